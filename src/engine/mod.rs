//! The engine layer: requests in, embeddings out. Today: the text front end.

pub mod text;

pub use text::{prompt_prefix, EncodedText, PromptName, TextTokenizer, Truncation, DEFAULT_MAX_LENGTH};
