//! Reconcile errors. Each becomes a status condition reason, a Warning Event and a metric label,
//! never a crash.

use spendguard_proto::ledger::v1::ErrorCode;
use spendguard_proto::ledger::{Answer, is_away};

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
            Self::Ledger { code, .. } if ledger_away(code) => "LedgerUnavailable",
            Self::Ledger { .. } => "LedgerRefused",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::PricingVersionNotFound(_) => "PricingVersionNotFound",
            Self::PricingVersionInvalid { .. } => "PricingVersionInvalid",
            Self::Startup(_) => "Startup",
        }
    }

    /// From a ledger gRPC status. A status without a SpendGuard error detail counts as the
    /// ledger being unavailable when its gRPC code says the transport failed (connection
    /// refused, deadline: `spendguard_proto::ledger::is_transport_failure`); any other is named
    /// by its gRPC code (`GRPC_UNIMPLEMENTED`) and is a refusal.
    pub fn ledger(status: &tonic::Status) -> Self {
        let code = match Answer::of(status) {
            Answer::Code(c) => c.as_str_name().trim_start_matches(CODE_PREFIX).to_owned(),
            // A newer ledger's code: it answered, so this is a refusal, not an outage.
            Answer::UnknownCode(n) => format!("UNKNOWN_CODE_{n}"),
            Answer::NoAnswer(_) => TRANSPORT_UNAVAILABLE.to_owned(),
            Answer::Unreadable(other) => format!("GRPC_{other:?}").to_uppercase(),
        };
        Self::Ledger {
            code,
            message: status.message().to_owned(),
        }
    }
}

/// The prefix protobuf puts on the ledger's code names (`ERROR_CODE_BUDGET_INVALID`).
const CODE_PREFIX: &str = "ERROR_CODE_";
/// The code of a ledger that did not answer at all (connection refused, deadline).
const TRANSPORT_UNAVAILABLE: &str = "UNAVAILABLE";

/// Whether `code` says the ledger is away for now rather than refusing: the shared list of
/// `spendguard_proto::ledger::is_away`, or no answer at all.
fn ledger_away(code: &str) -> bool {
    code == TRANSPORT_UNAVAILABLE
        || ErrorCode::from_str_name(&format!("{CODE_PREFIX}{code}")).is_some_and(is_away)
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
        assert_eq!(ledger("UNKNOWN_CODE_9999").reason(), "LedgerRefused");
    }

    #[test]
    fn a_status_is_read_as_the_ledgers_code_an_unknown_code_or_no_answer() {
        use prost::Message as _;
        use spendguard_proto::ledger::v1::ErrorDetail;
        // As the ledger answers: the detail, and the header naming its code.
        let with_detail = |grpc: tonic::Code, code: i32| {
            let detail = ErrorDetail {
                code,
                ..ErrorDetail::default()
            };
            let mut status = tonic::Status::with_details(grpc, "m", detail.encode_to_vec().into());
            let name = ErrorCode::try_from(code)
                .map_or("SOMETHING_NEW", spendguard_proto::ledger::code_name);
            status.metadata_mut().insert(
                spendguard_proto::ledger::ERROR_CODE_HEADER,
                name.parse().unwrap(),
            );
            status
        };
        let read = |status: tonic::Status| match Error::ledger(&status) {
            Error::Ledger { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            read(with_detail(
                tonic::Code::FailedPrecondition,
                ErrorCode::BudgetInvalid as i32
            )),
            "BUDGET_INVALID"
        );
        // A newer ledger's code on UNAVAILABLE is still the ledger answering.
        let unknown = read(with_detail(tonic::Code::Unavailable, 9999));
        assert_eq!(unknown, "UNKNOWN_CODE_9999");
        assert_eq!(
            Error::ledger(&with_detail(tonic::Code::Unavailable, 9999)).reason(),
            "LedgerRefused"
        );
        assert_eq!(read(tonic::Status::unavailable("refused")), "UNAVAILABLE");
        assert_eq!(
            read(tonic::Status::unimplemented("old ledger")),
            "GRPC_UNIMPLEMENTED"
        );
    }
}
