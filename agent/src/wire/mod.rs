//! What the parsers and the policy share: a parse of a possibly incomplete
//! prefix of a stream, host names and authorities as requests carry them,
//! and the canonical request path L7 rules see.

pub mod host;
pub mod path;

/// Outcome of parsing a possibly incomplete prefix of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// Valid so far; more bytes are needed to finish.
    NeedMore,
    Done(T),
    /// The bytes can never become a valid message; the reason is for logs.
    Invalid(String),
}
