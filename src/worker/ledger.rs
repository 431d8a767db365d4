//! The leases a worker holds and what it still owes the scheduler, reconciled with each
//! answer. Pure bookkeeping: the bot loop does the I/O and acts on the decisions.
//!
//! The rules follow the Bots API as BuildGrid implements it: a lease the bot works on is
//! reported ACTIVE on every call (the heartbeat); a finished one is reported COMPLETED with
//! its status and result until a call carrying it is answered; a lease the scheduler leaves
//! out of its answer (or marks CANCELLED) was taken away, so its action is stopped.

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::google::devtools::remoteworkers::v1test2::{Lease, LeaseState};

/// What happens to one lease.
#[derive(Debug)]
enum Slot {
    /// Its action runs.
    Running,
    /// Done; the completed lease waits to be reported.
    Done(Box<Lease>),
}

/// What was sent in one call, to tell confirmed reports from ones made meanwhile.
#[derive(Debug, Default)]
pub struct Sent {
    running: BTreeSet<String>,
    done: BTreeSet<String>,
}

/// What the bot must do after an answer.
#[derive(Debug, Default, PartialEq)]
pub struct Decisions {
    /// New leases to run (id and the lease as received, with its payload).
    pub start: Vec<Lease>,
    /// Leases taken away: stop their actions.
    pub cancel: Vec<String>,
    /// Completed leases the scheduler has now received.
    pub confirmed: Vec<String>,
}

/// The leases of one bot session.
#[derive(Debug, Default)]
pub struct Ledger {
    slots: BTreeMap<String, Slot>,
}

impl Ledger {
    /// An empty ledger (a new session holds no leases).
    pub fn new() -> Self {
        Ledger::default()
    }

    /// Leases whose actions run now.
    pub fn running(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Running)).count()
    }

    /// Completed leases not yet confirmed by the scheduler.
    pub fn unreported(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Done(_))).count()
    }

    /// True when the ledger holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Ids of the running leases.
    pub fn running_ids(&self) -> Vec<String> {
        self.slots.iter().filter(|(_, s)| matches!(s, Slot::Running)).map(|(id, _)| id.clone()).collect()
    }

    /// Records that `id` now runs (after [`Decisions::start`]).
    pub fn start(&mut self, id: &str) {
        self.slots.insert(id.to_string(), Slot::Running);
    }

    /// Records a finished lease (COMPLETED, with status and result). Ignored when the lease
    /// was taken away meanwhile.
    pub fn complete(&mut self, lease: Lease) -> bool {
        match self.slots.get_mut(&lease.id) {
            Some(slot @ Slot::Running) => {
                *slot = Slot::Done(Box::new(lease));
                true
            }
            _ => false,
        }
    }

    /// Records a lease refused without running (shutting down, over capacity, bad payload):
    /// it is reported as completed with `lease`'s status so the scheduler can place it.
    pub fn refuse(&mut self, lease: Lease) {
        self.slots.insert(lease.id.clone(), Slot::Done(Box::new(lease)));
    }

    /// The leases to put in the next call, and the record of what was sent.
    pub fn report(&self) -> (Vec<Lease>, Sent) {
        let mut sent = Sent::default();
        let mut leases = Vec::with_capacity(self.slots.len());
        for (id, slot) in &self.slots {
            match slot {
                Slot::Running => {
                    sent.running.insert(id.clone());
                    leases.push(Lease { id: id.clone(), state: LeaseState::Active as i32, ..Default::default() });
                }
                Slot::Done(l) => {
                    sent.done.insert(id.clone());
                    leases.push(l.as_ref().clone());
                }
            }
        }
        (leases, sent)
    }

    /// Takes in the scheduler's answer to the call that sent `sent`.
    ///
    /// Completed leases that were sent are confirmed and forgotten (the scheduler may hand
    /// the same id out again later, e.g. when it retries the job). A lease sent as running
    /// but missing from the answer, or marked CANCELLED, was taken away. A lease in the
    /// answer that the ledger does not hold is new work when PENDING or ACTIVE (even one
    /// confirmed by this very answer: BuildGrid may hand a re-queued job straight back).
    pub fn reconcile(&mut self, sent: &Sent, answer: &[Lease]) -> Decisions {
        let mut d = Decisions::default();
        for id in &sent.done {
            if matches!(self.slots.get(id), Some(Slot::Done(_))) {
                self.slots.remove(id);
                d.confirmed.push(id.clone());
            }
        }
        let answered: BTreeMap<&str, &Lease> = answer.iter().map(|l| (l.id.as_str(), l)).collect();
        for id in &sent.running {
            let kept = answered.get(id.as_str()).is_some_and(|l| l.state != LeaseState::Cancelled as i32);
            if !kept && self.slots.remove(id).is_some() {
                // A result finished since the call was sent is dropped too: the scheduler
                // no longer wants it from this bot.
                d.cancel.push(id.clone());
            }
        }
        for l in answer {
            let fresh = l.state == LeaseState::Pending as i32 || l.state == LeaseState::Active as i32;
            if fresh && !self.slots.contains_key(&l.id) {
                d.start.push(l.clone());
            }
        }
        d
    }

    /// Forgets everything (the session is gone; the scheduler re-queued its leases) and
    /// returns the ids that were running.
    pub fn clear(&mut self) -> Vec<String> {
        let ids = self.running_ids();
        self.slots.clear();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::rpc;

    fn lease(id: &str, state: LeaseState) -> Lease {
        Lease { id: id.into(), state: state as i32, ..Default::default() }
    }

    fn done(id: &str, code: i32) -> Lease {
        Lease {
            id: id.into(),
            state: LeaseState::Completed as i32,
            status: Some(rpc::Status { code, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn new_leases_start_once_and_heartbeat_as_active() {
        let mut l = Ledger::new();
        let (_, sent) = l.report();
        let d = l.reconcile(&sent, &[lease("i/a", LeaseState::Active), lease("i/b", LeaseState::Pending)]);
        assert_eq!(d.start.len(), 2);
        l.start("i/a");
        l.start("i/b");
        let (leases, sent) = l.report();
        assert!(leases.iter().all(|x| x.state == LeaseState::Active as i32 && x.payload.is_none()));
        // The heartbeat echoes them: nothing to do.
        let d = l.reconcile(&sent, &leases);
        assert_eq!(d, Decisions::default());
        assert_eq!(l.running(), 2);
    }

    #[test]
    fn completed_leases_are_reported_until_confirmed() {
        let mut l = Ledger::new();
        l.start("a");
        assert!(l.complete(done("a", 0)));
        let (leases, sent) = l.report();
        assert_eq!(leases, vec![done("a", 0)]);
        // The call failed: nothing confirmed, the same report goes out again.
        let (again, sent2) = l.report();
        assert_eq!(again, leases);
        let d = l.reconcile(&sent2, &[]);
        assert_eq!(d.confirmed, vec!["a".to_string()]);
        assert!(d.cancel.is_empty());
        assert!(l.is_empty());
        // A late answer to the first call changes nothing.
        assert_eq!(l.reconcile(&sent, &[]), Decisions { confirmed: vec![], ..Default::default() });
    }

    #[test]
    fn leases_left_out_or_cancelled_are_stopped() {
        let mut l = Ledger::new();
        l.start("a");
        l.start("b");
        l.start("c");
        let (_, sent) = l.report();
        // c finished while the call was in flight; the scheduler dropped it and a.
        assert!(l.complete(done("c", 0)));
        let d = l.reconcile(&sent, &[lease("b", LeaseState::Cancelled)]);
        assert_eq!(d.cancel, vec!["a".to_string(), "b".to_string(), "c".to_string()]);
        assert!(l.is_empty());
        assert!(!l.complete(done("a", 0)), "a result for a cancelled lease is ignored");
    }

    #[test]
    fn a_result_finished_during_a_call_is_not_confirmed_by_it() {
        let mut l = Ledger::new();
        l.start("a");
        let (_, sent) = l.report();
        assert!(l.complete(done("a", 0)));
        let d = l.reconcile(&sent, &[lease("a", LeaseState::Active)]);
        assert_eq!(d, Decisions::default());
        assert_eq!(l.unreported(), 1);
    }

    #[test]
    fn the_same_id_can_come_back_after_confirmation() {
        let mut l = Ledger::new();
        l.start("a");
        l.complete(done("a", 14));
        let (_, sent) = l.report();
        // The answer confirms a and already hands it out again: BuildGrid re-queues a job
        // reported UNAVAILABLE and may give it straight back to the same bot.
        let d = l.reconcile(&sent, &[lease("a", LeaseState::Active)]);
        assert_eq!(d.confirmed, vec!["a".to_string()]);
        assert_eq!(d.start.len(), 1);
    }

    #[test]
    fn refused_and_cleared() {
        let mut l = Ledger::new();
        l.refuse(done("x", 14));
        l.start("y");
        assert_eq!(l.unreported(), 1);
        assert_eq!(l.clear(), vec!["y".to_string()]);
        assert!(l.is_empty());
    }
}
