// SPDX-License-Identifier: Apache-2.0
//! Replays every fuzz target's seed corpus (`fuzz/corpus/TARGET/`) and the inputs of crashes
//! fuzzing found (`fuzz/regressions/TARGET/`, kept after the fix) through the same entry points
//! the fuzz targets call (`vmm::fuzzing`), on the stable toolchain, so CI covers those paths
//! without cargo-fuzz. `write_seeds` (ignored) regenerates the seeds from the real encoders.

use std::path::{Path, PathBuf};

use migration::disk::DiskBatchWriter;
use migration::memory::{BatchWriter, PAGE_SIZE};
use migration::protocol::{self, Command, RegionLayout, StartPayload};
use vmm::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    files
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn every_target_has_a_seed_corpus_and_replays_it() {
    for (target, run) in TARGETS {
        let seeds = inputs("corpus", target);
        assert!(!seeds.is_empty(), "no seeds in fuzz/corpus/{target}");
        assert!(fuzz_dir().join("fuzz_targets").join(format!("{target}.rs")).is_file(), "no fuzz target {target}");
        if target == "virtio_net" && !is_root() {
            eprintln!("*** SKIPPED replaying virtio_net: needs root (a network namespace and a TAP) ***");
            continue;
        }
        for input in seeds.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(input).expect("read an input");
            run(&data);
        }
    }
}

/// The seeds reach past the first checks: a valid `Start` is accepted, a batch is applied.
#[test]
fn seeds_are_valid_inputs() {
    let start = std::fs::read(fuzz_dir().join("corpus/migration_start/seed-valid")).expect("seed");
    let start: StartPayload = protocol::parse_json("Start", &start).expect("a valid Start");
    vmm::migrate::receive::check_start_config(&start, &[], true).expect("the seed Start is accepted");
    let mem = vm_memory_1mib();
    let batch = std::fs::read(fuzz_dir().join("corpus/memory_batch/seed-pages")).expect("seed");
    let mut written = vmm::migrate::receive::Written::new(&mem);
    vmm::migrate::receive::apply_batch(&mem, &batch, &mut written).expect("the seed batch applies");
}

fn vm_memory_1mib() -> vmm::vstate::memory::GuestMemoryMmap {
    vmm::vstate::memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap()
}

fn start_payload() -> Vec<u8> {
    let config = vmm::VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0".into(),
        mem_mib: 64,
        vcpus: 1,
        cpu_template: Default::default(),
        nets: vec![],
        disks: vec![],
    };
    let start = StartPayload {
        state_version: migration::STATE_VERSION,
        config: serde_json::to_value(&config).unwrap(),
        memory: vec![RegionLayout { start: 0, size: 64 << 20 }],
        cpuid: vec![],
        tsc_khz: None,
        disks: vec![],
    };
    serde_json::to_vec(&start).unwrap()
}

fn memory_batch() -> Vec<u8> {
    let mut b = BatchWriter::with_capacity(4 * PAGE_SIZE);
    b.push_page(0x1000, &[0xa5; PAGE_SIZE]);
    b.push_zero(0x2000);
    b.push_zero(0x3000);
    b.push_page(0xf_f000, &[1; PAGE_SIZE]);
    b.as_bytes().to_vec()
}

fn disk_batch() -> Vec<u8> {
    let mut b = DiskBatchWriter::default();
    b.push_data(0, 0, &[7; 4096]);
    b.push_zero(0, 8192, 8192);
    b.push_data(0, (1 << 20) - 512, &[9; 512]);
    b.as_bytes().to_vec()
}

fn frame(command: Command, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_frame(&mut out, command, payload).unwrap();
    out
}

fn machine_state() -> Vec<u8> {
    let trigger = vmm::devices::EventFdTrigger::new().unwrap();
    let serial = vmm::devices::serial::SerialPort::new(trigger, Box::new(std::io::sink()));
    let state = serde_json::json!({
        "version": migration::STATE_VERSION,
        "serial": serial.save_state(),
        "nets": [],
        "disks": [],
    });
    serde_json::to_vec(&state).unwrap()
}

/// A hostile driver's input (see `vmm::fuzzing`): features, then per queue a 16-entry
/// descriptor table and an available ring, then the buffers from 0x10000 on.
/// A descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);
/// A queue: its descriptor table and the heads in its available ring.
type QueueLayout = (Vec<Desc>, Vec<u16>);

fn driver_input(features: u64, queues: &[QueueLayout], buffers: &[u8]) -> Vec<u8> {
    let mut out = features.to_le_bytes().to_vec();
    for (descs, avail) in queues {
        let mut table = vec![0u8; 16 * 16];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let d = &mut table[16 * i..16 * i + 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        out.extend_from_slice(&table);
        let mut ring = vec![0u8; 4 + 2 * 16];
        ring[2..4].copy_from_slice(&(avail.len() as u16).to_le_bytes());
        for (i, head) in avail.iter().enumerate() {
            ring[4 + 2 * i..6 + 2 * i].copy_from_slice(&head.to_le_bytes());
        }
        out.extend_from_slice(&ring);
    }
    out.extend_from_slice(buffers);
    out
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const BUF: u64 = 0x1_0000;
const VERSION_1: u64 = 1 << 32;

fn blk_read_write() -> Vec<u8> {
    // Request 0: read sector 2 into a page; request 3: write sector 0 from a page.
    let descs = vec![
        (BUF, 16, NEXT, 1),
        (BUF + 0x1000, 4096, WRITE | NEXT, 2),
        (BUF + 0x3000, 1, WRITE, 0),
        (BUF + 0x100, 16, NEXT, 4),
        (BUF + 0x2000, 512, NEXT, 5),
        (BUF + 0x3001, 1, WRITE, 0),
    ];
    let mut buffers = vec![0u8; 0x3002];
    buffers[0..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    buffers[8..16].copy_from_slice(&2u64.to_le_bytes());
    buffers[0x100..0x104].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    buffers[0x2000..0x2200].fill(0x5a);
    driver_input(VERSION_1, &[(descs, vec![0, 3])], &buffers)
}

fn net_tx_rx_ctrl() -> Vec<u8> {
    let mac = 1 << 5;
    let ctrl_vq = 1 << 17;
    // RX: two writable buffers. TX: a header and a broadcast frame. Control: MAC table set.
    let rx = (vec![(BUF, 1526, WRITE, 0), (BUF + 0x800, 1526, WRITE, 0)], vec![0, 1]);
    let tx = (vec![(BUF + 0x1000, 12, NEXT, 1), (BUF + 0x1010, 60, 0, 0)], vec![0]);
    let ctrl = (vec![(BUF + 0x2000, 2, NEXT, 1), (BUF + 0x2010, 1, NEXT, 2), (BUF + 0x2020, 1, WRITE, 0)], vec![0]);
    let mut buffers = vec![0u8; 0x2030];
    buffers[0x1010..0x1016].fill(0xff);
    buffers[0x1016..0x101c].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    buffers[0x101c..0x101e].copy_from_slice(&[0x88, 0xb5]);
    buffers[0x2000] = 0; // VIRTIO_NET_CTRL_RX
    buffers[0x2001] = 0; // promiscuous
    buffers[0x2010] = 1;
    driver_input(VERSION_1 | mac | ctrl_vq, &[rx, tx, ctrl], &buffers)
}

fn api_requests() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("get_vm", b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("pipelined", b"GET /vm/migration HTTP/1.1\r\n\r\nPUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /metrics HTTP/1.0\r\n\r\n".to_vec()),
        (
            "migrate",
            b"PUT /vm/migrate HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 45\r\nExpect: 100-continue\r\n\r\n{\"to\":\"10.0.0.1:7100\",\"downtime_ms\":50,\"x\":1}".to_vec(),
        ),
        (
            "chunked",
            b"PUT /vm/migrate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\n{\"to\"\r\n13\r\n:\"127.0.0.1:7100\"}\r\n0\r\nT: x\r\n\r\n".to_vec(),
        ),
        ("bad", b"DELETE /vm?x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc".to_vec()),
    ]
}

/// Writes the seed corpus of every target from the real encoders.
#[test]
#[ignore = "regenerates fuzz/corpus; run by hand after a format change"]
fn write_seeds() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let start = start_payload();
    let mut stream = frame(Command::Start, &start);
    stream.extend(frame(Command::Memory, &memory_batch()));
    stream.extend(frame(Command::Disk, &disk_batch()));
    stream.extend(frame(Command::Prepare, &[]));
    stream.extend(frame(Command::Paused, &[]));
    stream.extend(frame(Command::State, &machine_state()));
    stream.extend(frame(Command::Complete, &[]));
    write("migration_frames", "stream", &stream);
    write("migration_start", "valid", &start);
    write("machine_state", "no_devices", &machine_state());
    write("memory_batch", "pages", &memory_batch());
    write("disk_batch", "blocks", &disk_batch());
    for (name, req) in api_requests() {
        write("api_http", name, &req);
    }
    write("virtio_blk", "read_write", &blk_read_write());
    write("virtio_net", "tx_rx_ctrl", &net_tx_rx_ctrl());
    for (name, line) in [
        ("linux", "console=ttyS0 reboot=k panic=1 pci=off ip=10.0.0.2::10.0.0.1:255.255.255.0:guest:eth0:off"),
        ("ours", "console=ttyS0 vmm.workload=dirty vmm.dirty_mib=64 virtio_mmio.device=4K@0xd0000000:5 ip=10.1.0.2/24"),
        ("disk", "vmm.workload=disk vmm.disk_mib=32 vmm.disk_rate=16 virtio_mmio.device=4K@0xd0001000:6"),
    ] {
        write("guest_cmdline", name, line.as_bytes());
    }
}
