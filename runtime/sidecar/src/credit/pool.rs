//! The local count of a sidecar's credits: what each has left to admit, which one is current,
//! and when to open the next (the ledger calls are in `mod.rs`).

use crate::sync::lock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Smallest credit lifetime: a credit stops admitting a quarter of its lifetime before it lapses
/// on the ledger, which must leave its draws seconds to land.
pub const CREDIT_TTL_MS_MIN: u64 = 8_000;
/// Largest credit lifetime (the ledger's largest reservation TTL).
pub const CREDIT_TTL_MS_MAX: u64 = 3_600_000;
/// Draws in flight past which calls are no longer admitted inside credits but reserve one by one:
/// waiting for the ledger is the back pressure that keeps a slow ledger from falling behind.
pub const DRAWS_IN_FLIGHT_MAX: u32 = 256;

/// With a sized credit, the next one is asked for only if it would hold this many calls like
/// the one asking: fewer are not worth a credit's two ledger writes, and a quiet pod (whose
/// recent demand is a few calls) opens none.
pub const CALLS_PER_CREDIT_MIN: i64 = 8;

/// Demand is measured over the last second, in buckets of this length.
const DEMAND_BUCKET: Duration = Duration::from_millis(100);
const DEMAND_BUCKETS: usize = 10;

/// How a sidecar uses credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditPolicy {
    /// Largest credit, nano-USD (> 0); the amount of every credit when `ahead` is zero.
    pub max_nano_usd: i64,
    /// Each credit holds this much of the sidecar's demand (the worst cases of the calls it was
    /// asked to decide in the last second), at most `max_nano_usd`. Zero: every credit is
    /// `max_nano_usd`.
    pub ahead: Duration,
    /// How long each credit lives on the ledger.
    pub ttl: Duration,
    /// How long a pod asked nothing goes before it releases its current credit; `None`: the
    /// default of [`CreditPolicy::quiet`].
    pub quiet: Option<Duration>,
}

impl CreditPolicy {
    /// Stop admitting this long before the credit lapses on the ledger: its last draws must
    /// still land, and the sidecar's and the database's clocks may differ by some seconds.
    pub fn admit_margin(&self) -> Duration {
        self.ttl / 4
    }

    /// A pod asked to decide nothing for this long releases its current credit: idle, it would
    /// hold money other pods' calls could use until it lapsed. Twice what a credit is sized to
    /// hold, and not under the admit margin, so a steady slow caller does not open and release a
    /// credit for every call.
    pub fn quiet(&self) -> Duration {
        self.quiet
            .unwrap_or_else(|| self.ahead.saturating_mul(2).max(self.admit_margin()))
    }

    /// The next credit's amount for `demand_per_second`, and whether it is worth asking for a
    /// call of `amount` (it must hold that call; a sized one, [`CALLS_PER_CREDIT_MIN`] of them).
    fn next_credit(&self, demand_per_second: i64, amount: i64) -> Option<i64> {
        if self.ahead.is_zero() {
            return (amount <= self.max_nano_usd).then_some(self.max_nano_usd);
        }
        let ahead_ms = i64::try_from(self.ahead.as_millis()).unwrap_or(i64::MAX);
        let sized = i128::from(demand_per_second) * i128::from(ahead_ms) / 1_000;
        let sized = i64::try_from(sized)
            .unwrap_or(i64::MAX)
            .min(self.max_nano_usd);
        (sized > 0 && sized >= amount.saturating_mul(CALLS_PER_CREDIT_MIN)).then_some(sized)
    }
}

/// The worst cases of the calls asked for in the last second (integer nano-USD per bucket).
#[derive(Debug, Default)]
struct Demand {
    buckets: [i64; DEMAND_BUCKETS],
    /// The bucket `newest` covers from here; unset before the first call.
    newest_start: Option<Instant>,
    newest: usize,
}

impl Demand {
    /// Adds `amount` at `now` and returns the last second's total.
    fn record(&mut self, amount: i64, now: Instant) -> i64 {
        let start = *self.newest_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        let steps =
            usize::try_from(elapsed.as_nanos() / DEMAND_BUCKET.as_nanos()).unwrap_or(usize::MAX);
        if steps > 0 {
            for i in 1..=steps.min(DEMAND_BUCKETS) {
                self.buckets[(self.newest + i) % DEMAND_BUCKETS] = 0;
            }
            self.newest = (self.newest + steps) % DEMAND_BUCKETS;
            let step = u32::try_from(steps).unwrap_or(u32::MAX);
            self.newest_start = Some(start + DEMAND_BUCKET.saturating_mul(step));
        }
        self.buckets[self.newest] = self.buckets[self.newest].saturating_add(amount);
        self.buckets
            .iter()
            .fold(0i64, |sum, b| sum.saturating_add(*b))
    }
}

/// A credit the ledger opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Its reservation id.
    pub id: String,
    /// Its amount.
    pub amount_nano_usd: i64,
    /// The fencing epoch it was opened under (a new epoch means another process: it stops).
    pub epoch: u64,
    /// Admit nothing from it from this instant on.
    pub admit_until: Instant,
    /// Its draws stop trying at this instant: the ledger expires it about then.
    pub expires: Instant,
}

/// What [`Credits::take`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Take {
    /// The credit the amount was taken from: the call is admitted once its lease is confirmed
    /// (else the amount goes back: [`Credits::untake`]).
    pub credit: Option<(String, Instant)>,
    /// Open the next credit now, of this amount (this call is the one that asks; others do not).
    pub open_next: Option<i64>,
    /// Credits retired with no draw in flight: release them.
    pub release: Vec<String>,
}

#[derive(Debug)]
struct Slot {
    opened: Opened,
    remaining: i64,
    /// Draws taken from it that have not landed yet.
    pending: u32,
}

#[derive(Debug, Default)]
struct Pool {
    current: Option<Slot>,
    /// Credits no longer admitting, by id, with their draws in flight: released at 0.
    retired: HashMap<String, Slot>,
    opening: bool,
    /// No new credit before this (after a denial or a failure).
    quiet_until: Option<Instant>,
    /// Draws in flight, over every credit.
    in_flight: u32,
    closed: bool,
    demand: Demand,
    /// When a call last asked for a credit admission.
    last_take: Option<Instant>,
    /// The current credit was retired because the pod went quiet: the next one is opened only
    /// once calls come again within the quiet period of each other (a slow caller gets none,
    /// instead of opening and releasing one per call).
    retired_quiet: bool,
    /// The ledger refused a draw under this epoch as stale: nothing decided under it (or an
    /// older one) is admitted inside a credit any more.
    fenced_through: u64,
}

/// The local count of this sidecar's credits.
#[derive(Debug)]
pub struct Credits {
    policy: CreditPolicy,
    pool: Mutex<Pool>,
    admitted: Counter,
    lost: Counter,
    opened: Counter,
    remaining: Gauge,
}

impl Credits {
    /// No credit yet: the first admission asks for one.
    pub fn new(policy: CreditPolicy) -> Self {
        Self {
            policy,
            pool: Mutex::new(Pool::default()),
            admitted: Counter::default(),
            lost: Counter::default(),
            opened: Counter::default(),
            remaining: Gauge::default(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> CreditPolicy {
        self.policy
    }

    /// Registers the credit metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "spendguard_sidecar_credit_admitted",
            "Calls admitted inside a credit (their lease confirmed by a read), without a ledger write on the request path",
            self.admitted.clone(),
        );
        registry.register(
            "spendguard_sidecar_credit_draws_lost",
            "Calls admitted inside a credit whose draw the ledger refused for good; each is recorded as a fail-open call instead",
            self.lost.clone(),
        );
        registry.register(
            "spendguard_sidecar_credits_opened",
            "Credits the ledger opened for this sidecar",
            self.opened.clone(),
        );
        registry.register(
            "spendguard_sidecar_credit_remaining_nano_usd",
            "What the current credit has left to admit",
            self.remaining.clone(),
        );
    }

    /// Takes `amount` for a call decided under `epoch` at `now`, if the current credit has it.
    pub fn take(&self, amount: i64, epoch: u64, now: Instant) -> Take {
        let mut guard = lock(&self.pool);
        let pool = &mut *guard;
        let mut take = Take::default();
        if pool.closed {
            return take;
        }
        let demand_per_second = pool.demand.record(amount, now);
        let active = pool
            .last_take
            .is_some_and(|t| now.saturating_duration_since(t) < self.policy.quiet());
        pool.last_take = Some(now);
        if pool.retired_quiet && active {
            pool.retired_quiet = false;
        }
        if epoch <= pool.fenced_through {
            // Another holder has the scope: the call reserves synchronously, and the ledger
            // refuses it (fail closed) unless the lease moved on to a newer epoch of ours. A
            // credit opened meanwhile under the fenced epoch is dropped, as `fence` does.
            pool.current = None;
            self.remaining.set(0);
            return take;
        }
        if let Some(slot) = &pool.current
            && (slot.opened.epoch != epoch || now >= slot.opened.admit_until)
        {
            retire_current(pool, &mut take.release);
        }
        let room = pool.in_flight < DRAWS_IN_FLIGHT_MAX;
        if let Some(slot) = &mut pool.current
            && room
            && slot.remaining >= amount
        {
            slot.remaining = slot.remaining.saturating_sub(amount);
            slot.pending = slot.pending.saturating_add(1);
            pool.in_flight = pool.in_flight.saturating_add(1);
            take.credit = Some((slot.opened.id.clone(), slot.opened.expires));
        }
        // A call larger than the next credit never fits one: it asks for none.
        let next = self.policy.next_credit(demand_per_second, amount);
        let wanted = match (&pool.current, next) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(slot), Some(next)) => {
                let ending = slot.opened.admit_until.saturating_duration_since(now)
                    < self.policy.admit_margin();
                // Below a quarter of what it held, the next one is opened (this one still admits
                // meanwhile); one smaller than what this one has left would only churn.
                let low = slot.remaining < (slot.opened.amount_nano_usd / 4).max(amount);
                ending || (low && next > slot.remaining)
            }
        };
        if wanted
            && !pool.opening
            && !pool.retired_quiet
            && pool.quiet_until.is_none_or(|t| now >= t)
        {
            pool.opening = true;
            take.open_next = next;
        }
        self.remaining
            .set(pool.current.as_ref().map_or(0, |s| s.remaining));
        take
    }

    /// A credit the ledger opened becomes the current one; the previous one retires. Returns
    /// the credits to release now (retired with no draw in flight, or this one if closed).
    pub fn opened(&self, opened: Opened) -> Vec<String> {
        let mut pool = lock(&self.pool);
        pool.opening = false;
        pool.quiet_until = None;
        self.opened.inc();
        if pool.closed {
            return vec![opened.id];
        }
        let mut release = Vec::new();
        retire_current(&mut pool, &mut release);
        pool.current = Some(Slot {
            remaining: opened.amount_nano_usd,
            opened,
            pending: 0,
        });
        self.remaining
            .set(pool.current.as_ref().map_or(0, |s| s.remaining));
        release
    }

    /// Opening failed or was not wanted (a denial, a soft cap): no new credit before `quiet`
    /// has passed; calls reserve synchronously meanwhile.
    pub fn not_opened(&self, now: Instant, quiet: Duration) {
        let mut pool = lock(&self.pool);
        pool.opening = false;
        pool.quiet_until = Some(now + quiet);
    }

    /// The budgets have no room for another credit: the current one stops admitting, so what it
    /// has left (less than calls need, or it would not have asked) goes back to the budgets once
    /// its draws landed, where calls reserving one by one can use it. Returns it if no draw is
    /// in flight: release it.
    pub fn retire(&self) -> Vec<String> {
        let mut pool = lock(&self.pool);
        let mut release = Vec::new();
        retire_current(&mut pool, &mut release);
        self.remaining.set(0);
        release
    }

    /// The pod has asked for nothing for [`CreditPolicy::quiet`] by `now`: the current credit
    /// stops admitting. Returns it if no draw is in flight (release it; otherwise its last
    /// draw's end returns it, as for any retired credit).
    pub fn retire_if_quiet(&self, now: Instant) -> Vec<String> {
        let mut pool = lock(&self.pool);
        let quiet = pool
            .last_take
            .is_none_or(|t| now.saturating_duration_since(t) >= self.policy.quiet());
        let mut release = Vec::new();
        if pool.closed || pool.current.is_none() || !quiet {
            return release;
        }
        retire_current(&mut pool, &mut release);
        pool.retired_quiet = true;
        self.remaining.set(0);
        release
    }

    /// The ledger refused a draw made under `epoch` as stale, and the lease holds nothing newer:
    /// the scope was taken over (or forced forward). No call decided under `epoch` or an older
    /// one is admitted inside a credit from now on, and the current credit is dropped (its
    /// release would be refused as stale too: it lapses at its TTL).
    pub fn fence(&self, epoch: u64) {
        let mut pool = lock(&self.pool);
        pool.fenced_through = pool.fenced_through.max(epoch);
        pool.current = None;
        self.remaining.set(0);
    }

    /// A call taken from a credit was admitted (its lease confirmed): it is counted, and its
    /// draw follows. False once the credits closed (shutdown): nothing is admitted after the
    /// close, even a call taken before it (give it back with [`Self::untake`]).
    pub fn admitted(&self) -> bool {
        let pool = lock(&self.pool);
        if pool.closed {
            return false;
        }
        self.admitted.inc();
        true
    }

    /// A call taken from `credit` was not admitted after all (its lease could not be confirmed
    /// as current): its amount goes back to the credit if that one still admits. Returns the
    /// credit if it is retired and this was the last call taken from it in flight: release it.
    pub fn untake(&self, credit: &str, amount: i64) -> Option<String> {
        self.end_pending(credit, amount)
    }

    /// A draw from `credit` ended (landed or lost). Returns the credit if it is retired and this
    /// was its last draw in flight: release it.
    pub fn draw_done(&self, credit: &str, lost: bool) -> Option<String> {
        if lost {
            self.lost.inc();
        }
        self.end_pending(credit, 0)
    }

    /// One call taken from `credit` is no longer in flight; `give_back` returns to it if it is
    /// still the current credit.
    fn end_pending(&self, credit: &str, give_back: i64) -> Option<String> {
        let mut pool = lock(&self.pool);
        pool.in_flight = pool.in_flight.saturating_sub(1);
        if let Some(slot) = pool.current.as_mut().filter(|s| s.opened.id == credit) {
            slot.pending = slot.pending.saturating_sub(1);
            slot.remaining = slot.remaining.saturating_add(give_back);
            let remaining = slot.remaining;
            self.remaining.set(remaining);
            return None;
        }
        let slot = pool.retired.get_mut(credit)?;
        slot.pending = slot.pending.saturating_sub(1);
        if slot.pending > 0 {
            return None;
        }
        pool.retired.remove(credit).map(|s| s.opened.id)
    }

    /// Shutdown: nothing more is admitted or opened. Returns every credit with no draw in flight
    /// (all of them once the draws drained): release them.
    pub fn close(&self) -> Vec<String> {
        let mut pool = lock(&self.pool);
        pool.closed = true;
        let mut release = Vec::new();
        retire_current(&mut pool, &mut release);
        let idle: Vec<String> = pool
            .retired
            .iter()
            .filter(|(_, s)| s.pending == 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            pool.retired.remove(id);
        }
        release.extend(idle);
        self.remaining.set(0);
        release
    }
}

/// Moves the current credit to the retired ones; pushes it to `release` if no draw is in flight.
fn retire_current(pool: &mut Pool, release: &mut Vec<String>) {
    if let Some(slot) = pool.current.take() {
        if slot.pending == 0 {
            release.push(slot.opened.id);
        } else {
            pool.retired.insert(slot.opened.id.clone(), slot);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn policy() -> CreditPolicy {
        CreditPolicy {
            max_nano_usd: 1_000,
            ahead: Duration::ZERO,
            ttl: Duration::from_secs(40),
            quiet: None,
        }
    }

    fn opened(id: &str, now: Instant) -> Opened {
        Opened {
            id: id.into(),
            amount_nano_usd: 1_000,
            epoch: 1,
            admit_until: now + Duration::from_secs(30),
            expires: now + Duration::from_secs(40),
        }
    }

    #[test]
    fn a_quiet_pod_retires_its_credit_once_its_draws_landed() {
        // Quiet is a quarter of the TTL here (10 s): the fixed-size policy has no `ahead`.
        let credits = Credits::new(policy());
        assert_eq!(policy().quiet(), Duration::from_secs(10));
        let start = Instant::now();
        assert!(credits.take(100, 1, start).open_next.is_some());
        assert!(credits.opened(opened("a", start)).is_empty());
        let admitted = credits.take(100, 1, start + Duration::from_secs(1));
        assert!(admitted.credit.is_some());
        let asked_last = start + Duration::from_secs(1);
        assert!(
            credits
                .retire_if_quiet(asked_last + Duration::from_millis(9_999))
                .is_empty(),
            "not quiet yet"
        );
        // Quiet, with one draw in flight: retired now, released when the draw ends.
        assert!(
            credits
                .retire_if_quiet(asked_last + Duration::from_secs(10))
                .is_empty()
        );
        assert!(
            credits
                .take(100, 1, asked_last + Duration::from_secs(10))
                .credit
                .is_none(),
            "a retired credit admits nothing"
        );
        assert_eq!(credits.draw_done("a", false), Some("a".to_owned()));
        // A credit with no draw in flight is returned at once.
        let later = asked_last + Duration::from_secs(11);
        assert!(credits.opened(opened("b", later)).is_empty());
        assert_eq!(
            credits.retire_if_quiet(later + Duration::from_secs(10)),
            vec!["b".to_owned()]
        );
        assert!(
            credits
                .retire_if_quiet(later + Duration::from_secs(20))
                .is_empty()
        );
        // After a quiet spell the first call opens nothing (a slow caller would open and
        // release a credit per call); a second one within the quiet period does.
        let back = later + Duration::from_secs(30);
        assert!(credits.take(100, 1, back).open_next.is_none());
        assert!(
            credits
                .take(100, 1, back + Duration::from_secs(1))
                .open_next
                .is_some()
        );
        // Sized credits wait twice what they hold, if that is longer.
        let sized = CreditPolicy {
            ahead: Duration::from_secs(8),
            ..policy()
        };
        assert_eq!(sized.quiet(), Duration::from_secs(16));
    }

    #[test]
    fn admits_only_what_the_credit_holds_and_asks_for_the_next_once() {
        let credits = Credits::new(policy());
        let now = Instant::now();
        // No credit: nothing admitted, and this caller opens one; the next caller does not.
        let first = credits.take(100, 1, now);
        assert_eq!(
            (first.credit.is_none(), first.open_next),
            (true, Some(1_000))
        );
        assert!(credits.take(100, 1, now).open_next.is_none());
        assert!(credits.opened(opened("a", now)).is_empty());
        let mut admitted = 0;
        for _ in 0..20 {
            if credits.take(300, 1, now).credit.is_some() {
                admitted += 300;
            }
        }
        assert_eq!(admitted, 900, "never more than the credit holds");
        // Below the low water mark the next credit was asked for once.
        credits.not_opened(now, Duration::from_secs(1));
        assert!(
            credits.take(300, 1, now).open_next.is_none(),
            "quiet after a failure"
        );
        assert!(
            credits
                .take(300, 1, now + Duration::from_secs(2))
                .open_next
                .is_some()
        );
    }

    #[test]
    fn a_call_larger_than_a_credit_asks_for_none_and_draws_in_flight_are_bounded() {
        let credits = Credits::new(policy());
        let now = Instant::now();
        assert!(
            credits.take(1_001, 1, now).open_next.is_none(),
            "no credit would hold it"
        );
        assert!(credits.take(1, 1, now).open_next.is_some());
        credits.opened(Opened {
            amount_nano_usd: 1_000_000,
            ..opened("a", now)
        });
        let admitted = (0..300)
            .filter(|_| credits.take(1, 1, now).credit.is_some())
            .count();
        assert_eq!(admitted, DRAWS_IN_FLIGHT_MAX as usize, "back pressure");
        credits.draw_done("a", false);
        assert!(credits.take(1, 1, now).credit.is_some(), "room again");
    }

    #[test]
    fn a_retired_credit_is_released_after_its_last_draw_lands() {
        let credits = Credits::new(policy());
        let now = Instant::now();
        credits.take(1, 1, now);
        credits.opened(opened("a", now));
        let (a, _) = credits.take(100, 1, now).credit.unwrap();
        credits.take(100, 1, now);
        // The next credit arrives while two draws from "a" are in flight.
        assert!(credits.opened(opened("b", now)).is_empty());
        assert_eq!(credits.take(100, 1, now).credit.unwrap().0, "b");
        assert_eq!(credits.draw_done(&a, false), None);
        assert_eq!(credits.draw_done(&a, true), Some("a".to_owned()));
        // "b" is current: its draws never release it.
        assert_eq!(credits.draw_done("b", false), None);
        assert_eq!(credits.close(), vec!["b".to_owned()]);
        assert!(credits.take(1, 1, now).credit.is_none(), "closed");
    }

    #[test]
    fn a_call_taken_before_the_close_is_not_admitted_after_it() {
        let credits = Credits::new(policy());
        let now = Instant::now();
        credits.take(1, 1, now);
        credits.opened(opened("a", now));
        let (a, _) = credits.take(100, 1, now).credit.unwrap();
        // Its lease check is in flight when the sidecar shuts down: the credit waits for it.
        assert!(credits.close().is_empty());
        assert!(!credits.admitted(), "admitted after the close");
        assert_eq!(credits.untake(&a, 100), Some("a".to_owned()));
    }

    #[test]
    fn a_credit_stops_admitting_near_its_end_and_under_another_epoch() {
        let credits = Credits::new(policy());
        let now = Instant::now();
        credits.take(1, 1, now);
        credits.opened(opened("a", now));
        let late = credits.take(1, 1, now + Duration::from_secs(30));
        assert_eq!(late.credit, None);
        assert_eq!(late.release, vec!["a".to_owned()]);
        assert!(late.open_next.is_some());
        credits.opened(opened("b", now));
        let other_epoch = credits.take(1, 2, now);
        assert_eq!(other_epoch.credit, None);
        assert_eq!(other_epoch.release, vec!["b".to_owned()]);
    }

    #[test]
    fn a_sized_credit_holds_the_demand_of_the_last_second_ahead() {
        let credits = Credits::new(CreditPolicy {
            max_nano_usd: 1_000_000,
            ahead: Duration::from_secs(2),
            ttl: Duration::from_secs(40),
            quiet: None,
        });
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // A quiet pod: a few calls of 100 are not worth a credit (2 s of them is under 8 calls).
        for ms in [0, 300, 600] {
            assert_eq!(credits.take(100, 1, at(ms)).open_next, None);
        }
        // The fourth call within the second: 400 a second, 800 ahead, 8 calls of 100.
        assert_eq!(credits.take(100, 1, at(900)).open_next, Some(800));
        credits.opened(Opened {
            amount_nano_usd: 800,
            ..opened("a", start)
        });
        // A busier second: 50 calls of 100 from 2.0 s on; the first second's calls have left
        // the window. The credit runs low and the next is sized on the new demand.
        let mut asked = Vec::new();
        for i in 0..50 {
            if let Some(amount) = credits.take(100, 1, at(2_000 + i * 10)).open_next {
                asked.push((i, amount));
            }
        }
        assert_eq!(
            asked,
            vec![(6, 1_400)],
            "asked once, when 100 of 800 were left (under a quarter), for 2 s of 700 a second"
        );
        // One ask while a credit is being opened, however busy; capped at the largest credit.
        credits.not_opened(at(2_500), Duration::ZERO);
        let asks = (0..10_000)
            .filter(|i| {
                credits
                    .take(100, 1, at(2_600 + i / 100))
                    .open_next
                    .is_some()
            })
            .count();
        assert_eq!(asks, 1);
        credits.not_opened(at(2_700), Duration::ZERO);
        assert_eq!(credits.take(100, 1, at(2_700)).open_next, Some(1_000_000));
    }

    #[test]
    fn demand_forgets_what_is_older_than_a_second() {
        let mut demand = Demand::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(demand.record(5, at(0)), 5);
        assert_eq!(demand.record(7, at(950)), 12);
        assert_eq!(demand.record(1, at(1_050)), 8, "the first bucket left");
        assert_eq!(demand.record(0, at(1_999)), 1);
        assert_eq!(demand.record(3, at(60_000)), 3, "a long pause clears all");
    }

    #[test]
    fn no_credit_for_free_calls_nor_one_smaller_than_what_is_left() {
        let sized = CreditPolicy {
            max_nano_usd: 1_000_000,
            ahead: Duration::from_secs(2),
            ttl: Duration::from_secs(40),
            quiet: None,
        };
        assert_eq!(sized.next_credit(0, 0), None, "a free call needs no credit");
        let credits = Credits::new(sized);
        let now = Instant::now();
        let earlier = now - Duration::from_secs(5);
        credits.opened(Opened {
            amount_nano_usd: 10_000,
            ..opened("a", now)
        });
        // A busy spell takes it to 2,400 left (under a quarter), then the pod goes quiet.
        for _ in 0..76 {
            assert!(credits.take(100, 1, earlier).credit.is_some());
        }
        credits.not_opened(earlier, Duration::ZERO);
        // Calls come back slowly: the demand of the last second sizes a next credit smaller
        // than what this one has left, so none is asked for until it would be larger.
        let asked: Vec<_> = (0..9)
            .map(|_| credits.take(100, 1, now).open_next)
            .collect();
        let mut expected = vec![None; 8];
        expected.push(Some(1_800));
        assert_eq!(
            asked, expected,
            "asked when 1,500 were left, for 2 s of 900 a second"
        );
    }
}
