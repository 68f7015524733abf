//! Evidence signing: the producer side and the verifier side of "no effect without audit
//! evidence" (spec slices S6 and S7).
//!
//! ```text
//! producer (ledger, sidecar, …)                       verifier (canonical ingest, audit verify)
//!   EventDraft::stamp ─► canonical bytes ──────────────────────────────┐
//!   Signer::sign(bytes) ─► Signed { key_id, algorithm, signed_at,      │
//!   Signer::sign_batch(…)           producer_id, signature,            │
//!        │                          inclusion (batch only) }  ─────────┤
//!        ├─ LocalEd25519Signer (PKCS#8 PEM file / Secret)              ▼
//!        └─ KmsSigner (AWS KMS ECDSA_SHA_256, P-256)       KeyRegistry::verify(signed, bytes)
//!                                                            key known? algorithm? signature
//!   SigningArgs (SPENDGUARD_SIGNING_MODE=local|kms|disabled)  over the envelope? revoked? window?
//!     └─ disabled only with SPENDGUARD_PROFILE=demo          └─ VerifyError::code() = quarantine reason
//! ```
//!
//! What a signature covers is the envelope in [`envelope`]: the sha256 of the exact canonical
//! event bytes together with the key id, algorithm, signing time and producer id. See
//! docs/design/evidence-signing.md for the design and its rejected alternatives.

pub mod batch;
pub mod code;
pub mod config;
pub mod envelope;
pub mod kms;
pub mod local;
pub mod signer;
pub mod verify;

pub use batch::{BatchTree, Inclusion};
pub use code::EvidenceCode;
pub use config::{ConfigError, Profile, Signing, SigningArgs, SigningMode};
pub use envelope::{Algorithm, Envelope, Signed};
pub use kms::{KmsSettings, KmsSigner};
pub use local::LocalEd25519Signer;
pub use signer::{ProducerSigner, SignError, Signer};
pub use verify::{KeyError, KeyRecord, KeyRegistry, PublicKey, VerifiedSignatures, VerifyError};
