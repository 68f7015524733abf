//! gRPC wire types of SpendGuard's services.
//!
//! The code under `src/gen` is generated from `spendguard/**/*.proto` and committed, so ordinary
//! builds need no protoc; `tests/bootstrap.rs` fails when it drifts from the .proto files.

/// `spendguard.ledger.v1`: the ledger service.
pub mod ledger {
    /// Version 1 of the ledger API.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        include!("gen/spendguard.ledger.v1.rs");
    }

    /// What a failed ledger RPC's status says, from the `ErrorDetail` the ledger encodes in the
    /// status details.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Answer {
        /// The ledger answered with this stable code.
        Code(v1::ErrorCode),
        /// The ledger answered with a code this build does not know (a newer ledger). It did
        /// answer, so callers must not take it for an unreachable ledger.
        UnknownCode(i32),
        /// No SpendGuard detail: the transport failed before the ledger answered (connection
        /// refused, reset, deadline).
        NoDetail,
    }

    impl Answer {
        /// Reads `status`.
        pub fn of(status: &tonic::Status) -> Self {
            use prost::Message;
            match v1::ErrorDetail::decode(status.details()) {
                Ok(detail) if detail.code != 0 => v1::ErrorCode::try_from(detail.code)
                    .map_or(Self::UnknownCode(detail.code), Self::Code),
                _ => Self::NoDetail,
            }
        }

        /// The known code, if the ledger answered with one.
        pub fn code(self) -> Option<v1::ErrorCode> {
            match self {
                Self::Code(code) => Some(code),
                Self::UnknownCode(_) | Self::NoDetail => None,
            }
        }

        /// Whether the answer says only that the ledger is away for now, so the same request may
        /// be answered later: no answer at all, or a code that says so ([`is_away`]).
        pub fn ledger_away(self) -> bool {
            match self {
                Self::Code(code) => is_away(code),
                Self::UnknownCode(_) => false,
                Self::NoDetail => true,
            }
        }
    }

    /// The codes that say the ledger cannot answer for now (unreachable database, overloaded,
    /// shutting down, unable to sign evidence), as opposed to a refusal of the request. One list
    /// for every client (the sidecar and the operator).
    pub fn is_away(code: v1::ErrorCode) -> bool {
        use v1::ErrorCode as C;
        matches!(
            code,
            C::Overloaded | C::DependencyUnavailable | C::ShuttingDown | C::SigningUnavailable
        )
    }

    /// The stable SpendGuard error code of a failed ledger RPC. `None` for statuses without one
    /// (transport failures) and for codes this build does not know: use [`Answer`] where the
    /// two must be told apart.
    pub fn error_code(status: &tonic::Status) -> Option<v1::ErrorCode> {
        Answer::of(status).code()
    }
}

/// `spendguard.sidecar.v1`: the sidecar's decision API.
pub mod sidecar {
    /// Version 1 of the decision API.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        include!("gen/spendguard.sidecar.v1.rs");
    }
}
