//! A mock OpenAI and Anthropic upstream for tests, benchmarks and the demo.
//!
//! It speaks the documented shapes (Chat Completions, Responses, Messages; JSON and server-sent
//! events) with deterministic usage:
//! - input tokens: one per 4 bytes of message text, rounded up, plus 3 per message;
//! - output tokens: the configured count, capped by the request's output limit (`finish_reason`
//!   `length` / `stop_reason` `max_tokens` when capped), one word per token.
//!
//! Per-request overrides (headers): `x-mock-output-tokens`, `x-mock-latency-ms`,
//! `x-mock-chunk-delay-ms`, `x-mock-cached-tokens` (input read from the prompt cache, at most the
//! input: a subset of OpenAI's input total, *outside* Anthropic's `input_tokens`, as each
//! documents), and `x-mock-fail` = `status:<code>` | `drop-mid-stream` | `hang` | `no-usage` |
//! `over-limit` (a provider that bills more output than the request's limit allowed), and
//! `x-mock-service-tier` (the tier a Chat Completions answer reports, `default` unless set, as a
//! project whose default tier is `priority` would get it; in every stream chunk when set). A
//! request without credentials gets the provider's 401.
//! `GET /_mock/requests` lists what was received (path, headers, body); `DELETE` clears it.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Most requests kept for inspection.
const RECORDED_MAX: usize = 10_000;

/// Defaults for every response.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Output tokens per response (capped by the request's limit).
    pub output_tokens: u32,
    /// Delay before the response starts.
    pub latency_ms: u64,
    /// Delay between stream chunks.
    pub chunk_delay_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            output_tokens: 16,
            latency_ms: 0,
            chunk_delay_ms: 0,
        }
    }
}

/// The mock provider.
#[derive(Clone)]
pub struct MockProvider {
    config: MockConfig,
    recorded: Arc<Mutex<Vec<Value>>>,
    counter: Arc<AtomicU64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Responses,
    Messages,
}

enum Failure {
    Status(u16),
    DropMidStream,
    Hang,
    NoUsage,
    OverLimit,
}

struct Plan {
    api: Api,
    model: String,
    stream: bool,
    include_usage: bool,
    input_tokens: u64,
    /// Of the input, read from the prompt cache.
    cached_tokens: u64,
    /// Output tokens of each choice.
    output_tokens: u32,
    /// Chat completions asked for (`n`); 1 for the other APIs.
    choices: u32,
    capped: bool,
    latency: Duration,
    chunk_delay: Duration,
    failure: Option<Failure>,
    /// The service tier a Chat Completions answer reports, when the request set one.
    service_tier: Option<String>,
    id: u64,
}

impl MockProvider {
    /// A mock with `config`.
    pub fn new(config: MockConfig) -> Self {
        Self {
            config,
            recorded: Arc::new(Mutex::new(Vec::new())),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .route("/v1/messages", post(messages))
            .route("/_mock/requests", get(list).delete(clear))
            .with_state(self.clone())
    }

    /// Serves on `listener` in the background.
    pub fn spawn(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        tokio::spawn(async move {
            let _ = axum::serve(nodelay(listener), router).await;
        })
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn record(&self, path: &str, headers: &HeaderMap, body: &Value) {
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(v.to_str().unwrap_or("").to_owned()),
                )
            })
            .collect();
        if let Ok(mut recorded) = self.recorded.lock()
            && recorded.len() < RECORDED_MAX
        {
            recorded.push(json!({"path": path, "headers": headers, "body": body}));
        }
    }
}

async fn list(State(mock): State<MockProvider>) -> Response {
    axum::Json(Value::Array(mock.requests())).into_response()
}

async fn clear(State(mock): State<MockProvider>) -> StatusCode {
    if let Ok(mut recorded) = mock.recorded.lock() {
        recorded.clear();
    }
    StatusCode::NO_CONTENT
}

async fn chat(State(mock): State<MockProvider>, headers: HeaderMap, body: Bytes) -> Response {
    serve(mock, Api::Chat, headers, body).await
}

async fn responses(State(mock): State<MockProvider>, headers: HeaderMap, body: Bytes) -> Response {
    serve(mock, Api::Responses, headers, body).await
}

async fn messages(State(mock): State<MockProvider>, headers: HeaderMap, body: Bytes) -> Response {
    serve(mock, Api::Messages, headers, body).await
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

fn error(api: Api, status: StatusCode, kind: &str, message: &str) -> Response {
    let body = match api {
        Api::Chat | Api::Responses => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
        Api::Messages => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    (status, axum::Json(body)).into_response()
}

/// Text bytes of every string under the message-bearing fields.
fn text_bytes(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| k.as_str() != "type" && k.as_str() != "role")
            .map(|(_, v)| text_bytes(v))
            .sum(),
        _ => 0,
    }
}

fn input_tokens(api: Api, body: &Value) -> u64 {
    let fields: &[&str] = match api {
        Api::Chat => &["messages"],
        Api::Responses => &["input", "instructions"],
        Api::Messages => &["messages", "system"],
    };
    let mut bytes = 0;
    let mut messages = 0;
    for field in fields {
        if let Some(v) = body.get(*field) {
            bytes += text_bytes(v);
            messages += v.as_array().map_or(1, |a| a.len() as u64);
        }
    }
    bytes.div_ceil(4) + 3 * messages
}

async fn serve(mock: MockProvider, api: Api, headers: HeaderMap, bytes: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return error(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body is not a JSON object",
            );
        }
    };
    let path = match api {
        Api::Chat => "/v1/chat/completions",
        Api::Responses => "/v1/responses",
        Api::Messages => "/v1/messages",
    };
    mock.record(path, &headers, &body);
    let authorized = match api {
        Api::Chat | Api::Responses => headers.contains_key(header::AUTHORIZATION),
        // Anthropic takes `x-api-key`; its newer clients send the key as a bearer token.
        Api::Messages => {
            headers.contains_key("x-api-key") || headers.contains_key(header::AUTHORIZATION)
        }
    };
    if !authorized {
        let kind = match api {
            Api::Messages => "authentication_error",
            _ => "invalid_request_error",
        };
        return error(api, StatusCode::UNAUTHORIZED, kind, "missing API key");
    }
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model is required",
        );
    };
    let limit = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|f| body.get(*f).and_then(Value::as_u64))
        .min();
    if api == Api::Messages && limit.is_none() {
        return error(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    }
    let wanted = header_u64(&headers, "x-mock-output-tokens")
        .map_or(mock.config.output_tokens, |v| {
            u32::try_from(v).unwrap_or(u32::MAX)
        });
    let failure = headers
        .get("x-mock-fail")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| match v {
            "drop-mid-stream" => Some(Failure::DropMidStream),
            "hang" => Some(Failure::Hang),
            "no-usage" => Some(Failure::NoUsage),
            "over-limit" => Some(Failure::OverLimit),
            other => other
                .strip_prefix("status:")
                .and_then(|s| s.parse().ok())
                .map(Failure::Status),
        });
    let output_tokens = match limit {
        Some(l) if !matches!(failure, Some(Failure::OverLimit)) => {
            wanted.min(u32::try_from(l).unwrap_or(u32::MAX))
        }
        _ => wanted,
    };
    // OpenAI accepts `n` from 1 to 128 on chat completions (and bills every choice's output).
    let choices = match (api, body.get("n")) {
        (Api::Chat, Some(n)) if !n.is_null() => match n.as_u64() {
            Some(n @ 1..=128) => u32::try_from(n).unwrap_or(1),
            _ => {
                return error(
                    api,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "n: must be an integer from 1 to 128",
                );
            }
        },
        _ => 1,
    };
    let input = input_tokens(api, &body);
    let plan = Plan {
        api,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        input_tokens: input,
        cached_tokens: header_u64(&headers, "x-mock-cached-tokens")
            .unwrap_or(0)
            .min(input),
        output_tokens,
        choices,
        capped: output_tokens < wanted,
        latency: Duration::from_millis(
            header_u64(&headers, "x-mock-latency-ms").unwrap_or(mock.config.latency_ms),
        ),
        chunk_delay: Duration::from_millis(
            header_u64(&headers, "x-mock-chunk-delay-ms").unwrap_or(mock.config.chunk_delay_ms),
        ),
        failure,
        service_tier: headers
            .get("x-mock-service-tier")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        id: mock.counter.fetch_add(1, Ordering::Relaxed),
        model,
    };
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    match plan.failure {
        Some(Failure::Hang) => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Some(Failure::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = match (api, code) {
                (Api::Messages, 529) => "overloaded_error",
                (Api::Messages, 429) | (_, 429) => "rate_limit_error",
                (Api::Messages, _) => "api_error",
                _ => "server_error",
            };
            return error(api, status, kind, "mock failure");
        }
        _ => {}
    }
    if plan.stream {
        stream_response(plan)
    } else {
        axum::Json(whole(&plan)).into_response()
    }
}

fn text(tokens: u32) -> String {
    (0..tokens).map(|_| "mock ").collect::<String>()
}

fn usage(plan: &Plan) -> Value {
    // The input is billed once; the output of every choice.
    let (i, o, c) = (
        plan.input_tokens,
        u64::from(plan.output_tokens) * u64::from(plan.choices),
        plan.cached_tokens,
    );
    match plan.api {
        Api::Chat => json!({
            "prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o,
            "prompt_tokens_details": {"cached_tokens": c, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        }),
        Api::Responses => json!({
            "input_tokens": i, "input_tokens_details": {"cached_tokens": c},
            "output_tokens": o, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": i + o
        }),
        Api::Messages => json!({
            "input_tokens": i - c, "output_tokens": o,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": c,
            "service_tier": "standard"
        }),
    }
}

fn response_object(plan: &Plan, status: &str, output_text: Option<&str>) -> Value {
    let output = match output_text {
        Some(t) => json!([{
            "type": "message", "id": format!("msg_mock_{}", plan.id), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]
        }]),
        None => json!([]),
    };
    json!({
        "id": format!("resp_mock_{}", plan.id), "object": "response", "created_at": 1_764_000_000,
        "status": status, "model": plan.model, "output": output,
        "error": null, "incomplete_details": null, "instructions": null, "metadata": {},
        "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
        "tools": [], "text": {"format": {"type": "text"}},
        "usage": if status == "completed" && !matches!(plan.failure, Some(Failure::NoUsage)) { usage(plan) } else { Value::Null }
    })
}

fn whole(plan: &Plan) -> Value {
    let t = text(plan.output_tokens);
    let mut body = match plan.api {
        Api::Chat => json!({
            "id": format!("chatcmpl-mock-{}", plan.id), "object": "chat.completion",
            "created": 1_764_000_000, "model": plan.model, "system_fingerprint": "fp_mock",
            "service_tier": plan.service_tier.as_deref().unwrap_or("default"),
            "choices": (0..plan.choices).map(|index| json!(
                {"index": index, "message": {"role": "assistant", "content": t, "refusal": null, "annotations": []},
                 "logprobs": null, "finish_reason": if plan.capped { "length" } else { "stop" }})).collect::<Vec<_>>(),
            "usage": usage(plan)
        }),
        Api::Responses => response_object(plan, "completed", Some(&t)),
        Api::Messages => json!({
            "id": format!("msg_mock_{}", plan.id), "type": "message", "role": "assistant",
            "model": plan.model, "content": [{"type": "text", "text": t}],
            "stop_reason": if plan.capped { "max_tokens" } else { "end_turn" },
            "stop_sequence": null, "usage": usage(plan)
        }),
    };
    if matches!(plan.failure, Some(Failure::NoUsage))
        && let Some(map) = body.as_object_mut()
    {
        map.remove("usage");
    }
    body
}

/// SSE events (name, data) of a streamed response.
fn events(plan: &Plan) -> Vec<(Option<&'static str>, Value)> {
    let words: Vec<&str> = (0..plan.output_tokens).map(|_| "mock ").collect();
    let no_usage = matches!(plan.failure, Some(Failure::NoUsage));
    let mut out = Vec::new();
    match plan.api {
        Api::Chat => {
            let id = format!("chatcmpl-mock-{}", plan.id);
            // Every chunk names the tier the request set (OpenAI's chunks carry `service_tier`).
            let tiered = |mut chunk: Value| {
                if let Some(tier) = &plan.service_tier {
                    chunk["service_tier"] = json!(tier);
                }
                chunk
            };
            // One choice per chunk, the choices interleaved, as OpenAI streams `n` > 1.
            let chunk = |index: u32, delta: Value, finish: Value| {
                let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_764_000_000,
                    "model": plan.model, "system_fingerprint": "fp_mock",
                    "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                if plan.include_usage {
                    c["usage"] = Value::Null;
                }
                tiered(c)
            };
            for index in 0..plan.choices {
                out.push((
                    None,
                    chunk(
                        index,
                        json!({"role": "assistant", "content": "", "refusal": null}),
                        Value::Null,
                    ),
                ));
            }
            for w in &words {
                for index in 0..plan.choices {
                    out.push((None, chunk(index, json!({"content": w}), Value::Null)));
                }
            }
            for index in 0..plan.choices {
                out.push((
                    None,
                    chunk(
                        index,
                        json!({}),
                        json!(if plan.capped { "length" } else { "stop" }),
                    ),
                ));
            }
            if plan.include_usage && !no_usage {
                out.push((None, tiered(json!({"id": id, "object": "chat.completion.chunk", "created": 1_764_000_000,
                    "model": plan.model, "system_fingerprint": "fp_mock", "choices": [], "usage": usage(plan)}))));
            }
        }
        Api::Responses => {
            let item = format!("msg_mock_{}", plan.id);
            let mut seq = 0u64;
            let mut ev = |name: &'static str, mut data: Value| {
                data["type"] = json!(name);
                data["sequence_number"] = json!(seq);
                seq += 1;
                (Some(name), data)
            };
            out.push(ev(
                "response.created",
                json!({"response": response_object(plan, "in_progress", None)}),
            ));
            out.push(ev(
                "response.in_progress",
                json!({"response": response_object(plan, "in_progress", None)}),
            ));
            out.push(ev("response.output_item.added", json!({"output_index": 0,
                "item": {"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []}})));
            out.push(ev(
                "response.content_part.added",
                json!({"item_id": item, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            ));
            for w in &words {
                out.push(ev(
                    "response.output_text.delta",
                    json!({"item_id": item, "output_index": 0,
                    "content_index": 0, "delta": w, "logprobs": []}),
                ));
            }
            let t = text(plan.output_tokens);
            out.push(ev(
                "response.output_text.done",
                json!({"item_id": item, "output_index": 0,
                "content_index": 0, "text": t, "logprobs": []}),
            ));
            out.push(ev(
                "response.content_part.done",
                json!({"item_id": item, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": t, "annotations": []}}),
            ));
            out.push(ev(
                "response.output_item.done",
                json!({"output_index": 0,
                "item": {"type": "message", "id": item, "status": "completed", "role": "assistant",
                         "content": [{"type": "output_text", "text": t, "annotations": []}]}}),
            ));
            out.push(ev(
                "response.completed",
                json!({"response": response_object(plan, "completed", Some(&t))}),
            ));
        }
        Api::Messages => {
            let mut start_usage = usage(plan);
            start_usage["output_tokens"] = json!(1);
            out.push((
                Some("message_start"),
                json!({"type": "message_start", "message": {
                "id": format!("msg_mock_{}", plan.id), "type": "message", "role": "assistant",
                "model": plan.model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": if no_usage { Value::Null } else { start_usage }}}),
            ));
            out.push((
                Some("content_block_start"),
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            out.push((Some("ping"), json!({"type": "ping"})));
            for w in &words {
                out.push((
                    Some("content_block_delta"),
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": w}}),
                ));
            }
            out.push((
                Some("content_block_stop"),
                json!({"type": "content_block_stop", "index": 0}),
            ));
            let delta_usage = if no_usage {
                Value::Null
            } else {
                json!({"output_tokens": plan.output_tokens})
            };
            out.push((Some("message_delta"), json!({"type": "message_delta",
                "delta": {"stop_reason": if plan.capped { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
                "usage": delta_usage})));
            out.push((Some("message_stop"), json!({"type": "message_stop"})));
        }
    }
    out
}

fn stream_response(plan: Plan) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let events = events(&plan);
    let drop_mid = matches!(plan.failure, Some(Failure::DropMidStream));
    let chat = plan.api == Api::Chat;
    let delay = plan.chunk_delay;
    tokio::spawn(async move {
        for (index, (name, data)) in events.into_iter().enumerate() {
            if drop_mid && index == 2 {
                let _ = tx
                    .send(Err(std::io::Error::other("mock: connection dropped")))
                    .await;
                return;
            }
            let frame = match name {
                Some(name) => format!("event: {name}\ndata: {data}\n\n"),
                None => format!("data: {data}\n\n"),
            };
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        if chat {
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `listener` with Nagle's algorithm off on every accepted connection, as a provider's edge has
/// it: streamed chunks leave as they are written.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    })
}
