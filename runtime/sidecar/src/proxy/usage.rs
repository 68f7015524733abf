//! Provider-reported usage, from a whole response body or watched in a server-sent event stream
//! as it passes through (chunks are forwarded untouched; this only reads them).

use super::request::Api;
use serde_json::{Map, Value};
use spendguard_core::pricing::{
    AnthropicUsage, OpenAiChatUsage, OpenAiResponsesUsage, PricingError, TokenUsage,
};

/// Longest SSE line inspected on chat and Anthropic streams, whose usage events are small;
/// longer lines (large content deltas) cannot carry usage and are skipped without buffering them
/// whole.
const LINE_LEN_MAX: usize = 1 << 20;

/// Bytes allowed per output token when bounding a Responses terminal event, which echoes the
/// output text JSON-escaped: a token is a few characters, and escaping at most sextuples one.
const ECHOED_BYTES_PER_OUTPUT_TOKEN: usize = 32;

/// Longest SSE line inspected on a stream of `api` for a request of `request_len` bytes allowed
/// `max_output_tokens`. A Responses stream's usage comes in its terminal event, which carries the
/// whole response object: the output text, and the request's instructions and tools echoed. So
/// its bound grows with the request and the output limit (twice the request for escaping, plus
/// the output, plus 1 MiB); a line past it is skipped and the call committed at its worst case.
pub fn line_len_max(api: Api, request_len: usize, max_output_tokens: u64) -> usize {
    match api {
        Api::OpenAiResponses => {
            let output = usize::try_from(max_output_tokens)
                .unwrap_or(usize::MAX)
                .saturating_mul(ECHOED_BYTES_PER_OUTPUT_TOKEN);
            LINE_LEN_MAX
                .saturating_add(request_len.saturating_mul(2))
                .saturating_add(output)
        }
        Api::OpenAiChat | Api::AnthropicMessages => LINE_LEN_MAX,
    }
}

/// Usage from a non-streaming response body. `None` when the body has no `usage` object.
pub fn from_body(api: Api, body: &[u8]) -> Option<Result<TokenUsage, PricingError>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let usage = value.get("usage")?.as_object()?;
    if let Some(tier) = api.unpriced_tier(value.get("service_tier")) {
        return Some(Err(PricingError::UnpricedServiceTier(tier)));
    }
    Some(to_tokens(api, usage))
}

/// Converts a provider `usage` object.
///
/// # Errors
/// [`PricingError`] when the object does not have the provider's shape or is inconsistent.
pub fn to_tokens(api: Api, usage: &Map<String, Value>) -> Result<TokenUsage, PricingError> {
    let value = Value::Object(usage.clone());
    let malformed = |e: serde_json::Error| PricingError::Malformed(e.to_string());
    match api {
        Api::OpenAiChat => TokenUsage::from_openai_chat(
            &serde_json::from_value::<OpenAiChatUsage>(value).map_err(malformed)?,
        ),
        Api::OpenAiResponses => TokenUsage::from_openai_responses(
            &serde_json::from_value::<OpenAiResponsesUsage>(value).map_err(malformed)?,
        ),
        Api::AnthropicMessages => TokenUsage::from_anthropic(
            &serde_json::from_value::<AnthropicUsage>(value).map_err(malformed)?,
        ),
    }
}

/// Watches an SSE stream for usage.
///
/// - OpenAI chat: the final chunk's `usage` (present because the guard sets
///   `stream_options.include_usage`).
/// - OpenAI responses: `response.usage` of the terminal `response.completed`,
///   `response.incomplete` or `response.failed` event.
/// - Anthropic: `message.usage` of `message_start`, updated by the cumulative `usage` of each
///   `message_delta`.
#[derive(Debug)]
pub struct StreamUsage {
    api: Api,
    line_len_max: usize,
    line: Vec<u8>,
    skipping_long_line: bool,
    usage: Option<Map<String, Value>>,
    /// A service tier the response was served at that the snapshot does not price.
    unpriced_tier: Option<String>,
    complete: bool,
}

impl StreamUsage {
    /// A watcher for `api` that inspects lines up to `line_len_max` bytes ([`line_len_max`]).
    pub fn new(api: Api, line_len_max: usize) -> Self {
        Self {
            api,
            line_len_max,
            line: Vec::new(),
            skipping_long_line: false,
            usage: None,
            unpriced_tier: None,
            complete: false,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|b| *b == b'\n') {
            if !self.skipping_long_line {
                self.line.extend_from_slice(&bytes[..newline]);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
            }
            self.skipping_long_line = false;
            bytes = &bytes[newline + 1..];
        }
        if !self.skipping_long_line {
            self.line.extend_from_slice(bytes);
            if self.line.len() > self.line_len_max {
                self.line.clear();
                self.skipping_long_line = true;
            }
        }
    }

    /// The usage seen so far, if any.
    pub fn usage(&self) -> Option<Result<TokenUsage, PricingError>> {
        let usage = self.usage.as_ref()?;
        Some(match &self.unpriced_tier {
            Some(tier) => Err(PricingError::UnpricedServiceTier(tier.clone())),
            None => to_tokens(self.api, usage),
        })
    }

    /// Whether the stream reported its final usage (the terminal event was seen).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    fn on_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        // Cheap filter: only events that can carry usage are parsed.
        if data == b"[DONE]" || !contains(data, b"usage") {
            return;
        }
        let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        match self.api {
            Api::OpenAiChat => {
                if let Some(Value::Object(usage)) = event.get("usage") {
                    self.usage = Some(usage.clone());
                    self.unpriced_tier = self.api.unpriced_tier(event.get("service_tier"));
                    self.complete = true;
                }
            }
            Api::OpenAiResponses => {
                let terminal = matches!(
                    event.get("type").and_then(Value::as_str),
                    Some("response.completed" | "response.incomplete" | "response.failed")
                );
                let response = event.get("response");
                if let (true, Some(Value::Object(usage))) =
                    (terminal, response.and_then(|r| r.get("usage")))
                {
                    self.usage = Some(usage.clone());
                    self.unpriced_tier = self
                        .api
                        .unpriced_tier(response.and_then(|r| r.get("service_tier")));
                    self.complete = true;
                }
            }
            Api::AnthropicMessages => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    if let Some(Value::Object(usage)) =
                        event.get("message").and_then(|m| m.get("usage"))
                    {
                        self.usage = Some(usage.clone());
                    }
                }
                Some("message_delta") => {
                    if let (Some(base), Some(Value::Object(delta))) =
                        (self.usage.as_mut(), event.get("usage"))
                    {
                        for (key, value) in delta {
                            if !value.is_null() {
                                base.insert(key.clone(), value.clone());
                            }
                        }
                        self.complete = true;
                    }
                }
                _ => {}
            },
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_chat_stream_usage_split_across_chunks() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut watcher = StreamUsage::new(Api::OpenAiChat, LINE_LEN_MAX);
        for chunk in stream.as_bytes().chunks(7) {
            watcher.feed(chunk);
        }
        let usage = watcher.usage().unwrap().unwrap();
        assert_eq!(usage.uncached_input, 8);
        assert_eq!(usage.cached_input, 4);
        assert_eq!(usage.output, 5);
        assert!(watcher.is_complete());
    }

    #[test]
    fn anthropic_stream_merges_start_and_delta() {
        let stream = concat!(
            "event: message_start\r\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\r\n\r\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":42}}\n\n",
        );
        let mut watcher = StreamUsage::new(Api::AnthropicMessages, LINE_LEN_MAX);
        watcher.feed(stream.as_bytes());
        let usage = watcher.usage().unwrap().unwrap();
        assert_eq!(usage.uncached_input, 20);
        assert_eq!(usage.cached_input, 3);
        assert_eq!(usage.output, 42);
        assert!(watcher.is_complete());
    }

    #[test]
    fn anthropic_stream_cut_after_start_is_partial() {
        let mut watcher = StreamUsage::new(Api::AnthropicMessages, LINE_LEN_MAX);
        watcher.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n");
        assert!(!watcher.is_complete());
        assert_eq!(watcher.usage().unwrap().unwrap().uncached_input, 20);
    }

    #[test]
    fn responses_terminal_event_only() {
        let mut watcher = StreamUsage::new(Api::OpenAiResponses, LINE_LEN_MAX);
        watcher.feed(b"data: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n");
        assert!(watcher.usage().is_none());
        watcher.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"output_tokens_details\":{\"reasoning_tokens\":2}}}}\n");
        let usage = watcher.usage().unwrap().unwrap();
        assert_eq!(
            (usage.uncached_input, usage.output, usage.reasoning),
            (9, 2, 2)
        );
    }

    #[test]
    fn long_lines_are_skipped_not_buffered() {
        let mut watcher = StreamUsage::new(Api::OpenAiChat, LINE_LEN_MAX);
        watcher.feed(b"data: ");
        watcher.feed(&vec![b'x'; LINE_LEN_MAX + 10]);
        assert!(watcher.line.is_empty());
        watcher.feed(b"tail\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n");
        assert!(watcher.usage().is_some());
    }

    #[test]
    fn usage_served_at_an_unpriced_tier_is_not_priced() {
        let unpriced = |usage: Option<Result<TokenUsage, PricingError>>| matches!(usage, Some(Err(PricingError::UnpricedServiceTier(t))) if t == "priority");
        let body =
            br#"{"service_tier":"priority","usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        assert!(unpriced(from_body(Api::OpenAiChat, body)));
        let body =
            br#"{"service_tier":"default","usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        assert!(matches!(from_body(Api::OpenAiChat, body), Some(Ok(_))));
        let body = br#"{"object":"response","service_tier":"priority","usage":{"input_tokens":1,"output_tokens":1}}"#;
        assert!(unpriced(from_body(Api::OpenAiResponses, body)));

        let mut chat = StreamUsage::new(Api::OpenAiChat, LINE_LEN_MAX);
        chat.feed(b"data: {\"service_tier\":\"priority\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n");
        assert!(chat.is_complete());
        assert!(unpriced(chat.usage()));
        let mut responses = StreamUsage::new(Api::OpenAiResponses, LINE_LEN_MAX);
        responses.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"service_tier\":\"priority\",\"usage\":{\"input_tokens\":9,\"output_tokens\":4}}}\n");
        assert!(unpriced(responses.usage()));
        let mut flex = StreamUsage::new(Api::OpenAiResponses, LINE_LEN_MAX);
        flex.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"service_tier\":\"flex\",\"usage\":{\"input_tokens\":9,\"output_tokens\":4}}}\n");
        assert!(matches!(flex.usage(), Some(Ok(_))));
    }

    #[test]
    fn a_responses_terminal_event_longer_than_a_mebibyte_still_reports_usage() {
        // Instructions of 1.5 MiB, echoed in `response.completed`.
        let instructions = "i".repeat(3 << 19);
        let request_len = instructions.len() + 100;
        let event = format!(
            "data: {{\"type\":\"response.completed\",\"response\":{{\"instructions\":\"{instructions}\",\"usage\":{{\"input_tokens\":9,\"output_tokens\":4}}}}}}\n"
        );
        let limit = line_len_max(Api::OpenAiResponses, request_len, 4_096);
        assert!(event.len() > LINE_LEN_MAX && event.len() < limit);
        let mut watcher = StreamUsage::new(Api::OpenAiResponses, limit);
        for chunk in event.as_bytes().chunks(16 << 10) {
            watcher.feed(chunk);
        }
        assert!(watcher.is_complete());
        assert_eq!(watcher.usage().unwrap().unwrap().output, 4);
        assert_eq!(
            line_len_max(Api::OpenAiChat, request_len, 4_096),
            LINE_LEN_MAX,
            "chat usage chunks are small"
        );
    }

    #[test]
    fn body_usage() {
        let usage = from_body(
            Api::AnthropicMessages,
            br#"{"type":"message","usage":{"input_tokens":5,"output_tokens":6}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((usage.uncached_input, usage.output), (5, 6));
        assert!(from_body(Api::OpenAiChat, br#"{"id":"x"}"#).is_none());
    }
}
