//! Stable codes for every evidence error, in the style of `spendguard_core::error::ErrorCode`.
//!
//! The string form is the contract: verification codes become quarantine reasons in canonical
//! ingest, and every code is a metric label and what runbooks quote.

macro_rules! evidence_codes {
    ($($variant:ident = $name:literal,)*) => {
        /// Stable evidence error codes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EvidenceCode { $(
            #[doc = $name]
            $variant,
        )* }

        impl EvidenceCode {
            /// Every code, for exhaustive tests and docs.
            pub const ALL: &'static [EvidenceCode] = &[$(EvidenceCode::$variant),*];

            /// The stable string form.
            pub const fn as_str(self) -> &'static str {
                match self { $(EvidenceCode::$variant => $name,)* }
            }
        }

        impl std::fmt::Display for EvidenceCode {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

evidence_codes! {
    // Verification (quarantine reasons).
    SignatureInvalid = "SIGNATURE_INVALID",
    SignatureMalformed = "SIGNATURE_MALFORMED",
    KeyUnknown = "KEY_UNKNOWN",
    KeyRevoked = "KEY_REVOKED",
    KeyOutsideWindow = "KEY_OUTSIDE_WINDOW",
    AlgorithmMismatch = "ALGORITHM_MISMATCH",
    SignedAtInFuture = "SIGNED_AT_IN_FUTURE",
    // Key registry.
    PublicKeyInvalid = "PUBLIC_KEY_INVALID",
    KeyWindowInvalid = "KEY_WINDOW_INVALID",
    KeyIdConflict = "KEY_ID_CONFLICT",
    KeyRevocationIrreversible = "KEY_REVOCATION_IRREVERSIBLE",
    // Signing at run time.
    SigningInputInvalid = "SIGNING_INPUT_INVALID",
    SigningKeyUnavailable = "SIGNING_KEY_UNAVAILABLE",
    SigningCredentialsMissing = "SIGNING_CREDENTIALS_MISSING",
    SigningBackendUnavailable = "SIGNING_BACKEND_UNAVAILABLE",
    SigningBackendInvalidResponse = "SIGNING_BACKEND_INVALID_RESPONSE",
    // Signing configuration at startup.
    SigningModeMissing = "SIGNING_MODE_MISSING",
    SigningDisabledOutsideDemo = "SIGNING_DISABLED_OUTSIDE_DEMO",
    SigningConfigMissing = "SIGNING_CONFIG_MISSING",
    SigningConfigConflict = "SIGNING_CONFIG_CONFLICT",
    SigningConfigInvalid = "SIGNING_CONFIG_INVALID",
    SigningKeyFileUnreadable = "SIGNING_KEY_FILE_UNREADABLE",
    SigningKeyInvalid = "SIGNING_KEY_INVALID",
    SigningKmsKeyUnsupported = "SIGNING_KMS_KEY_UNSUPPORTED",
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_upper_snake_case() {
        let mut seen = HashSet::new();
        for code in EvidenceCode::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "duplicate code {name}");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}
