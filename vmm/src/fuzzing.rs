// SPDX-License-Identifier: Apache-2.0
//! One entry point per input an attacker controls, for the fuzz targets in `fuzz/` (a workspace
//! of its own, run by `resources/fuzz.sh`) and for the tests that replay their corpus on the
//! stable toolchain (`vmm/tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must return,
//! never panic, hang or touch memory it should not:
//!
//! - [`migration_frames`]: the stream at a destination, cut into frames;
//! - [`migration_start`]: a `Start` payload and the destination's checks of it (all but KVM's);
//! - [`machine_state`]: the `State` payload, and the serial port's part restored;
//! - [`memory_batch`]: a `Memory` batch written into guest memory;
//! - [`disk_batch`]: a `Disk` batch written into a copied disk's new file;
//! - [`api_http`]: bytes from an API client, served as a connection is;
//! - [`virtio_net`] and [`virtio_blk`]: queues laid out by a hostile driver, then processed;
//! - [`guest_cmdline`]: the guest's command line, as our guests parse it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use migration::protocol::{self, StartPayload};
use virtio::{MmioTransport, VirtioDevice};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_device::MutDeviceMmio;
use vm_device::bus::MmioAddress;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::api::server::{ApiServerOptions, serve_stream};
use crate::api::{ApiError, ApiRequest, ApiResponse, MigrationInfo};
use crate::migrate::MachineState;
use crate::vstate::memory::GuestMemoryMmap;

/// Frames as the destination reads them, until the bytes end or one is refused.
pub fn migration_frames(data: &[u8]) {
    let mut reader = data;
    let mut buf = Vec::new();
    while protocol::read_frame_into(&mut reader, &mut buf).is_ok() {}
}

/// A `Start` payload: parsed, then checked as a sandboxed destination with one NIC would.
pub fn migration_start(data: &[u8]) {
    let Ok(start) = protocol::parse_json::<StartPayload>("Start", data) else { return };
    let nets = ["tap=fuzz0".parse().expect("a valid --net")];
    let _ = crate::migrate::receive::check_start_config(&start, &nets, true);
    let _ = crate::migrate::receive::check_start_config(&start, &[], false);
}

/// A `State` payload: parsed, and the serial port's state restored into a port.
pub fn machine_state(data: &[u8]) {
    let Ok(state) = protocol::parse_json::<MachineState>("State", data) else { return };
    let Ok(trigger) = crate::devices::EventFdTrigger::new() else { return };
    let mut serial = crate::devices::serial::SerialPort::new(trigger, Box::new(std::io::sink()));
    let _ = serial.restore_state(&state.serial);
}

/// Guest memory of the memory batch target: 1 MiB, so batches reach past its end easily.
fn small_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("1 MiB of guest memory")
}

/// A `Memory` batch applied to 1 MiB of guest memory.
pub fn memory_batch(data: &[u8]) {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    let mem = MEM.get_or_init(small_memory);
    let mut written = crate::migrate::receive::Written::new(mem);
    let _ = crate::migrate::receive::apply_batch(mem, data, &mut written);
}

/// A `Disk` batch applied to the new file of a 1 MiB copied disk (its path is removed at once;
/// the destination's writer keeps the file open).
pub fn disk_batch(data: &[u8]) {
    static SINK: OnceLock<Mutex<crate::migrate::disks::DiskSink>> = OnceLock::new();
    let sink = SINK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vmm-fuzz-disk-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let local = crate::disk_config::DiskConfig { path: path.clone(), read_only: false, shared: false };
        let mut config = crate::config::VmConfig {
            kernel: Default::default(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 32,
            vcpus: 1,
            cpu_template: Default::default(),
            nets: Vec::new(),
            disks: vec![local.clone()],
        };
        let layouts = [protocol::DiskLayout { size: 1 << 20, shared: false, read_only: false }];
        let mut res = crate::host::HostResources::on_demand();
        let sink = crate::migrate::disks::DiskSink::prepare(&layouts, &[local], &mut config, &mut res)
            .expect("a new 1 MiB disk file");
        let _ = std::fs::remove_file(&path);
        Mutex::new(sink)
    });
    let _ = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(data);
}

/// The API's answers to the fuzz target's requests: a fixed, valid answer per request.
fn fake_vmm(requests: std::sync::mpsc::Receiver<crate::api::ApiMessage>) {
    for (request, reply) in requests {
        let answer = match request {
            ApiRequest::GetMigration => Ok(ApiResponse::Migration(MigrationInfo::default())),
            ApiRequest::Metrics => Ok(ApiResponse::Metrics("vmm_up 1\n".into())),
            ApiRequest::Migrate(_) | ApiRequest::Snapshot(_) => Ok(ApiResponse::Accepted),
            ApiRequest::GetSnapshot => Ok(ApiResponse::Snapshot(Default::default())),
            ApiRequest::GetVm => Err(ApiError::Internal("no VM in the fuzzer".into())),
            ApiRequest::Restore(_) => Err(ApiError::Conflict("no restore in the fuzzer".into())),
            ApiRequest::Pause | ApiRequest::Resume | ApiRequest::Shutdown => Ok(ApiResponse::Done),
        };
        let _ = reply.send(answer);
    }
}

/// Bytes an API client sent before closing its side, served as a connection is; every answer
/// must be a well-formed HTTP response.
pub fn api_http(data: &[u8]) {
    type Vmm = (Mutex<std::sync::mpsc::Sender<crate::api::ApiMessage>>, Arc<EventFd>);
    static VMM: OnceLock<Vmm> = OnceLock::new();
    let (to_vmm, wake) = VMM.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || fake_vmm(rx));
        (Mutex::new(tx), Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd")))
    });
    let Ok((server, mut client)) = UnixStream::pair() else { return };
    // A socket buffer holds far more than a fuzz input; the rest would block, so it is cut.
    let _ = client.write_all(&data[..data.len().min(64 << 10)]);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let options = ApiServerOptions { request_timeout: Duration::from_secs(1), ..Default::default() };
    let tx = to_vmm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    serve_stream(server, tx, wake.clone(), options);
    let mut answers = Vec::new();
    let _ = client.read_to_end(&mut answers);
    let asked_head = data.windows(5).any(|w| w == b"HEAD ");
    let mut rest = &answers[..];
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("the server sent a malformed answer ({other:?}): {:?}", String::from_utf8_lossy(rest)),
        };
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("Content-Length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        // The answer to a `HEAD` has the length of the body it leaves out: what follows its
        // head is then the next answer (our bodies are JSON or metrics text, never "HTTP/"), or
        // nothing, if a `HEAD` was asked at all.
        let after = &rest[head..];
        let head_only = after.starts_with(b"HTTP/") || (after.is_empty() && asked_head);
        let length = if head_only { 0 } else { length };
        assert!(rest.len() >= head + length || response.code == Some(204), "a truncated answer");
        rest = &rest[(head + length).min(rest.len())..];
    }
}

/// A hostile virtio driver: sets a device up through its MMIO registers like a real driver,
/// then lays its queues out from fuzz input.
struct HostileDriver {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    queues: u32,
}

/// Queues of the hostile driver: this many entries, each queue's rings in a page of its own.
const QUEUE_SIZE: u16 = 16;
const RINGS: u64 = 0x1000;
/// Where buffers go; the rest of guest memory.
const BUFFERS: u64 = 0x1_0000;
const DRIVER_MEM: usize = 256 << 10;

impl HostileDriver {
    fn new(device: Arc<Mutex<dyn VirtioDevice + Send>>, queues: u32) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), DRIVER_MEM)]).expect("guest memory");
        let transport = MmioTransport::new(mem.clone(), device);
        HostileDriver { mem, transport, queues }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        self.transport.mmio_write(MmioAddress(0), u64::from(reg), &v.to_le_bytes());
    }

    /// Resets the device, accepts `features`, sets every queue up and fills its descriptor
    /// table, available ring and the buffers from `data` (zeros where it runs out).
    fn setup(&mut self, features: u64, data: &[u8]) {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for sel in 0..2u32 {
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, s);
        let mut rest = data;
        let mut take = |n: usize| {
            let mut out = vec![0u8; n];
            let k = n.min(rest.len());
            out[..k].copy_from_slice(&rest[..k]);
            rest = &rest[k..];
            out
        };
        let size = u64::from(QUEUE_SIZE);
        for q in 0..self.queues {
            let base = RINGS * (1 + u64::from(q));
            let (desc, avail, used) = (base, base + 16 * size, base + 0x800);
            let _ = self.mem.write_slice(&take(16 * size as usize), GuestAddress(desc));
            let _ = self.mem.write_slice(&take(4 + 2 * size as usize), GuestAddress(avail));
            let _ = self.mem.write_slice(&[0u8; 4], GuestAddress(used));
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, q);
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (lo, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                (VIRTIO_MMIO_QUEUE_USED_LOW, used),
            ] {
                self.write_reg(lo, addr as u32);
                self.write_reg(lo + 4, (addr >> 32) as u32);
            }
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        let buffers = take(DRIVER_MEM - BUFFERS as usize);
        let _ = self.mem.write_slice(&buffers, GuestAddress(BUFFERS));
        self.write_reg(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

/// The first 8 bytes as the features the driver accepts.
fn split_features(data: &[u8]) -> (u64, &[u8]) {
    let mut f = [0u8; 8];
    let k = data.len().min(8);
    f[..k].copy_from_slice(&data[..k]);
    (u64::from_le_bytes(f), &data[k..])
}

/// A virtio-blk device on a 1 MiB image, driven by a hostile driver.
pub fn virtio_blk(data: &[u8]) {
    type Rig = (Arc<Mutex<block::Block>>, Mutex<HostileDriver>);
    static RIG: OnceLock<Rig> = OnceLock::new();
    let (block, driver) = RIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vmm-fuzz-blk-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let disk = block::Disk::create(&path, 1 << 20, false).expect("a 1 MiB image");
        let _ = std::fs::remove_file(&path);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
        let block = Arc::new(Mutex::new(block::Block::new(disk, "fuzz", irq).expect("a virtio-blk device")));
        let driver = HostileDriver::new(block.clone(), 1);
        (block, Mutex::new(driver))
    });
    let (features, rest) = split_features(data);
    driver.lock().unwrap_or_else(std::sync::PoisonError::into_inner).setup(features, rest);
    block.lock().unwrap_or_else(std::sync::PoisonError::into_inner).process_queue();
}

/// Brings interface `name` up (an ioctl on any socket).
fn link_up(name: &str) {
    // SAFETY: a socket for the ioctl, closed below; an ifreq with the name and flags.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        libc::close(fd);
    }
}

/// A virtio-net device on a TAP in a network namespace of this thread's own (needs root),
/// driven by a hostile driver: TX, RX and control queues processed.
pub fn virtio_net(data: &[u8]) {
    thread_local! {
        static RIG: Option<(Arc<Mutex<net::Net>>, Mutex<HostileDriver>)> = {
            // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                None
            } else {
                let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
                let net = net::Net::new("vmmfuzz0", [0x52, 0x54, 0, 0, 0, 1], irq).ok().map(|n| Arc::new(Mutex::new(n)));
                link_up("vmmfuzz0");
                net.map(|n| (n.clone(), Mutex::new(HostileDriver::new(n, 3))))
            }
        };
    }
    RIG.with(|rig| {
        let Some((net, driver)) = rig else { panic!("virtio_net needs root (a network namespace and a TAP)") };
        let (features, rest) = split_features(data);
        driver.lock().unwrap_or_else(std::sync::PoisonError::into_inner).setup(features, rest);
        let mut n = net.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        n.process_tx();
        n.process_rx();
        n.process_ctrl();
    });
}

/// The guest's command line, as our guests (Linux init and our kernel) parse it.
pub fn guest_cmdline(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let p = guest_common::Params::parse(s);
        let _ = p.devices().count();
    }
}

/// A fuzz target: its name and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: [Target; 9] = [
    ("migration_frames", migration_frames),
    ("migration_start", migration_start),
    ("machine_state", machine_state),
    ("memory_batch", memory_batch),
    ("disk_batch", disk_batch),
    ("api_http", api_http),
    ("virtio_net", virtio_net),
    ("virtio_blk", virtio_blk),
    ("guest_cmdline", guest_cmdline),
];
