//! The sidecar's errors, each with a stable code (docs/sidecar.md) and an HTTP status.
//!
//! Contract refusals (STOP, REQUIRE_APPROVAL) are not errors: they are decisions. These are the
//! cases where no decision could be made, or a request was malformed; nothing is reserved.

use axum::http::StatusCode;

/// Why a request was refused without a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SidecarError {
    /// A field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The request body is not valid JSON (or not an object).
    #[error("request body is not a JSON object: {0}")]
    InvalidJson(String),
    /// The request body is larger than the configured limit.
    #[error("request body exceeds {limit_bytes} bytes")]
    RequestTooLarge {
        /// The configured limit.
        limit_bytes: usize,
    },
    /// The call's input cannot be bounded from the request (a stored conversation, a file, a
    /// server-side tool): its worst case is unknown, so it is refused (fail closed).
    #[error("input cannot be bounded: {0}")]
    UnboundedInput(String),
    /// The request asks for a pricing tier the pricing snapshot does not hold (OpenAI
    /// `service_tier` `priority` or `scale`; Anthropic's long-context pricing): its cost cannot
    /// be bounded or priced (fail closed).
    #[error("pricing tier not in the snapshot: {0}")]
    UnpricedTier(String),
    /// The call id was already used for another decision (the proxy never forwards twice).
    #[error("call id {0} was already used")]
    CallIdReused(String),
    /// The call id was used before with different fields.
    #[error("call id {0} was used before with different fields")]
    IdempotencyConflict(String),
    /// No decision with this call id is open on this sidecar.
    #[error("no decision with call id {0}")]
    CallNotFound(String),
    /// The decision was already resolved another way.
    #[error("call {0} was already resolved")]
    CallAlreadyResolved(String),
    /// The decision was not a CONTINUE with a reservation.
    #[error("call {0} holds no reservation")]
    NoReservation(String),
    /// The reservation expired before it was released (a commit after the TTL is booked late).
    #[error("the reservation of call {0} expired")]
    ReservationExpired(String),
    /// The usage report does not parse.
    #[error("usage is malformed: {0}")]
    UsageInvalid(String),
    /// No valid fencing lease: the sidecar is starting, draining or was taken over (fail closed).
    #[error("no valid fencing lease: {0}")]
    LeaseUnavailable(String),
    /// The ledger is unreachable or failed (fail closed).
    #[error("ledger unavailable: {0}")]
    DependencyUnavailable(String),
    /// Something answered in the ledger's place without the ledger's answer (no SpendGuard
    /// error detail under a gRPC code that is not a transport failure: a ledger older than the
    /// method, a proxy in between, a stream reset), or the ledger answered with a code this
    /// sidecar does not know. Never a reason to fail open, since nothing says the ledger is
    /// merely away; a settlement refused so is kept and offered again.
    #[error("the ledger's answer cannot be read: {0}")]
    LedgerAnswerUnreadable(String),
    /// The ledger refuses new spend while audit evidence waits outside the canonical chain past
    /// its configured bound (S22's durability policy): an explicit refusal, never a reason to
    /// fail open.
    #[error("ledger refuses new spend: {0}")]
    EvidenceBacklog(String),
    /// The ledger cannot sign the call's audit evidence (its signing key is unavailable), so it
    /// recorded nothing: never a reason to fail open, since the call could not be recorded.
    #[error("ledger cannot sign evidence: {0}")]
    SigningUnavailable(String),
    /// The ledger does not know this sidecar's tenant or budgets: a configuration error, never
    /// a reason to fail open.
    #[error("guard misconfigured: {0}")]
    Misconfigured(String),
    /// The upstream provider could not be reached: nothing was sent to it.
    #[error("upstream provider unreachable: {0}")]
    UpstreamUnavailable(String),
    /// The request went to the upstream provider, and no whole answer came back (a timeout, or
    /// the connection lost): the provider may bill the call.
    #[error("upstream provider did not answer: {0}")]
    UpstreamNoAnswer(String),
    /// A bug; nothing was reserved.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SidecarError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::InvalidJson(_) => "INVALID_JSON",
            Self::RequestTooLarge { .. } => "REQUEST_TOO_LARGE",
            Self::UnboundedInput(_) => "UNBOUNDED_INPUT",
            Self::UnpricedTier(_) => "UNPRICED_TIER",
            Self::CallIdReused(_) => "CALL_ID_REUSED",
            Self::IdempotencyConflict(_) => "IDEMPOTENCY_CONFLICT",
            Self::CallNotFound(_) => "CALL_NOT_FOUND",
            Self::CallAlreadyResolved(_) => "CALL_ALREADY_RESOLVED",
            Self::NoReservation(_) => "NO_RESERVATION",
            Self::ReservationExpired(_) => "RESERVATION_EXPIRED",
            Self::UsageInvalid(_) => "USAGE_INVALID",
            Self::LeaseUnavailable(_) => "LEASE_UNAVAILABLE",
            Self::DependencyUnavailable(_) => "DEPENDENCY_UNAVAILABLE",
            Self::LedgerAnswerUnreadable(_) => "LEDGER_ANSWER_UNREADABLE",
            Self::EvidenceBacklog(_) => "EVIDENCE_BACKLOG",
            Self::SigningUnavailable(_) => "SIGNING_UNAVAILABLE",
            Self::Misconfigured(_) => "GUARD_MISCONFIGURED",
            Self::UpstreamUnavailable(_) => "UPSTREAM_UNAVAILABLE",
            Self::UpstreamNoAnswer(_) => "UPSTREAM_NO_ANSWER",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// Whether a settlement refused with this error may land if sent again later: the ledger
    /// away, the lease lapsed, evidence that cannot be signed for now, or an answer that was
    /// not the ledger's (dropping the settlement would lose the call's spend).
    pub const fn settlement_may_land_later(&self) -> bool {
        matches!(
            self,
            Self::DependencyUnavailable(_)
                | Self::LedgerAnswerUnreadable(_)
                | Self::LeaseUnavailable(_)
                | Self::SigningUnavailable(_)
        )
    }

    /// The HTTP status of the error.
    pub const fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidArgument { .. }
            | Self::InvalidJson(_)
            | Self::UnboundedInput(_)
            | Self::UnpricedTier(_)
            | Self::UsageInvalid(_) => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::CallNotFound(_) => StatusCode::NOT_FOUND,
            Self::CallIdReused(_)
            | Self::IdempotencyConflict(_)
            | Self::CallAlreadyResolved(_)
            | Self::NoReservation(_)
            | Self::ReservationExpired(_) => StatusCode::CONFLICT,
            Self::LeaseUnavailable(_)
            | Self::DependencyUnavailable(_)
            | Self::EvidenceBacklog(_)
            | Self::SigningUnavailable(_)
            | Self::Misconfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable(_) | Self::LedgerAnswerUnreadable(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamNoAnswer(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The request field at fault, when there is one.
    pub const fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The gRPC status of the error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self.http_status() {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::InvalidArgument,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::CONFLICT => tonic::Code::FailedPrecondition,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}
