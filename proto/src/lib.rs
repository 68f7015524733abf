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
    /// status details, or, without one, from the gRPC code alone.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Answer {
        /// The ledger answered with this stable code.
        Code(v1::ErrorCode),
        /// The ledger answered with a code this build does not know (a newer ledger). It did
        /// answer, so callers must not take it for an unreachable ledger.
        UnknownCode(i32),
        /// No answer: the transport failed before the ledger answered (connection refused or
        /// reset, deadline, cancelled). A status without a detail under a code
        /// [`is_transport_failure`] accepts.
        NoAnswer(tonic::Code),
        /// A status without a SpendGuard detail under any other gRPC code: something answered,
        /// but not with the ledger's answer. A ledger older than the method (`UNIMPLEMENTED`), a
        /// proxy or mesh in between (`PERMISSION_DENIED`, `UNAUTHENTICATED`), a stream reset
        /// mid-answer (`INTERNAL`), a message over a limit (`RESOURCE_EXHAUSTED`). Nothing says
        /// the ledger is merely away, so it is no reason to fail open; nor is it a refusal,
        /// so nothing may be dropped for it.
        Unreadable(tonic::Code),
    }

    /// The metadata key under which the ledger names its stable code in every status it answers,
    /// beside the `ErrorDetail`.
    pub const ERROR_CODE_HEADER: &str = "spendguard-error-code";

    impl Answer {
        /// Reads `status`. A detail counts as the ledger's only beside the ledger's
        /// [`ERROR_CODE_HEADER`], which must name the same code: a peer in between may put its
        /// own detail (`google.rpc.Status` decodes as an `ErrorDetail` too). Only a status
        /// without any detail can be no answer at all: a transport failure raised in this
        /// process carries none, and a detail that cannot be checked (its header lost on the
        /// way, or contradicting it) may be the ledger saying "never fail open"
        /// (`EVIDENCE_BACKLOG` comes under `UNAVAILABLE`), so it is unreadable, not away.
        pub fn of(status: &tonic::Status) -> Self {
            use prost::Message;
            if status.details().is_empty() {
                return if is_transport_failure(status.code()) {
                    Self::NoAnswer(status.code())
                } else {
                    Self::Unreadable(status.code())
                };
            }
            let header = status
                .metadata()
                .get(ERROR_CODE_HEADER)
                .and_then(|value| value.to_str().ok());
            let (Ok(detail), Some(header)) = (v1::ErrorDetail::decode(status.details()), header)
            else {
                return Self::Unreadable(status.code());
            };
            match v1::ErrorCode::try_from(detail.code) {
                Ok(code) if code != v1::ErrorCode::Unspecified && code_name(code) == header => {
                    Self::Code(code)
                }
                Ok(_) => Self::Unreadable(status.code()),
                Err(_) => Self::UnknownCode(detail.code),
            }
        }

        /// The known code, if the ledger answered with one.
        pub fn code(self) -> Option<v1::ErrorCode> {
            match self {
                Self::Code(code) => Some(code),
                Self::UnknownCode(_) | Self::NoAnswer(_) | Self::Unreadable(_) => None,
            }
        }

        /// Whether the ledger itself answered (with a SpendGuard detail, known or not).
        pub fn from_the_ledger(self) -> bool {
            matches!(self, Self::Code(_) | Self::UnknownCode(_))
        }

        /// Whether the ledger itself refused the request: its own answer, and not one that says
        /// it is away. Anything else (no answer, an answer that is not the ledger's) may change
        /// if the request is sent again.
        pub fn ledger_refused(self) -> bool {
            self.from_the_ledger() && !self.ledger_away()
        }

        /// Whether the answer says only that the ledger is away for now, so the same request may
        /// be answered later: no answer at all, or a code that says so ([`is_away`]).
        pub fn ledger_away(self) -> bool {
            match self {
                Self::Code(code) => is_away(code),
                Self::NoAnswer(_) => true,
                Self::UnknownCode(_) | Self::Unreadable(_) => false,
            }
        }
    }

    /// A code's name as the ledger writes it in [`ERROR_CODE_HEADER`] (`BUDGET_EXHAUSTED`).
    pub fn code_name(code: v1::ErrorCode) -> &'static str {
        let name = code.as_str_name();
        name.strip_prefix("ERROR_CODE_").unwrap_or(name)
    }

    /// The gRPC codes a status without a SpendGuard detail carries when the call never reached
    /// an answer: the connection was refused or broke (`UNAVAILABLE`, and `UNKNOWN`, which tonic
    /// gives a transport error it cannot classify), the deadline passed (`DEADLINE_EXCEEDED`)
    /// or the call was cancelled (`CANCELLED`). A service mesh answers an unreachable ledger
    /// `UNAVAILABLE` too (tonic maps HTTP 429, 502, 503 and 504 without a gRPC status to it).
    /// HTTP codes tonic does not map (an ingress's 500 in front of the ledger) become `UNKNOWN`,
    /// so they read as an unreachable ledger too. One list for every client.
    pub fn is_transport_failure(code: tonic::Code) -> bool {
        matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        )
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

    #[cfg(test)]
    mod tests {
        use super::{Answer, v1};

        /// A status as the ledger answers: the detail, and the header naming its code.
        fn with_detail(code: tonic::Code, detail: i32) -> tonic::Status {
            let name = v1::ErrorCode::try_from(detail).map_or("SOMETHING_NEW", super::code_name);
            with_detail_named(code, detail, Some(name))
        }

        fn with_detail_named(
            code: tonic::Code,
            detail: i32,
            header: Option<&str>,
        ) -> tonic::Status {
            let detail = v1::ErrorDetail {
                code: detail,
                message: "x".into(),
                field: String::new(),
            };
            let mut status = tonic::Status::with_details(
                code,
                "x",
                prost::Message::encode_to_vec(&detail).into(),
            );
            if let Some(header) = header {
                status
                    .metadata_mut()
                    .insert(super::ERROR_CODE_HEADER, header.parse().unwrap());
            }
            status
        }

        #[test]
        fn only_a_transport_failure_without_a_detail_is_no_answer() {
            use tonic::Code as G;
            for code in [
                G::Unavailable,
                G::DeadlineExceeded,
                G::Cancelled,
                G::Unknown,
            ] {
                let answer = Answer::of(&tonic::Status::new(code, "x"));
                assert_eq!(answer, Answer::NoAnswer(code));
                assert!(answer.ledger_away() && !answer.from_the_ledger());
            }
            for code in [
                G::Unimplemented,
                G::Internal,
                G::OutOfRange,
                G::ResourceExhausted,
                G::PermissionDenied,
                G::Unauthenticated,
                G::InvalidArgument,
                G::FailedPrecondition,
                G::NotFound,
                G::DataLoss,
            ] {
                let answer = Answer::of(&tonic::Status::new(code, "x"));
                assert_eq!(answer, Answer::Unreadable(code));
                assert!(!answer.ledger_away() && !answer.from_the_ledger());
                assert!(!answer.ledger_refused());
            }
        }

        #[test]
        fn a_detail_decides_whatever_the_grpc_code() {
            let away = Answer::of(&with_detail(
                tonic::Code::Unavailable,
                v1::ErrorCode::DependencyUnavailable as i32,
            ));
            assert_eq!(away, Answer::Code(v1::ErrorCode::DependencyUnavailable));
            assert!(away.ledger_away() && away.from_the_ledger());
            let refused = Answer::of(&with_detail(
                tonic::Code::Unavailable,
                v1::ErrorCode::BudgetExhausted as i32,
            ));
            assert!(!refused.ledger_away() && refused.from_the_ledger());
            assert!(refused.ledger_refused() && !away.ledger_refused());
            let newer = Answer::of(&with_detail(tonic::Code::Unavailable, 9_999));
            assert_eq!(newer, Answer::UnknownCode(9_999));
            assert!(!newer.ledger_away() && newer.from_the_ledger());
        }

        #[test]
        fn a_detail_without_the_ledgers_header_is_not_the_ledgers() {
            // A proxy's `google.rpc.Status {code: 3}` decodes as ErrorDetail {code: 3}.
            let code = v1::ErrorCode::try_from(3).unwrap();
            let bare = with_detail_named(tonic::Code::InvalidArgument, 3, None);
            assert_eq!(
                Answer::of(&bare),
                Answer::Unreadable(tonic::Code::InvalidArgument)
            );
            // The ledger's own detail whose header was lost on the way (EVIDENCE_BACKLOG comes
            // under UNAVAILABLE): not an unreachable ledger, which could fail open.
            let backlog = v1::ErrorCode::EvidenceBacklog as i32;
            let unavailable = with_detail_named(tonic::Code::Unavailable, backlog, None);
            assert_eq!(
                Answer::of(&unavailable),
                Answer::Unreadable(tonic::Code::Unavailable)
            );
            assert!(!Answer::of(&unavailable).ledger_away());
            let contradicted =
                with_detail_named(tonic::Code::InvalidArgument, 3, Some("BUDGET_EXHAUSTED"));
            assert_ne!(super::code_name(code), "BUDGET_EXHAUSTED");
            assert_eq!(
                Answer::of(&contradicted),
                Answer::Unreadable(tonic::Code::InvalidArgument)
            );
            let named = with_detail_named(
                tonic::Code::InvalidArgument,
                3,
                Some(super::code_name(code)),
            );
            assert_eq!(Answer::of(&named), Answer::Code(code));
        }
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
