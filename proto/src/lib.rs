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
}
