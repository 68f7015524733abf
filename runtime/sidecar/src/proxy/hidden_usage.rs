//! Hides, from an OpenAI chat stream, the usage chunk the guard asked for on the client's behalf.
//!
//! The guard needs a stream's usage to commit it, so it sets `stream_options.include_usage` on
//! every chat stream. A client that did not ask for it would then get one more chunk than it
//! expects: `{"choices": [], "usage": {...}}`, on which common client code (`chunk.choices[0]`)
//! fails. For such a client the stream is passed through event by event instead of chunk by
//! chunk (bytes are held back only until their event's blank line), and that chunk is dropped.
//! The usage watcher still sees every byte.

use bytes::Bytes;

/// Longest event held back whole; a longer one is passed on as it is (it is a content delta:
/// the usage chunk is small).
const EVENT_LEN_MAX: usize = 1 << 20;

/// The filter of one stream.
#[derive(Debug, Default)]
pub struct HiddenUsage {
    /// Bytes of the event not yet ended.
    pending: Vec<u8>,
    /// Passing the rest of an event longer than [`EVENT_LEN_MAX`] on as it comes.
    passing_long_event: bool,
}

impl HiddenUsage {
    /// The bytes to forward now for `data`: the events it completes, without the usage chunk.
    pub fn push(&mut self, data: &[u8]) -> Bytes {
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(end) = event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            if self.passing_long_event || !is_usage_chunk(event) {
                out.extend_from_slice(event);
            }
            self.passing_long_event = false;
            start += end;
        }
        self.pending.drain(..start);
        if self.passing_long_event || self.pending.len() > EVENT_LEN_MAX {
            out.append(&mut self.pending);
            self.passing_long_event = true;
        }
        Bytes::from(out)
    }

    /// What is left at the stream's end (an event without its blank line), forwarded as it is.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

/// The length of the first whole event in `bytes` (up to and with the blank line that ends it).
fn event_end(bytes: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if *byte == b'\n' {
            let line = &bytes[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Whether `event` is the usage-only chunk: no choices, a usage object.
fn is_usage_chunk(event: &[u8]) -> bool {
    event.split(|b| *b == b'\n').any(|line| {
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        let data = data.trim_ascii();
        // Every other chunk of such a stream says `"usage":null`: parse only the candidates.
        let candidate = |pattern: &[u8]| data.windows(pattern.len()).any(|w| w == pattern);
        if !candidate(b"\"usage\":{") && !candidate(b"\"usage\": {") {
            return false;
        }
        let Ok(serde_json::Value::Object(chunk)) = serde_json::from_slice(data) else {
            return false;
        };
        chunk.get("usage").is_some_and(serde_json::Value::is_object)
            && chunk
                .get("choices")
                .and_then(serde_json::Value::as_array)
                .is_some_and(Vec::is_empty)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\n",
        "data: [DONE]\n\n",
    );

    fn filtered(chunk_len: usize) -> String {
        let mut filter = HiddenUsage::default();
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(chunk_len) {
            out.extend_from_slice(&filter.push(chunk));
        }
        out.extend_from_slice(&filter.finish());
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn the_usage_chunk_is_dropped_and_every_other_byte_passes_in_order() {
        let expected = STREAM.replace(
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\n",
            "",
        );
        assert_ne!(expected, STREAM);
        for chunk_len in [1, 7, 64, STREAM.len()] {
            assert_eq!(filtered(chunk_len), expected, "chunks of {chunk_len}");
        }
    }

    #[test]
    fn events_pass_once_whole_and_a_long_one_is_not_held() {
        let mut filter = HiddenUsage::default();
        assert!(
            filter
                .push(b"data: {\"choices\":[{\"delta\":{}}]}")
                .is_empty()
        );
        assert_eq!(
            filter.push(b"\r\n\r\ndata: x").as_ref(),
            b"data: {\"choices\":[{\"delta\":{}}]}\r\n\r\n"
        );
        let long = vec![b'y'; EVENT_LEN_MAX + 1];
        assert_eq!(filter.push(&long).len(), EVENT_LEN_MAX + 1 + 7);
        assert_eq!(
            filter.push(b"z\n\n").as_ref(),
            b"z\n\n",
            "its end passes too"
        );
        assert!(filter.finish().is_empty());
    }
}
