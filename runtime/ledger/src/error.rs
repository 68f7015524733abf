//! The ledger service's errors, each with a stable [`ErrorCode`].

use spendguard_core::{ErrorCode, LedgerError};

/// Everything that can go wrong serving a ledger request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request was refused by validation or by the ledger's state; nothing was written.
    #[error(transparent)]
    Refused(#[from] LedgerError),
    /// Another live process claims this ledger's producer instance id (S2): fail closed.
    #[error("producer instance id {0} is claimed by another live process")]
    ProducerInstanceConflict(String),
    /// This ledger's claim on its producer instance id ended with its claim session: it writes
    /// nothing until it has claimed the id again.
    #[error(
        "this ledger lost its claim on its producer instance id; it writes nothing until it claims the id again"
    )]
    ProducerClaimLost,
    /// A batch found its producer's claim token or next sequence changed: another process
    /// claimed the id, or an earlier batch committed though its answer was lost. Nothing was
    /// written; the next batch reads the sequence again.
    #[error(
        "producer instance id {0} changed under this batch (claimed by another process, or an earlier batch committed without its answer); nothing was written"
    )]
    ProducerSequenceMoved(String),
    /// The write queue is full.
    #[error("the ledger write queue is full")]
    Overloaded,
    /// The ledger is shutting down.
    #[error("the ledger is shutting down")]
    ShuttingDown,
    /// New spend is refused while audit evidence waits outside the canonical chain longer than
    /// the configured bound (S22's durability policy).
    #[error(
        "audit evidence has waited {age_ms} ms for the canonical chain, past the configured {limit_ms} ms: new reservations are refused until the forwarder catches up"
    )]
    EvidenceBacklog {
        /// Age of the oldest unforwarded event.
        age_ms: i64,
        /// The configured bound.
        limit_ms: i64,
    },
    /// The database failed or is unreachable; the transaction rolled back.
    #[error("database unavailable: {0}")]
    Database(String),
    /// An audit event could not be signed, so its batch wrote nothing (no effect without its
    /// evidence): the signer's stable code and message.
    #[error("audit evidence cannot be signed: {0}")]
    Signing(String),
    /// A database invariant fired: a bug, caught before anything was written.
    #[error("ledger invariant violated: {0}")]
    Invariant(String),
    /// Configuration or startup failed.
    #[error("startup failed: {0}")]
    Startup(String),
    /// A gRPC server ended without being asked to: the process exits so it is restarted.
    #[error("stopped serving: {0}")]
    ServingStopped(String),
    /// The database login could get around the ledger's rules
    /// ([`spendguard_postgres::RoleError::Privileged`], whose message this is): refused at
    /// startup unless explicitly allowed.
    #[error("{0}")]
    DatabaseRolePrivileged(String),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A batch planned on the writer's cache found a row changed: nothing was written, and the
    /// writer runs it again on the load path. Never reaches a caller.
    #[error("cached rows were stale")]
    Stale,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SQLSTATE raised by `spendguard_require_fresh` when a cached batch found a row changed.
pub(crate) const STALE_SQLSTATE: &str = "SG001";

impl Error {
    /// Classifies a database failure by its SQLSTATE, whichever driver reported it: class 23
    /// (integrity) and P0001 (raise) come from our constraints and triggers, SG001 from the
    /// cached path's guard; anything else, a code or none, means the database failed.
    pub(crate) fn from_sqlstate(code: Option<&str>, message: String) -> Self {
        match code {
            Some(STALE_SQLSTATE) => Self::Stale,
            Some(code) if code.starts_with("23") || code == "P0001" => Self::Invariant(message),
            _ => Self::Database(message),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        Self::from_sqlstate(code.as_deref(), error.to_string())
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        let code = error.code().map(tokio_postgres::error::SqlState::code);
        Self::from_sqlstate(code, error.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Migration(error.to_string())
    }
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused(e) => e.code(),
            Self::ProducerInstanceConflict(_)
            | Self::ProducerClaimLost
            | Self::ProducerSequenceMoved(_) => ErrorCode::ProducerInstanceConflict,
            Self::Overloaded => ErrorCode::Overloaded,
            Self::ShuttingDown | Self::ServingStopped(_) => ErrorCode::ShuttingDown,
            Self::EvidenceBacklog { .. } => ErrorCode::EvidenceBacklog,
            Self::Database(_) => ErrorCode::DependencyUnavailable,
            Self::Signing(_) => ErrorCode::SigningUnavailable,
            Self::Invariant(_)
            | Self::Migration(_)
            | Self::Startup(_)
            | Self::DatabaseRolePrivileged(_)
            | Self::Stale => ErrorCode::Internal,
        }
    }

    /// The stable code a failed start reports: the RPC code, or for a refusal that only
    /// startup makes, its own.
    pub fn startup_code(&self) -> &'static str {
        match self {
            Self::DatabaseRolePrivileged(_) => "LEDGER_DATABASE_ROLE_PRIVILEGED",
            other => other.code().as_str(),
        }
    }

    /// Whether a batch that failed with this error should be retried command by command, so one
    /// bad command (or a lost race with another replica) cannot fail its neighbours.
    pub(crate) fn is_isolatable(&self) -> bool {
        matches!(self, Self::Invariant(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_the_error_the_writer_acts_on() {
        let of = |code| Error::from_sqlstate(code, "m".into());
        assert!(matches!(of(Some("SG001")), Error::Stale));
        assert!(matches!(of(Some("23514")), Error::Invariant(_)));
        assert!(matches!(of(Some("P0001")), Error::Invariant(_)));
        assert!(matches!(of(Some("40P01")), Error::Database(_)));
        assert!(matches!(of(None), Error::Database(_)));
    }
}
