// SPDX-License-Identifier: Apache-2.0
//! `vmm-cluster`: serves `vmm host|cluster|vm ...` (the `vmm` binary runs it for them).

use std::process::ExitCode;

use clap::Parser;
use vmm_cluster::cli::{Cli, Top, run_command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (VMM_LOG filters, VMM_LOG_FORMAT=json for JSON lines): the agent is a
    // daemon and logs what it does, and so is the balancer; the other commands print their results and log warnings.
    let daemon = matches!(cli.command, Top::Host(vmm_cluster::cli::HostCmd::Run(_)) | Top::Balancer(_));
    vmm::logging::init("vmm", if daemon { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let etcd = cli.etcd_access();
    match runtime.block_on(run_command(cli.command, &etcd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
