// SPDX-License-Identifier: Apache-2.0
//! The `vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::arch::cpuid::CpuTemplate;
use vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB};
use vmm::net_config::NetConfig;
use vmm::{ExitReason, VmConfig, Vmm};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM micro-VM monitor built for live migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel and run it until it powers off.
    Run(RunArgs),
    /// Measure what this host's KVM runs natively, emulates or cannot run, at CPL 3 and CPL 0.
    Probe,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio archive) for the guest.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// CPU features shown to the guest: `host` (all KVM supports) or `baseline` (what KVM's
    /// instruction emulator handles; for Linux on paravirtual nested KVM).
    #[arg(long, value_enum, default_value_t = CpuTemplate::Host)]
    cpu_template: CpuTemplate,
    /// A virtio-net device on a TAP: `tap=NAME[,mac=MAC]`. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Probe => probe(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        cpu_template: args.cpu_template,
        nets: args.nets,
    };
    let built = vmm::build_vm_for_boot(&config, Box::new(std::io::stdout()))?;
    let vmm = Vmm::start(built)?;
    match vmm.run()? {
        ExitReason::Reset(how) => {
            log::info!("guest stopped ({how})");
            Ok(ExitCode::SUCCESS)
        }
        ExitReason::Error(e) => Err(e.into()),
    }
}

fn probe() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let kvm = vmm::builder::open_kvm()?;
    print!("{}", vmm::probe::table(&kvm));
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr (stdout is the guest's console); `VMM_LOG=debug` for more.
fn init_logging() {
    struct StderrLogger;
    impl log::Log for StderrLogger {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                eprintln!(
                    "vmm: {}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                );
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: StderrLogger = StderrLogger;
    let level = match std::env::var("VMM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("info") => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
