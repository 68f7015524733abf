//! USD amounts in specs: decimal strings, validated by pattern, converted exactly.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The pattern the apiserver enforces (at most 999,999,999 USD, at most 9 decimals).
pub const USD_PATTERN: &str = r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?$";

/// A non-negative USD amount as a decimal string with at most 9 decimals, e.g. `"12.50"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usd(pub String);

impl JsonSchema for Usd {
    fn schema_name() -> Cow<'static, str> {
        "Usd".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": USD_PATTERN,
            "description": "USD amount as a decimal string, e.g. \"12.50\""
        })
    }
}

impl Usd {
    /// Formats nano-USD exactly, without trailing zeros (`12500000000` → `"12.5"`).
    pub fn from_nano_usd(nano_usd: i64) -> Self {
        let sign = if nano_usd < 0 { "-" } else { "" };
        let magnitude = nano_usd.unsigned_abs();
        let (whole, fraction) = (magnitude / 1_000_000_000, magnitude % 1_000_000_000);
        if fraction == 0 {
            return Self(format!("{sign}{whole}"));
        }
        let fraction = format!("{fraction:09}");
        Self(format!("{sign}{whole}.{}", fraction.trim_end_matches('0')))
    }

    /// The amount in nano-USD, computed without floats.
    ///
    /// # Errors
    /// When the string does not match the pattern (the apiserver refuses such objects).
    pub fn nano_usd(&self) -> Result<i64, String> {
        // Mirrors USD_PATTERN: no sign, no leading zeros, a non-empty fraction after a dot.
        let (whole, fraction) = match self.0.split_once('.') {
            Some((whole, fraction)) if !fraction.is_empty() => (whole, fraction),
            Some(_) => return Err(format!("{:?} has a dot without decimals", self.0)),
            None => (self.0.as_str(), ""),
        };
        let digits_ok = !whole.is_empty()
            && whole.len() <= 9
            && fraction.len() <= 9
            && (whole == "0" || !whole.starts_with('0'))
            && whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit());
        if !digits_ok {
            return Err(format!(
                "{:?} is not a USD amount with at most 9 decimals",
                self.0
            ));
        }
        let whole: i64 = whole.parse().map_err(|e| format!("{e}"))?;
        let padded = format!("{fraction:0<9}");
        let fraction: i64 = padded.parse().map_err(|e| format!("{e}"))?;
        whole
            .checked_mul(1_000_000_000)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(|| "amount too large".to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn formatting_round_trips() {
        for nano in [
            0,
            1,
            12_500_000_000,
            999_999_999_999_999_999,
            100_000_000_000,
        ] {
            assert_eq!(Usd::from_nano_usd(nano).nano_usd().unwrap(), nano);
        }
        assert_eq!(Usd::from_nano_usd(12_500_000_000).0, "12.5");
        assert_eq!(Usd::from_nano_usd(1).0, "0.000000001");
    }

    #[test]
    fn exact_conversion() {
        assert_eq!(Usd("12.50".into()).nano_usd().unwrap(), 12_500_000_000);
        assert_eq!(Usd("0.000000001".into()).nano_usd().unwrap(), 1);
        assert_eq!(
            Usd("999999999.999999999".into()).nano_usd().unwrap(),
            999_999_999_999_999_999
        );
        for bad in [
            "",
            "-1",
            "1.",
            "01",
            "1.0000000001",
            "1e3",
            "abc",
            "1234567890",
        ] {
            assert!(Usd(bad.into()).nano_usd().is_err(), "{bad}");
        }
    }
}
