//! Answers a message over the size limit as every other bad request is answered.
//!
//! tonic refuses a message over `max_decoding_message_size` while decoding it, before any
//! handler runs, with `OUT_OF_RANGE` and none of the ledger's error details. This wrapper turns
//! that answer into `INVALID_ARGUMENT` with the stable code `REQUEST_TOO_LARGE` (header and
//! `ErrorDetail`), so a caller handles it like any refused field. Nothing was read or written.
//! The ledger's handlers never answer `OUT_OF_RANGE` themselves, so only the transport's refusal
//! is rewritten. It is counted like every refusal (`rpc_errors_total`, under its method's name),
//! though no handler ran.

use crate::error::Error;
use crate::grpc::status;
use crate::metrics::Metrics;
use spendguard_core::ErrorCode;
use spendguard_core::LedgerError;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

/// The ledger's RPCs, as `proto/spendguard/ledger/v1/ledger.proto` names them (a unit test
/// checks the list against the file): the metric label of a refused message's method.
pub const RPCS: &[&str] = &[
    "ReserveSet",
    "Commit",
    "Release",
    "SweepExpired",
    "AcquireFencingLease",
    "UpsertTenant",
    "UpsertBudget",
    "RegisterPricing",
    "RegisterSigningKey",
    "GetBalances",
    "CheckFencing",
    "CreateApproval",
    "ResolveApproval",
    "ListApprovals",
    "GetApproval",
    "RecordFailOpen",
    "RecordStops",
    "UpsertRetentionPolicy",
    "GetRetentionPolicy",
];

/// `inner` with its transport's size refusal answered as `REQUEST_TOO_LARGE`.
#[derive(Clone)]
pub struct SizeLimited<S> {
    inner: S,
    max_message_bytes: usize,
    metrics: Metrics,
}

impl<S> SizeLimited<S> {
    /// Wraps `inner`, whose decoding limit is `max_message_bytes`; refusals are counted in
    /// `metrics`.
    pub fn new(inner: S, max_message_bytes: usize, metrics: Metrics) -> Self {
        Self {
            inner,
            max_message_bytes,
            metrics,
        }
    }
}

/// The metric label of the method `path` names (`/spendguard.ledger.v1.Ledger/ReserveSet`).
fn rpc_of(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.iter()
        .find(|rpc| **rpc == method)
        .copied()
        .unwrap_or("unknown")
}

impl<S, B> Service<Request<B>> for SizeLimited<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let max = self.max_message_bytes;
        let rpc = rpc_of(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(match refused_size(&response) {
                Some(len) => {
                    metrics.observe_rpc(
                        rpc,
                        started.elapsed(),
                        Some(ErrorCode::RequestTooLarge.as_str()),
                    );
                    status(&Error::Refused(LedgerError::RequestTooLarge {
                        field: "request (bytes)",
                        len: len.unwrap_or(max.saturating_add(1)),
                        max,
                    }))
                    .into_http()
                }
                None => response,
            })
        })
    }
}

impl<S: NamedService> NamedService for SizeLimited<S> {
    const NAME: &'static str = S::NAME;
}

/// `Some` when `response` is the transport's `OUT_OF_RANGE` (a trailers-only answer, its status
/// in the headers), with the message's size when tonic's text names it.
fn refused_size(response: &Response<Body>) -> Option<Option<usize>> {
    let headers = response.headers();
    if headers.get("grpc-status")?.as_bytes() != b"11" {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    Some(found_bytes(message))
}

/// The size in tonic's "decoded message length too large: found N bytes, ..." (percent-encoded
/// on the wire, so the spaces may be `%20`).
fn found_bytes(message: &str) -> Option<usize> {
    let message = message.replace("%20", " ");
    let after = message.split("found ").nth(1)?;
    after.split(' ').next()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_rpc_list_is_the_services() {
        let proto = include_str!("../../../proto/spendguard/ledger/v1/ledger.proto");
        let mut declared: Vec<&str> = proto
            .lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .filter_map(|rest| rest.split('(').next())
            .map(str::trim)
            .collect();
        let mut listed = RPCS.to_vec();
        declared.sort_unstable();
        listed.sort_unstable();
        assert_eq!(listed, declared);
        assert_eq!(
            rpc_of("/spendguard.ledger.v1.Ledger/ReserveSet"),
            "ReserveSet"
        );
        assert_eq!(rpc_of("/spendguard.ledger.v1.Ledger/Nope"), "unknown");
    }

    #[test]
    fn the_size_is_read_from_tonics_message_plain_or_percent_encoded() {
        let text = "decoded message length too large: found 70010 bytes, the limit is: 65536 bytes";
        assert_eq!(found_bytes(text), Some(70_010));
        assert_eq!(found_bytes(&text.replace(' ', "%20")), Some(70_010));
        assert_eq!(found_bytes("something else"), None);
    }

    #[test]
    fn only_a_trailers_only_out_of_range_is_a_size_refusal() {
        let answer = |code: tonic::Code| tonic::Status::new(code, "m").into_http::<Body>();
        assert_eq!(refused_size(&answer(tonic::Code::OutOfRange)), Some(None));
        assert_eq!(refused_size(&answer(tonic::Code::InvalidArgument)), None);
        assert_eq!(refused_size(&Response::new(Body::empty())), None);
    }
}
