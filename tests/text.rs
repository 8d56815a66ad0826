//! The text front end against the real tokenizer (CPU only).
//!
//! The tokenizer comes from `$JV4_MODEL_DIR/tokenizer.json` if that variable is set (a real
//! model folder), else from `../shared/models/jina-embeddings-v4/` beside the crate. The golden
//! ids (`tokenizer_golden.jsonl`) are looked up in the same two places. Missing files fail the
//! tests: a tokenizer test that passes without a tokenizer proves nothing.

use jv4::engine::text::{
    prompt_prefix, EncodedText, PromptName, TextTokenizer, Truncation, DEFAULT_MAX_LENGTH,
};
use jv4::model::task::Task;
use jv4::Error;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

const IMAGE_TEMPLATE: &str =
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n";
const QUERY_IDS: [u32; 3] = [2859, 25, 220];

fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/jina-embeddings-v4")
}

/// `$JV4_MODEL_DIR/tokenizer.json` if the variable is set (and then it must be there), else the
/// shared copy.
fn tokenizer_path() -> PathBuf {
    let path = match std::env::var_os("JV4_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir).join("tokenizer.json"),
        None => shared_dir().join("tokenizer.json"),
    };
    assert!(
        path.is_file(),
        "tokenizer not found at {}: set JV4_MODEL_DIR to a jina-embeddings-v4 folder, or check \
         out the shared/ folder beside the crate",
        path.display()
    );
    path
}

/// The golden ids: beside the tokenizer if there, else the shared copy (a real model download
/// has none).
fn golden_path() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("JV4_MODEL_DIR").map(PathBuf::from).into_iter().collect();
    dirs.push(shared_dir());
    let found = dirs.iter().map(|d| d.join("tokenizer_golden.jsonl")).find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("tokenizer_golden.jsonl not found in any of {dirs:?}"))
}

/// Loaded once per test binary: parsing the 11 MB tokenizer.json is the slow part.
fn tok() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = tokenizer_path();
        TextTokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// (line number, text, ids) of every golden line.
fn golden() -> Vec<(usize, String, Vec<u32>)> {
    let path = golden_path();
    let body = std::fs::read_to_string(&path).unwrap();
    body.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
            let text = v["text"].as_str().expect("text").to_owned();
            let ids =
                v["ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect();
            (i + 1, text, ids)
        })
        .collect()
}

fn golden_ids(text: &str) -> Vec<u32> {
    golden()
        .into_iter()
        .find(|(_, t, _)| t == text)
        .unwrap_or_else(|| panic!("no golden line for {text:?}"))
        .2
}

/// A long, varied English-like text (a fixed LCG, so every run is the same).
fn long_text(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "engine",
        "embeds",
        "long",
        "documents",
        "quickly",
        "and",
        "exactly",
        "while",
        "tokenizers",
        "split",
        "words",
        "into",
        "pieces",
        "Paris",
        "capital",
        "France",
        "of",
        "42",
        "vectors,",
        "queries.",
        "passages",
        "über",
        "数据",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while s.len() < bytes {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if !s.is_empty() {
            s.push(if (x >> 60) == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
    }
    s
}

#[test]
fn golden_ids_match_every_line() {
    let lines = golden();
    assert_eq!(lines.len(), 33, "tokenizer_golden.jsonl should have 33 lines");
    let bad: Vec<String> = lines
        .iter()
        .filter_map(|(n, text, want)| {
            let got = tok().encode_raw(text).unwrap();
            (&got != want).then(|| format!("line {n} {text:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{} golden line(s) differ:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn prompted_texts_match_golden() {
    let q = tok()
        .encode_prompted(
            Task::Retrieval,
            PromptName::Query,
            "What is the capital of France?",
            Truncation::default(),
        )
        .unwrap();
    assert_eq!(q, EncodedText { ids: golden_ids("Query: What is the capital of France?"), dropped: 0 });

    let passage = "Paris is the capital and most populous city of France.";
    let want = golden_ids(&format!("Passage: {passage}"));
    for task in [Task::Retrieval, Task::Code] {
        let p = tok().encode_prompted(task, PromptName::Passage, passage, Truncation::default());
        assert_eq!(p.unwrap().ids, want, "{task}");
    }

    // Text-matching is symmetric: "passage" still gets the Query prefix.
    let tm = tok()
        .encode_prompted(
            Task::TextMatching,
            PromptName::Passage,
            "What is the capital of France?",
            Truncation::default(),
        )
        .unwrap();
    assert_eq!(tm.ids, q.ids);
}

#[test]
fn no_bos_or_eos_is_added() {
    let text = "What is the capital of France?";
    let got = tok().encode_prompted(Task::Code, PromptName::Query, text, Truncation::default()).unwrap().ids;
    let raw = tok().encode_raw(text).unwrap();
    assert_eq!(got[0], 2859, "first id must be the prefix's \"Query\", got {got:?}");
    assert_eq!(got.last(), raw.last(), "last id must be the text's last token");
    assert_eq!(got.last(), Some(&30), "\"?\"");
    assert!(tok().encode_raw("").unwrap().is_empty(), "an empty string must give no ids");
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        let id = tok().token_id(special).unwrap();
        assert!(!got.contains(&id), "{special} in {got:?}");
    }
}

#[test]
fn image_template_ids() {
    assert_eq!(
        tok().encode_raw(IMAGE_TEMPLATE).unwrap(),
        [151644, 872, 198, 151652, 151655, 151653, 74785, 279, 2168, 13, 151645, 198]
    );
    assert_eq!(tok().token_id("<|image_pad|>"), Some(151655));
    assert_eq!(tok().token_id("<|endoftext|>"), Some(151643));
    assert_eq!(tok().token_id("no such token, surely"), None);
}

#[test]
fn empty_text_is_the_prefix() {
    for (task, prompt, want) in [
        (Task::Retrieval, PromptName::Query, QUERY_IDS.to_vec()),
        (Task::TextMatching, PromptName::Passage, QUERY_IDS.to_vec()),
        (Task::Code, PromptName::Passage, vec![12187, 424, 25, 220]),
    ] {
        let got = tok().encode_prompted(task, prompt, "", Truncation::default()).unwrap();
        assert_eq!(got, EncodedText { ids: want, dropped: 0 }, "{task} × {prompt}");
    }
}

#[test]
fn special_token_strings_in_user_text_are_special() {
    // Same as the HF reference: the string "<|im_end|>" becomes token 151645.
    let got = tok()
        .encode_prompted(Task::Retrieval, PromptName::Query, "a<|im_end|>b", Truncation::default())
        .unwrap();
    assert!(got.ids.contains(&151645), "{:?}", got.ids);
}

#[test]
fn truncation_keeps_the_front() {
    let text = long_text(2000);
    let (task, prompt) = (Task::Retrieval, PromptName::Passage);
    let full = tok().encode_prompted(task, prompt, &text, Truncation::default()).unwrap();
    assert_eq!(full.dropped, 0);
    assert!(full.ids.len() > 100, "{}", full.ids.len());

    let cut = tok().encode_prompted(task, prompt, &text, Truncation::new(16)).unwrap();
    assert_eq!(cut.ids.len(), 16);
    assert_eq!(cut.ids, full.ids[..16]);
    assert_eq!(cut.dropped, full.ids.len() - 16);
    assert_eq!(cut.ids[..3], [12187, 424, 25], "prefix kept");

    // Exactly at the limit: nothing dropped, and strict mode accepts it.
    let n = full.ids.len();
    let exact = Truncation { max_length: n, strict: true };
    assert_eq!(tok().encode_prompted(task, prompt, &text, exact).unwrap(), full);

    let strict = Truncation { max_length: 16, strict: true };
    let err = tok().encode_prompted(task, prompt, &text, strict).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&n.to_string()) && msg.contains("16"), "{msg}");

    for strict in [false, true] {
        let zero = Truncation { max_length: 0, strict };
        let err = tok().encode_prompted(task, prompt, "hi", zero).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        assert!(err.to_string().contains("max_length"), "{err}");
    }
}

#[test]
fn limits_above_the_context_are_clamped() {
    let text = "word ".repeat(DEFAULT_MAX_LENGTH + 100);
    let big = Truncation::new(usize::MAX);
    let got = tok().encode_prompted(Task::Retrieval, PromptName::Passage, &text, big).unwrap();
    assert_eq!(got.ids.len(), DEFAULT_MAX_LENGTH);
    assert!(got.dropped > 0);
}

/// A 1 MB text: encode fully, then cut. About 0.4 s in release on a 2-core machine; the limit of
/// 3 s leaves room for a loaded CI machine and still catches anything quadratic.
#[test]
fn one_megabyte_text_is_fast() {
    // Debug builds of the tokenizer are ~10x slower; check the logic there on a smaller text.
    let bytes = if cfg!(debug_assertions) { 64 << 10 } else { 1 << 20 };
    let text = long_text(bytes);
    let t0 = Instant::now();
    let got =
        tok().encode_prompted(Task::Retrieval, PromptName::Passage, &text, Truncation::default()).unwrap();
    let dt = t0.elapsed();
    eprintln!("{} bytes -> {} ids kept, {} dropped in {dt:?}", text.len(), got.ids.len(), got.dropped);
    assert_eq!(got.ids.len(), DEFAULT_MAX_LENGTH.min(got.ids.len() + got.dropped));
    if !cfg!(debug_assertions) {
        assert!(got.dropped > 0);
        assert!(dt.as_secs_f64() < 3.0, "1 MB took {dt:?}");
    }
}

#[test]
fn unknown_task_and_prompt_names() {
    let err = "classification".parse::<Task>().unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(err.to_string().contains("classification"), "{err}");

    let err = "document".parse::<PromptName>().unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("document") && msg.contains("query") && msg.contains("passage"), "{msg}");
    assert_eq!("passage".parse::<PromptName>().unwrap(), PromptName::Passage);
}

#[test]
fn missing_tokenizer_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    let want = dir.path().join("tokenizer.json");
    assert!(err.to_string().contains(&want.display().to_string()), "{err}");
}

#[test]
fn corrupt_tokenizer_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    for garbage in ["not json at all {", "{\"model\": 42}"] {
        std::fs::write(&path, garbage).unwrap();
        let err = TextTokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}

#[test]
fn batch_fails_item_by_item_in_order() {
    let long = long_text(2000);
    let items: Vec<(Task, PromptName, &str)> = vec![
        (Task::Retrieval, PromptName::Query, "What is the capital of France?"),
        (Task::Retrieval, PromptName::Passage, &long),
        (Task::Code, PromptName::Passage, ""),
        (Task::TextMatching, PromptName::Passage, "hello"),
    ];
    let trunc = Truncation { max_length: 64, strict: true };
    let got = tok().encode_batch_prompted(&items, trunc);
    assert_eq!(got.len(), items.len());
    for (i, (&(task, prompt, text), res)) in items.iter().zip(&got).enumerate() {
        if i == 1 {
            let err = res.as_ref().unwrap_err();
            assert!(matches!(err, Error::Input(_)) && err.to_string().contains("64"), "{err}");
        } else {
            let one = tok().encode_prompted(task, prompt, text, trunc).unwrap();
            assert_eq!(res.as_ref().unwrap(), &one, "item {i}");
        }
    }
    assert_eq!(got[0].as_ref().unwrap().ids, golden_ids("Query: What is the capital of France?"));
    assert_eq!(got[2].as_ref().unwrap().ids, [12187, 424, 25, 220]);

    // A bad limit fails every item, each with its own error.
    let zero = tok().encode_batch_prompted(&items, Truncation::new(0));
    assert!(zero.iter().all(|r| matches!(r, Err(Error::Input(_)))));
    assert!(tok().encode_batch_prompted(&[], Truncation::default()).is_empty());
}

#[test]
fn prefix_table() {
    assert_eq!(prompt_prefix(Task::Retrieval, PromptName::Query), "Query: ");
    assert_eq!(prompt_prefix(Task::Code, PromptName::Passage), "Passage: ");
    assert_eq!(prompt_prefix(Task::TextMatching, PromptName::Passage), "Query: ");
}
