//! Tokenizer, incremental detokenizer, chat templates and stop strings.

pub mod chat_template;
pub mod detokenizer;
pub mod stop;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateError};
pub use detokenizer::IncrementalDetokenizer;
pub use stop::{StopMatcher, StopOutcome};
pub use tokenizer::{TextError, Tokenizer};
