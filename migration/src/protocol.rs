// SPDX-License-Identifier: Apache-2.0
//! The wire protocol between a migration source and destination (see `docs/migration-protocol.md`).
//!
//! Everything travels in frames: a fixed 24-byte header (magic, protocol version, command,
//! payload length, CRC32 of the payload, flags) and the payload. The CRC catches a corrupted or
//! spliced stream, which TCP's own 16-bit checksum does not reliably do; the length is bounded,
//! so random bytes can never make the destination allocate or wait for gigabytes. Over a
//! transport that authenticates every byte (mutual TLS: an AEAD tag on every record), the bulk
//! frames carry no CRC ([`Integrity::Transport`], flag [`FLAG_NO_CHECKSUM`]): it would only
//! repeat, at a cost, what the transport already guarantees.
//!
//! Conversation (source → destination unless marked ←):
//! 1. `Start` (JSON [`StartPayload`]: versions, VM config, memory layout, CPUID) ← `Response`.
//!    The destination checks it can host this VM before anything on the source is paused.
//! 2. `Memory` × N (binary [`crate::memory`] batches) and `Disk` × N (binary [`crate::disk`]
//!    batches: a copied disk's allocated extents, then the blocks written meanwhile), no
//!    answers, while the guest runs.
//! 3. `Prepare` ← `Response`: the source is about to pause the guest; the destination answers
//!    once it could run it (its KVM memory slots are registered), so that nothing the
//!    destination still sets up counts as downtime.
//! 4. `Paused`: the guest stopped on the source (starts the destination's downtime clock).
//! 5. `Memory` × N and `Disk` × N: the last dirty pages and blocks.
//! 6. `State` (JSON, the machine's device and vCPU state).
//! 7. `Complete` ← `Response`: the commit point. The destination restores, resumes the guest
//!    and answers with its measured downtime; from then on it owns the guest.
//!
//! `Abandon` may replace any step before `Complete`: the destination discards everything.
//!
//! A source that migrates through a host agent's shared migration port first sends one `Route`
//! frame naming the move, so the agent can hand the connection to the right destination VMM;
//! the agent consumes it, and the destination VMM sees the conversation from `Start` on. When
//! the destination commits the migration with its cluster at `Prepare` (answering with
//! `committed: true`), the commit point moves from `Complete` to that answer.
//! Post-copy (protocol 5) replaces the last `Memory` frames of step 5 with `PostcopyDirty` (the
//! pages still to come; since protocol 7 most of them announced by `PostcopyDrop` before
//! `Prepare`) and a second connection; after `Complete` the pages follow while the
//! guest runs on the destination (see [`crate::postcopy`]).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// "VMMG".
pub const MAGIC: u32 = 0x474d_4d56;
/// Protocol version this build speaks. Bump it on any change to framing or commands.
pub const PROTOCOL_VERSION: u16 = 7;
/// Header bytes before every payload.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted: a memory batch is sent once it reaches 1 MiB, a disk batch once it
/// reaches 8 MiB, so either is at most 8 MiB plus a page or block and a record.
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Longest route a `Route` frame carries, in bytes.
pub const MAX_ROUTE: usize = 256;
/// Header flag: the checksum field is zero and not checked, because the transport
/// authenticates the frame ([`Integrity::Transport`]). Refused on any other transport.
pub const FLAG_NO_CHECKSUM: u32 = 1;

/// What protects frames against corruption on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    /// Each frame's CRC-32 (plain TCP). A frame flagged [`FLAG_NO_CHECKSUM`] is refused, so
    /// that a flipped flag bit cannot turn the check off.
    Checksum,
    /// The transport authenticates every byte (mutual TLS): frames may go without a CRC, and
    /// those with one are still checked.
    Transport,
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Start = 1,
    Memory = 2,
    Paused = 3,
    State = 4,
    Complete = 5,
    Abandon = 6,
    Response = 7,
    Prepare = 8,
    Disk = 9,
    /// Sent first, only to a host agent's shared port: which move this connection carries.
    Route = 10,
    /// The pages the destination must still get (post-copy; see [`crate::postcopy`]).
    PostcopyDirty = 11,
    /// First frame of the fault connection.
    PostcopyChannel = 12,
    /// A page the destination faulted on.
    PageRequest = 13,
    /// Every page was pushed.
    PostcopyEnd = 14,
    /// The destination has every page.
    PostcopyDone = 15,
    /// First frame of a new main connection after the link broke.
    PostcopyResume = 16,
    /// Before the switch's `Prepare`: pages the destination will lack, to drop now (post-copy).
    PostcopyDrop = 17,
}

impl Command {
    fn from_u16(v: u16) -> Option<Command> {
        Some(match v {
            1 => Command::Start,
            2 => Command::Memory,
            3 => Command::Paused,
            4 => Command::State,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::Response,
            8 => Command::Prepare,
            9 => Command::Disk,
            10 => Command::Route,
            11 => Command::PostcopyDirty,
            12 => Command::PostcopyChannel,
            13 => Command::PageRequest,
            14 => Command::PostcopyEnd,
            15 => Command::PostcopyDone,
            16 => Command::PostcopyResume,
            17 => Command::PostcopyDrop,
            _ => return None,
        })
    }
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    #[error("not a migration stream (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("peer speaks migration protocol version {peer}, this VMM speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("frame checksum mismatch: the stream is corrupted")]
    Checksum,
    #[error("frame without a checksum on a connection that does not authenticate its bytes")]
    NoChecksum,
    #[error("unknown frame flags {0:#x}")]
    Flags(u32),
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected { expected: &'static str, got: Command },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// A received frame.
#[derive(Debug)]
pub struct Frame {
    pub command: Command,
    pub payload: Vec<u8>,
}

fn header(command: Command, payload: &[u8], integrity: Integrity) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&(command as u16).to_le_bytes());
    h[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    match integrity {
        Integrity::Checksum => h[16..20].copy_from_slice(&crc32fast::hash(payload).to_le_bytes()),
        Integrity::Transport => h[20..24].copy_from_slice(&FLAG_NO_CHECKSUM.to_le_bytes()),
    }
    h
}

/// Writes one frame, with its CRC.
pub fn write_frame(w: &mut impl Write, command: Command, payload: &[u8]) -> Result<(), ProtocolError> {
    write_frame_with(w, Integrity::Checksum, command, payload)
}

/// Writes one frame, with its CRC only if `integrity` says the transport needs it.
pub fn write_frame_with(
    w: &mut impl Write,
    integrity: Integrity,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(payload.len() as u64));
    }
    w.write_all(&header(command, payload, integrity))?;
    w.write_all(payload)?;
    Ok(())
}

/// Writes a frame whose payload is JSON.
pub fn write_json<T: Serialize>(w: &mut impl Write, command: Command, value: &T) -> Result<(), ProtocolError> {
    let payload =
        serde_json::to_vec(value).map_err(|e| ProtocolError::Invalid { what: "payload", why: e.to_string() })?;
    write_frame(w, command, &payload)
}

fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })
}

/// Reads one frame, into `buf` (reused between calls to avoid allocating per frame); its CRC
/// must be there and match.
pub fn read_frame_into(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Command, ProtocolError> {
    read_frame_limited(r, Integrity::Checksum, buf, MAX_PAYLOAD)
}

/// Reads one frame, into `buf` (reused between calls), on a connection protected as
/// `integrity` says.
pub fn read_frame_into_with(
    r: &mut impl Read,
    integrity: Integrity,
    buf: &mut Vec<u8>,
) -> Result<Command, ProtocolError> {
    read_frame_limited(r, integrity, buf, MAX_PAYLOAD)
}

/// [`read_frame_into_with`] refusing payloads over `limit` bytes before reading them.
fn read_frame_limited(
    r: &mut impl Read,
    integrity: Integrity,
    buf: &mut Vec<u8>,
    limit: u64,
) -> Result<Command, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact_or_truncated(r, &mut h)?;
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { peer: version, ours: PROTOCOL_VERSION });
    }
    let raw_command = u16::from_le_bytes([h[6], h[7]]);
    let command = Command::from_u16(raw_command).ok_or(ProtocolError::UnknownCommand(raw_command))?;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&h[8..16]);
    let len = u64::from_le_bytes(len8);
    if len > limit {
        return Err(ProtocolError::TooLarge(len));
    }
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    let flags = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    if flags & !FLAG_NO_CHECKSUM != 0 {
        return Err(ProtocolError::Flags(flags));
    }
    let checked = flags & FLAG_NO_CHECKSUM == 0;
    if !checked && integrity == Integrity::Checksum {
        return Err(ProtocolError::NoChecksum);
    }
    // One read of the whole payload into the buffer (so that a TLS stream can decrypt it in
    // place there). The buffer is reused: only bytes it never held are zeroed first.
    let len = len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    } else {
        buf.truncate(len);
    }
    read_exact_or_truncated(r, buf)?;
    if checked && crc32fast::hash(buf) != crc {
        return Err(ProtocolError::Checksum);
    }
    Ok(command)
}

/// Reads one frame into a new buffer.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    read_frame_with(r, Integrity::Checksum)
}

/// Reads one frame on a connection protected as `integrity` says.
pub fn read_frame_with(r: &mut impl Read, integrity: Integrity) -> Result<Frame, ProtocolError> {
    let mut payload = Vec::new();
    let command = read_frame_into_with(r, integrity, &mut payload)?;
    Ok(Frame { command, payload })
}

/// Parses a JSON payload.
pub fn parse_json<T: for<'de> Deserialize<'de>>(what: &'static str, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Invalid { what, why: e.to_string() })
}

/// The destination's answer to `Start`, `Prepare` and `Complete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// Only in the answer to `Prepare`: the destination's cluster has recorded the destination
    /// as the guest's owner. From this answer on the source must never resume the guest on its
    /// own: only the cluster can hand it back (see `docs/migration-protocol.md`).
    #[serde(default)]
    pub committed: bool,
    /// Guest pause as the destination measured it (`Paused` received → guest resumed), in µs.
    #[serde(default)]
    pub downtime_us: Option<u64>,
    /// When the guest's vCPUs started on the destination: µs since the Unix epoch on the
    /// destination's clock (to line up with the source's pause on hosts whose clocks agree).
    #[serde(default)]
    pub resumed_at_us: Option<u64>,
}

impl Response {
    pub fn ok() -> Self {
        Response { ok: true, error: None, committed: false, downtime_us: None, resumed_at_us: None }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Response { ok: false, error: Some(msg.into()), committed: false, downtime_us: None, resumed_at_us: None }
    }
}

/// Now, in µs since the Unix epoch (0 if the clock is before it).
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Waits for a `Response` frame; a refusal becomes an error carrying the peer's reason.
pub fn read_response(r: &mut impl Read) -> Result<Response, ProtocolError> {
    let frame = read_frame(r)?;
    if frame.command != Command::Response {
        return Err(ProtocolError::Unexpected { expected: "Response", got: frame.command });
    }
    parse_json("response", &frame.payload)
}

/// Writes the `Route` frame that opens a connection to a host agent's shared migration port.
pub fn write_route(w: &mut impl Write, route: &str) -> Result<(), ProtocolError> {
    check_route(route)?;
    write_frame(w, Command::Route, route.as_bytes())
}

/// Reads the `Route` frame a connection to a shared migration port must start with.
/// Anything longer than a route is refused before it is read.
pub fn read_route(r: &mut impl Read) -> Result<String, ProtocolError> {
    let mut payload = Vec::new();
    let command = read_frame_limited(r, Integrity::Checksum, &mut payload, MAX_ROUTE as u64).map_err(|e| match e {
        ProtocolError::TooLarge(n) => {
            ProtocolError::Invalid { what: "route", why: format!("{n} bytes, more than {MAX_ROUTE}") }
        }
        e => e,
    })?;
    if command != Command::Route {
        return Err(ProtocolError::Unexpected { expected: "Route", got: command });
    }
    let route =
        String::from_utf8(payload).map_err(|_| ProtocolError::Invalid { what: "route", why: "not UTF-8".into() })?;
    check_route(&route)?;
    Ok(route)
}

/// A route is 1 to [`MAX_ROUTE`] printable ASCII characters.
pub fn check_route(route: &str) -> Result<(), ProtocolError> {
    if route.is_empty() || route.len() > MAX_ROUTE || !route.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ProtocolError::Invalid {
            what: "route",
            why: format!("must be 1 to {MAX_ROUTE} printable ASCII characters without spaces"),
        });
    }
    Ok(())
}

/// A guest memory region as the source lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub start: u64,
    pub size: u64,
}

/// A disk of the guest, as the source has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// Size in bytes.
    pub size: u64,
    /// On storage both ends reach: handed over, not copied.
    pub shared: bool,
    pub read_only: bool,
}

/// `Start`: everything the destination needs to decide whether it can take this VM, and to
/// build an empty one for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartPayload {
    /// Version of the state types (`crate::state::STATE_VERSION`).
    pub state_version: crate::state::StateVersion,
    /// The VM's configuration as the source's VMM serialises it.
    pub config: serde_json::Value,
    pub memory: Vec<RegionLayout>,
    /// CPUID entries the guest runs with (vCPU 0's); the destination must support them.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Reserved for the source's TSC frequency; not sent yet (always `null`).
    pub tsc_khz: Option<u32>,
    /// The guest's disks, in its order (default: none).
    #[serde(default)]
    pub disks: Vec<DiskLayout>,
    /// This migration may switch to post-copy: its id, which the source's later connections
    /// (the fault connection, reconnections) present. The destination then keeps listening.
    #[serde(default)]
    pub postcopy_id: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Command::Memory, b"pages").unwrap();
        write_json(&mut buf, Command::Response, &Response::error("no")).unwrap();
        let mut r = Cursor::new(buf);
        let f = read_frame(&mut r).unwrap();
        assert_eq!((f.command, f.payload.as_slice()), (Command::Memory, b"pages".as_slice()));
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.error.as_deref(), Some("no"));
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Truncated)));
    }

    #[test]
    fn routes_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_route(&mut buf, "move/vm-1/42").unwrap();
        assert_eq!(read_route(&mut Cursor::new(&buf)).unwrap(), "move/vm-1/42");
        for bad in ["", "has space", &"x".repeat(MAX_ROUTE + 1), "tab\there"] {
            assert!(write_route(&mut Vec::new(), bad).is_err(), "{bad:?}");
            let mut raw = Vec::new();
            write_frame(&mut raw, Command::Route, bad.as_bytes()).unwrap();
            assert!(read_route(&mut Cursor::new(&raw)).is_err(), "{bad:?}");
        }
        let mut other = Vec::new();
        write_frame(&mut other, Command::Start, b"{}").unwrap();
        assert!(matches!(read_route(&mut Cursor::new(&other)), Err(ProtocolError::Unexpected { .. })));
        let mut long = Vec::new();
        write_frame(&mut long, Command::Route, &[b'x'; MAX_ROUTE + 1]).unwrap();
        assert!(matches!(read_route(&mut Cursor::new(&long)), Err(ProtocolError::Invalid { what: "route", .. })));
        let mut not_utf8 = Vec::new();
        write_frame(&mut not_utf8, Command::Route, &[0xff, 0xfe]).unwrap();
        assert!(read_route(&mut Cursor::new(&not_utf8)).is_err());
    }

    #[test]
    fn an_old_response_without_committed_reads_as_not_committed() {
        let r: Response = parse_json("response", br#"{"ok": true}"#).unwrap();
        assert!(r.ok && !r.committed);
    }

    #[test]
    fn corruption_is_detected() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Command::State, b"{\"a\":1}").unwrap();
        let n = buf.len();
        buf[n - 2] ^= 0x40;
        assert!(matches!(read_frame(&mut Cursor::new(&buf)), Err(ProtocolError::Checksum)));
        let mut bad = buf.clone();
        bad[0] = 0;
        assert!(matches!(read_frame(&mut Cursor::new(&bad)), Err(ProtocolError::BadMagic(_))));
        let mut other = buf.clone();
        let peer = PROTOCOL_VERSION + 1;
        other[4..6].copy_from_slice(&peer.to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(&other)),
            Err(ProtocolError::Version { peer: p, ours: PROTOCOL_VERSION }) if p == peer
        ));
        let mut cmd = buf.clone();
        cmd[6] = 99;
        assert!(matches!(read_frame(&mut Cursor::new(&cmd)), Err(ProtocolError::UnknownCommand(99))));
        let mut huge = buf.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_frame(&mut Cursor::new(&huge)), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(read_frame(&mut Cursor::new(&buf[..n - 1])), Err(ProtocolError::Truncated)));
    }

    #[test]
    fn frames_go_without_checksum_only_where_the_transport_authenticates() {
        let mut buf = Vec::new();
        write_frame_with(&mut buf, Integrity::Transport, Command::Memory, b"pages").unwrap();
        // No CRC, the flag set.
        assert_eq!(&buf[16..20], &[0, 0, 0, 0]);
        assert_eq!(&buf[20..24], &FLAG_NO_CHECKSUM.to_le_bytes());
        let mut payload = Vec::new();
        assert_eq!(
            read_frame_into_with(&mut Cursor::new(&buf), Integrity::Transport, &mut payload).unwrap(),
            Command::Memory
        );
        assert_eq!(payload, b"pages");
        // A plaintext reader refuses it: a flipped flag bit must not turn its check off.
        assert!(matches!(read_frame(&mut Cursor::new(&buf)), Err(ProtocolError::NoChecksum)));
        // A frame with its CRC is still checked on an authenticating transport.
        let mut crc = Vec::new();
        write_frame(&mut crc, Command::Memory, b"pages").unwrap();
        crc[HEADER_LEN] ^= 1;
        let r = read_frame_into_with(&mut Cursor::new(&crc), Integrity::Transport, &mut payload);
        assert!(matches!(r, Err(ProtocolError::Checksum)));
        // Unknown flags are refused either way.
        let mut flags = buf.clone();
        flags[20] = 3;
        let r = read_frame_into_with(&mut Cursor::new(&flags), Integrity::Transport, &mut payload);
        assert!(matches!(r, Err(ProtocolError::Flags(3))));
    }

    #[test]
    fn a_reused_buffer_holds_exactly_each_payload() {
        let mut wire = Vec::new();
        for p in [&b"a longer payload"[..], b"", b"short", b"a longer payload again"] {
            write_frame(&mut wire, Command::Memory, p).unwrap();
        }
        let mut r = Cursor::new(wire);
        let mut buf = Vec::new();
        for p in [&b"a longer payload"[..], b"", b"short", b"a longer payload again"] {
            read_frame_into(&mut r, &mut buf).unwrap();
            assert_eq!(buf, p);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // A tiny deterministic PRNG: the test must not depend on a random crate.
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        for len in 0..2000usize {
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            // Sometimes give it a valid magic and version so that later checks run too.
            if len >= HEADER_LEN && x % 2 == 0 {
                bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            }
            let _ = read_frame(&mut Cursor::new(&bytes));
            let _ = parse_json::<StartPayload>("start", &bytes);
        }
    }
}
