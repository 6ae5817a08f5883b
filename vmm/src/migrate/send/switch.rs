// SPDX-License-Identifier: Apache-2.0
//! The source's switch to post-copy (`--postcopy`, `--postcopy-auto`): the destination gets the
//! list of the pages it lacks instead of the pages, and runs the guest at once; then
//! [`postcopy_source`] answers its faults and pushes the rest.

use std::time::Instant;

use migration::STATE_VERSION;
use migration::memory::{PAGE_SIZE, or_into};
use migration::protocol::{self, Command};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::Source;
use crate::api::{MigrationPhase, PostcopyInfo};
use crate::migrate::dirty::Bitmap;
use crate::migrate::{
    MachineState, MigrateError, disks, pause_devices, postcopy_source, save_devices, save_disks, save_vm_state,
};

impl Source<'_> {
    /// Moves the guest now and lets the pages it dirtied since the last round follow: the
    /// destination gets the list of pages it lacks instead of the pages, runs the guest, and
    /// fetches them on first touch while this host pushes them (see [`postcopy_source`]).
    pub(super) fn postcopy(&mut self, carried: Vec<Bitmap>) -> Result<Option<u64>, MigrateError> {
        let vm = &self.m.vm;
        let (Some(id), Some(fault)) = (self.postcopy_id, self.fault.take()) else {
            return Err(MigrateError::Other("post-copy in a migration that did not offer it".into()));
        };
        let peer = self.peer();
        let layout: Vec<(u64, u64)> = vm.memory().iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
        let as_bitmap = |words: &[Bitmap]| migration::postcopy::PageBitmap {
            regions: layout
                .iter()
                .zip(words)
                .map(|(&(start, len), w)| (start, len / PAGE_SIZE as u64, w.clone()))
                .collect(),
        };
        // The pages dirtied so far go now, while the guest still runs here: the destination
        // drops its copies of them before it answers `Prepare`. Dropping (a madvise per run of
        // pages) took it 6-10 ms for 30 000 pages, all of it downtime when it came after the
        // pause; only what the guest dirties from here to the pause is left for then.
        let mut needed = carried;
        for (a, b) in needed.iter_mut().zip(self.peeked.collect(vm)?) {
            or_into(a, &b);
        }
        protocol::write_frame(self.stream()?, Command::PostcopyDrop, &as_bitmap(&needed).encode())?;
        self.prepare()?;
        let paused_at = Instant::now();
        self.vcpus.lock().expect("Poisoned lock").pause_and_save().map_err(MigrateError::Vcpus)?;
        self.paused = true;
        self.states_pending = true;
        self.update(|p| {
            p.paused_at_us = Some(protocol::unix_now_us());
            p.phase = MigrationPhase::StopAndCopy;
        });
        let at =
            |what: &str| log::debug!("migration: post-copy switch: {what} at {} µs", paused_at.elapsed().as_micros());
        at("vCPUs paused");
        protocol::write_frame(self.stream()?, Command::Paused, &[])?;
        pause_devices(self.m);
        self.set_throttle(0);
        for (a, b) in needed.iter_mut().zip(self.peeked.collect(vm)?) {
            or_into(a, &b);
        }
        at("dirty log read");
        let bitmap = as_bitmap(&needed);
        let needed_pages = bitmap.count();
        let round = self.progress.lock().expect("Poisoned lock").round + 1;
        self.record_round(round, needed_pages, true);
        protocol::write_frame(self.stream()?, Command::PostcopyDirty, &bitmap.encode())?;
        at("dirty list sent");
        // Disks do not go by post-copy: their last blocks go now, as in stop-and-copy.
        self.disk_round(false)?;
        disks::flush_shared(self.m)?;
        let m = self.m;
        let progress = self.progress;
        let transfer = postcopy_source::Transfer {
            mem: m.vm.memory(),
            layout,
            needed: bitmap,
            fault,
            peer,
            id,
            progress,
            max_bandwidth: self.params.max_bandwidth,
        };
        let mut downtime_us = None;
        // The fault connection is served from here on: restoring the machine, the destination
        // already touches pages it does not have.
        let done = transfer.run(|| {
            self.states_pending = false;
            let vcpus = self.vcpus.lock().expect("Poisoned lock").saved_states().map_err(MigrateError::Vcpus)?;
            self.guest_still_runs()?;
            let (serial, nets) = save_devices(m);
            let disks = save_disks(m);
            let state = MachineState { version: STATE_VERSION, vm: save_vm_state(vm)?, vcpus, serial, nets, disks };
            protocol::write_json(self.stream()?, Command::State, &state)?;
            protocol::write_frame(self.stream()?, Command::Complete, &[])?;
            self.complete_sent = true;
            // From `Complete` on the destination owns the guest. Without an answer it may run it
            // already, with pages missing that only this host has: the transfer goes on by
            // reconnecting, as after any break.
            let answer = match protocol::read_response(self.stream()?) {
                Ok(a) if !a.ok => {
                    return Err(MigrateError::Refused(a.error.unwrap_or_else(|| "no reason given".into())));
                }
                Ok(a) => Some(a),
                Err(e) => {
                    log::warn!("migration: no answer to Complete ({e}); the guest may run on the destination");
                    None
                }
            };
            // The guest runs on the destination now; its memory is on both hosts until every
            // page is across, and this host never resumes it.
            let downtime = paused_at.elapsed();
            let switched_at_ms = self.started.elapsed().as_millis() as u64;
            downtime_us = answer.as_ref().and_then(|a| a.downtime_us);
            let resumed_at_us = answer.as_ref().and_then(|a| a.resumed_at_us);
            self.update(|p| {
                p.downtime_ms = Some(downtime.as_millis() as u64);
                p.downtime_us = Some(downtime.as_micros() as u64);
                p.resumed_at_us = resumed_at_us;
                p.phase = MigrationPhase::Postcopy;
                p.postcopy = Some(PostcopyInfo { switched_at_ms, pages_needed: needed_pages, ..Default::default() });
            });
            log::info!(
                "migration: switched to post-copy after {switched_at_ms} ms ({needed_pages} pages to follow), \
                 downtime {} µs",
                downtime.as_micros()
            );
            let main = if answer.is_some() { self.stream.take() } else { None };
            self.stream = None;
            Ok(main)
        })?;
        self.update(|p| {
            if let Some(pc) = p.postcopy.as_mut() {
                pc.faults = Some(done.faults);
                pc.fault_latency_median_us = done.fault_latency_median_us;
                pc.fault_latency_p99_us = done.fault_latency_p99_us;
                pc.duration_ms = Some(done.duration_ms);
                pc.reconnects = done.reconnects;
            }
        });
        Ok(downtime_us)
    }
}
