//! Audit events as RFC 8785 canonical JSON: the exact bytes that will be signed, chained and
//! exported. They are rendered once, stored as bytes, and never re-derived from parsed JSON.
//!
//! Money is carried as decimal strings: RFC 8785 numbers are IEEE doubles, which cannot hold every
//! i64 nano-USD amount exactly.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Integers up to 2^53 are printed by RFC 8785 as plain decimal digits; above, as doubles.
pub(crate) const EXACT_INTEGER_MAX: u64 = 1 << 53;

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

/// sha256 over the canonical (RFC 8785) JSON of a request: an idempotency fingerprint (of a
/// reservation, an approval, a lease acquire, a record).
///
/// A fingerprint must tell apart every two requests that differ, and RFC 8785 prints every
/// number as an IEEE double, so 2^53 + 1 and 2^53 + 2 (amounts up to 10^18 are valid) would hash
/// alike and a retry with another amount would replay. Integers beyond ±2^53 are therefore
/// hashed as their decimal strings; every smaller one keeps the bytes it always had, so the
/// fingerprints stored before this rule (2026-11-28) still match.
pub(crate) fn canonical_sha256<T: serde::Serialize>(request: &T) -> String {
    let bytes = serde_json::to_value(request)
        .map(exact_integers)
        .and_then(|value| serde_json_canonicalizer::to_vec(&value))
        .unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}

/// `value` with every integer a double cannot hold exactly replaced by its decimal string.
fn exact_integers(value: Value) -> Value {
    match value {
        Value::Number(n) if !fits_a_double_exactly(&n) => Value::String(n.to_string()),
        Value::Array(items) => Value::Array(items.into_iter().map(exact_integers).collect()),
        Value::Object(members) => Value::Object(
            members
                .into_iter()
                .map(|(name, member)| (name, exact_integers(member)))
                .collect(),
        ),
        other => other,
    }
}

fn fits_a_double_exactly(n: &serde_json::Number) -> bool {
    match (n.as_u64(), n.as_i64()) {
        (Some(u), _) => u <= EXACT_INTEGER_MAX,
        (None, Some(i)) => i.unsigned_abs() <= EXACT_INTEGER_MAX,
        (None, None) => true, // a float: printed as RFC 8785 prints it
    }
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
        let bytes = if stamp.producer_sequence <= EXACT_INTEGER_MAX {
            self.envelope(stamp)?
        } else {
            self.envelope_generic(stamp)?
        };
        let sha256 = Sha256::digest(&bytes).into();
        Ok(CanonicalEvent { bytes, sha256 })
    }

    /// The envelope written member by member, without copying `data` into a new tree and
    /// sorting the envelope again (this runs for every event on the ledger's hot path).
    /// RFC 8785 sorts members by UTF-16 code units; the envelope's names are ASCII, so their
    /// order is fixed, and only the values need the canonicalizer. Property-tested equal to
    /// [`Self::envelope_generic`].
    fn envelope(&self, stamp: &ProducerStamp) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(br#"{"data":"#);
        serde_json_canonicalizer::to_writer(&self.data, &mut out)?;
        out.extend_from_slice(br#","event_type":"#);
        serde_json_canonicalizer::to_writer(&self.event_type, &mut out)?;
        out.extend_from_slice(br#","occurred_at":"#);
        serde_json_canonicalizer::to_writer(&format_time(stamp.occurred_at), &mut out)?;
        out.extend_from_slice(br#","producer_instance_id":"#);
        serde_json_canonicalizer::to_writer(&stamp.producer_instance_id, &mut out)?;
        out.extend_from_slice(br#","producer_sequence":"#);
        out.extend_from_slice(stamp.producer_sequence.to_string().as_bytes());
        out.extend_from_slice(br#","schema":"#);
        serde_json_canonicalizer::to_writer(&EVENT_SCHEMA, &mut out)?;
        out.extend_from_slice(br#","tenant_id":"#);
        serde_json_canonicalizer::to_writer(&self.tenant_id, &mut out)?;
        out.push(b'}');
        Ok(out)
    }

    /// The envelope as a JSON tree, canonicalized as a whole: the definition.
    fn envelope_generic(&self, stamp: &ProducerStamp) -> Result<Vec<u8>, serde_json::Error> {
        let event = json!({
            "schema": EVENT_SCHEMA,
            "event_type": self.event_type,
            "tenant_id": self.tenant_id,
            "producer_instance_id": stamp.producer_instance_id,
            "producer_sequence": stamp.producer_sequence,
            "occurred_at": format_time(stamp.occurred_at),
            "data": self.data,
        });
        serde_json_canonicalizer::to_vec(&event)
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

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1.0e300..1.0e300f64).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\\u{0}-\\u{1f}\"\\\\/\\u{7f}\\u{2028}é€😀a-z]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_member_by_member_envelope_equals_the_canonicalized_tree(
            data in json_value(),
            tenant_id in proptest::prelude::any::<String>(),
            producer_instance_id in "[\\u{0}-\\u{7f}é😀]{0,12}",
            producer_sequence in 0..=EXACT_INTEGER_MAX,
            event_type in proptest::sample::select(vec!["reservation.reserved", "x\"y\\z\u{1}\u{7f}é"]),
            micros in 0i64..4_102_444_800_000_000,
        ) {
            let draft = EventDraft { tenant_id, event_type, data };
            let stamp = ProducerStamp {
                producer_instance_id,
                producer_sequence,
                occurred_at: DateTime::from_timestamp_micros(micros).unwrap_or_default(),
            };
            proptest::prop_assert_eq!(
                draft.envelope(&stamp).unwrap(),
                draft.envelope_generic(&stamp).unwrap()
            );
        }
    }

    #[test]
    fn a_fingerprint_keeps_the_rfc_8785_bytes_of_integers_a_double_holds() {
        for n in [0_i64, 1, -1, 600, 1 << 53, -(1 << 53)] {
            let request = json!({"amount": n, "key": "k", "nested": [n, {"n": n}]});
            assert_eq!(
                canonical_sha256(&request),
                hex::encode(Sha256::digest(
                    serde_json_canonicalizer::to_vec(&request).unwrap()
                )),
                "{n}: a fingerprint stored before the exact-integer rule must still match"
            );
        }
    }

    #[test]
    fn a_fingerprint_tells_apart_integers_a_double_cannot() {
        let pairs: [(i64, i64); 4] = [
            (1 << 53, (1 << 53) + 1),
            (999_999_999_999_999_999, 1_000_000_000_000_000_000),
            (-(1 << 53), -(1 << 53) - 1),
            (i64::MAX - 1, i64::MAX),
        ];
        for (a, b) in pairs {
            assert_eq!(
                serde_json_canonicalizer::to_vec(&json!({"amount": a})).unwrap(),
                serde_json_canonicalizer::to_vec(&json!({"amount": b})).unwrap(),
                "RFC 8785 alone prints {a} and {b} alike"
            );
            assert_ne!(
                canonical_sha256(&json!({"amount": a, "list": [1]})),
                canonical_sha256(&json!({"amount": b, "list": [1]})),
            );
            assert_ne!(
                canonical_sha256(&json!({"nested": [{"amount": a}]})),
                canonical_sha256(&json!({"nested": [{"amount": b}]})),
            );
        }
        assert_ne!(
            canonical_sha256(&json!({"amount": u64::MAX})),
            canonical_sha256(&json!({"amount": u64::MAX - 1})),
        );
    }

    proptest::proptest! {
        #[test]
        fn distinct_integers_have_distinct_fingerprints(a: i64, apart in 1_i64..=1_024) {
            // Close pairs: far apart, two doubles differ anyway, and RFC 8785 alone would pass.
            let b = a.wrapping_add(apart);
            proptest::prop_assert_ne!(
                canonical_sha256(&json!({"amount": a})),
                canonical_sha256(&json!({"amount": b}))
            );
        }
    }

    #[test]
    fn sequences_above_two_to_the_53_take_the_generic_envelope() {
        let draft = EventDraft {
            tenant_id: "t".into(),
            event_type: "reservation.reserved",
            data: json!({}),
        };
        let stamp = ProducerStamp {
            producer_instance_id: "ledger-0".into(),
            producer_sequence: EXACT_INTEGER_MAX + 1,
            occurred_at: DateTime::UNIX_EPOCH,
        };
        assert_eq!(
            draft.stamp(&stamp).unwrap().bytes,
            draft.envelope_generic(&stamp).unwrap()
        );
    }
}
