//! Kubernetes Events for condition transitions, so `kubectl describe` tells what the operator
//! did and why. The condition in status is the source of truth; an Event is a best-effort
//! notice of a change to it, published only when the Ready condition's status or reason changes
//! (periodic refreshes publish nothing).

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use spendguard_crds::condition::Condition;
use tracing::warn;

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "spendguard-operator";
/// `action` of every Event: what the operator was doing when the outcome happened.
pub const ACTION: &str = "Reconcile";
/// The API limit on an Event's note.
const NOTE_BYTES_MAX: usize = 1024;

/// Publishes Events through kube's events.k8s.io/v1 recorder (which also counts repeats into a
/// series instead of creating new Events).
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// A publisher reporting as `instance` (the pod name).
    pub fn new(kube: kube::Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: Some(instance.to_owned()),
        };
        Self {
            recorder: Recorder::new(kube, reporter),
        }
    }

    /// Publishes an Event on `object` when `next` changes the Ready condition found in
    /// `previous`: `Normal` when it becomes True, `Warning` (with the stable reason) otherwise.
    pub async fn on_transition<K>(&self, object: &K, previous: &[Condition], next: &Condition)
    where
        K: Resource<DynamicType = ()>,
    {
        if let Some(event) = transition(previous, next) {
            self.publish(object, &event).await;
        }
    }

    /// Publishes a `Normal` Event for an outcome that is not a condition (e.g. a finalizer ran).
    pub async fn normal<K>(&self, object: &K, reason: &str, note: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, &outcome(EventType::Normal, reason, note))
            .await;
    }

    /// Publishes a `Warning` Event for an outcome that is not the Ready condition (e.g. a
    /// decision the ledger did not take).
    pub async fn warning<K>(&self, object: &K, reason: &str, note: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, &outcome(EventType::Warning, reason, note))
            .await;
    }

    /// A failure to publish is logged, not returned: it must not fail the reconcile.
    async fn publish<K>(&self, object: &K, event: &Event)
    where
        K: Resource<DynamicType = ()>,
    {
        let reference = object.object_ref(&());
        if let Err(error) = self.recorder.publish(event, &reference).await {
            warn!(%error, reason = %event.reason, "publishing event failed");
        }
    }
}

/// An Event of `type_` with `reason`, its note cut to the API limit on a char boundary.
fn outcome(type_: EventType, reason: &str, note: &str) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note[..note.floor_char_boundary(NOTE_BYTES_MAX)].to_owned()),
        action: ACTION.to_owned(),
        secondary: None,
    }
}

/// The Event for `next`, or `None` when the Ready condition keeps its status and reason.
fn transition(previous: &[Condition], next: &Condition) -> Option<Event> {
    let unchanged = previous
        .iter()
        .find(|c| c.type_ == next.type_)
        .is_some_and(|c| c.status == next.status && c.reason == next.reason);
    if unchanged {
        return None;
    }
    let type_ = if next.status == "True" {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let end = next.message.floor_char_boundary(NOTE_BYTES_MAX);
    Some(Event {
        type_,
        reason: next.reason.clone(),
        note: Some(next.message[..end].to_owned()),
        action: ACTION.to_owned(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(status: &str, reason: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: "m".into(),
            last_transition_time: "2026-11-25T00:00:00Z".into(),
            observed_generation: 1,
        }
    }

    // Goal: Events fire on transitions only. Method: compare pairs of conditions.
    #[test]
    fn only_a_changed_status_or_reason_publishes() {
        let ready = condition("True", "Reconciled");
        let down = condition("False", "LedgerUnavailable");
        let first = transition(&[], &ready).expect("first condition");
        assert_eq!(
            (first.type_, first.reason.as_str()),
            (EventType::Normal, "Reconciled")
        );
        assert!(transition(std::slice::from_ref(&ready), &ready).is_none());
        let warning = transition(std::slice::from_ref(&ready), &down).expect("went down");
        assert_eq!(
            (warning.type_, warning.reason.as_str()),
            (EventType::Warning, "LedgerUnavailable")
        );
        // Same status, another reason: still a change worth telling.
        let refused = condition("False", "LedgerRefused");
        assert!(transition(std::slice::from_ref(&down), &refused).is_some());
    }

    // Goal: a long error message never makes the Event invalid. Method: multibyte text at the limit.
    #[test]
    fn notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        let mut long = condition("False", "LedgerRefused");
        long.message = "é".repeat(NOTE_BYTES_MAX);
        let event = transition(&[], &long).expect("event");
        let note = event.note.expect("note");
        assert!(note.len() <= NOTE_BYTES_MAX && note.len() >= NOTE_BYTES_MAX - 1);
    }
}
