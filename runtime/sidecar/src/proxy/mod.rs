//! The OpenAI/Anthropic-compatible proxy: decide, forward with the output limit enforced, pass
//! the response through (streams chunk by chunk), then settle exactly once.
//!
//! Settlement, whatever happens:
//! - the provider reported usage ─► commit it (the rest of the reservation is released);
//! - the provider answered with an error status, or could not be reached ─► release;
//! - the stream was cut short or the client went away after the request was sent ─► commit the
//!   whole reservation (the provider may have billed; nothing smaller is safe). Provider usage
//!   reconciliation (S10–S12) refines these later.
//!
//! Settlements run in the background (they only lower what the reservation already holds) and
//! are retried while the ledger is unreachable, within the reservation's TTL.

pub mod hidden_usage;
pub mod refusal;
pub mod request;
pub mod upstream;
pub mod usage;

use crate::decider::{CommitOutcome, DecideInput, Decider, Decision, Spend, Verdict, Waiter};
use crate::error::SidecarError;
use crate::metrics::Metrics;
use crate::pending_commits::PendingCommit;
use crate::settling::SettlingGuard;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hidden_usage::HiddenUsage;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use refusal::{CALL_ID_HEADER, RESERVATION_HEADER, set_decision_headers, set_header};
use request::{Api, ProviderRequest};
use std::collections::HashMap;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use upstream::Upstream;
use usage::StreamUsage;

/// Largest upstream response body read whole (non-streaming).
const RESPONSE_BODY_MAX: usize = 64 << 20;

/// What the proxy needs.
#[derive(Clone)]
pub struct Proxy {
    /// Decisions.
    pub decider: Arc<Decider>,
    /// Upstream client.
    pub upstream: Upstream,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// Background settlements (shutdown waits for them).
    pub settlements: TaskTracker,
    /// Metrics.
    pub metrics: Metrics,
}

/// The provider-compatible routes.
pub fn routes(proxy: Proxy) -> Router {
    Router::new()
        .route(Api::OpenAiChat.path(), post(openai_chat))
        .route(Api::OpenAiResponses.path(), post(openai_responses))
        .route(Api::AnthropicMessages.path(), post(anthropic_messages))
        .with_state(proxy)
}

async fn openai_chat(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy.handle(Api::OpenAiChat, query, headers, body).await
}

async fn openai_responses(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy
        .handle(Api::OpenAiResponses, query, headers, body)
        .await
}

async fn anthropic_messages(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    proxy
        .handle(Api::AnthropicMessages, query, headers, body)
        .await
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl Proxy {
    async fn handle(
        &self,
        api: Api,
        query: Option<String>,
        headers: HeaderMap,
        body: Body,
    ) -> Response {
        match self.guarded(api, query, headers, body).await {
            Ok(response) => response,
            Err(error) => {
                self.metrics.proxy_error(error.code());
                refusal::error(api, &error)
            }
        }
    }

    async fn guarded(
        &self,
        api: Api,
        query: Option<String>,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response, SidecarError> {
        let bytes = axum::body::to_bytes(body, self.body_limit_bytes)
            .await
            .map_err(|_| SidecarError::RequestTooLarge {
                limit_bytes: self.body_limit_bytes,
            })?;
        let request = ProviderRequest::parse(api, &bytes)?;
        request.check_long_context(
            headers
                .get_all("anthropic-beta")
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )?;
        let call_id = match header_text(&headers, CALL_ID_HEADER) {
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let decision = self
            .decide_detached(DecideInput {
                call_id: call_id.clone(),
                provider: api.provider(),
                model: request.model.clone(),
                input_tokens_upper_bound: request.input_tokens_upper_bound,
                max_output_tokens: request.max_output_tokens,
                choices: request.choices,
                run_id: header_text(&headers, "x-spendguard-run-id"),
                workflow_id: header_text(&headers, "x-spendguard-workflow-id"),
                settles: Waiter::Nobody,
            })
            .await?;
        self.metrics.decision(decision.decision, decision.reason);
        if decision.replayed && decision.decision == Verdict::Continue {
            // The proxy forwards a call id once: a retry must not spend twice. A refusal is
            // answered again (a call waiting for approval is retried until it is decided).
            return Err(SidecarError::CallIdReused(call_id));
        }
        if decision.decision != Verdict::Continue {
            return Ok(refusal::decision(api, &decision));
        }
        let settlement = Settlement {
            proxy: self.clone(),
            call_id: call_id.clone(),
            armed: true,
            started: None,
        };
        let max_output_tokens = decision
            .max_output_tokens
            .ok_or_else(|| SidecarError::Internal("CONTINUE without an output limit".into()))?;
        let hides_usage_chunk = request.hides_usage_chunk;
        let request_len = bytes.len();
        let output_bound = u64::from(max_output_tokens).saturating_mul(u64::from(request.choices));
        let upstream_body = match request.into_upstream_body(max_output_tokens) {
            Ok(body) => body,
            Err(e) => {
                settlement.finish(Outcome::Release("guard_error"));
                return Err(e);
            }
        };
        let response = match self
            .upstream
            .send(api, query.as_deref(), &headers, upstream_body)
            .await
        {
            Ok(response) => response,
            Err(e) => {
                // Sent without an answer: the provider may bill the call, so its worst case is
                // committed, as for a stream cut short. Anything else sent nothing (no
                // connection, handed back unsent, not built): the money goes back.
                let outcome = match e {
                    SidecarError::UpstreamNoAnswer(_) => Outcome::Commit(Spend::Unreported),
                    _ => Outcome::Release("upstream_unavailable"),
                };
                settlement.finish(outcome);
                return Err(e);
            }
        };
        let status = response.status();
        let (parts, upstream_body) = response.into_parts();
        let mut out_headers = upstream::response_headers(&parts.headers);
        let is_stream = parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body = if status.is_success() && is_stream {
            Body::from_stream(MeteredStream {
                inner: upstream_body,
                watcher: StreamUsage::new(api, usage::line_len_max(api, request_len, output_bound)),
                hidden_usage: hides_usage_chunk.then(HiddenUsage::default),
                settlement: Some(settlement),
                idle: Box::pin(tokio::time::sleep(self.upstream.timeout())),
                idle_timeout: self.upstream.timeout(),
            })
        } else {
            let read = tokio::time::timeout(
                self.upstream.timeout(),
                http_body_util::Limited::new(upstream_body, RESPONSE_BODY_MAX).collect(),
            )
            .await;
            let bytes = match read {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ if status.is_success() => {
                    // Answered, but not readable in full (cut, late, or too large): its usage is
                    // unknown, so its worst case is committed.
                    settlement.finish(Outcome::Commit(Spend::Unreported));
                    return Err(SidecarError::UpstreamNoAnswer(
                        "the provider's answer could not be read in full".into(),
                    ));
                }
                _ => {
                    // Providers do not bill requests they refused or failed.
                    settlement.finish(Outcome::Release("upstream_error"));
                    return Err(SidecarError::UpstreamUnavailable(format!(
                        "the provider answered {status} with a body that could not be read"
                    )));
                }
            };
            settlement.finish(settle_body(api, status, &bytes));
            out_headers.remove(axum::http::header::CONTENT_LENGTH);
            Body::from(bytes)
        };
        let mut response = (status, out_headers, body).into_response();
        set_decision_headers(&mut response, &decision);
        if let Some(reservation) = &decision.reservation_id {
            set_header(&mut response, RESERVATION_HEADER, reservation);
        }
        Ok(response)
    }
}

impl Proxy {
    /// Decides in a task of its own: a client gone while the ledger reserves for its call drops
    /// the handler, not the decision, and a CONTINUE nobody will forward is released at once
    /// instead of holding its worst case until the reservation's TTL. (A replayed CONTINUE
    /// belongs to the call that made it and is left alone.)
    async fn decide_detached(&self, input: DecideInput) -> Result<Decision, SidecarError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let decider = self.decider.clone();
        let metrics = self.metrics.clone();
        let call_id = input.call_id.clone();
        self.settlements.spawn(async move {
            let decided = decider.decide(input).await;
            if let Err(Ok(decision)) = answer.send(decided)
                && decision.decision == Verdict::Continue
                && !decision.replayed
            {
                let started = decider.settlement_started();
                settle_with_retries(
                    decider,
                    metrics,
                    call_id,
                    Outcome::Release("client_gone"),
                    started,
                )
                .await;
            }
        });
        answered
            .await
            .map_err(|_| SidecarError::Internal("the decision ended without an answer".into()))?
    }
}

/// Settlement of a whole (non-streaming) response.
fn settle_body(api: Api, status: StatusCode, body: &Bytes) -> Outcome {
    if !status.is_success() {
        // Providers do not bill requests they refused or failed.
        return Outcome::Release("upstream_error");
    }
    match usage::from_body(api, body) {
        Some(Ok(usage)) => Outcome::Commit(Spend::Usage(usage)),
        Some(Err(e)) => {
            warn!(error = %e, "upstream usage cannot be priced; committing the reservation");
            Outcome::Commit(Spend::Unreported)
        }
        None => Outcome::Commit(Spend::Unreported),
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Commit(Spend),
    Release(&'static str),
}

/// Resolves a forwarded call exactly once. Dropped unfinished (the client went away while the
/// request was in flight): commits the whole reservation.
struct Settlement {
    proxy: Proxy,
    call_id: String,
    armed: bool,
    /// Marked in flight before the client can see the answer's end, so its next call, refused
    /// for lack of budget, waits for this settlement (`settling.rs`).
    started: Option<SettlingGuard>,
}

impl Settlement {
    fn finish(mut self, outcome: Outcome) {
        self.armed = false;
        self.spawn(outcome);
    }

    /// Marks the settlement in flight now (a stream's terminal event is on its way to the
    /// client; the settlement itself comes when the body ends).
    fn mark_started(&mut self) {
        if self.started.is_none() {
            self.started = Some(self.proxy.decider.settlement_started());
        }
    }

    fn spawn(&mut self, outcome: Outcome) {
        let decider = self.proxy.decider.clone();
        let metrics = self.proxy.metrics.clone();
        let call_id = self.call_id.clone();
        let started = self
            .started
            .take()
            .unwrap_or_else(|| decider.settlement_started());
        self.proxy.settlements.spawn(settle_with_retries(
            decider, metrics, call_id, outcome, started,
        ));
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.armed {
            self.spawn(Outcome::Commit(Spend::Unreported));
        }
    }
}

async fn settle_with_retries(
    decider: Arc<Decider>,
    metrics: Metrics,
    call_id: String,
    outcome: Outcome,
    started: SettlingGuard,
) {
    // Refusals for lack of budget wait for the first attempt only (`started` is dropped after
    // it): retries go on without holding them up.
    match outcome {
        // The first attempt goes through the call table. One that fails for now leaves a pending
        // commit (spooled for the next process, see `Decider::commit`), retried by reservation
        // id: that needs no call-table entry (the table forgets calls TTL + 5 min after their
        // decision, long before a commit's 24 h bound), and a release would be moot past the
        // TTL while a commit is not: the ledger books it late.
        Outcome::Commit(spend) => {
            match first_attempt(decider.commit(&call_id, spend, Waiter::Nobody), started).await {
                Ok(committed) => record_commit(
                    &metrics,
                    &call_id,
                    CommitOutcome::of(committed.late, committed.overrun_nano_usd),
                ),
                Err(e) => match decider.pending_commit(&call_id) {
                    Some(pending) => commit_pending(&decider, &metrics, &pending).await,
                    None => {
                        metrics.settlement("failed");
                        warn!(call_id, code = e.code(), error = %e,
                          "commit failed: the call's usage is not recorded; the TTL sweep returns its reservation");
                    }
                },
            }
        }
        Outcome::Release(reason) => {
            let deadline = Instant::now() + decider.reservation_ttl();
            let mut started = Some(started);
            let released = retry_settlement(deadline, &call_id, || {
                let attempt = decider.release(&call_id, reason, Waiter::Nobody);
                let started = started.take();
                async move {
                    match started {
                        Some(started) => first_attempt(attempt, started).await,
                        None => attempt.await,
                    }
                }
            })
            .await;
            match released {
                Ok(_) => metrics.settlement("release"),
                Err(e) => {
                    metrics.settlement("failed");
                    warn!(call_id, code = e.code(), error = %e,
                          "release failed; the ledger's TTL sweep releases the reservation");
                }
            }
        }
    }
}

/// Runs a settlement's first attempt, then marks the settlement no longer in flight for
/// refusals to wait on.
async fn first_attempt<T>(
    attempt: impl std::future::Future<Output = T>,
    started: SettlingGuard,
) -> T {
    let done = attempt.await;
    drop(started);
    done
}

/// Counts a commit that landed, and an overrun when the usage cost more than the worst case the
/// guard reserved (a late commit is all overrun by design, and not counted as one).
fn record_commit(metrics: &Metrics, call_id: &str, outcome: CommitOutcome) {
    metrics.settlement(outcome.outcome());
    if let CommitOutcome::Committed { overrun_nano_usd } = outcome
        && overrun_nano_usd > 0
    {
        metrics.overrun();
        warn!(
            call_id,
            overrun_nano_usd,
            "the call cost more than its worst case; the ledger booked the rest as an overrun"
        );
    }
}

/// Sends a pending commit by reservation id until the ledger has it (booked late if past its
/// TTL), it is refused for good, or [`PENDING_MAX`] after its first failure.
async fn commit_pending(decider: &Decider, metrics: &Metrics, pending: &PendingCommit) {
    let deadline = Instant::now() + pending.time_left(chrono::Utc::now().timestamp_millis());
    let committed = retry_settlement(deadline, &pending.call_id, || {
        decider.commit_left_over(pending)
    })
    .await;
    match committed {
        Ok(outcome) => record_commit(metrics, &pending.call_id, outcome),
        Err(e) => {
            metrics.settlement("failed");
            decider.abandon_pending_commit(&pending.call_id);
            warn!(call_id = pending.call_id, reservation_id = pending.reservation_id,
                  code = e.code(), error = %e,
                  "commit failed: the call's usage is not recorded");
        }
    }
}

/// Sends the commits a previous process of this pod left in the spool, one after the other:
/// the first waits for the ledger to come back, the rest then land in a round trip each, and a
/// large spool never floods the ledger.
pub async fn resume_pending_commits(
    decider: Arc<Decider>,
    metrics: Metrics,
    left: Vec<PendingCommit>,
    drawn: &HashMap<String, String>,
) {
    if !left.is_empty() {
        warn!(
            commits = left.len(),
            "sending the commits a previous sidecar of this pod could not settle"
        );
    }
    for mut pending in left {
        // A call of a credit drawn again just now: its commit goes to the reservation the
        // draw got, which differs from the spooled one for a draw sent under a key of its own.
        if let Some(id) = drawn.get(&pending.call_id)
            && *id != pending.reservation_id
        {
            pending.reservation_id.clone_from(id);
            decider.hold_pending_commit(&pending);
        }
        commit_pending(&decider, &metrics, &pending).await;
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `deadline` passes while its failures
/// may still land later (backing off from 50 ms to 2 s).
async fn retry_settlement<T, F, Fut>(
    deadline: Instant,
    call_id: &str,
    mut attempt: F,
) -> Result<T, SidecarError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SidecarError>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match attempt().await {
            Ok(settled) => {
                debug!(call_id, "settled");
                return Ok(settled);
            }
            Err(e) if e.settlement_may_land_later() && Instant::now() + backoff < deadline => {
                debug!(call_id, error = %e, "settlement retry");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Passes an upstream SSE body through chunk by chunk while watching for usage; settles when
/// the stream ends, fails, idles past the timeout, or is dropped (client disconnect).
struct MeteredStream {
    inner: Incoming,
    watcher: StreamUsage,
    /// Set when the client did not ask for the usage chunk the guard asked for.
    hidden_usage: Option<HiddenUsage>,
    settlement: Option<Settlement>,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
}

impl MeteredStream {
    fn settle(&mut self) {
        if let Some(settlement) = self.settlement.take() {
            let spend = match self.watcher.usage() {
                Some(Ok(usage)) if self.watcher.is_complete() => Spend::Usage(usage),
                Some(Err(e)) => {
                    warn!(error = %e, "streamed usage cannot be priced; committing the reservation");
                    Spend::Unreported
                }
                _ => Spend::Unreported,
            };
            settlement.finish(Outcome::Commit(spend));
        }
    }
}

impl futures_core::Stream for MeteredStream {
    type Item = Result<Bytes, SidecarError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.settlement.is_none() {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.watcher.feed(&data);
                        if this.watcher.is_complete()
                            && let Some(settlement) = this.settlement.as_mut()
                        {
                            settlement.mark_started();
                        }
                        let next = Instant::now() + this.idle_timeout;
                        this.idle.as_mut().reset(next);
                        let data = match this.hidden_usage.as_mut() {
                            Some(filter) => filter.push(&data),
                            None => data,
                        };
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.settle();
                    return Poll::Ready(Some(Err(SidecarError::UpstreamNoAnswer(e.to_string()))));
                }
                Poll::Ready(None) => {
                    this.settle();
                    // An unfinished last event still goes out (the next poll ends the stream).
                    let tail = this.hidden_usage.as_mut().map(HiddenUsage::finish);
                    return match tail {
                        Some(tail) if !tail.is_empty() => Poll::Ready(Some(Ok(tail))),
                        _ => Poll::Ready(None),
                    };
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.settle();
                        return Poll::Ready(Some(Err(SidecarError::UpstreamNoAnswer(
                            "stream idle past the upstream timeout".into(),
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        self.settle();
    }
}
