//! Late chunking's token ↔ byte mapping with the real Qwen2 tokenizer (`../shared/models/
//! jina-embeddings-v4/tokenizer.json`, or `$JV4_MODEL_DIR`; missing files fail the test): the ids
//! with offsets are the ids without, the prefix belongs to no chunk, the text's tokens cover the
//! text in order, and chunks by spans hold exactly the tokens touching their bytes.

use std::path::PathBuf;

use jv4::engine::text::{plan_chunks, prompt_prefix, PromptName, TextTokenizer, Truncation};
use jv4::model::task::Task;
use jv4::Chunking;

fn tokenizer() -> TextTokenizer {
    let path = match std::env::var_os("JV4_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir).join("tokenizer.json"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/models/jina-embeddings-v4/tokenizer.json"),
    };
    TextTokenizer::from_file(&path).unwrap_or_else(|e| panic!("the real tokenizer is needed: {e}"))
}

const TEXT: &str = "What is late chunking? It pools each chunk from one pass. Über Katzen: schön. \
                    日本語の文です。Emoji 🙂🚀 too.\n\nA new paragraph.";

#[test]
fn offsets_map_the_real_tokenizers_tokens_onto_the_text() {
    let tok = tokenizer();
    for (task, prompt) in [(Task::Retrieval, PromptName::Passage), (Task::Code, PromptName::Query)] {
        let enc = tok.encode_with_offsets(task, prompt, TEXT).unwrap();
        let plain = tok.encode_prompted(task, prompt, TEXT, Truncation::default()).unwrap();
        assert_eq!(enc.ids, plain.ids, "offsets change nothing about the ids");
        let prefix = tok.encode_raw(prompt_prefix(task, prompt).trim_end()).unwrap();
        // "Passage: What": the prefix's space merges into the text's first word.
        assert_eq!(enc.first_text_token, prefix.len(), "{prefix:?}");
        let text_offsets = &enc.offsets[enc.first_text_token..];
        assert_eq!(text_offsets[0].0, 0);
        assert_eq!(text_offsets.last().unwrap().1, TEXT.len());
        for w in text_offsets.windows(2) {
            // In order, contiguous, or sharing a character split across byte-level tokens.
            assert!(w[1].0 == w[0].1 || w[1] == w[0], "{w:?}");
        }
        for &(s, e) in text_offsets {
            assert!(s < e && TEXT.is_char_boundary(s) && TEXT.is_char_boundary(e), "({s}, {e})");
        }

        let one = plan_chunks(&enc, TEXT, &Chunking::Tokens(1)).unwrap();
        assert_eq!(one.len(), enc.ids.len() - enc.first_text_token);
        let sizes = plan_chunks(&enc, TEXT, &Chunking::Tokens(4)).unwrap();
        assert_eq!(sizes.len(), one.len().div_ceil(4));
        assert!(sizes.windows(2).all(|w| w[0].tokens.end == w[1].tokens.start && w[0].tokens.len() == 4));

        // Sentences as spans: each chunk's tokens are exactly those touching its bytes.
        let mut spans = Vec::new();
        let mut start = 0;
        for (i, c) in TEXT.char_indices() {
            if matches!(c, '.' | '?' | '。') {
                let end = i + c.len_utf8();
                spans.push((start, end));
                start = end;
            }
        }
        let chunks = plan_chunks(&enc, TEXT, &Chunking::Spans(spans.clone())).unwrap();
        assert_eq!(chunks.len(), spans.len());
        for (c, &(s, e)) in chunks.iter().zip(&spans) {
            assert_eq!((c.chars.start, c.chars.end), (s, e));
            let touching: Vec<usize> = (enc.first_text_token..enc.ids.len())
                .filter(|&t| enc.offsets[t].0 < e && enc.offsets[t].1 > s)
                .collect();
            assert_eq!(c.tokens.clone().collect::<Vec<_>>(), touching, "span {s}..{e}: {:?}", &TEXT[s..e]);
        }
    }
}
