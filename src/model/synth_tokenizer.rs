//! `tokenizer.json` for synthetic checkpoints: a small byte-level BPE tokenizer in the format and
//! pipeline of the real Qwen2 one (NFC, the Qwen2 split regex, byte-level mapping, BPE), with
//! every special token at the id `config.json` names, so that a synthetic folder is a complete
//! model folder (docs/MODEL.md §1.2, §3).
//!
//! - Ids `0..256` are the 256 bytes (byte `b` is id `b`, in the byte-level alphabet), so any
//!   UTF-8 text encodes without an unknown token.
//! - Ids `256..` are merges learned by [`train_merges`] on a small built-in multilingual corpus
//!   ([`CORPUS`]), at most up to the lowest special id; prompts and common words become
//!   multi-byte tokens as with the real tokenizer.
//! - The 22 Qwen2 added tokens sit at the config's ids where the config names them
//!   (`bos_token_id` = `<|endoftext|>`, `eos_token_id` = `<|im_end|>`, vision start/end/pad, image
//!   pad, video pad) and at their real offset from `bos_token_id` otherwise (`<|im_start|>` =
//!   bos + 1, …). The `tokenizers` crate numbers added tokens from the model's vocabulary size
//!   unless the model already holds them, so each one is also a BPE vocabulary entry at its id;
//!   no merge produces them, so they only come from the added-token split. The ids between the
//!   last merge and the first special are unused (the serialiser logs a "holes" warning through
//!   `log`, which nothing here listens to).
//!
//! The output is a pure function of the config: the training breaks ties by symbol order and the
//! serialiser orders vocabulary, merges and added tokens by id.

use crate::model::config::ModelConfig;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// The file name in a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Most merges to learn (the corpus usually runs out first); keeps the file small for both presets.
pub const MAX_MERGES: usize = 1500;

/// The Qwen2 pre-tokenizer's split pattern (contractions, letter runs with one leading non-letter,
/// single digits, punctuation runs, newlines, spaces).
const SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 added tokens in their real order: (content, offset from `<|endoftext|>`, special).
/// The first 14 are special in the real file, the tool/FIM markers are not.
const ADDED: [(&str, u32, bool); 22] = [
    ("<|endoftext|>", 0, true),
    ("<|im_start|>", 1, true),
    ("<|im_end|>", 2, true),
    ("<|object_ref_start|>", 3, true),
    ("<|object_ref_end|>", 4, true),
    ("<|box_start|>", 5, true),
    ("<|box_end|>", 6, true),
    ("<|quad_start|>", 7, true),
    ("<|quad_end|>", 8, true),
    ("<|vision_start|>", 9, true),
    ("<|vision_end|>", 10, true),
    ("<|vision_pad|>", 11, true),
    ("<|image_pad|>", 12, true),
    ("<|video_pad|>", 13, true),
    ("<tool_call>", 14, false),
    ("</tool_call>", 15, false),
    ("<|fim_prefix|>", 16, false),
    ("<|fim_middle|>", 17, false),
    ("<|fim_suffix|>", 18, false),
    ("<|fim_pad|>", 19, false),
    ("<|repo_name|>", 20, false),
    ("<|file_sep|>", 21, false),
];

/// One added token of the synthetic tokenizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedSpecial {
    /// The token string, e.g. `"<|image_pad|>"`.
    pub content: &'static str,
    /// Its id.
    pub id: u32,
    /// Whether it is flagged special (skipped when decoding with `skip_special_tokens`).
    pub special: bool,
}

/// The added tokens for `cfg`, in id order: the config's ids where it names them, the real offset
/// from `bos_token_id` otherwise. Fails if two land on one id or one is outside the vocabulary.
pub fn added_tokens(cfg: &ModelConfig) -> Result<Vec<AddedSpecial>> {
    let s = &cfg.special;
    let named = |content: &str| -> Option<u32> {
        match content {
            "<|endoftext|>" => Some(s.bos_token_id),
            "<|im_end|>" => Some(s.eos_token_id),
            "<|vision_start|>" => Some(s.vision_start_token_id),
            "<|vision_end|>" => Some(s.vision_end_token_id),
            "<|image_pad|>" => Some(s.image_token_id),
            "<|vision_pad|>" => s.vision_token_id,
            "<|video_pad|>" => s.video_token_id,
            _ => None,
        }
    };
    let mut out: Vec<AddedSpecial> = ADDED
        .iter()
        .map(|&(content, off, special)| AddedSpecial {
            content,
            id: named(content).unwrap_or(s.bos_token_id + off),
            special,
        })
        .collect();
    out.sort_by_key(|t| t.id);
    for w in out.windows(2) {
        if w[0].id == w[1].id {
            return Err(Error::Tokenizer(format!(
                "synthetic tokenizer: {} and {} would share id {}",
                w[0].content, w[1].content, w[0].id
            )));
        }
    }
    let vocab = cfg.text.vocab_size;
    if let Some(t) = out.iter().find(|t| t.id as usize >= vocab) {
        return Err(Error::Tokenizer(format!(
            "synthetic tokenizer: {} at id {} is not below vocab_size {vocab}",
            t.content, t.id
        )));
    }
    Ok(out)
}

/// Builds the tokenizer for `cfg` (see the module documentation).
pub fn build(cfg: &ModelConfig) -> Result<Tokenizer> {
    let added = added_tokens(cfg)?;
    let first_special = added[0].id as usize;
    if first_special < 256 {
        return Err(Error::Tokenizer(format!(
            "synthetic tokenizer: special id {first_special} leaves no room for the 256 byte tokens"
        )));
    }
    let pre = pre_tokenizer()?;
    let alphabet = byte_alphabet();
    let (symbols, merges) = train_merges(&pre, &alphabet, MAX_MERGES.min(first_special - 256))?;

    let mut vocab: Vocab = symbols.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();
    for t in &added {
        // A merge that spelled out a special string would give it two ids.
        if vocab.insert(t.content.to_string(), t.id).is_some() {
            return Err(Error::Tokenizer(format!(
                "synthetic tokenizer: the corpus merges produce the added token {}",
                t.content
            )));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: BPE: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NFC)).map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: {e}")))?;
    tok.with_pre_tokenizer(Some(pre));
    tok.with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level())));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level())));
    let tokens: Vec<AddedToken> =
        added.iter().map(|t| AddedToken::from(t.content, t.special).normalized(false)).collect();
    tok.add_tokens(tokens).map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: {e}")))?;
    check_ids(&tok, &added, "built")?;
    Ok(tok)
}

/// Builds the tokenizer for `cfg`, writes it to `dir/tokenizer.json` and loads it back, so that a
/// file the `tokenizers` crate cannot read, or one whose specials moved, is an error here.
pub fn write(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    let tok = build(cfg)?;
    let path = dir.join(TOKENIZER_FILE);
    let text = tok.to_string(true).map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    let back = Tokenizer::from_file(&path)
        .map_err(|e| Error::Tokenizer(format!("{}: written but unreadable: {e}", path.display())))?;
    check_ids(&back, &added_tokens(cfg)?, "reloaded")
}

fn check_ids(tok: &Tokenizer, added: &[AddedSpecial], what: &str) -> Result<()> {
    for t in added {
        let got = tok.token_to_id(t.content);
        // The string must also encode to exactly that one id (split out before BPE).
        let enc = tok
            .encode_fast(t.content, true)
            .map_err(|e| Error::Tokenizer(format!("synthetic tokenizer ({what}): {e}")))?;
        if got != Some(t.id) || enc.get_ids() != [t.id] {
            return Err(Error::Tokenizer(format!(
                "synthetic tokenizer ({what}): {} has id {got:?} and encodes to {:?}, expected {}",
                t.content,
                enc.get_ids(),
                t.id
            )));
        }
    }
    Ok(())
}

fn byte_level() -> ByteLevel {
    ByteLevel::new(false, false, false)
}

/// NFC is applied by the normalizer; this is the Qwen2 split followed by the byte-level mapping.
fn pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(SPLIT_REGEX.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: split regex: {e}")))?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level()),
    ])))
}

/// The byte-level alphabet: the character byte `b` is written as, for `b` in `0..256`. Printable
/// Latin-1 bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; the other 68 take the code
/// points from U+0100 up, in byte order (the GPT-2 convention the `tokenizers` ByteLevel uses).
pub fn byte_alphabet() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut out = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let cp = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(cp).expect("below the surrogate range");
    }
    out
}

/// Learns up to `budget` merges on [`CORPUS`]: words are the pre-tokenizer's pieces, counted; at
/// each step the most frequent adjacent symbol pair becomes one symbol, ties going to the smallest
/// pair of strings. Returns the symbol table (the 256 bytes, then one new symbol per merge whose
/// result is new) and the merges in rank order.
pub fn train_merges(
    pre: &PreTokenizerWrapper,
    alphabet: &[char; 256],
    budget: usize,
) -> Result<(Vec<String>, Merges)> {
    let mut symbols: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut index: HashMap<String, u32> =
        symbols.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();

    let mut pts = PreTokenizedString::from(CORPUS);
    pre.pre_tokenize(&mut pts).map_err(|e| Error::Tokenizer(format!("synthetic tokenizer: {e}")))?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(piece.to_string()).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, u64)> =
        counts.into_iter().map(|(w, n)| (w.chars().map(|c| index[&c.to_string()]).collect(), n)).collect();

    let mut merges: Merges = Vec::new();
    while merges.len() < budget {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        let Some((&(a, b), _)) = pairs.iter().max_by(|(pa, na), (pb, nb)| {
            let key = |p: &(u32, u32)| (symbols[p.0 as usize].clone(), symbols[p.1 as usize].clone());
            na.cmp(nb).then_with(|| key(pb).cmp(&key(pa)))
        }) else {
            break;
        };
        let joined = format!("{}{}", symbols[a as usize], symbols[b as usize]);
        let id = *index.entry(joined.clone()).or_insert_with(|| {
            symbols.push(joined);
            symbols.len() as u32 - 1
        });
        merges.push((symbols[a as usize].clone(), symbols[b as usize].clone()));
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = id;
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
    }
    Ok((symbols, merges))
}

/// Training text, written for this file: the prompt templates and a mix of scripts, so that the
/// prompts and frequent words get their own tokens and other scripts at least their frequent
/// byte pairs.
pub const CORPUS: &str = "\
Query: what is the capital of France?
Passage: Paris is the capital and the largest city of France, on the river Seine.
Query: how do I sort a list in Python?
Passage: Use the sorted function, which returns a new list, or the sort method of the list.
Query: Describe the image.
Passage: The image shows a small red boat on a calm lake in the early morning.
user
Describe the image.
Query: which planet is the largest in the solar system?
Passage: Jupiter is the largest planet; it is a gas giant with a great red spot.
Query: what does an embedding model do?
Passage: An embedding model maps a text or an image to a vector, so that similar inputs \
get vectors that are close to each other. Search engines compare a query vector with the \
vectors of many passages and return the passages that are nearest.
Passage: The quick brown fox jumps over the lazy dog. The dog does not move; the fox runs \
into the forest and the birds in the trees begin to sing.
Passage: Rain fell all night over the hills, and in the morning the streets of the town were \
still wet. People walked to work with umbrellas, and the children went to school.
Passage: A language model reads tokens and predicts the next one. Tokens are pieces of words: \
frequent words are one token, rare words are split into several pieces, and any byte can be a \
token of its own.
Query: def add(a, b): return a + b
Passage: fn main() { let x = 42; println!(\"{x}\"); }
Passage: for (int i = 0; i < n; i++) { sum += values[i]; }
Passage: SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;
Passage: The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 are written with digits.
Query: Wie spät ist es? Passage: Es ist halb neun am Morgen, und die Sonne scheint über der Stadt.
Query: Où est la gare ? Passage: La gare est à côté du marché, au bout de la rue principale.
Query: ¿Dónde está la biblioteca? Passage: La biblioteca está en la plaza, junto al museo.
Query: Qual é o seu nome? Passage: O meu nome é Ana e eu moro perto do mar.
Query: Как дела? Passage: Спасибо, всё хорошо. Сегодня тёплый день, и мы идём гулять в парк.
Query: Τι ώρα είναι; Passage: Είναι δέκα το πρωί και ο ουρανός είναι καθαρός.
Query: 今天天气怎么样？ Passage: 今天天气很好，我们去公园散步吧。图像显示一只小猫。
Query: 駅はどこですか？ Passage: 駅はこの道をまっすぐ行って、左に曲がったところにあります。
Query: 오늘 날씨 어때요? Passage: 오늘은 맑고 따뜻해요. 공원에서 산책해요.
Query: أين المكتبة؟ Passage: المكتبة بجانب المدرسة في وسط المدينة.
Query: आप कैसे हैं? Passage: मैं ठीक हूँ, धन्यवाद। आज मौसम अच्छा है।
Query: מה השעה? Passage: השעה עשר בבוקר.
Query: Bugün hava nasıl? Passage: Bugün hava güneşli ve sıcak.
Passage: emoji 😀 🎉 👍 🚀 ❤️ and symbols © ® ™ € £ ¥ ± × ÷ → ∞
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection_onto_256_distinct_chars() {
        let a = byte_alphabet();
        let distinct: std::collections::BTreeSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], 'Ġ', "space is U+0120 in the byte-level alphabet");
        assert_eq!(a[b'\n' as usize], 'Ċ');
    }

    fn tiny_config(edit: impl FnOnce(&mut serde_json::Value)) -> ModelConfig {
        let mut v = crate::model::synth::config_json(crate::model::synth::Preset::Tiny);
        edit(&mut v);
        ModelConfig::from_json_str(&v.to_string(), Path::new("t/config.json")).unwrap()
    }

    #[test]
    fn added_tokens_follow_the_config_and_reject_collisions() {
        let cfg = tiny_config(|_| {});
        let added = added_tokens(&cfg).unwrap();
        let id = |c: &str| added.iter().find(|t| t.content == c).unwrap().id;
        assert_eq!(id("<|image_pad|>"), cfg.special.image_token_id);
        assert_eq!(id("<|im_start|>"), cfg.special.bos_token_id + 1);
        assert!(added.windows(2).all(|w| w[0].id < w[1].id), "sorted, distinct");

        // Ids the config moves are honoured, wherever they are.
        let moved = tiny_config(|v| v["image_token_id"] = serde_json::json!(1900));
        assert_eq!(
            added_tokens(&moved).unwrap()[0],
            AddedSpecial { content: "<|image_pad|>", id: 1900, special: true }
        );
        let tok = build(&moved).unwrap();
        assert_eq!(tok.token_to_id("<|image_pad|>"), Some(1900));

        // image_token_id on <|im_start|>'s id (bos + 1): refused, naming both.
        let clash = tiny_config(|v| v["image_token_id"] = serde_json::json!(2001));
        let msg = added_tokens(&clash).unwrap_err().to_string();
        assert!(
            msg.contains("<|im_start|>") && msg.contains("<|image_pad|>") && msg.contains("2001"),
            "{msg}"
        );

        // The last unnamed token (bos + 21) past the vocabulary.
        let high = tiny_config(|v| v["bos_token_id"] = serde_json::json!(2040));
        let msg = added_tokens(&high).unwrap_err().to_string();
        assert!(msg.contains("vocab_size 2048"), "{msg}");

        // No room for the byte tokens below the first special.
        let low = tiny_config(|v| v["image_token_id"] = serde_json::json!(100));
        assert!(build(&low).unwrap_err().to_string().contains("256 byte tokens"));
    }

    #[test]
    fn training_respects_the_budget_and_is_deterministic() {
        let pre = pre_tokenizer().unwrap();
        let alphabet = byte_alphabet();
        let (s1, m1) = train_merges(&pre, &alphabet, 50).unwrap();
        let (s2, m2) = train_merges(&pre, &alphabet, 50).unwrap();
        assert_eq!(m1.len(), 50);
        assert_eq!((&s1, &m1), (&s2, &m2));
        assert!(s1.len() <= 256 + 50);
        // Every merge joins two existing symbols into one that is in the table.
        for (a, b) in &m1 {
            assert!(s1.contains(a) && s1.contains(b) && s1.contains(&format!("{a}{b}")), "{a} {b}");
        }
    }
}
