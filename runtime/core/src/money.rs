//! Money as integer nano-USD (1 USD = 10^9 nano-USD). Never floats.
//!
//! Why nano-USD: per-token list prices go down to fractions of a micro-USD ($0.15 per million
//! tokens is 150 nano-USD per token), and i64 nano-USD still holds 9.2 billion USD. Prices are
//! kept per million tokens (see `pricing`), so cheaper prices stay exact too.
//! Costs computed from rational prices round *up* ([`NanoUsd::from_ratio_ceil`]), so a reserve can
//! never undercount.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest amount any single field may carry: one billion USD. Keeping every amount at or
/// below this bound means sums of two or three amounts cannot overflow i64.
pub const AMOUNT_MAX_NANO_USD: i64 = 1_000_000_000 * NANO_USD_PER_USD;

/// nano-USD in one USD.
pub const NANO_USD_PER_USD: i64 = 1_000_000_000;

/// A non-negative amount of nano-USD, at most [`AMOUNT_MAX_NANO_USD`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "i64", into = "i64")]
pub struct NanoUsd(i64);

/// Why an amount was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The amount was below zero.
    #[error("amount {0} is negative")]
    Negative(i64),
    /// The amount (or a sum) exceeded [`AMOUNT_MAX_NANO_USD`].
    #[error("amount exceeds the maximum of {AMOUNT_MAX_NANO_USD} nano-USD")]
    TooLarge,
    /// A subtraction would have gone below zero.
    #[error("amount would become negative")]
    Underflow,
    /// The amount must be positive.
    #[error("amount must be greater than zero")]
    NotPositive,
    /// A ratio had a zero denominator.
    #[error("division by zero")]
    DivisionByZero,
}

impl NanoUsd {
    /// Zero.
    pub const ZERO: Self = Self(0);

    /// Checks the bounds `0..=AMOUNT_MAX_NANO_USD`.
    ///
    /// # Errors
    /// [`MoneyError::Negative`] or [`MoneyError::TooLarge`].
    pub fn new(nano_usd: i64) -> Result<Self, MoneyError> {
        if nano_usd < 0 {
            Err(MoneyError::Negative(nano_usd))
        } else if nano_usd > AMOUNT_MAX_NANO_USD {
            Err(MoneyError::TooLarge)
        } else {
            Ok(Self(nano_usd))
        }
    }

    /// Like [`NanoUsd::new`], but refuses zero too.
    ///
    /// # Errors
    /// [`MoneyError::NotPositive`], [`MoneyError::Negative`] or [`MoneyError::TooLarge`].
    pub fn positive(nano_usd: i64) -> Result<Self, MoneyError> {
        match Self::new(nano_usd)? {
            Self(0) => Err(MoneyError::NotPositive),
            amount => Ok(amount),
        }
    }

    /// The raw count of nano-USD.
    pub const fn get(self) -> i64 {
        self.0
    }

    /// Whether this is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Sum, refusing results above the maximum.
    ///
    /// # Errors
    /// [`MoneyError::TooLarge`].
    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        self.0
            .checked_add(other.0)
            .ok_or(MoneyError::TooLarge)
            .and_then(Self::new)
    }

    /// Difference, refusing negative results.
    ///
    /// # Errors
    /// [`MoneyError::Underflow`].
    pub fn checked_sub(self, other: Self) -> Result<Self, MoneyError> {
        if other.0 > self.0 {
            return Err(MoneyError::Underflow);
        }
        // Both are in 0..=MAX and other <= self, so this cannot underflow.
        Ok(Self(self.0.wrapping_sub(other.0)))
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Self) -> Self {
        self.checked_sub(other).unwrap_or(Self::ZERO)
    }

    /// The smaller of two amounts.
    pub fn min(self, other: Self) -> Self {
        if self.0 <= other.0 { self } else { other }
    }

    /// `ceil(numerator / denominator)` nano-USD: how a cost computed from a rational price
    /// (for example tokens × nano-USD per million tokens / 10^6) becomes money. Rounds up so
    /// reserves never undercount.
    ///
    /// # Errors
    /// [`MoneyError::DivisionByZero`] or [`MoneyError::TooLarge`].
    pub fn from_ratio_ceil(numerator: u128, denominator: u128) -> Result<Self, MoneyError> {
        if denominator == 0 {
            return Err(MoneyError::DivisionByZero);
        }
        let quotient = numerator.div_ceil(denominator);
        let value = i64::try_from(quotient).map_err(|_| MoneyError::TooLarge)?;
        Self::new(value)
    }
}

impl TryFrom<i64> for NanoUsd {
    type Error = MoneyError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<NanoUsd> for i64 {
    fn from(value: NanoUsd) -> Self {
        value.0
    }
}

impl fmt::Display for NanoUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} nano-USD", self.0)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(NanoUsd::new(-1), Err(MoneyError::Negative(-1)));
        assert_eq!(
            NanoUsd::new(AMOUNT_MAX_NANO_USD + 1),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            NanoUsd::new(AMOUNT_MAX_NANO_USD).map(NanoUsd::get),
            Ok(AMOUNT_MAX_NANO_USD)
        );
        assert_eq!(NanoUsd::new(0), Ok(NanoUsd::ZERO));
    }

    #[test]
    fn arithmetic_is_checked() {
        let max = NanoUsd::new(AMOUNT_MAX_NANO_USD).unwrap();
        let one = NanoUsd::new(1).unwrap();
        assert_eq!(max.checked_add(one), Err(MoneyError::TooLarge));
        assert_eq!(NanoUsd::ZERO.checked_sub(one), Err(MoneyError::Underflow));
        assert_eq!(one.saturating_sub(max), NanoUsd::ZERO);
        assert_eq!(max.checked_sub(one).unwrap().get(), AMOUNT_MAX_NANO_USD - 1);
    }

    #[test]
    fn ratio_rounds_up_never_down() {
        // 1 token at 150 nano-USD per million tokens costs 0.00015 nano-USD: reserve 1.
        assert_eq!(NanoUsd::from_ratio_ceil(150, 1_000_000).unwrap().get(), 1);
        // Exact division is not rounded.
        assert_eq!(
            NanoUsd::from_ratio_ceil(3_000_000, 1_000_000)
                .unwrap()
                .get(),
            3
        );
        assert_eq!(
            NanoUsd::from_ratio_ceil(3_000_001, 1_000_000)
                .unwrap()
                .get(),
            4
        );
        assert_eq!(NanoUsd::from_ratio_ceil(0, 7).unwrap(), NanoUsd::ZERO);
        assert_eq!(
            NanoUsd::from_ratio_ceil(1, 0),
            Err(MoneyError::DivisionByZero)
        );
        assert_eq!(
            NanoUsd::from_ratio_ceil(u128::MAX, 1),
            Err(MoneyError::TooLarge)
        );
    }

    #[test]
    fn serde_refuses_out_of_range() {
        assert!(serde_json::from_str::<NanoUsd>("-5").is_err());
        assert_eq!(serde_json::from_str::<NanoUsd>("5").unwrap().get(), 5);
    }

    proptest! {
        #[test]
        fn ratio_ceil_is_the_least_upper_bound(n in 0u128..1u128 << 90, d in 1u128..1u128 << 40) {
            match NanoUsd::from_ratio_ceil(n, d) {
                Ok(v) => {
                    let v = u128::try_from(v.get()).unwrap();
                    prop_assert!(v * d >= n);
                    prop_assert!(v == 0 || (v - 1) * d < n);
                }
                // Refused only when the least upper bound is beyond the largest amount.
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::TooLarge);
                    prop_assert!(n.div_ceil(d) > u128::try_from(AMOUNT_MAX_NANO_USD).unwrap());
                }
            }
        }

        #[test]
        fn add_then_sub_round_trips(a in 0..AMOUNT_MAX_NANO_USD / 2, b in 0..AMOUNT_MAX_NANO_USD / 2) {
            let (a, b) = (NanoUsd::new(a).unwrap(), NanoUsd::new(b).unwrap());
            prop_assert_eq!(a.checked_add(b).unwrap().checked_sub(b).unwrap(), a);
        }
    }
}
