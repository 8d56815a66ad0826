//! Output encodings of embeddings, for the runner and any host that writes vectors out (the C
//! ABI, Python, a server): quantised types, base64, `.npy` and `.npz`.
//!
//! What each type is, exactly (`v` a unit vector of `d` values, or one multi-vector row):
//!
//! - [`EmbeddingType::Float`]: the f32 values.
//! - [`EmbeddingType::Ubinary`]: the sign bits `v[i] > 0` packed 8 to a byte, **most significant
//!   bit first**: byte `j` holds components `8j … 8j+7`, component `8j` in bit 7 (value 128).
//!   The last byte is padded with zero bits; `ceil(d / 8)` bytes. This is NumPy's
//!   `np.packbits(v > 0)` (big bit order), i.e. sentence-transformers' `precision="ubinary"` and
//!   jina's API `ubinary`.
//! - [`EmbeddingType::Binary`]: the same bytes as signed int8, shifted by −128 (`u − 128`: 0 →
//!   −128, 255 → 127): sentence-transformers' `precision="binary"` and jina's `binary`.
//! - [`EmbeddingType::Int8`]: sentence-transformers' scalar formula
//!   `((v − start) / step − 128).astype(int8)` with `step = (end − start) / 255`, computed in f64,
//!   truncated toward zero, with the **fixed** range `start = −1, end = 1` for every component:
//!   exactly `quantize_embeddings(v, "int8", ranges=np.array([[-1.0] * d, [1.0] * d]))`. Every
//!   component of a unit vector lies in that range, so no calibration set is needed.
//!   sentence-transformers without `ranges` or calibration embeddings instead takes each
//!   component's min and max over the batch being quantised, which would make a vector depend on
//!   the other inputs of its call; we never do that. The step is 2/255 ≈ 0.0078.
//!
//! base64 ([`base64_encode`]) is standard RFC 4648 with padding over the little-endian bytes
//! ([`Quantized::to_le_bytes`]): for floats what OpenAI's `encoding_format: "base64"` returns
//! (`np.frombuffer(base64.b64decode(s), dtype="<f4")`); for the byte types the bytes as they are.

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

use crate::{Error, Result};

/// The element type of written vectors. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmbeddingType {
    /// f32.
    #[default]
    Float,
    /// Packed sign bits as int8 (`u − 128`).
    Binary,
    /// Packed sign bits as uint8.
    Ubinary,
    /// Scalar int8 over the fixed range [−1, 1].
    Int8,
}

impl EmbeddingType {
    /// Every type.
    pub const ALL: [EmbeddingType; 4] =
        [EmbeddingType::Float, EmbeddingType::Binary, EmbeddingType::Ubinary, EmbeddingType::Int8];

    /// The name the command line and jina's API use.
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingType::Float => "float",
            EmbeddingType::Binary => "binary",
            EmbeddingType::Ubinary => "ubinary",
            EmbeddingType::Int8 => "int8",
        }
    }

    /// Values written for a `d`-wide vector.
    pub fn width(self, d: usize) -> usize {
        match self {
            EmbeddingType::Float | EmbeddingType::Int8 => d,
            EmbeddingType::Binary | EmbeddingType::Ubinary => d.div_ceil(8),
        }
    }

    /// The `.npy` dtype descriptor.
    pub fn npy_descr(self) -> &'static str {
        match self {
            EmbeddingType::Float => "<f4",
            EmbeddingType::Binary | EmbeddingType::Int8 => "|i1",
            EmbeddingType::Ubinary => "|u1",
        }
    }
}

impl fmt::Display for EmbeddingType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EmbeddingType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        EmbeddingType::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            Error::Input(format!(
                "unknown embedding type {s:?}: expected one of float, binary, ubinary, int8"
            ))
        })
    }
}

/// A vector in its written type.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantized {
    /// f32 values.
    F32(Vec<f32>),
    /// int8 values (binary, int8).
    I8(Vec<i8>),
    /// uint8 values (ubinary).
    U8(Vec<u8>),
}

impl Quantized {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Quantized::F32(v) => v.len(),
            Quantized::I8(v) => v.len(),
            Quantized::U8(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values' little-endian bytes (what `.npy` and base64 hold).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Quantized::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Quantized::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Quantized::U8(v) => v.clone(),
        }
    }

    /// A JSON array of the values, or with `base64` one string of their bytes.
    pub fn to_json(&self, base64: bool) -> Value {
        if base64 {
            return Value::String(base64_encode(&self.to_le_bytes()));
        }
        match self {
            Quantized::F32(v) => json!(v),
            Quantized::I8(v) => json!(v),
            Quantized::U8(v) => json!(v),
        }
    }
}

/// `v` in type `t`.
pub fn quantize(v: &[f32], t: EmbeddingType) -> Quantized {
    match t {
        EmbeddingType::Float => Quantized::F32(v.to_vec()),
        EmbeddingType::Ubinary => Quantized::U8(pack_sign_bits(v)),
        EmbeddingType::Binary => {
            Quantized::I8(pack_sign_bits(v).into_iter().map(|b| (b as i16 - 128) as i8).collect())
        }
        EmbeddingType::Int8 => Quantized::I8(v.iter().map(|&x| int8(x)).collect()),
    }
}

/// The sign bits `x > 0`, eight to a byte, most significant bit first, the last byte zero-padded
/// (`np.packbits(v > 0)`). NaN is not above zero: bit 0.
pub fn pack_sign_bits(v: &[f32]) -> Vec<u8> {
    v.chunks(8)
        .map(|c| c.iter().enumerate().fold(0u8, |b, (i, &x)| if x > 0.0 { b | (0x80 >> i) } else { b }))
        .collect()
}

/// One component as int8: `trunc((x − (−1)) / (2 / 255) − 128)` in f64, clamped to the int8 range
/// (a NaN gives 0, as a saturating cast does).
pub fn int8(x: f32) -> i8 {
    const START: f64 = -1.0;
    const END: f64 = 1.0;
    let step = (END - START) / 255.0;
    let q = (x as f64 - START) / step - 128.0;
    // `as` truncates toward zero and saturates at the type's bounds.
    q as i8
}

/// Standard base64 (RFC 4648 alphabet `A–Z a–z 0–9 + /`, `=` padding).
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `.npy` file (format 1.0, C order) of `shape` holding `data`, the little-endian bytes of
/// values of dtype `descr` (e.g. `<f4`, `|i1`, `<i8`).
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic (6) + version (2) + length (2) + header ends on a 64-byte boundary.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A `.npy` of equal-width rows of type `t`, or an [`Error::Input`] naming the first row whose
/// width differs (rows of different widths cannot share a matrix).
pub fn npy_rows(rows: &[Quantized], t: EmbeddingType) -> Result<Vec<u8>> {
    let cols = rows.first().map_or(0, Quantized::len);
    if let Some(i) = rows.iter().position(|r| r.len() != cols) {
        return Err(Error::Input(format!(
            "row {i} has {} values but row 0 has {cols}: a .npy matrix needs one width \
             (different \"dims\" per line?)",
            rows[i].len()
        )));
    }
    let data: Vec<u8> = rows.iter().flat_map(Quantized::to_le_bytes).collect();
    Ok(npy_bytes(t.npy_descr(), &[rows.len(), cols], &data))
}

/// An `.npz` (a zip of `.npy` members, stored uncompressed, as `np.savez` writes): each
/// `(name, npy bytes)` becomes the member `name.npy`. Errors past the 4 GiB of a plain zip.
pub fn npz_bytes(arrays: &[(&str, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let u32_of = |n: usize| {
        u32::try_from(n).map_err(|_| Error::Input("an .npz over 4 GiB (zip64 is not written)".into()))
    };
    for (name, data) in arrays {
        let name = format!("{name}.npy");
        let (crc, size, offset) = (crc32(data), u32_of(data.len())?, u32_of(out.len())?);
        // The fields both headers share: version needed 2.0, no flags, stored, 1980-01-01 00:00.
        let mut common = Vec::new();
        for v in [20u16, 0, 0, 0, 0x21] {
            common.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            common.extend_from_slice(&v.to_le_bytes());
        }
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes()); // extra field length
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        central.extend_from_slice(&common);
        for v in [0u16, 0, 0] {
            central.extend_from_slice(&v.to_le_bytes()); // comment, disk, internal attributes
        }
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_size) = (u32_of(out.len())?, u32_of(central.len())?);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    let n = arrays.len() as u16;
    for v in [0u16, 0, n, n] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    Ok(out)
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zip uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *t = c;
    }
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::jsonl::base64_decode;

    #[test]
    fn sign_bits_are_packed_most_significant_first() {
        // Signs + - 0 + - + + - | +  →  1001 0110 = 0x96 = 150, then 1000 0000 = 128 (padded).
        let v = [0.5, -0.1, 0.0, 2.0, -3.0, 0.1, 0.2, -0.2, 0.7];
        assert_eq!(pack_sign_bits(&v), vec![0x96, 0x80]);
        assert_eq!(quantize(&v, EmbeddingType::Ubinary), Quantized::U8(vec![150, 128]));
        assert_eq!(quantize(&v, EmbeddingType::Binary), Quantized::I8(vec![22, 0]));
        assert_eq!(quantize(&[-1.0; 8], EmbeddingType::Binary), Quantized::I8(vec![-128]));
        assert_eq!(quantize(&[1.0; 16], EmbeddingType::Binary), Quantized::I8(vec![127, 127]));
        assert_eq!(pack_sign_bits(&[f32::NAN, 1.0]), vec![0x40]);
        assert_eq!(EmbeddingType::Binary.width(2048), 256);
        assert_eq!(EmbeddingType::Ubinary.width(9), 2);
    }

    #[test]
    fn int8_is_the_scalar_formula_over_minus_one_to_one() {
        // (x + 1) / (2/255) − 128, truncated toward zero: 1 → 127, −1 → −128, 0 → −0.5 → 0,
        // 0.5 → 63.25 → 63, −0.5 → −64.25 → −64, 0.3 → 37.75 → 37, −0.02 → −3.05 → −3.
        let v = [1.0, -1.0, 0.0, 0.5, -0.5, 0.3, -0.02];
        assert_eq!(quantize(&v, EmbeddingType::Int8), Quantized::I8(vec![127, -128, 0, 63, -64, 37, -3]));
        assert_eq!(int8(5.0), 127);
        assert_eq!(int8(-5.0), -128);
    }

    #[test]
    fn base64_is_rfc4648_and_round_trips() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        // 1.0f32 little-endian is 00 00 80 3f.
        assert_eq!(Quantized::F32(vec![1.0]).to_json(true), json!("AACAPw=="));
        let v = Quantized::F32(vec![0.25, -3.5, 1e-7]);
        let back = base64_decode(v.to_json(true).as_str().unwrap()).unwrap();
        let floats: Vec<f32> = back.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(floats, vec![0.25, -3.5, 1e-7]);
        assert_eq!(Quantized::I8(vec![-1, 2]).to_json(false), json!([-1, 2]));
        assert_eq!(Quantized::I8(vec![-1, 2]).to_json(true), json!(base64_encode(&[0xFF, 2])));
    }

    #[test]
    fn npy_header_is_aligned_and_mixed_widths_are_refused() {
        let rows = vec![Quantized::F32(vec![1.0, 2.0]), Quantized::F32(vec![3.0, 4.0])];
        let b = npy_rows(&rows, EmbeddingType::Float).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 2)"), "{header}");
        assert_eq!(&b[10 + hlen..], &[1.0f32, 2.0, 3.0, 4.0].map(f32::to_le_bytes).concat()[..]);
        let one = npy_bytes("<i8", &[3], &[0; 24]);
        assert!(std::str::from_utf8(&one[10..74]).unwrap().contains("'shape': (3,)"));
        let mixed = vec![Quantized::F32(vec![1.0, 2.0]), Quantized::F32(vec![3.0])];
        let e = npy_rows(&mixed, EmbeddingType::Float).unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains("row 1 has 1 values"), "{e}");
    }

    #[test]
    fn crc32_and_zip_layout() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926); // the standard check value
        let a = npy_bytes("|u1", &[2], &[7, 9]);
        let z = npz_bytes(&[("data", a.clone()), ("offsets", vec![1, 2, 3])]).unwrap();
        assert_eq!(&z[..4], &[0x50, 0x4b, 0x03, 0x04]);
        assert_eq!(&z[30..38], b"data.npy");
        assert_eq!(&z[38..38 + a.len()], &a[..]);
        assert_eq!(u32::from_le_bytes(z[14..18].try_into().unwrap()), crc32(&a));
        let eocd = &z[z.len() - 22..];
        assert_eq!(&eocd[..4], &[0x50, 0x4b, 0x05, 0x06]);
        assert_eq!(u16::from_le_bytes([eocd[10], eocd[11]]), 2);
    }
}
