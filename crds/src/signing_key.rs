//! `SigningKey`: a producer's public key and its validity window (S7).

use crate::condition::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SigningAlgorithm {
    /// Ed25519 (RFC 8032).
    Ed25519,
    /// ECDSA over P-256 with SHA-256 (KMS ECC_NIST_P256).
    EcdsaP256Sha256,
}

/// A public key trusted for events signed inside its window.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "SigningKey",
    status = "SigningKeyStatus",
    shortname = "sgkey",
    category = "spendguard",
    doc = "A producer public key, its validity window and revocation.",
    printcolumn(name = "Algorithm", type_ = "string", json_path = ".spec.algorithm"),
    printcolumn(name = "NotAfter", type_ = "string", json_path = ".spec.notAfter"),
    printcolumn(name = "Revoked", type_ = "boolean", json_path = ".spec.revoked")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "timestamp(self.notBefore) < timestamp(self.notAfter)", "message": "notBefore must be before notAfter"},
    {"rule": "self.publicKey == oldSelf.publicKey && self.algorithm == oldSelf.algorithm", "message": "publicKey and algorithm are immutable"},
    {"rule": "!oldSelf.revoked || self.revoked", "message": "a revoked key cannot be un-revoked"}
]))]
pub struct SigningKeySpec {
    /// Algorithm.
    pub algorithm: SigningAlgorithm,
    /// Public key: base64 raw key (Ed25519) or base64 DER SubjectPublicKeyInfo (P-256).
    #[schemars(length(min = 32, max = 512))]
    pub public_key: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// Revoked keys verify nothing from now on.
    #[serde(default)]
    pub revoked: bool,
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyStatus {
    /// Key id derived from the public key.
    #[serde(default)]
    pub key_id: String,
    /// When the operator first saw `revoked: true` (RFC 3339). Stamped once, under its own field
    /// manager, before the ledger is told, and reused on every later reconcile: a revocation
    /// never moves later (the ledger refuses that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
