use thiserror::Error;

/// Errors from the database layer. Whether an error is worth retrying is a
/// variant, not a flag: callers match on `Transient` to back off and retry.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database is unreachable, restarting, overloaded or the statement
    /// lost a race (deadlock, serialization failure). Retrying may succeed.
    #[error("database temporarily unavailable: {0}")]
    Transient(String),
    /// A request the database refused for good: a bug or a schema problem.
    #[error("database error: {0}")]
    Permanent(String),
    /// The thing asked for does not exist (SQLSTATE ST404 from our functions).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with stored state (SQLSTATE ST409).
    #[error("{0}")]
    Conflict(String),
    /// The request is invalid (SQLSTATE 22023 from our functions).
    #[error("{0}")]
    Invalid(String),
    /// A transition was refused because the state it was computed from is no
    /// longer current (another worker moved the instance on).
    #[error("stale transition refused: {0}")]
    Fenced(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_) | StoreError::Fenced(_))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let message = db
                .message()
                .strip_prefix("stead: ")
                .unwrap_or(db.message())
                .to_string();
            return match code {
                "ST404" => StoreError::NotFound(message),
                "ST409" => StoreError::Conflict(message),
                "22023" => StoreError::Invalid(message),
                // serialization_failure, deadlock_detected, lock_not_available,
                // query_canceled (statement timeout), too_many_connections,
                // admin/crash shutdown, cannot_connect_now, read-only standby.
                "40001" | "40P01" | "55P03" | "57014" | "53300" | "57P01" | "57P02" | "57P03"
                | "25006" => StoreError::Transient(format!("{code}: {}", db.message())),
                _ if code.starts_with("08") || code.starts_with("53") => {
                    StoreError::Transient(format!("{code}: {}", db.message()))
                }
                _ => StoreError::Permanent(format!("{code}: {}", db.message())),
            };
        }
        // No SQLSTATE: the connection is closed or broken; a new one may work.
        StoreError::Transient(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Transient(other.to_string()),
        }
    }
}
