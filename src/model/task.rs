//! The three task adapters of jina-embeddings-v4.

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A task: selects the LoRA adapter (and, for text, the prompt rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// `retrieval`: asymmetric query/passage search.
    Retrieval,
    /// `text-matching`: symmetric similarity; always uses the "Query" prompt.
    TextMatching,
    /// `code`: code search.
    Code,
}

impl Task {
    /// All tasks, in the order of the checkpoint's `task_names`.
    pub const ALL: [Task; 3] = [Task::Retrieval, Task::TextMatching, Task::Code];

    /// The name used in the checkpoint and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Task::Retrieval => "retrieval",
            Task::TextMatching => "text-matching",
            Task::Code => "code",
        }
    }

    /// Position in [`Task::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            Error::Input(format!("unknown task {s:?}: expected one of retrieval, text-matching, code"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        let err = "classification".parse::<Task>().unwrap_err().to_string();
        assert!(err.contains("classification") && err.contains("text-matching"), "{err}");
    }
}
