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

    /// The stable SpendGuard error code of a failed ledger RPC, from the `ErrorDetail` the ledger
    /// encodes in the status details. `None` for statuses without one (transport failures).
    pub fn error_code(status: &tonic::Status) -> Option<v1::ErrorCode> {
        use prost::Message;
        let detail = v1::ErrorDetail::decode(status.details()).ok()?;
        v1::ErrorCode::try_from(detail.code)
            .ok()
            .filter(|code| *code != v1::ErrorCode::Unspecified)
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
