//! The library's public error, and `Chain`, which prints an error with its
//! sources for logs.

use std::fmt;

/// Why a node could not start or the migrations could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range or inconsistent; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be reached or refused what was asked.
    #[error("the database failed")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The migrations could not be applied.
    #[error("applying the migrations failed")]
    Migrate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The API could not listen on its address.
    #[error("binding the API to {addr} failed")]
    Bind {
        /// The `--listen` address.
        addr: String,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Invalid { message, .. } => Error::Config(message),
            other => Error::Database(Box::new(other)),
        }
    }
}

/// Displays an error and its sources as `error: source: source`, leaving out
/// a source whose text the line already ends with (tokio-postgres repeats
/// its cause in its own message).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(e) = source {
            let text = e.to_string();
            if !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = e.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner: root")]
    struct Inner(#[source] Root);

    #[derive(Debug, thiserror::Error)]
    #[error("root")]
    struct Root;

    #[test]
    fn chain_joins_sources_without_repeating_them() {
        assert_eq!(Chain(&Outer(Inner(Root))).to_string(), "outer: inner: root");
        assert_eq!(Chain(&Root).to_string(), "root");
    }
}
