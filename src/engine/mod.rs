//! The engine layer: requests in, embeddings out. Today: the text and image front ends.

pub mod image;
pub mod text;

pub use text::{prompt_prefix, EncodedText, PromptName, TextTokenizer, Truncation, DEFAULT_MAX_LENGTH};
