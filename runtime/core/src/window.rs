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

    /// When the window that starts at `start` ends (the next one starts); `None` for a lifetime
    /// window, which never ends.
    pub fn end_of(self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Lifetime => None,
            Self::CalendarDayUtc => start.checked_add_days(chrono::Days::new(1)),
            Self::CalendarMonthUtc => start.checked_add_months(chrono::Months::new(1)),
        }
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
    fn a_window_ends_where_the_next_starts() {
        let day = BudgetWindow::CalendarDayUtc;
        let month = BudgetWindow::CalendarMonthUtc;
        for now in [
            "2026-01-31T23:59:59Z",
            "2026-02-28T12:00:00Z",
            "2024-02-29T00:00:00Z",
        ] {
            let now = at(now);
            for window in [day, month] {
                let end = window.end_of(window.start_containing(now)).unwrap();
                assert!(end > now);
                assert_eq!(window.start_containing(end), end, "{window:?} {now}");
                assert_ne!(window.start_containing(end), window.start_containing(now));
            }
        }
        assert_eq!(
            month.end_of(at("2026-01-01T00:00:00Z")),
            Some(at("2026-02-01T00:00:00Z"))
        );
        assert_eq!(BudgetWindow::Lifetime.end_of(DateTime::UNIX_EPOCH), None);
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
