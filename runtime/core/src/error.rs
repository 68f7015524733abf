//! Stable error codes shared by every service and adapter, and the ledger's domain errors.
//!
//! The string form ([`ErrorCode::as_str`]) is the contract: it is what the proto enum names
//! (without its `ERROR_CODE_` prefix), what metrics are labelled with and what runbooks quote.

use crate::money::MoneyError;
use uuid::Uuid;

/// How a code maps onto transport status families (gRPC code, HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Caller error in the request itself.
    InvalidArgument,
    /// A referenced object does not exist (or belongs to another tenant).
    NotFound,
    /// The caller may not make this request where it made it (the data-path listener).
    PermissionDenied,
    /// The request is well formed but the state forbids it.
    FailedPrecondition,
    /// Transient: retry later.
    Unavailable,
    /// A bug.
    Internal,
}

macro_rules! error_codes {
    ($($variant:ident = $name:literal => $class:ident,)*) => {
        /// Stable error codes (see `proto/spendguard/ledger/v1/ledger.proto`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $(
            #[doc = $name]
            $variant,
        )* }

        impl ErrorCode {
            /// Every code, for exhaustive tests and docs.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The stable string form.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// The transport family.
            pub const fn class(self) -> ErrorClass {
                match self { $(ErrorCode::$variant => ErrorClass::$class,)* }
            }
        }
    };
}

error_codes! {
    InvalidArgument = "INVALID_ARGUMENT" => InvalidArgument,
    IdMalformed = "ID_MALFORMED" => InvalidArgument,
    AmountInvalid = "AMOUNT_INVALID" => InvalidArgument,
    TtlInvalid = "TTL_INVALID" => InvalidArgument,
    RequestTooLarge = "REQUEST_TOO_LARGE" => InvalidArgument,
    FencingEpochMissing = "FENCING_EPOCH_MISSING" => InvalidArgument,
    BudgetInvalid = "BUDGET_INVALID" => InvalidArgument,
    ApproverRequired = "APPROVER_REQUIRED" => InvalidArgument,
    TenantNotFound = "TENANT_NOT_FOUND" => NotFound,
    BudgetNotFound = "BUDGET_NOT_FOUND" => NotFound,
    ReservationNotFound = "RESERVATION_NOT_FOUND" => NotFound,
    FencingScopeNotFound = "FENCING_SCOPE_NOT_FOUND" => NotFound,
    ApprovalNotFound = "APPROVAL_NOT_FOUND" => NotFound,
    PermissionDenied = "PERMISSION_DENIED" => PermissionDenied,
    FencingEpochStale = "FENCING_EPOCH_STALE" => FailedPrecondition,
    FencingLeaseHeld = "FENCING_LEASE_HELD" => FailedPrecondition,
    FencingLeaseExpired = "FENCING_LEASE_EXPIRED" => FailedPrecondition,
    IdempotencyConflict = "IDEMPOTENCY_CONFLICT" => FailedPrecondition,
    ReservationAlreadyResolved = "RESERVATION_ALREADY_RESOLVED" => FailedPrecondition,
    ReservationExpired = "RESERVATION_EXPIRED" => FailedPrecondition,
    BudgetExhausted = "BUDGET_EXHAUSTED" => FailedPrecondition,
    PricingUnknown = "PRICING_UNKNOWN" => FailedPrecondition,
    PricingConflict = "PRICING_CONFLICT" => FailedPrecondition,
    SigningKeyConflict = "SIGNING_KEY_CONFLICT" => FailedPrecondition,
    SigningKeyRevocationIrreversible = "SIGNING_KEY_REVOCATION_IRREVERSIBLE" => FailedPrecondition,
    SigningKeyWindowClosed = "SIGNING_KEY_WINDOW_CLOSED" => FailedPrecondition,
    ApprovalAlreadyResolved = "APPROVAL_ALREADY_RESOLVED" => FailedPrecondition,
    ApprovalExpired = "APPROVAL_EXPIRED" => FailedPrecondition,
    CreditUnavailable = "CREDIT_UNAVAILABLE" => FailedPrecondition,
    ApprovalNotApproved = "APPROVAL_NOT_APPROVED" => FailedPrecondition,
    ProducerInstanceConflict = "PRODUCER_INSTANCE_CONFLICT" => Unavailable,
    Overloaded = "OVERLOADED" => Unavailable,
    DependencyUnavailable = "DEPENDENCY_UNAVAILABLE" => Unavailable,
    ShuttingDown = "SHUTTING_DOWN" => Unavailable,
    EvidenceBacklog = "EVIDENCE_BACKLOG" => Unavailable,
    SigningUnavailable = "SIGNING_UNAVAILABLE" => Unavailable,
    Internal = "INTERNAL" => Internal,
}

/// A request refused by validation or by the ledger's state. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A required field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An id does not match its grammar.
    #[error("{field}: malformed id: {reason}")]
    IdMalformed {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An amount is out of range.
    #[error("{field}: {source}")]
    AmountInvalid {
        /// The request field.
        field: &'static str,
        /// The bound it broke.
        source: MoneyError,
    },
    /// A TTL is out of range.
    #[error("{field}: {value} ms is outside {min}..={max} ms")]
    TtlInvalid {
        /// The request field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
    },
    /// A list or string is too long.
    #[error("{field}: {len} exceeds the maximum of {max}")]
    RequestTooLarge {
        /// The request field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Fencing token absent or epoch 0.
    #[error("fencing token with a non-zero epoch is required")]
    FencingEpochMissing,
    /// A budget definition is inconsistent.
    #[error("budget invalid: {0}")]
    BudgetInvalid(String),
    /// Unknown tenant.
    #[error("tenant {0} not found")]
    TenantNotFound(String),
    /// Unknown budget (or one of another tenant).
    #[error("budget {budget_id} not found in tenant {tenant_id}")]
    BudgetNotFound {
        /// Tenant asked.
        tenant_id: String,
        /// Budget asked.
        budget_id: String,
    },
    /// Unknown reservation (or one of another tenant).
    #[error("reservation {0} not found")]
    ReservationNotFound(Uuid),
    /// Unknown fencing scope (or one of another tenant).
    #[error("fencing scope {0} not found")]
    FencingScopeNotFound(String),
    /// The presented epoch is not current.
    #[error("fencing epoch {presented} for scope {scope_id} is stale (current {current})")]
    FencingEpochStale {
        /// Scope.
        scope_id: String,
        /// Epoch presented.
        presented: u64,
        /// Current epoch.
        current: u64,
    },
    /// Another owner holds an unexpired lease.
    #[error("fencing scope {scope_id} is held by {owner} until its lease expires")]
    FencingLeaseHeld {
        /// Scope.
        scope_id: String,
        /// Current owner.
        owner: String,
    },
    /// The caller's own lease expired.
    #[error("fencing lease on scope {0} expired; renew it first")]
    FencingLeaseExpired(String),
    /// Idempotency key reused with different fields.
    #[error("idempotency key {0} was used with different fields")]
    IdempotencyConflict(String),
    /// The reservation was resolved another way.
    #[error("reservation {id} is already {state}")]
    ReservationAlreadyResolved {
        /// Reservation.
        id: Uuid,
        /// Its final state.
        state: &'static str,
    },
    /// Release after the reservation's TTL (a Commit is booked late instead).
    #[error("reservation {0} expired")]
    ReservationExpired(Uuid),
    /// The pricing snapshot (version and hash) is not registered for the tenant.
    #[error("pricing {version} ({sha256_hex}) is not registered for tenant {tenant_id}")]
    PricingUnknown {
        /// Tenant.
        tenant_id: String,
        /// Version presented.
        version: String,
        /// Hash presented.
        sha256_hex: String,
    },
    /// The version is registered with another hash: snapshots are immutable.
    #[error("pricing {version} is already registered with another hash")]
    PricingConflict {
        /// Version.
        version: String,
    },
    /// The key id is registered with another algorithm, public key or start.
    #[error(
        "signing key {key_id} is already registered with another algorithm, public key or start"
    )]
    SigningKeyConflict {
        /// Key id.
        key_id: String,
    },
    /// The request would clear or postpone the key's revocation.
    #[error("signing key {key_id} is revoked; a revocation can only be moved earlier")]
    SigningKeyRevocationIrreversible {
        /// Key id.
        key_id: String,
    },
    /// The request would change a validity end that has passed.
    #[error(
        "signing key {key_id}: its validity ended, and an end that has passed is final; register a new key"
    )]
    SigningKeyWindowClosed {
        /// Key id.
        key_id: String,
    },
    /// ResolveApproval without an approver identity.
    #[error("an approver identity is required")]
    ApproverRequired,
    /// Unknown approval (or one of another tenant).
    #[error("approval {0} not found")]
    ApprovalNotFound(Uuid),
    /// The approval was resolved with another decision.
    #[error("approval {id} is already {state}")]
    ApprovalAlreadyResolved {
        /// Approval.
        id: Uuid,
        /// Its final state.
        state: &'static str,
    },
    /// The approval expired before it was resolved.
    #[error("approval {0} expired")]
    ApprovalExpired(Uuid),
    /// A reservation names an approval that is not approved.
    #[error("approval {id} is {state}, not approved")]
    ApprovalNotApproved {
        /// Approval.
        id: Uuid,
        /// Its state.
        state: &'static str,
    },
    /// Only the control listener serves this request (or this use of it).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A draw names a credit it cannot take from: not a credit of this scope and budgets, no
    /// longer open, in a window that has ended, or without enough left.
    #[error("credit {id} cannot be drawn from: {reason}")]
    CreditUnavailable {
        /// The credit reservation.
        id: Uuid,
        /// Why.
        reason: String,
    },
}

impl LedgerError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Self::IdMalformed { .. } => ErrorCode::IdMalformed,
            Self::AmountInvalid { .. } => ErrorCode::AmountInvalid,
            Self::TtlInvalid { .. } => ErrorCode::TtlInvalid,
            Self::RequestTooLarge { .. } => ErrorCode::RequestTooLarge,
            Self::FencingEpochMissing => ErrorCode::FencingEpochMissing,
            Self::BudgetInvalid(_) => ErrorCode::BudgetInvalid,
            Self::TenantNotFound(_) => ErrorCode::TenantNotFound,
            Self::BudgetNotFound { .. } => ErrorCode::BudgetNotFound,
            Self::ReservationNotFound(_) => ErrorCode::ReservationNotFound,
            Self::FencingScopeNotFound(_) => ErrorCode::FencingScopeNotFound,
            Self::FencingEpochStale { .. } => ErrorCode::FencingEpochStale,
            Self::FencingLeaseHeld { .. } => ErrorCode::FencingLeaseHeld,
            Self::FencingLeaseExpired(_) => ErrorCode::FencingLeaseExpired,
            Self::IdempotencyConflict(_) => ErrorCode::IdempotencyConflict,
            Self::ReservationAlreadyResolved { .. } => ErrorCode::ReservationAlreadyResolved,
            Self::ReservationExpired(_) => ErrorCode::ReservationExpired,
            Self::PricingUnknown { .. } => ErrorCode::PricingUnknown,
            Self::PricingConflict { .. } => ErrorCode::PricingConflict,
            Self::SigningKeyConflict { .. } => ErrorCode::SigningKeyConflict,
            Self::SigningKeyRevocationIrreversible { .. } => {
                ErrorCode::SigningKeyRevocationIrreversible
            }
            Self::SigningKeyWindowClosed { .. } => ErrorCode::SigningKeyWindowClosed,
            Self::ApproverRequired => ErrorCode::ApproverRequired,
            Self::ApprovalNotFound(_) => ErrorCode::ApprovalNotFound,
            Self::ApprovalAlreadyResolved { .. } => ErrorCode::ApprovalAlreadyResolved,
            Self::ApprovalExpired(_) => ErrorCode::ApprovalExpired,
            Self::ApprovalNotApproved { .. } => ErrorCode::ApprovalNotApproved,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::CreditUnavailable { .. } => ErrorCode::CreditUnavailable,
        }
    }

    /// The request field at fault, when there is one.
    pub fn field(&self) -> &'static str {
        match self {
            Self::InvalidArgument { field, .. }
            | Self::IdMalformed { field, .. }
            | Self::AmountInvalid { field, .. }
            | Self::TtlInvalid { field, .. }
            | Self::RequestTooLarge { field, .. } => field,
            Self::FencingEpochMissing => "fencing",
            Self::ApproverRequired => "approver",
            _ => "",
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_upper_snake_case() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "duplicate code {name}");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}
