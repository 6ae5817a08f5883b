// SPDX-License-Identifier: Apache-2.0
//! How a failed migration ends on the source: before the commit point the guest runs on here;
//! after it, or after `Complete` went unanswered, it stays paused here (see [`super`]).

use std::io::Write;
use std::time::Duration;

use migration::protocol::{self, Command};

use super::{Outcome, Source};
use crate::api::MigrationPhase;
use crate::migrate::{MigrateError, announce_now, dirty, pause_devices, resume_devices};

impl Source<'_> {
    /// Cleans up after an error and says how it ended.
    pub(super) fn fail(&mut self, e: MigrateError) -> Outcome {
        let refused = matches!(e, MigrateError::Refused(_));
        let msg = e.to_string();
        if (self.complete_sent && !refused) || self.committed {
            let msg = if self.committed {
                format!(
                    "{msg}; the destination's cluster had committed the move, so the guest stays paused here \
                     until the cluster hands it back"
                )
            } else {
                format!(
                    "{msg}; the destination may be running the guest, so it stays paused here \
                     (resume it only if the destination is known not to run it)"
                )
            };
            log::error!("migration: {msg}");
            if self.committed && !self.complete_sent {
                // The destination never got everything: tell it to give up at once (it exits
                // without running the guest, and its cluster hands the guest back).
                if let Some(s) = self.stream.as_mut() {
                    let _ = protocol::write_frame(s, Command::Abandon, &[]);
                    let _ = s.flush();
                }
            }
            self.stream = None;
            let vcpus = self.vcpus.lock().expect("Poisoned lock");
            if self.states_pending {
                // Not needed any more, but must not be taken for a later resume's answers.
                let _ = vcpus.saved_states();
                self.states_pending = false;
            }
            if !self.paused {
                // Committed but not yet paused: the guest is no longer ours to run.
                match vcpus.pause() {
                    Ok(()) => {
                        self.paused = true;
                        pause_devices(self.m);
                    }
                    Err(e) => log::error!("migration: pausing the vCPUs after the commit failed: {e}"),
                }
            }
            drop(vcpus);
            // Whatever happens next (a resume here, or nothing), dirty pages no longer matter.
            if let Err(e) = dirty::stop(&self.m.vm) {
                log::warn!("migration: stopping dirty logging: {e}");
            }
            self.update(|p| {
                p.phase = MigrationPhase::Failed;
                p.error = Some(msg.clone());
            });
            return Outcome::InDoubt(msg);
        }
        if self.m.guest_stopped().is_some() {
            log::warn!("migration failed: {msg}");
        } else {
            log::warn!("migration failed, the guest keeps running here: {msg}");
        }
        if let Some(s) = self.stream.as_mut() {
            // Best effort: tell the destination to give up, then hang up.
            let _ = protocol::write_frame(s, Command::Abandon, &[]);
            let _ = s.flush();
        }
        self.stream = None;
        self.disks.stop_tracking();
        let mut cleanup = Vec::new();
        if let Err(e) = dirty::stop(&self.m.vm) {
            cleanup.push(format!("stopping dirty logging: {e}"));
        }
        if self.states_pending {
            // Their answers are of no use now, but must not be taken for the resume's.
            let _ = self.vcpus.lock().expect("Poisoned lock").saved_states();
            self.states_pending = false;
        }
        if self.paused {
            resume_devices(self.m);
            if let Err(e) = self.vcpus.lock().expect("Poisoned lock").resume() {
                cleanup.push(format!("resuming vCPUs: {e}"));
            }
            self.paused = false;
            // The destination announced the guest when it heard `Paused`: take it back.
            for wait in [0, 50, 150] {
                std::thread::sleep(Duration::from_millis(wait));
                announce_now(self.m);
            }
        }
        let msg = if cleanup.is_empty() { msg } else { format!("{msg} (and {})", cleanup.join("; ")) };
        self.update(|p| {
            p.phase = MigrationPhase::Failed;
            p.error = Some(msg.clone());
        });
        Outcome::Failed(msg)
    }
}
