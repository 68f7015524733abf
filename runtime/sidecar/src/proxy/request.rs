//! Provider requests as the guard sees them: which API, which model, an input bound that cannot
//! undercount, the output limit, and the body to forward with that limit enforced.
//!
//! The input bound is the byte length of the body sent upstream (or the client's, if longer) plus
//! fixed allowances. Every prompt token comes from at least one byte of text in the body (JSON
//! escaping only adds bytes), and the per-message framing tokens are fewer than the bytes of the
//! JSON framing around each message. The body is forwarded re-serialized, and a number can grow
//! then (`1e15` becomes `1000000000000000.0`), so both lengths count. What bytes cannot bound is
//! refused (fail closed): stored conversations and items, files, audio and server-side tools,
//! whose cost is unknown before the call; and service tiers billed at prices the snapshot does
//! not hold.

use crate::error::SidecarError;
use serde_json::{Map, Value};
use spendguard_core::contract::CHOICES_MAX;
use spendguard_core::pricing::Provider;

/// Tokens allowed for the tool-use system prompt providers add when tools are present.
pub const TOOLS_OVERHEAD_TOKENS: u64 = 1_000;
/// Input tokens above which Anthropic bills a request sent with the 1M-context beta at its
/// long-context prices (twice the input price, one and a half the output price).
pub const ANTHROPIC_LONG_CONTEXT_TOKENS: u64 = 200_000;
/// Fixed allowance for request framing.
pub const BASE_OVERHEAD_TOKENS: u64 = 64;

/// The provider APIs the proxy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions`.
    OpenAiChat,
    /// OpenAI `POST /v1/responses`.
    OpenAiResponses,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
}

impl Api {
    /// The provider that prices the call.
    pub const fn provider(self) -> Provider {
        match self {
            Self::OpenAiChat | Self::OpenAiResponses => Provider::Openai,
            Self::AnthropicMessages => Provider::Anthropic,
        }
    }

    /// The request path (the same upstream and at the proxy).
    pub const fn path(self) -> &'static str {
        match self {
            Self::OpenAiChat => "/v1/chat/completions",
            Self::OpenAiResponses => "/v1/responses",
            Self::AnthropicMessages => "/v1/messages",
        }
    }

    /// The output-limit fields the API accepts; the first is the one the guard sets.
    const fn output_limit_fields(self) -> &'static [&'static str] {
        match self {
            Self::OpenAiChat => &["max_completion_tokens", "max_tokens"],
            Self::OpenAiResponses => &["max_output_tokens"],
            Self::AnthropicMessages => &["max_tokens"],
        }
    }

    /// Tool types the client runs itself (priced as tokens); others are server-side tools.
    const fn client_tool_types(self) -> &'static [&'static str] {
        match self {
            Self::OpenAiChat | Self::OpenAiResponses => &["function", "custom"],
            Self::AnthropicMessages => &["custom"],
        }
    }

    /// Tokens allowed per image part: above every documented per-image cost of the provider.
    /// OpenAI: the largest is gpt-4o-mini at high detail, 2,833 + 8 tiles × 5,667 = 48,169
    /// (an image is scaled to fit 2,048 px, then its short side to 768 px: at most 2 × 4 tiles
    /// of 512 px); patch-based models stop at 1,536 patches × 2.46 = 3,779. Anthropic resizes an
    /// image to about 1.15 megapixels, ~1,600 tokens (w × h / 750). Per-model figures belong in
    /// the pricing snapshot once it carries them.
    pub const fn image_tokens_max(self) -> u64 {
        match self {
            Self::OpenAiChat | Self::OpenAiResponses => 50_000,
            Self::AnthropicMessages => 10_000,
        }
    }

    /// Service tiers billed at prices the pricing snapshot holds (absent, or one of these):
    /// OpenAI's `priority` costs more per token and `scale` is billed from reserved units, so
    /// neither can be priced from the snapshot's per-token prices; `flex` costs less (its usage
    /// priced at the standard prices over-counts, never under). Anthropic's `service_tier`
    /// chooses between capacities billed at standard prices.
    const fn priced_service_tiers(self) -> Option<&'static [&'static str]> {
        match self {
            Self::OpenAiChat | Self::OpenAiResponses => Some(&["auto", "default", "flex"]),
            Self::AnthropicMessages => None,
        }
    }

    /// A `service_tier` (asked for in a request, or reported in a response) the snapshot does
    /// not price, if it is one.
    pub fn unpriced_tier(self, tier: Option<&Value>) -> Option<String> {
        let priced = self.priced_service_tiers()?;
        match tier? {
            Value::Null => None,
            Value::String(tier) if priced.contains(&tier.as_str()) => None,
            Value::String(tier) => Some(tier.clone()),
            other => Some(other.to_string()),
        }
    }

    /// Request fields that pull in input the body does not contain.
    const fn unbounded_fields(self) -> &'static [&'static str] {
        match self {
            Self::OpenAiChat => &["web_search_options", "audio"],
            Self::OpenAiResponses => &["previous_response_id", "conversation", "prompt"],
            Self::AnthropicMessages => &["mcp_servers", "container"],
        }
    }
}

/// A parsed request, before the guard's output limit is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderRequest {
    /// The API.
    pub api: Api,
    /// Model as requested.
    pub model: String,
    /// Server-sent events requested.
    pub stream: bool,
    /// The client's output limit, if it set one (per choice).
    pub max_output_tokens: Option<u32>,
    /// Completions asked for: OpenAI chat `n` (1 when absent); 1 for the other APIs.
    pub choices: u32,
    /// Input tokens that cannot undercount.
    pub input_tokens_upper_bound: u64,
    /// An OpenAI chat stream whose client did not ask for its usage chunk: the guard asks for
    /// it, and hides it from the client (`hidden_usage.rs`).
    pub hides_usage_chunk: bool,
    body: Map<String, Value>,
}

impl ProviderRequest {
    /// Refuses a request whose price depends on a tier the snapshot does not hold, given the
    /// `anthropic-beta` header values: Anthropic's 1M-context beta bills input above
    /// [`ANTHROPIC_LONG_CONTEXT_TOKENS`] at long-context prices (without the beta, such input is
    /// refused by Anthropic). A request that may reach it is refused; one bound below it is
    /// billed at the standard prices.
    ///
    /// # Errors
    /// [`SidecarError::UnpricedTier`].
    pub fn check_long_context<'a>(
        &self,
        betas: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SidecarError> {
        let long_context_beta = betas
            .into_iter()
            .flat_map(|v| v.split(','))
            .any(|beta| beta.trim().starts_with("context-1m"));
        if self.api == Api::AnthropicMessages
            && long_context_beta
            && self.input_tokens_upper_bound > ANTHROPIC_LONG_CONTEXT_TOKENS
        {
            return Err(SidecarError::UnpricedTier(format!(
                "with the context-1m beta, input above {ANTHROPIC_LONG_CONTEXT_TOKENS} tokens is billed at long-context prices the pricing snapshot does not hold (this request's input bound is {})",
                self.input_tokens_upper_bound
            )));
        }
        Ok(())
    }

    /// Parses and checks a request body.
    ///
    /// # Errors
    /// [`SidecarError::InvalidJson`], [`SidecarError::InvalidArgument`] (model, stream, output
    /// limits) or [`SidecarError::UnboundedInput`].
    pub fn parse(api: Api, bytes: &[u8]) -> Result<Self, SidecarError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| SidecarError::InvalidJson(e.to_string()))?;
        let Value::Object(body) = value else {
            return Err(SidecarError::InvalidJson("expected an object".into()));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
            _ => {
                return Err(SidecarError::invalid(
                    "model",
                    "must be a non-empty string of at most 256 characters",
                ));
            }
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(SidecarError::invalid("stream", "must be a boolean")),
        };
        let mut max_output_tokens = None;
        for field in api.output_limit_fields() {
            if let Some(limit) = output_limit(field, body.get(*field))? {
                max_output_tokens = Some(max_output_tokens.map_or(limit, |m: u32| m.max(limit)));
            }
        }
        let choices = if api == Api::OpenAiChat {
            match body.get("n") {
                None | Some(Value::Null) => 1,
                Some(n) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=CHOICES_MAX).contains(n))
                    .ok_or_else(|| {
                        SidecarError::invalid(
                            "n",
                            format!("must be an integer from 1 to {CHOICES_MAX}"),
                        )
                    })?,
            }
        } else {
            1
        };
        for field in api.unbounded_fields() {
            if body.get(*field).is_some_and(|v| !v.is_null()) {
                return Err(SidecarError::UnboundedInput(format!(
                    "`{field}` adds input or cost the request body does not show"
                )));
            }
        }
        if let Some(tier) = api.unpriced_tier(body.get("service_tier")) {
            return Err(SidecarError::UnpricedTier(format!(
                "`service_tier: {tier}` is billed at prices the pricing snapshot does not hold"
            )));
        }
        let mut allowance = Allowance::default();
        allowance.scan(api, &body)?;
        if let Some(Value::Array(tools)) = body.get("tools") {
            for tool in tools {
                let kind = tool.get("type").and_then(Value::as_str).unwrap_or("custom");
                if !api.client_tool_types().contains(&kind) {
                    return Err(SidecarError::UnboundedInput(format!(
                        "server-side tool `{kind}` is billed per use"
                    )));
                }
            }
            if !tools.is_empty() {
                allowance.tokens = allowance.tokens.saturating_add(TOOLS_OVERHEAD_TOKENS);
            }
        }
        let hides_usage_chunk = api == Api::OpenAiChat
            && stream
            && body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                != Some(true);
        let sent_len = serialized_len(&body)?;
        let bytes_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX).max(sent_len);
        Ok(Self {
            api,
            model,
            stream,
            max_output_tokens,
            choices,
            input_tokens_upper_bound: bytes_len
                .saturating_add(allowance.tokens)
                .saturating_add(BASE_OVERHEAD_TOKENS),
            hides_usage_chunk,
            body,
        })
    }

    /// The body to forward: the guard's output limit set when the client named none, and usage
    /// requested on OpenAI chat streams.
    ///
    /// # Errors
    /// [`SidecarError::Internal`] if the body cannot be serialized.
    pub fn into_upstream_body(mut self, max_output_tokens: u32) -> Result<Vec<u8>, SidecarError> {
        if self.max_output_tokens.is_none() {
            let field = self.api.output_limit_fields()[0];
            self.body.insert(field.to_owned(), max_output_tokens.into());
        }
        if self.api == Api::OpenAiChat && self.stream {
            let options = self
                .body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !options.is_object() {
                *options = Value::Object(Map::new());
            }
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        serde_json::to_vec(&self.body).map_err(|e| SidecarError::Internal(e.to_string()))
    }
}

/// How many bytes `body` serializes to (what is forwarded, before the guard's few additions),
/// counted without building them.
fn serialized_len(body: &Map<String, Value>) -> Result<u64, SidecarError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self
                .0
                .saturating_add(u64::try_from(buf.len()).unwrap_or(u64::MAX));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, body).map_err(|e| SidecarError::Internal(e.to_string()))?;
    Ok(count.0)
}

fn output_limit(field: &'static str, value: Option<&Value>) -> Result<Option<u32>, SidecarError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().map(u32::try_from) {
            Some(Ok(n)) if n > 0 => Ok(Some(n)),
            _ => Err(SidecarError::invalid(
                field,
                "must be a positive integer no larger than 4294967295",
            )),
        },
    }
}

/// Tokens that bytes do not bound, found by walking the content parts.
#[derive(Default)]
struct Allowance {
    tokens: u64,
}

impl Allowance {
    fn scan(&mut self, api: Api, body: &Map<String, Value>) -> Result<(), SidecarError> {
        let roots: &[&str] = match api {
            Api::OpenAiChat => &["messages"],
            Api::OpenAiResponses => &["input", "instructions"],
            Api::AnthropicMessages => &["messages", "system"],
        };
        for root in roots {
            if let Some(value) = body.get(*root) {
                self.walk(api, value, 0)?;
            }
        }
        Ok(())
    }

    fn walk(&mut self, api: Api, value: &Value, depth: usize) -> Result<(), SidecarError> {
        if depth > 64 {
            return Err(SidecarError::invalid("messages", "nested too deeply"));
        }
        match value {
            Value::Array(items) => items.iter().try_for_each(|v| self.walk(api, v, depth + 1)),
            Value::Object(object) => {
                match object.get("type").and_then(Value::as_str) {
                    Some("image_url" | "input_image" | "image") => {
                        self.tokens = self.tokens.saturating_add(api.image_tokens_max());
                    }
                    // Responses input that names a stored item instead of carrying it: a
                    // reference, or reasoning without its encrypted content.
                    Some(kind @ "item_reference") => {
                        return Err(SidecarError::UnboundedInput(format!(
                            "`{kind}` input pulls in a stored item the request body does not show"
                        )));
                    }
                    Some("reasoning")
                        if api == Api::OpenAiResponses
                            && object.get("encrypted_content").is_none_or(Value::is_null) =>
                    {
                        return Err(SidecarError::UnboundedInput(
                            "`reasoning` input without `encrypted_content` pulls in stored reasoning the request body does not show".into(),
                        ));
                    }
                    Some(
                        kind @ ("file" | "input_file" | "document" | "input_audio" | "audio"
                        | "container_upload" | "search_result"),
                    ) => {
                        return Err(SidecarError::UnboundedInput(format!(
                            "`{kind}` content is billed by its decoded size, unknown before the call"
                        )));
                    }
                    _ => {}
                }
                object
                    .values()
                    .try_for_each(|v| self.walk(api, v, depth + 1))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(api: Api, json: &str) -> Result<ProviderRequest, SidecarError> {
        ProviderRequest::parse(api, json.as_bytes())
    }

    #[test]
    fn bound_is_body_bytes_plus_allowances() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;
        let r = parse(Api::OpenAiChat, body).unwrap();
        assert_eq!(
            r.input_tokens_upper_bound,
            body.len() as u64 + BASE_OVERHEAD_TOKENS
        );
        assert_eq!(r.max_output_tokens, None);
        assert!(!r.stream);

        let with_image = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}],"tools":[{"type":"function","function":{"name":"f"}}]}"#;
        let r = parse(Api::OpenAiChat, with_image).unwrap();
        assert_eq!(
            r.input_tokens_upper_bound,
            with_image.len() as u64
                + Api::OpenAiChat.image_tokens_max()
                + TOOLS_OVERHEAD_TOKENS
                + BASE_OVERHEAD_TOKENS
        );
    }

    #[test]
    fn numbers_that_grow_when_forwarded_count_at_their_forwarded_length() {
        // `1e15` is forwarded as `1000000000000000.0`: the bound counts what is sent.
        let numbers = vec!["1e15"; 100].join(",");
        let body = format!(
            r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"assistant","content":[{{"type":"tool_use","id":"t","name":"f","input":{{"v":[{numbers}]}}}}]}}]}}"#
        );
        let r = parse(Api::AnthropicMessages, &body).unwrap();
        let sent = r.clone().into_upstream_body(5).unwrap();
        assert!(
            sent.len() > body.len() + 1_000,
            "{} {}",
            sent.len(),
            body.len()
        );
        assert!(
            r.input_tokens_upper_bound >= sent.len() as u64 + BASE_OVERHEAD_TOKENS,
            "{} < {}",
            r.input_tokens_upper_bound,
            sent.len()
        );
    }

    #[test]
    fn service_tiers_priced_elsewhere_are_refused() {
        for api in [Api::OpenAiChat, Api::OpenAiResponses] {
            for tier in [r#""priority""#, r#""scale""#, r#""turbo""#, "1"] {
                let body =
                    format!(r#"{{"model":"m","messages":[],"input":"x","service_tier":{tier}}}"#);
                let err = parse(api, &body).unwrap_err();
                assert_eq!(err.code(), "UNPRICED_TIER", "{api:?} {tier}");
            }
            for tier in [r#""auto""#, r#""default""#, r#""flex""#, "null"] {
                let body =
                    format!(r#"{{"model":"m","messages":[],"input":"x","service_tier":{tier}}}"#);
                assert!(parse(api, &body).is_ok(), "{api:?} {tier}");
            }
        }
        let anthropic = r#"{"model":"c","max_tokens":5,"messages":[],"service_tier":"auto"}"#;
        assert!(parse(Api::AnthropicMessages, anthropic).is_ok());
    }

    #[test]
    fn only_chat_streams_whose_client_did_not_ask_hide_the_usage_chunk() {
        let hides = |api: Api, body: &str| parse(api, body).unwrap().hides_usage_chunk;
        assert!(hides(
            Api::OpenAiChat,
            r#"{"model":"m","messages":[],"stream":true}"#
        ));
        assert!(hides(
            Api::OpenAiChat,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":false}}"#
        ));
        assert!(!hides(
            Api::OpenAiChat,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#
        ));
        assert!(!hides(Api::OpenAiChat, r#"{"model":"m","messages":[]}"#));
        assert!(!hides(
            Api::OpenAiResponses,
            r#"{"model":"m","input":"x","stream":true}"#
        ));
    }

    #[test]
    fn long_context_input_with_the_1m_beta_is_refused() {
        let long = format!(
            r#"{{"model":"c","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(200_000)
        );
        let r = parse(Api::AnthropicMessages, &long).unwrap();
        let beta = "prompt-caching-2024-07-31, context-1m-2025-08-07";
        assert_eq!(
            r.check_long_context([beta]).unwrap_err().code(),
            "UNPRICED_TIER"
        );
        assert!(
            r.check_long_context(["prompt-caching-2024-07-31"]).is_ok(),
            "without the beta, Anthropic refuses such input itself"
        );
        let short = parse(
            Api::AnthropicMessages,
            r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert!(short.check_long_context([beta]).is_ok());
    }

    #[test]
    fn output_limits_are_validated() {
        for bad in ["-1", "0", "1.5", "\"10\"", "99999999999"] {
            let body = format!(r#"{{"model":"m","messages":[],"max_tokens":{bad}}}"#);
            let err = parse(Api::OpenAiChat, &body).unwrap_err();
            assert_eq!(err.code(), "INVALID_ARGUMENT", "{bad}");
        }
        let both = r#"{"model":"m","messages":[],"max_tokens":10,"max_completion_tokens":30}"#;
        assert_eq!(
            parse(Api::OpenAiChat, both).unwrap().max_output_tokens,
            Some(30)
        );
    }

    #[test]
    fn guard_sets_the_limit_and_asks_for_stream_usage() {
        let r = parse(
            Api::OpenAiChat,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_obfuscation":false}}"#,
        )
        .unwrap();
        assert!(r.hides_usage_chunk, "the client did not ask for usage");
        let out: Value = serde_json::from_slice(&r.into_upstream_body(512).unwrap()).unwrap();
        assert_eq!(out["max_completion_tokens"], 512);
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["stream_options"]["include_obfuscation"], false);

        let r = parse(
            Api::AnthropicMessages,
            r#"{"model":"c","messages":[],"max_tokens":7}"#,
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&r.into_upstream_body(512).unwrap()).unwrap();
        assert_eq!(
            out["max_tokens"], 7,
            "a client limit within the cap is kept"
        );

        let r = parse(Api::OpenAiResponses, r#"{"model":"m","input":"hi"}"#).unwrap();
        let out: Value = serde_json::from_slice(&r.into_upstream_body(64).unwrap()).unwrap();
        assert_eq!(out["max_output_tokens"], 64);
    }

    #[test]
    fn unboundable_requests_are_refused() {
        let cases = [
            (
                Api::OpenAiResponses,
                r#"{"model":"m","input":"x","previous_response_id":"r1"}"#,
            ),
            (
                Api::OpenAiResponses,
                r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#,
            ),
            (
                Api::AnthropicMessages,
                r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#,
            ),
            (
                Api::AnthropicMessages,
                r#"{"model":"c","max_tokens":5,"messages":[],"tools":[{"type":"web_search_20250305","name":"w"}]}"#,
            ),
            (
                Api::OpenAiResponses,
                r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#,
            ),
            (
                Api::OpenAiResponses,
                r#"{"model":"m","input":[{"type":"reasoning","id":"rs_1","summary":[]}]}"#,
            ),
        ];
        for (api, body) in cases {
            assert_eq!(
                parse(api, body).unwrap_err().code(),
                "UNBOUNDED_INPUT",
                "{body}"
            );
        }
        assert!(
            parse(
                Api::OpenAiResponses,
                r#"{"model":"m","input":[{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":"gAAAA"}]}"#
            )
            .is_ok(),
            "reasoning carried in the body is bounded by its bytes"
        );
        assert_eq!(
            parse(Api::OpenAiChat, r#"{"model":"m","messages":[],"n":3}"#)
                .unwrap()
                .choices,
            3
        );
        assert_eq!(
            parse(Api::OpenAiChat, r#"{"model":"m","messages":[]}"#)
                .unwrap()
                .choices,
            1
        );
        for n in ["0", "-1", "129", "1.5", "\"2\"", "true"] {
            let body = format!(r#"{{"model":"m","messages":[],"n":{n}}}"#);
            let error = parse(Api::OpenAiChat, &body).unwrap_err();
            assert_eq!(error.code(), "INVALID_ARGUMENT", "n = {n}");
        }
        assert_eq!(
            parse(Api::AnthropicMessages, r#"{"model":"c","max_tokens":5,"messages":[],"tools":[{"name":"t","input_schema":{}}]}"#)
                .unwrap()
                .max_output_tokens,
            Some(5),
            "client tools are fine"
        );
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(
            parse(Api::OpenAiChat, "{").unwrap_err().code(),
            "INVALID_JSON"
        );
        assert_eq!(
            parse(Api::OpenAiChat, "[]").unwrap_err().code(),
            "INVALID_JSON"
        );
        assert_eq!(
            parse(Api::OpenAiChat, r#"{"messages":[]}"#)
                .unwrap_err()
                .code(),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            parse(Api::OpenAiChat, r#"{"model":"m","stream":"yes"}"#)
                .unwrap_err()
                .code(),
            "INVALID_ARGUMENT"
        );
    }
}
