//! The synthetic model folder is complete: its tokenizer.json loads through the engine's
//! tokenizer with every special token at the id config.json names, encodes any text within the
//! vocabulary, and `jv4 synth` output runs through the CPU model.

use jv4::engine::image::{preprocess, ImageConfig, RgbImage8};
use jv4::engine::{PromptName, TextTokenizer, Truncation};
use jv4::model::batch::{ImageInput, PackedBatch};
use jv4::model::checkpoint::Checkpoint;
use jv4::model::config::ModelConfig;
use jv4::model::cpu::CpuModel;
use jv4::model::plan::GridThw;
use jv4::model::synth::{config_json, write_checkpoint, Preset, SynthSpec};
use jv4::model::synth_tokenizer;
use jv4::model::{Dtype, Task};
use std::path::Path;
use std::process::Command;

const IMAGE_PREFIX: &str = "<|im_start|>user\n<|vision_start|>";
const IMAGE_SUFFIX: &str = "<|vision_end|>Describe the image.<|im_end|>\n";

/// Texts in many scripts, with emoji, combining marks, control characters and odd spacing.
const TEXTS: [&str; 12] = [
    "What is the capital of France?",
    "Die Straße führt über den Fluß zur Brücke.",
    "Привет, как твои дела сегодня?",
    "机器学习模型把文本映射到向量空间。",
    "東京は日本の首都です。カタカナ、ひらがな",
    "안녕하세요, 만나서 반갑습니다",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, यह एक परीक्षण है",
    "👩‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 😀😀😀 ✨",
    "e\u{301}te\u{301} — ǅ ﬁ ① ℌ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{200b}zero\u{feff}width",
    "tabs\tand\r\nnewlines\n\n\n   spaces    and \u{0} \u{7f} controls",
    "fn main() { println!(\"{}\", 1 + 2); } // <not|a|special>",
];

fn synth(dir: &Path, seed: u64) -> ModelConfig {
    write_checkpoint(dir, &SynthSpec { seed, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 }).unwrap();
    Checkpoint::open(dir).unwrap().config.clone()
}

fn tiny() -> (tempfile::TempDir, ModelConfig, TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 7);
    let tok = TextTokenizer::from_model_dir(dir.path()).unwrap();
    (dir, cfg, tok)
}

#[test]
fn special_tokens_sit_at_the_config_ids() {
    let (_d, cfg, tok) = tiny();
    let s = &cfg.special;
    let named = [
        ("<|endoftext|>", Some(s.bos_token_id)),
        ("<|im_end|>", Some(s.eos_token_id)),
        ("<|vision_start|>", Some(s.vision_start_token_id)),
        ("<|vision_end|>", Some(s.vision_end_token_id)),
        ("<|image_pad|>", Some(s.image_token_id)),
        ("<|vision_pad|>", s.vision_token_id),
        ("<|video_pad|>", s.video_token_id),
    ];
    for (content, id) in named {
        let id = id.unwrap_or_else(|| panic!("the synthetic config names {content}"));
        assert_eq!(tok.token_id(content), Some(id), "{content}");
        assert_eq!(tok.encode_raw(content).unwrap(), vec![id], "{content} encodes to its one id");
    }
    // Not named by the config: the real layout's offset from bos.
    assert_eq!(tok.token_id("<|im_start|>"), Some(s.bos_token_id + 1));
    // All 22 added tokens: distinct, below the vocabulary.
    let added = synth_tokenizer::added_tokens(&cfg).unwrap();
    assert_eq!(added.len(), 22);
    for t in &added {
        assert_eq!(tok.token_id(t.content), Some(t.id), "{}", t.content);
        assert!((t.id as usize) < cfg.text.vocab_size, "{} at {}", t.content, t.id);
    }
}

#[test]
fn prompts_and_texts_encode_within_the_vocabulary_and_round_trip() {
    let (d, cfg, tok) = tiny();
    let first_special = synth_tokenizer::added_tokens(&cfg).unwrap()[0].id;
    let raw = tokenizers::Tokenizer::from_file(d.path().join("tokenizer.json")).unwrap();
    for text in TEXTS {
        for task in Task::ALL {
            for prompt in PromptName::ALL {
                let enc = tok.encode_prompted(task, prompt, text, Truncation::default()).unwrap();
                assert_eq!(enc.dropped, 0);
                // Ordinary text never produces a special id, let alone one outside the vocabulary.
                assert!(enc.ids.iter().all(|&i| i < first_special), "{text:?}: {:?}", enc.ids);
                // Byte-level: nothing is lost (the input is NFC-normalised first).
                let prefix = jv4::engine::prompt_prefix(task, prompt);
                let back = raw.decode(&enc.ids, false).unwrap();
                let want: String = nfc(&format!("{prefix}{text}"));
                assert_eq!(back, want, "{text:?}");
                // Deterministic.
                let again = tok.encode_prompted(task, prompt, text, Truncation::default()).unwrap();
                assert_eq!(again, enc);
            }
        }
    }
    // The prefix merges into whole tokens, as with the real tokenizer (not one token per byte).
    let q = tok.encode_prompted(Task::Retrieval, PromptName::Query, "", Truncation::default()).unwrap();
    assert!(q.ids.len() < "Query: ".len(), "{:?}", q.ids);
    // Batch encoding agrees with one by one.
    let items: Vec<(Task, PromptName, &str)> =
        TEXTS.iter().map(|&t| (Task::Code, PromptName::Passage, t)).collect();
    for (r, &(t, p, s)) in tok.encode_batch_prompted(&items, Truncation::default()).into_iter().zip(&items) {
        assert_eq!(r.unwrap(), tok.encode_prompted(t, p, s, Truncation::default()).unwrap());
    }
}

/// NFC through the tokenizers crate (the same normaliser the tokenizer applies).
fn nfc(s: &str) -> String {
    use tokenizers::{NormalizedString, Normalizer};
    let mut n = NormalizedString::from(s);
    tokenizers::normalizers::NFC.normalize(&mut n).unwrap();
    n.get().to_string()
}

#[test]
fn image_template_encodes_around_the_vision_span() {
    let (_d, cfg, tok) = tiny();
    let s = &cfg.special;
    let pre = tok.encode_raw(IMAGE_PREFIX).unwrap();
    let suf = tok.encode_raw(IMAGE_SUFFIX).unwrap();
    assert_eq!(pre.first(), Some(&(s.bos_token_id + 1)), "starts with <|im_start|>: {pre:?}");
    assert_eq!(pre.last(), Some(&s.vision_start_token_id), "{pre:?}");
    assert_eq!(suf.first(), Some(&s.vision_end_token_id), "{suf:?}");
    assert!(suf.contains(&s.eos_token_id), "<|im_end|> in {suf:?}");
    assert!(pre.len() >= 3 && suf.len() >= 4, "{pre:?} {suf:?}");
    // The whole template with one pad: the specials come out exactly once each, in order.
    let all = tok.encode_raw(&format!("{IMAGE_PREFIX}<|image_pad|>{IMAGE_SUFFIX}")).unwrap();
    let mut want = pre.clone();
    want.push(s.image_token_id);
    want.extend(&suf);
    assert_eq!(all, want);
    assert!(all.iter().all(|&i| (i as usize) < cfg.text.vocab_size));
}

#[test]
fn the_file_is_deterministic_and_the_full_preset_builds() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    synth(a.path(), 1);
    synth(b.path(), 2); // the seed changes the weights, not the tokenizer
    let ta = std::fs::read(a.path().join("tokenizer.json")).unwrap();
    let tb = std::fs::read(b.path().join("tokenizer.json")).unwrap();
    assert!(ta == tb, "tokenizer.json differs between two synth runs");

    // Full: the real special ids, without writing 7.5 GB of weights.
    let full = config_json(Preset::Full);
    let cfg = ModelConfig::from_json_str(&full.to_string(), Path::new("full/config.json")).unwrap();
    let tok = synth_tokenizer::build(&cfg).unwrap();
    for (content, id) in [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|image_pad|>", 151655)] {
        assert_eq!(tok.token_to_id(content), Some(id), "{content}");
    }
    for text in TEXTS {
        let ids = tok.encode_fast(text, true).unwrap().get_ids().to_vec();
        assert!(!ids.is_empty() && ids.iter().all(|&i| (i as usize) < cfg.text.vocab_size), "{text:?}");
    }
}

/// `jv4 synth --out D`, then D's tokenizer and CPU model embed a text and an image in one forward.
#[test]
fn synth_command_output_runs_on_the_cpu_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let o = Command::new(env!("CARGO_BIN_EXE_jv4"))
        .args(["synth", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let tok = TextTokenizer::from_model_dir(&out).unwrap();
    let ckpt = Checkpoint::open(&out).unwrap();
    let model = CpuModel::from_checkpoint(&ckpt).unwrap();
    let cfg = model.config().clone();

    let text =
        tok.encode_prompted(Task::Retrieval, PromptName::Query, "Ein kurzer Satz 🙂", Truncation::default());
    let text_ids = text.unwrap().ids;

    // A 56×56 noise image: the minimum size, a 4×4 patch grid, 4 merged tokens.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let data = (0..56 * 56 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    let p = preprocess(&RgbImage8 { width: 56, height: 56, data }, &ImageConfig::default()).unwrap();
    let grid = GridThw { t: p.grid_thw[0], h: p.grid_thw[1], w: p.grid_thw[2] };
    let merge = cfg.vision.spatial_merge_size;
    let mut image_ids = tok.encode_raw(IMAGE_PREFIX).unwrap();
    image_ids.extend(std::iter::repeat_n(cfg.special.image_token_id, grid.merged_tokens(merge)));
    image_ids.extend(tok.encode_raw(IMAGE_SUFFIX).unwrap());

    let mut batch = PackedBatch::new(&cfg);
    batch.push_text(&text_ids, Task::Retrieval).unwrap();
    batch.push(&image_ids, Task::Code, vec![ImageInput::new(grid, p.pixel_values)]).unwrap();
    batch.want_multi = true;
    let out = model.forward(&batch).unwrap();
    let (hid, pd) = (cfg.text.hidden_size, cfg.multi_vector_projector_dim);
    let multi = out.multi.as_ref().unwrap();
    assert_eq!(out.single.len(), 2 * hid);
    assert_eq!(multi.len(), (text_ids.len() + image_ids.len()) * pd);
    assert!(out.single.iter().chain(multi).all(|v| v.is_finite()));
    for single in out.single.chunks(hid) {
        let norm: f32 = single.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "single vector norm {norm}");
    }
    assert_ne!(out.single[..hid], out.single[hid..]);
}
