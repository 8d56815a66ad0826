//! Input limits: how much one request may make the engine read, hold and decode. A host hands the
//! engine whatever its users send; these bounds keep one input from taking the host's memory,
//! blocking a thread, or reading files it should not (docs/RELIABILITY.md).
//!
//! - **Lines** (`jv4 embed`): a line over [`Limits::max_line_bytes`] is an error of its own;
//!   [`read_line`] holds at most that many bytes of it (plus one) while skipping the rest.
//! - **Texts** over [`Limits::max_text_bytes`] are refused, not cut. Cutting before tokenizing
//!   would change the token-level result of the reference's truncation unless the cut provably
//!   lies past the `max_length`-th token, and for a byte-level BPE behind an NFC normaliser that
//!   bound (bytes per token × normalisation ratio) is far above any sensible limit. So a text
//!   within the limit is tokenized whole and truncated exactly as the reference does, and a text
//!   over it gets a clear error.
//! - **Base64 strings** over [`Limits::max_base64_bytes`] are refused before decoding.
//! - **Image files and bytes** over [`Limits::max_image_file_bytes`] are refused. A path is
//!   opened without blocking (`O_NONBLOCK`, so a FIFO cannot hang the run), checked with `fstat`
//!   to be a regular file (no FIFOs, devices such as `/dev/zero`, directories), and read for at
//!   most the limit plus one byte, so a file that grows while it is read is still bounded.
//!   With [`Limits::image_root`] set, a path must resolve (symlinks followed) inside that folder.
//! - **Decoded pixels** ([`Limits::max_image_pixels`]) are checked on the header and passed on to
//!   the decoders (see [`crate::engine::image::DecodeLimits`]).
//!
//! Error messages name the limit and the file, never the file's contents.

use std::fs::File;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The size limits of one engine. `Default` protects a host; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes in one JSON line of `jv4 embed` (default 48 MiB: a base64 image at its limit).
    pub max_line_bytes: usize,
    /// Most UTF-8 bytes in one text (default 2 MiB: about 500k tokens of English, far past the
    /// 32768-token `max_length`, and at most ~2 s of tokenizing; longer texts are refused, not
    /// cut: see the module docs).
    pub max_text_bytes: usize,
    /// Most characters of one `image_base64` string (default 45 MiB: an image file at its limit).
    pub max_base64_bytes: usize,
    /// Most bytes of one image file or encoded image (default 32 MiB).
    pub max_image_file_bytes: u64,
    /// Most pixels (width × height) of a decoded image (default 178,956,970, PIL's decompression
    /// bomb threshold, so that every image the reference accepts is accepted).
    pub max_image_pixels: u64,
    /// When set, image paths must resolve inside this folder (relative paths are taken from it).
    pub image_root: Option<PathBuf>,
}

/// Default [`Limits::max_image_file_bytes`].
pub const DEFAULT_MAX_IMAGE_FILE_BYTES: u64 = 32 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 48 << 20,
            max_text_bytes: 2 << 20,
            max_base64_bytes: 45 << 20,
            max_image_file_bytes: DEFAULT_MAX_IMAGE_FILE_BYTES,
            max_image_pixels: crate::engine::image::DEFAULT_MAX_INPUT_PIXELS,
            image_root: None,
        }
    }
}

impl Limits {
    /// Checks that none of the limits is zero.
    pub fn validate(&self) -> Result<()> {
        if self.max_line_bytes == 0
            || self.max_text_bytes == 0
            || self.max_base64_bytes == 0
            || self.max_image_file_bytes == 0
            || self.max_image_pixels == 0
        {
            return Err(Error::Input(format!("every limit must be at least 1: {self:?}")));
        }
        Ok(())
    }

    /// A text within [`Limits::max_text_bytes`], or an error saying by how much it is over.
    pub fn check_text(&self, text: &str) -> Result<()> {
        if text.len() > self.max_text_bytes {
            return Err(Error::Input(format!(
                "text of {} bytes is over the limit of {} bytes (max_text_bytes)",
                text.len(),
                self.max_text_bytes
            )));
        }
        Ok(())
    }

    /// A base64 string within [`Limits::max_base64_bytes`] (checked before it is decoded).
    pub fn check_base64(&self, s: &str) -> std::result::Result<(), String> {
        if s.len() > self.max_base64_bytes {
            return Err(format!(
                "{} characters, over the limit of {} (max_base64_bytes)",
                s.len(),
                self.max_base64_bytes
            ));
        }
        Ok(())
    }

    /// Encoded image bytes within [`Limits::max_image_file_bytes`].
    pub fn check_image_bytes(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 > self.max_image_file_bytes {
            return Err(Error::Input(format!(
                "encoded image of {} bytes is over the limit of {} bytes (max_image_file_bytes)",
                bytes.len(),
                self.max_image_file_bytes
            )));
        }
        Ok(())
    }

    /// Where an image path leads: itself, or with [`Limits::image_root`] set, its canonical form,
    /// which must lie inside the (canonical) root. Relative paths are then taken from the root.
    pub fn resolve_image_path(&self, path: &Path) -> Result<PathBuf> {
        let Some(root) = &self.image_root else {
            return Ok(path.to_path_buf());
        };
        let root = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
        let joined = root.join(path); // an absolute `path` replaces the root here
        let real = std::fs::canonicalize(&joined).map_err(|e| Error::io(path, e))?;
        if !real.starts_with(&root) {
            return Err(Error::Input(format!(
                "{}: outside the image root {} (image_root)",
                path.display(),
                root.display()
            )));
        }
        Ok(real)
    }

    /// Reads an image file within the limits: only a regular file (checked on the open handle,
    /// which was opened without blocking), at most [`Limits::max_image_file_bytes`] bytes, and
    /// inside [`Limits::image_root`] when set. Errors name the path, never its contents.
    pub fn read_image_file(&self, path: &Path) -> Result<Vec<u8>> {
        let real = self.resolve_image_path(path)?;
        let file = open_nonblocking(&real).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::Input(format!(
                "{}: not a regular file ({}); images are read from regular files only",
                path.display(),
                file_kind(&meta)
            )));
        }
        let max = self.max_image_file_bytes;
        let too_big = || {
            Error::Input(format!(
                "{}: image file is over the limit of {max} bytes (max_image_file_bytes)",
                path.display()
            ))
        };
        if meta.len() > max {
            return Err(too_big());
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(meta.len() as usize).map_err(|_| too_big())?;
        file.take(max + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > max {
            return Err(too_big()); // it grew after fstat
        }
        Ok(bytes)
    }
}

/// `O_NONBLOCK` on Linux (x86-64, aarch64 and most others): opening a FIFO for reading returns at
/// once instead of waiting for a writer. Regular files ignore it.
#[cfg(target_os = "linux")]
const O_NONBLOCK: i32 = 0o4000;

fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(O_NONBLOCK);
    }
    o.open(path)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

/// Reads one line (up to and including `\n`) into `buf` (cleared first), keeping at most
/// `max + 1` bytes of it: a longer line is consumed to its end but only its start is kept, so its
/// length shows it is over `max` while memory stays bounded. Returns the bytes consumed (0 at the
/// end of the input), like [`BufRead::read_until`].
pub fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    buf.clear();
    let mut consumed = 0usize;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = (max + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_bounds_what_it_keeps_and_consumes_the_whole_line() {
        let data = b"short\nthis line is far too long\nok\n";
        let mut r = std::io::BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), 6);
        assert_eq!(buf, b"short\n");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), 26);
        assert_eq!(buf.len(), 9, "kept max + 1 bytes");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), 3);
        assert_eq!(buf, b"ok\n");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), 0);
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(Limits::default().validate().is_ok());
        assert!(Limits { max_text_bytes: 0, ..Limits::default() }.validate().is_err());
    }
}
