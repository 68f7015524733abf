//! Small synchronisation helpers shared by the sidecar's in-memory tables and queues.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also after a panic in another holder: the tables and queues it guards hold
/// plain data that a panic cannot leave half-updated in a way worse than failing every later
/// request, so the sidecar keeps serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
