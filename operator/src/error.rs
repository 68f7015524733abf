//! Reconcile errors. Each becomes a status condition reason, a Warning Event and a metric label,
//! never a crash.

/// What can go wrong reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("kubernetes api: {0}")]
    Kube(#[source] kube::Error),
    /// The ledger refused or failed; `code` is its stable error code.
    #[error("ledger {code}: {message}")]
    Ledger {
        /// Stable ledger error code, e.g. `BUDGET_INVALID` or `DEPENDENCY_UNAVAILABLE`.
        code: String,
        /// Detail.
        message: String,
    },
    /// The spec cannot be used as is (the CRD schema should have caught it).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A ContractBundle names a PricingVersion that does not exist (yet).
    #[error("PricingVersion {0} does not exist")]
    PricingVersionNotFound(String),
    /// A ContractBundle names a PricingVersion whose prices core::pricing refuses.
    #[error("PricingVersion {name} is invalid: {message}")]
    PricingVersionInvalid {
        /// The PricingVersion's name.
        name: String,
        /// Why it was refused.
        message: String,
    },
    /// Startup failed.
    #[error("startup: {0}")]
    Startup(String),
}

impl Error {
    /// CamelCase reason for the Ready condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesApiError",
            Self::Ledger { code, .. }
                if matches!(
                    code.as_str(),
                    "DEPENDENCY_UNAVAILABLE"
                        | "UNAVAILABLE"
                        | "OVERLOADED"
                        | "SHUTTING_DOWN"
                        | "SIGNING_UNAVAILABLE"
                ) =>
            {
                "LedgerUnavailable"
            }
            Self::Ledger { .. } => "LedgerRefused",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::PricingVersionNotFound(_) => "PricingVersionNotFound",
            Self::PricingVersionInvalid { .. } => "PricingVersionInvalid",
            Self::Startup(_) => "Startup",
        }
    }

    /// From a ledger gRPC status. Statuses without a SpendGuard error detail come from the
    /// transport (connection refused, deadline) and count as the ledger being unavailable.
    pub fn ledger(status: &tonic::Status) -> Self {
        use spendguard_proto::ledger::error_code;
        let detail = error_code(status);
        let code = match detail {
            Some(c) => c.as_str_name().trim_start_matches("ERROR_CODE_").to_owned(),
            None => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => "UNAVAILABLE".to_owned(),
                other => format!("GRPC_{other:?}").to_uppercase(),
            },
        };
        Self::Ledger {
            code,
            message: status.message().to_owned(),
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    /// Unwraps the reconciler's own error, so the condition, Event and metric carry its
    /// stable reason rather than the finalizer's wrapper.
    fn from(error: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as Finalizer;
        match error {
            Finalizer::ApplyFailed(e) | Finalizer::CleanupFailed(e) => e,
            Finalizer::AddFinalizer(e) | Finalizer::RemoveFinalizer(e) => Self::Kube(e),
            Finalizer::UnnamedObject => Self::InvalidSpec("object has no name".into()),
            Finalizer::InvalidFinalizer => Self::InvalidSpec("invalid finalizer name".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_that_is_away_or_cannot_sign_is_unavailable_and_a_refusal_is_not() {
        let ledger = |code: &str| Error::Ledger {
            code: code.to_owned(),
            message: String::new(),
        };
        for away in [
            "DEPENDENCY_UNAVAILABLE",
            "UNAVAILABLE",
            "OVERLOADED",
            "SHUTTING_DOWN",
            "SIGNING_UNAVAILABLE",
        ] {
            assert_eq!(ledger(away).reason(), "LedgerUnavailable", "{away}");
        }
        assert_eq!(ledger("BUDGET_INVALID").reason(), "LedgerRefused");
    }
}
