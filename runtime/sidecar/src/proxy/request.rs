//! Provider requests as the guard sees them: which API, which model, an input bound that cannot
//! undercount, the output limit, and the body to forward with that limit enforced.
//!
//! The input bound is the request body's byte length plus fixed allowances. Every prompt token
//! comes from at least one byte of text in the body (JSON escaping only adds bytes), and the
//! per-message framing tokens are fewer than the bytes of the JSON framing around each message.
//! What bytes cannot bound is refused (fail closed): stored conversations, files, audio and
//! server-side tools, whose cost is unknown before the call.

use crate::error::SidecarError;
use serde_json::{Map, Value};
use spendguard_core::contract::CHOICES_MAX;
use spendguard_core::pricing::Provider;

/// Tokens allowed per image part: above every documented per-image cost (OpenAI high-detail and
/// patch-based images, Anthropic's ~1.15 megapixel cap).
pub const IMAGE_TOKENS_MAX: u64 = 3_000;
/// Tokens allowed for the tool-use system prompt providers add when tools are present.
pub const TOOLS_OVERHEAD_TOKENS: u64 = 1_000;
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
    body: Map<String, Value>,
}

impl ProviderRequest {
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
        let bytes_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        Ok(Self {
            api,
            model,
            stream,
            max_output_tokens,
            choices,
            input_tokens_upper_bound: bytes_len
                .saturating_add(allowance.tokens)
                .saturating_add(BASE_OVERHEAD_TOKENS),
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
                self.walk(value, 0)?;
            }
        }
        Ok(())
    }

    fn walk(&mut self, value: &Value, depth: usize) -> Result<(), SidecarError> {
        if depth > 64 {
            return Err(SidecarError::invalid("messages", "nested too deeply"));
        }
        match value {
            Value::Array(items) => items.iter().try_for_each(|v| self.walk(v, depth + 1)),
            Value::Object(object) => {
                match object.get("type").and_then(Value::as_str) {
                    Some("image_url" | "input_image" | "image") => {
                        self.tokens = self.tokens.saturating_add(IMAGE_TOKENS_MAX);
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
                object.values().try_for_each(|v| self.walk(v, depth + 1))
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
                + IMAGE_TOKENS_MAX
                + TOOLS_OVERHEAD_TOKENS
                + BASE_OVERHEAD_TOKENS
        );
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
        ];
        for (api, body) in cases {
            assert_eq!(
                parse(api, body).unwrap_err().code(),
                "UNBOUNDED_INPUT",
                "{body}"
            );
        }
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
