//! Audit events as RFC 8785 canonical JSON: the exact bytes that will be signed, chained and
//! exported. They are rendered once, stored as bytes, and never re-derived from parsed JSON.
//!
//! Money is carried as decimal strings: RFC 8785 numbers are IEEE doubles, which cannot hold every
//! i64 nano-USD amount exactly.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Schema tag inside every event.
pub const EVENT_SCHEMA: &str = "spendguard.audit.v1";

/// An event before the producer stamps it with its identity, sequence and time.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    /// Tenant the event belongs to (export and chains are per tenant).
    pub tenant_id: String,
    /// Dotted type, e.g. `reservation.reserved`.
    pub event_type: &'static str,
    /// Type-specific body; must not contain floats.
    pub data: Value,
}

/// The producer's stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStamp {
    /// Stable producer instance id (S2).
    pub producer_instance_id: String,
    /// Per-producer monotonic sequence, starting at 1, contiguous.
    pub producer_sequence: u64,
    /// Database time of the transaction that wrote the event.
    pub occurred_at: DateTime<Utc>,
}

/// A stamped event with its canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalEvent {
    /// RFC 8785 bytes.
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`.
    pub sha256: [u8; 32],
}

/// Formats a time the way every event does: RFC 3339, UTC, microseconds.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl EventDraft {
    /// Renders the canonical bytes.
    ///
    /// # Errors
    /// When the data holds a value RFC 8785 cannot represent (a non-finite number).
    pub fn stamp(&self, stamp: &ProducerStamp) -> Result<CanonicalEvent, serde_json::Error> {
        let event = json!({
            "schema": EVENT_SCHEMA,
            "event_type": self.event_type,
            "tenant_id": self.tenant_id,
            "producer_instance_id": stamp.producer_instance_id,
            "producer_sequence": stamp.producer_sequence,
            "occurred_at": format_time(stamp.occurred_at),
            "data": self.data,
        });
        let bytes = serde_json_canonicalizer::to_vec(&event)?;
        let sha256 = Sha256::digest(&bytes).into();
        Ok(CanonicalEvent { bytes, sha256 })
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_are_sorted_and_stable() {
        let draft = EventDraft {
            tenant_id: "t".into(),
            event_type: "reservation.reserved",
            data: json!({"z": "1", "a": {"y": 2, "b": "x"}}),
        };
        let stamp = ProducerStamp {
            producer_instance_id: "ledger-0".into(),
            producer_sequence: 7,
            occurred_at: DateTime::UNIX_EPOCH,
        };
        let e = draft.stamp(&stamp).unwrap();
        let text = String::from_utf8(e.bytes.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"data":{"a":{"b":"x","y":2},"z":"1"},"event_type":"reservation.reserved","occurred_at":"1970-01-01T00:00:00.000000Z","producer_instance_id":"ledger-0","producer_sequence":7,"schema":"spendguard.audit.v1","tenant_id":"t"}"#
        );
        assert_eq!(e, draft.stamp(&stamp).unwrap());
        assert_eq!(e.sha256.to_vec(), Sha256::digest(text.as_bytes()).to_vec());
    }
}
