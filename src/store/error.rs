//! The store's one error type. Whether a retry may help is the variant
//! (`Transient` or not); every variant that comes from the database keeps
//! the error it came from as its `source`.

use thiserror::Error;

#[derive(Debug, Error)]
pub(crate) enum StoreError {
    /// The database is unreachable, restarting or overloaded, or the
    /// statement lost a race (deadlock, serialization failure, timeout).
    /// Retrying may succeed.
    #[error("the database is temporarily unavailable")]
    Transient(#[source] Cause),
    /// A request the database refused for good, or a value stored in it
    /// that this version of stead does not know: a bug or a schema problem.
    #[error("the database refused the operation")]
    Permanent(#[source] Cause),
    /// The thing asked for does not exist (SQLSTATE ST404 from our functions).
    #[error("{message}")]
    NotFound {
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The request conflicts with stored state (SQLSTATE ST409).
    #[error("{message}")]
    Conflict {
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The request or the configuration is invalid (SQLSTATE 22023 from our
    /// functions, a bad schema name, a bad database URL).
    #[error("{message}")]
    Invalid {
        message: String,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// A transition was refused because the state it was computed from is
    /// no longer current (another worker moved an instance on).
    #[error("stale transition refused: {moved} of {batch} instances changed since they were read")]
    Fenced { moved: usize, batch: usize },
}

/// What lies behind a `Transient` or `Permanent` error.
#[derive(Debug, Error)]
pub(crate) enum Cause {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    BuildPool(#[from] deadpool_postgres::BuildError),
    #[error("applying the migrations failed")]
    Migration(#[source] refinery::Error),
    /// A text column holds a value no variant of its enum spells.
    #[error("{column} holds {value:?}, which this version of stead does not know")]
    UnknownValue { column: &'static str, value: String },
    /// A JSON column does not have the shape this version writes.
    #[error("{column} holds JSON this version of stead cannot read")]
    BadJson {
        column: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A dedicated connection ended.
    #[error("the {0} connection closed")]
    Closed(&'static str),
}

impl StoreError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        StoreError::Invalid {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn unknown_value(column: &'static str, value: &str) -> Self {
        StoreError::Permanent(Cause::UnknownValue {
            column,
            value: value.to_string(),
        })
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No SQLSTATE: the connection is closed or broken; a new one may work.
            return StoreError::Transient(e.into());
        };
        let code = db.code().code();
        let message = || {
            db.message()
                .strip_prefix("stead: ")
                .unwrap_or(db.message())
                .to_string()
        };
        match code {
            "ST404" => StoreError::NotFound {
                message: message(),
                source: e,
            },
            "ST409" => StoreError::Conflict {
                message: message(),
                source: e,
            },
            "22023" => StoreError::Invalid {
                message: message(),
                source: Some(e),
            },
            // serialization_failure, deadlock_detected, lock_not_available,
            // query_canceled (statement timeout), too_many_connections,
            // admin/crash shutdown, cannot_connect_now, read-only standby.
            "40001" | "40P01" | "55P03" | "57014" | "53300" | "57P01" | "57P02" | "57P03"
            | "25006" => StoreError::Transient(e.into()),
            _ if code.starts_with("08") || code.starts_with("53") => {
                StoreError::Transient(e.into())
            }
            _ => StoreError::Permanent(e.into()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Transient(other.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn an_unknown_value_is_permanent_and_names_column_and_value() {
        let e = StoreError::unknown_value("instances.status", "paused");
        assert!(matches!(
            e,
            StoreError::Permanent(Cause::UnknownValue {
                column: "instances.status",
                ..
            })
        ));
        let text = e.source().expect("the cause").to_string();
        assert!(text.contains("instances.status"), "{text}");
        assert!(text.contains("\"paused\""), "{text}");
    }
}
