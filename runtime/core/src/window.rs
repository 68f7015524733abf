//! Budget windows: lifetime, or a calendar day or month in UTC.
//!
//! Spend is accounted to the window in which it was *reserved*: a reservation made at 23:59:59
//! and committed after midnight lands in the old day's window, so windows roll over without
//! moving money between them.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

/// How a budget's limit renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetWindow {
    /// Never renews.
    Lifetime,
    /// Renews at 00:00 UTC every day.
    CalendarDayUtc,
    /// Renews at 00:00 UTC on the first of every month.
    CalendarMonthUtc,
}

impl BudgetWindow {
    /// The name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Lifetime => "lifetime",
            Self::CalendarDayUtc => "calendar_day_utc",
            Self::CalendarMonthUtc => "calendar_month_utc",
        }
    }

    /// Parses the database name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "lifetime" => Some(Self::Lifetime),
            "calendar_day_utc" => Some(Self::CalendarDayUtc),
            "calendar_month_utc" => Some(Self::CalendarMonthUtc),
            _ => None,
        }
    }

    /// Start of the window that contains `now`. Lifetime windows start at the Unix epoch.
    pub fn start_containing(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let date = match self {
            Self::Lifetime => return DateTime::UNIX_EPOCH,
            Self::CalendarDayUtc => now.date_naive(),
            Self::CalendarMonthUtc => {
                NaiveDate::from_ymd_opt(now.year(), now.month(), 1).unwrap_or(now.date_naive())
            }
        };
        Utc.from_utc_datetime(&date.and_time(chrono::NaiveTime::MIN))
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn window_starts() {
        let now = at("2026-11-24T23:59:59.999Z");
        assert_eq!(
            BudgetWindow::Lifetime.start_containing(now),
            DateTime::UNIX_EPOCH
        );
        assert_eq!(
            BudgetWindow::CalendarDayUtc.start_containing(now),
            at("2026-11-24T00:00:00Z")
        );
        assert_eq!(
            BudgetWindow::CalendarMonthUtc.start_containing(now),
            at("2026-11-01T00:00:00Z")
        );
        // Rollover: one millisecond later is a new day, and on Dec 1 a new month.
        let next = at("2026-12-01T00:00:00Z");
        assert_eq!(BudgetWindow::CalendarDayUtc.start_containing(next), next);
        assert_eq!(BudgetWindow::CalendarMonthUtc.start_containing(next), next);
    }

    #[test]
    fn names_round_trip() {
        for w in [
            BudgetWindow::Lifetime,
            BudgetWindow::CalendarDayUtc,
            BudgetWindow::CalendarMonthUtc,
        ] {
            assert_eq!(BudgetWindow::parse(w.as_str()), Some(w));
        }
        assert_eq!(BudgetWindow::parse("weekly"), None);
    }
}
