//! The engine layer: requests in, embeddings out. Today: the text front end.
