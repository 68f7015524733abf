//! The writer's memory of the rows it last committed, so a hot batch skips the load round trips.
//!
//! Why: a reserve or commit batch spent more time reading and locking rows (BEGIN, load, windows)
//! than writing them. The writer is the only task of this process that changes money, so after a
//! batch commits, the planner's final state *is* what those rows hold. The next batch of
//! reserves, commits and releases is planned on that memory and written by one self-validating
//! statement (`store/fast_guard.sql`): it locks every row the plan read and checks it still holds
//! the remembered values, so a change by another replica or an operator fails the statement as a
//! whole and the batch runs again on the locked-load path. The cache can make a batch faster,
//! never different.
//!
//! Time: the load path plans on the database clock it read. The fast path estimates that clock
//! from the offset seen on the last load, the statement refuses an estimate more than
//! [`CLOCK_TOLERANCE`] away from `now()`, and a batch whose decisions could change within that
//! tolerance (a lease or reservation expiring, a window rolling over) takes the load path.

use chrono::{DateTime, Duration, Utc};
use spendguard_core::NanoUsd;
use spendguard_core::lease::LeaseState;
use spendguard_core::plan::{
    BudgetKey, BudgetRow, Command, Credit, PricingKey, ReservationRow, Snapshot, WindowKey,
    WindowRow,
};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// How far the estimated database clock may be from the database's own `now()`.
pub const CLOCK_TOLERANCE: Duration = Duration::milliseconds(250);
/// Open reservations remembered at most; past this the cache starts over (reservations settled
/// or swept by another replica are never seen leaving).
const RESERVATIONS_MAX: usize = 200_000;

/// Rows as of the last committed batch. Absent means unknown, never "does not exist".
#[derive(Debug, Default)]
pub struct HotCache {
    tenants: HashMap<String, String>,
    budgets: HashMap<BudgetKey, BudgetRow>,
    windows: HashMap<WindowKey, WindowRow>,
    scopes: HashMap<String, LeaseState>,
    /// Open reservations only: a settled one is answered by the load path.
    reservations: HashMap<Uuid, ReservationRow>,
    pricing: HashMap<PricingKey, String>,
    /// Database clock minus this host's clock, as of the last load.
    clock_offset: Option<Duration>,
}

/// The rows a fast batch read, as the statement must find them (locked) before writing.
#[derive(Debug, Default)]
pub struct Expected {
    /// Windows whose money the plan used.
    pub windows: BTreeMap<WindowKey, WindowRow>,
    /// Scopes whose epoch the plan checked.
    pub scopes: BTreeMap<String, LeaseState>,
    /// Budgets whose definition the plan used.
    pub budgets: BTreeMap<BudgetKey, BudgetRow>,
    /// Reservation ids the plan took as new: a denial writes nothing, so the guard must see that
    /// no reservation holds the id (else the request is a replay the load path answers).
    pub absent_reservations: Vec<Uuid>,
    /// Reservation ids the plan took as open: another replica may have settled one (and the
    /// windows may have come back to the same values), so the guard checks they still are.
    pub open_reservations: Vec<Uuid>,
    /// Credits the plan drew from, with the drawn total it read: another replica may have drawn
    /// from one, so the statement checks the total before writing the new one.
    pub credit_drawn: BTreeMap<Uuid, NanoUsd>,
}

impl HotCache {
    /// Forgets everything (after any failed batch: what was committed is then unknown).
    pub fn clear(&mut self) {
        *self = Self {
            clock_offset: self.clock_offset,
            ..Self::default()
        };
    }

    /// Records the database clock read at `db_now` by a load that started at `local_before`.
    pub fn observe_clock(&mut self, db_now: DateTime<Utc>, local_before: DateTime<Utc>) {
        self.clock_offset = Some(db_now - local_before);
    }

    /// Remembers the state after a committed batch: every row it loaded or wrote.
    pub fn absorb(&mut self, state: Snapshot) {
        self.tenants.extend(state.tenants);
        self.budgets.extend(state.budgets);
        self.windows.extend(state.windows);
        self.scopes.extend(state.scopes);
        self.pricing.extend(state.pricing);
        for (id, row) in state.reservations {
            if row.resolution.is_some() {
                self.reservations.remove(&id);
            } else {
                self.reservations.insert(id, row);
            }
        }
        if self.reservations.len() > RESERVATIONS_MAX {
            self.clear();
        }
    }

    /// A snapshot to plan `commands` on without reading the database, and the rows the write
    /// must find unchanged; `None` when any command needs the load path.
    pub fn snapshot_for(&self, commands: &[Command]) -> Option<(Snapshot, Expected)> {
        let now = Utc::now() + self.clock_offset?;
        let mut snapshot = Snapshot {
            now,
            ..Snapshot::default()
        };
        let mut expected = Expected::default();
        for command in commands {
            match command {
                // Opening a credit is rare next to calls: the load path.
                Command::ReserveSet(r) if r.credit == Credit::Open => return None,
                Command::ReserveSet(r) => {
                    // A reservation under an approval is checked against the approval's row,
                    // which only the load path reads (approvals are rare).
                    if r.context.approval_id.is_some() {
                        return None;
                    }
                    let tenant = self.tenants.get(&r.tenant_id)?;
                    snapshot.tenants.insert(r.tenant_id.clone(), tenant.clone());
                    let pricing_key = (r.tenant_id.clone(), r.pricing.version.clone());
                    let hash = self.pricing.get(&pricing_key)?;
                    snapshot.pricing.insert(pricing_key, hash.clone());
                    self.scope(&r.fencing.scope_id, now, &mut snapshot, &mut expected)?;
                    let id = r.reservation_id();
                    match self.reservations.get(&id) {
                        // A replay of a reservation drawn from a credit reports the credit's
                        // remainder: the load path reads it.
                        Some(open) if open.drawn_from.is_some() => return None,
                        Some(open) => self.reservation(open, now, &mut snapshot, &mut expected)?,
                        None if !snapshot.reservations.contains_key(&id) => {
                            expected.absent_reservations.push(id);
                        }
                        None => {}
                    }
                    for budget_id in &r.budget_ids {
                        let key = BudgetKey {
                            tenant_id: r.tenant_id.clone(),
                            budget_id: budget_id.clone(),
                        };
                        let budget = self.budgets.get(&key)?;
                        let start = budget.window.start_containing(now);
                        // A window that could roll over within the tolerance: load path.
                        let early = budget.window.start_containing(now - CLOCK_TOLERANCE);
                        let late = budget.window.start_containing(now + CLOCK_TOLERANCE);
                        if early != start || late != start {
                            return None;
                        }
                        self.window(
                            &WindowKey {
                                budget: key.clone(),
                                start,
                            },
                            &mut snapshot,
                            &mut expected,
                        )?;
                        snapshot.budgets.insert(key.clone(), budget.clone());
                        expected.budgets.insert(key, budget.clone());
                    }
                    if let Credit::DrawFrom(id) = r.credit {
                        // A credit the cache does not hold open, or of another tenant (the load
                        // path answers that), or one that lapses within the tolerance.
                        let credit = self.reservations.get(&id)?;
                        if !credit.is_credit || credit.tenant_id != r.tenant_id {
                            return None;
                        }
                        let drawn = snapshot
                            .reservations
                            .get(&id)
                            .map_or(credit.drawn, |c| c.drawn);
                        self.reservation_row(credit, now, &mut snapshot, &mut expected)?;
                        expected.credit_drawn.entry(id).or_insert(drawn);
                    }
                }
                Command::Commit(c) => {
                    self.scope(&c.fencing.scope_id, now, &mut snapshot, &mut expected)?;
                    let open = self.reservations.get(&c.reservation_id)?;
                    self.reservation(open, now, &mut snapshot, &mut expected)?;
                }
                Command::Release(r) => {
                    self.scope(&r.fencing.scope_id, now, &mut snapshot, &mut expected)?;
                    let open = self.reservations.get(&r.reservation_id)?;
                    self.reservation(open, now, &mut snapshot, &mut expected)?;
                }
                _ => return None,
            }
        }
        Some((snapshot, expected))
    }

    fn scope(
        &self,
        scope_id: &str,
        now: DateTime<Utc>,
        snapshot: &mut Snapshot,
        expected: &mut Expected,
    ) -> Option<()> {
        let scope = self.scopes.get(scope_id)?;
        if near(scope.expires_at, now) {
            return None;
        }
        snapshot.scopes.insert(scope_id.to_owned(), scope.clone());
        expected.scopes.insert(scope_id.to_owned(), scope.clone());
        Some(())
    }

    /// An open reservation a command settles: never a credit (its release takes the load path).
    fn reservation(
        &self,
        row: &ReservationRow,
        now: DateTime<Utc>,
        snapshot: &mut Snapshot,
        expected: &mut Expected,
    ) -> Option<()> {
        if row.is_credit {
            return None;
        }
        self.reservation_row(row, now, snapshot, expected)
    }

    /// An open reservation the plan reads, with its windows and budgets.
    fn reservation_row(
        &self,
        row: &ReservationRow,
        now: DateTime<Utc>,
        snapshot: &mut Snapshot,
        expected: &mut Expected,
    ) -> Option<()> {
        if near(row.expires_at, now) {
            return None;
        }
        for window in &row.windows {
            self.window(window, snapshot, expected)?;
            // Settlements report balances, which show the budget's definition.
            let budget = self.budgets.get(&window.budget)?;
            snapshot
                .budgets
                .insert(window.budget.clone(), budget.clone());
            expected
                .budgets
                .insert(window.budget.clone(), budget.clone());
        }
        // A second command on one reservation (two draws from one credit) reads the same row.
        snapshot
            .reservations
            .entry(row.id)
            .or_insert_with(|| row.clone());
        expected.open_reservations.push(row.id);
        Some(())
    }

    fn window(
        &self,
        key: &WindowKey,
        snapshot: &mut Snapshot,
        expected: &mut Expected,
    ) -> Option<()> {
        let row = *self.windows.get(key)?;
        snapshot.windows.insert(key.clone(), row);
        expected.windows.insert(key.clone(), row);
        Some(())
    }
}

/// Whether `at` is close enough to `now` that the database clock could fall on either side.
fn near(at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (at - now).abs() <= CLOCK_TOLERANCE
}
