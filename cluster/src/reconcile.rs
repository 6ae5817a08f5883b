// SPDX-License-Identifier: Apache-2.0
//! What an agent should do next, decided from the whole picture: the cluster view, the VMMs it
//! has locally, and which VMs have a task of theirs in flight. A pure function (no I/O, no
//! clock), level-triggered as kube-rs controllers are: it is run again after every change and
//! every second, and what it returns is recomputed from scratch each time, so a restarted agent
//! picks up exactly where the state says it is.

use std::collections::{BTreeMap, BTreeSet};

use crate::local::{LocalVm, Role};
use crate::model::{Desired, MovePhase, VmPhase};
use crate::view::ClusterView;

/// A local VMM and whether its process still runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSummary {
    pub local: LocalVm,
    pub alive: bool,
}

/// One step for the agent to take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Boot the VM here (it was created on this host).
    Boot { vm: String },
    /// Ask the guest to power off.
    Shutdown { vm: String, epoch: u64 },
    /// Kill a VMM that must not run here (any more).
    Kill { vm: String, epoch: u64, why: String },
    /// Remove an ended VMM's TAP and directory.
    Forget { vm: String, epoch: u64 },
    /// Delete a stopped VM's records.
    RemoveStopped { vm: String },
    /// Publish the VM's status.
    Report { vm: String, epoch: u64, phase: VmPhase, detail: Option<String> },
    /// The VM came back to this host (handed back after a failed move): the VMM that still holds
    /// it runs it again, at the new epoch.
    Adopt { vm: String, from_epoch: u64, to_epoch: u64 },
    /// Start the outgoing migration of a requested move.
    StartMove { vm: String, move_id: String },
    /// Follow an outgoing migration started earlier (after an agent restart).
    FollowMove { vm: String, move_id: String },
    /// The source VMM of a move that is done (the guest runs at the destination) still lives:
    /// after a post-copy switch it serves the pages the destination lacks, so it ends once its
    /// migration does, not at once.
    DrainOutgoing { vm: String, epoch: u64 },
    /// End a requested move that cannot happen (the VM has no VMM here).
    FailRequested { vm: String, move_id: String, why: String },
    /// An incoming VMM whose move was committed: end the move once it runs.
    FinishIncoming { vm: String, move_id: String, epoch: u64 },
    /// A committed incoming VMM ended before it was told the guest may run: give the VM back.
    HandBack { vm: String, move_id: String, revision: i64, why: String },
    /// A committed incoming VMM ended after it was told the guest may run: the VM is lost here;
    /// the move is over (the source must not resume its copy).
    EndLostIncoming { vm: String, move_id: String, epoch: u64, why: String },
}

/// What this agent should do now. `reported` is the status it last published per VM.
pub fn decide(
    me: &str,
    view: &ClusterView,
    locals: &[LocalSummary],
    busy: &BTreeSet<String>,
    reported: &BTreeMap<String, (u64, VmPhase)>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let report = |vm: &str, epoch: u64, phase: VmPhase, detail: Option<String>, actions: &mut Vec<Action>| {
        if reported.get(vm) != Some(&(epoch, phase)) {
            actions.push(Action::Report { vm: vm.to_string(), epoch, phase, detail });
        }
    };
    let in_flight = |vm: &str| view.move_in_flight(vm).map(|m| &m.value);

    for s in locals {
        let l = &s.local;
        if busy.contains(&l.vm) {
            continue;
        }
        let (vm, epoch) = (l.vm.clone(), l.epoch);
        let Some(rec) = view.vms.get(&l.vm).map(|r| &r.value) else {
            // Removed from the cluster.
            actions.push(if s.alive {
                Action::Kill { vm, epoch, why: "the VM no longer exists in the cluster".into() }
            } else {
                Action::Forget { vm, epoch }
            });
            continue;
        };
        // Moves in flight that involve this VMM are the move loop's.
        if let Some(m) = in_flight(&l.vm)
            && (m.from == me || m.to == me)
        {
            continue;
        }
        if rec.owner == me && rec.epoch == l.epoch {
            if rec.desired == Desired::Stopped {
                if !s.alive {
                    actions.push(Action::RemoveStopped { vm });
                } else if !l.stopping {
                    actions.push(Action::Shutdown { vm, epoch });
                } else {
                    report(&l.vm, epoch, VmPhase::Stopping, None, &mut actions);
                }
            } else if s.alive {
                report(&l.vm, epoch, VmPhase::Running, None, &mut actions);
            } else {
                report(&l.vm, epoch, VmPhase::Crashed, Some("its VMM exited".into()), &mut actions);
            }
        } else if rec.owner == me && rec.epoch > l.epoch {
            let newer = locals.iter().any(|o| o.local.vm == l.vm && o.local.epoch == rec.epoch);
            if s.alive && !newer && rec.desired == Desired::Running {
                actions.push(Action::Adopt { vm, from_epoch: epoch, to_epoch: rec.epoch });
            } else if s.alive {
                actions.push(Action::Kill { vm, epoch, why: format!("a newer VMM runs epoch {}", rec.epoch) });
            } else {
                actions.push(Action::Forget { vm, epoch });
            }
        } else if s.alive
            && l.outgoing.as_ref().is_some_and(|id| {
                view.moves.get(&l.vm).is_some_and(|m| &m.value.id == id && m.value.phase == MovePhase::Done)
            })
        {
            actions.push(Action::DrainOutgoing { vm, epoch });
        } else if s.alive {
            actions.push(Action::Kill {
                vm,
                epoch,
                why: format!("the VM belongs to host {} at epoch {} now", rec.owner, rec.epoch),
            });
        } else {
            actions.push(Action::Forget { vm, epoch });
        }
    }

    // VMs owned here without a VMM for their epoch.
    for (name, r) in &view.vms {
        let r = &r.value;
        if r.owner != me || busy.contains(name) || locals.iter().any(|s| &s.local.vm == name) {
            continue;
        }
        if r.desired == Desired::Stopped {
            actions.push(Action::RemoveStopped { vm: name.clone() });
        } else if r.epoch == 1 && in_flight(name).is_none() {
            actions.push(Action::Boot { vm: name.clone() });
        } else if in_flight(name).is_none() {
            let detail = format!("host {me} owns it at epoch {} but has no VMM for it", r.epoch);
            report(name, r.epoch, VmPhase::Lost, Some(detail), &mut actions);
        }
    }

    // Moves in flight from or to here.
    for (name, m) in &view.moves {
        let m = &m.value;
        if m.phase.is_final() || busy.contains(name) {
            continue;
        }
        let local = |epoch: u64| locals.iter().find(|s| &s.local.vm == name && s.local.epoch == epoch);
        if m.from == me {
            let source = local(m.epoch);
            match (m.phase, source) {
                (MovePhase::Requested, Some(s)) if s.alive && s.local.outgoing.as_deref() == Some(&m.id) => {
                    actions.push(Action::FollowMove { vm: name.clone(), move_id: m.id.clone() });
                }
                (MovePhase::Requested, Some(s)) if s.alive && !s.local.stopping => {
                    actions.push(Action::StartMove { vm: name.clone(), move_id: m.id.clone() });
                }
                (MovePhase::Requested, _) => actions.push(Action::FailRequested {
                    vm: name.clone(),
                    move_id: m.id.clone(),
                    why: format!("host {me} has no running VMM for VM {name} at epoch {}", m.epoch),
                }),
                (MovePhase::Committed, Some(s)) if s.alive => {
                    actions.push(Action::FollowMove { vm: name.clone(), move_id: m.id.clone() });
                }
                _ => {}
            }
        } else if m.to == me && m.phase == MovePhase::Committed {
            let incoming = locals.iter().find(|s| {
                &s.local.vm == name && matches!(&s.local.role, Role::Incoming { move_id } if move_id == &m.id)
            });
            let current = view.vms.get(name);
            match incoming {
                Some(s) if s.alive => actions.push(Action::FinishIncoming {
                    vm: name.clone(),
                    move_id: m.id.clone(),
                    epoch: s.local.epoch,
                }),
                Some(s) if s.local.may_run => actions.push(Action::EndLostIncoming {
                    vm: name.clone(),
                    move_id: m.id.clone(),
                    epoch: s.local.epoch,
                    why: "the destination VMM ended after it was told the guest may run".into(),
                }),
                _ => {
                    // It never ran here: the source's paused copy is the guest.
                    if let Some(cur) = current.filter(|c| c.value.owner == me) {
                        actions.push(Action::HandBack {
                            vm: name.clone(),
                            move_id: m.id.clone(),
                            revision: cur.mod_revision,
                            why: "the destination VMM ended before the guest could run there".into(),
                        });
                    }
                }
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MoveRecord, MoveTimes, VmRecord, VmSpec};
    use crate::view::Versioned;

    fn vm(name: &str, owner: &str, epoch: u64) -> Versioned<VmRecord> {
        Versioned {
            value: VmRecord {
                name: name.into(),
                spec: VmSpec {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: String::new(),
                    mem_mib: 64,
                    vcpus: 1,
                    mac: None,
                },
                desired: Desired::Running,
                owner: owner.into(),
                epoch,
                created_ms: 0,
            },
            mod_revision: 10 * epoch as i64,
            lease: 0,
        }
    }

    fn mv(name: &str, from: &str, to: &str, epoch: u64, phase: MovePhase) -> Versioned<MoveRecord> {
        Versioned {
            value: MoveRecord {
                id: format!("{name}.{epoch}.1"),
                vm: name.into(),
                from: from.into(),
                to: to.into(),
                epoch,
                phase,
                requested_by: "t".into(),
                error: None,
                times: MoveTimes::default(),
                mode: None,
            },
            mod_revision: 5,
            lease: 0,
        }
    }

    fn local(name: &str, epoch: u64, alive: bool) -> LocalSummary {
        LocalSummary {
            local: LocalVm {
                vm: name.into(),
                epoch,
                pid: 1,
                start_time: 1,
                tap: None,
                role: Role::Booted,
                committed_revision: None,
                may_run: false,
                outgoing: None,
                stopping: false,
            },
            alive,
        }
    }

    fn view(vms: Vec<Versioned<VmRecord>>, moves: Vec<Versioned<MoveRecord>>) -> ClusterView {
        let mut v = ClusterView::default();
        for r in vms {
            v.vms.insert(r.value.name.clone(), r);
        }
        for m in moves {
            v.moves.insert(m.value.vm.clone(), m);
        }
        v
    }

    fn run(v: &ClusterView, locals: &[LocalSummary]) -> Vec<Action> {
        decide("a", v, locals, &BTreeSet::new(), &BTreeMap::new())
    }

    #[test]
    fn a_new_vm_boots_once_and_a_crash_is_reported_not_rebooted() {
        let v = view(vec![vm("v", "a", 1), vm("w", "b", 1)], vec![]);
        assert_eq!(run(&v, &[]), [Action::Boot { vm: "v".into() }]);
        let actions = run(&v, &[local("v", 1, false)]);
        assert!(matches!(&actions[..], [Action::Report { phase: VmPhase::Crashed, .. }]), "{actions:?}");
        // Reported already: nothing more.
        let reported = BTreeMap::from([("v".to_string(), (1, VmPhase::Crashed))]);
        assert!(decide("a", &v, &[local("v", 1, false)], &BTreeSet::new(), &reported).is_empty());
        // Busy VMs are left alone.
        assert!(decide("a", &v, &[], &BTreeSet::from(["v".to_string()]), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_vm_owned_at_a_later_epoch_without_a_vmm_is_lost() {
        let v = view(vec![vm("v", "a", 3)], vec![]);
        let actions = run(&v, &[]);
        assert!(matches!(&actions[..], [Action::Report { phase: VmPhase::Lost, .. }]), "{actions:?}");
    }

    #[test]
    fn stopping_shuts_down_then_removes() {
        let mut r = vm("v", "a", 1);
        r.value.desired = Desired::Stopped;
        let v = view(vec![r], vec![]);
        assert_eq!(run(&v, &[local("v", 1, true)]), [Action::Shutdown { vm: "v".into(), epoch: 1 }]);
        let mut stopping = local("v", 1, true);
        stopping.local.stopping = true;
        assert!(matches!(&run(&v, &[stopping])[..], [Action::Report { phase: VmPhase::Stopping, .. }]));
        assert_eq!(run(&v, &[local("v", 1, false)]), [Action::RemoveStopped { vm: "v".into() }]);
        assert_eq!(run(&v, &[]), [Action::RemoveStopped { vm: "v".into() }]);
        // Gone from the cluster: the VMM goes, then its leftovers.
        let empty = view(vec![], vec![]);
        assert!(matches!(&run(&empty, &[local("v", 1, true)])[..], [Action::Kill { .. }]));
        assert_eq!(run(&empty, &[local("v", 1, false)]), [Action::Forget { vm: "v".into(), epoch: 1 }]);
    }

    #[test]
    fn the_source_starts_follows_or_fails_a_move() {
        let v = view(vec![vm("v", "a", 1)], vec![mv("v", "a", "b", 1, MovePhase::Requested)]);
        assert_eq!(run(&v, &[local("v", 1, true)]), [Action::StartMove { vm: "v".into(), move_id: "v.1.1".into() }]);
        let mut started = local("v", 1, true);
        started.local.outgoing = Some("v.1.1".into());
        assert_eq!(run(&v, &[started.clone()]), [Action::FollowMove { vm: "v".into(), move_id: "v.1.1".into() }]);
        assert!(matches!(&run(&v, &[local("v", 1, false)])[..], [Action::FailRequested { .. }]));
        // Committed: the VM is the destination's; the source follows until the end, never
        // killing its copy while the move is open (it may be handed back).
        let v = view(vec![vm("v", "b", 2)], vec![mv("v", "a", "b", 1, MovePhase::Committed)]);
        assert_eq!(run(&v, &[started.clone()]), [Action::FollowMove { vm: "v".into(), move_id: "v.1.1".into() }]);
        // Done: the leftover goes once its migration is over (post-copy may still need it).
        let v = view(vec![vm("v", "b", 2)], vec![mv("v", "a", "b", 1, MovePhase::Done)]);
        assert_eq!(run(&v, &[started]), [Action::DrainOutgoing { vm: "v".into(), epoch: 1 }]);
        assert_eq!(run(&v, &[local("v", 1, false)]), [Action::Forget { vm: "v".into(), epoch: 1 }]);
    }

    #[test]
    fn a_handed_back_vm_is_adopted_by_the_vmm_that_holds_it() {
        let v = view(vec![vm("v", "a", 3)], vec![mv("v", "a", "b", 1, MovePhase::Failed)]);
        assert_eq!(run(&v, &[local("v", 1, true)]), [Action::Adopt { vm: "v".into(), from_epoch: 1, to_epoch: 3 }]);
        // With a newer VMM of its own, an old one is stale.
        assert!(matches!(
            &run(&v, &[local("v", 1, true), local("v", 3, true)])[..],
            [Action::Kill { .. }, Action::Report { .. }]
        ));
    }

    #[test]
    fn the_destination_finishes_hands_back_or_ends_a_committed_move() {
        let committed = mv("v", "b", "a", 1, MovePhase::Committed);
        let v = view(vec![vm("v", "a", 2)], vec![committed]);
        let mut incoming = local("v", 2, true);
        incoming.local.role = Role::Incoming { move_id: "v.1.1".into() };
        assert_eq!(
            run(&v, &[incoming.clone()]),
            [Action::FinishIncoming { vm: "v".into(), move_id: "v.1.1".into(), epoch: 2 }]
        );
        incoming.alive = false;
        assert!(matches!(&run(&v, &[incoming.clone()])[..], [Action::HandBack { revision: 20, .. }]));
        incoming.local.may_run = true;
        assert!(matches!(&run(&v, &[incoming])[..], [Action::EndLostIncoming { .. }]));
        // Not committed yet, or not ours: nothing to do (the source ends it).
        let v = view(vec![vm("v", "b", 1)], vec![mv("v", "b", "a", 1, MovePhase::Requested)]);
        let mut receiving = local("v", 2, true);
        receiving.local.role = Role::Incoming { move_id: "v.1.1".into() };
        assert!(run(&v, &[receiving]).is_empty());
    }

    #[test]
    fn a_live_vmm_of_a_vm_owned_elsewhere_is_killed_unless_a_move_is_open() {
        let v = view(vec![vm("v", "b", 2)], vec![]);
        assert!(matches!(&run(&v, &[local("v", 1, true)])[..], [Action::Kill { .. }]));
    }

    #[test]
    fn the_source_of_a_done_move_ends_with_its_migration_not_at_once() {
        // A restarted agent finds the source VMM of a move that is done: after a post-copy
        // switch it may still serve pages the destination lacks.
        let done = mv("v", "a", "b", 1, MovePhase::Done);
        let v = view(vec![vm("v", "b", 2)], vec![done.clone()]);
        let mut source = local("v", 1, true);
        source.local.outgoing = Some(done.value.id.clone());
        assert_eq!(run(&v, &[source.clone()]), [Action::DrainOutgoing { vm: "v".into(), epoch: 1 }]);
        // Not for another move's id, nor once it is gone.
        let mut other = source.clone();
        other.local.outgoing = Some("v.0.1".into());
        assert!(matches!(&run(&v, &[other])[..], [Action::Kill { .. }]));
        source.alive = false;
        assert_eq!(run(&v, &[source]), [Action::Forget { vm: "v".into(), epoch: 1 }]);
    }
}
