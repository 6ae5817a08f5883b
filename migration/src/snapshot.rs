// SPDX-License-Identifier: Apache-2.0
//! The snapshot format, without the VMM: the manifest, the checksummed state file's framing,
//! and the chunk tables that make a multi-GiB memory file (or a copied disk) checkable piece by
//! piece as it is loaded, instead of all at once before the guest runs.
//!
//! A snapshot is a directory:
//!
//! - `manifest.json`: what the snapshot is (format name and version, the files, their sizes and
//!   checksums). Written last, so a directory without it is an unfinished snapshot.
//! - `state`: [`MAGIC`], the format version, the payload's length, the payload (JSON: the VM's
//!   configuration, the machine's device and vCPU state, the memory layout and chunk table, the
//!   disks), and the CRC-64 of all that. A reader refuses a wrong magic, a version it cannot read,
//!   a length over [`MAX_STATE_BYTES`] (before allocating anything) and a bad CRC.
//! - `memory`: guest RAM, the regions one after the other, as a sparse file: pages that were never
//!   touched or are all zero are holes. Checked chunk by chunk against the [`ChunkTable`].
//! - `disk-N.raw`: a copy of disk N (`--with-disks`), sparse, with a chunk table of its own.
//!
//! Versioning follows the migration state's rule: a reader takes its own major version and any
//! minor version up to its own; fields added in a minor version have `#[serde(default)]`.

use serde::{Deserialize, Serialize};

/// The manifest's `format` field.
pub const FORMAT: &str = "vmm-snapshot";
/// First bytes of the state file: "VMMSNAP" and a NUL.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// The format version this build writes.
pub const SNAPSHOT_VERSION: SnapshotVersion = SnapshotVersion { major: 1, minor: 0 };
/// Largest state payload read (the chunk table of a 1 TiB guest is 32 MiB of JSON-embedded
/// base64; the rest is a few hundred KiB).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Memory is loaded and checked in chunks of this size: small enough that loading one on a
/// guest's first touch costs about as much as the fault itself (64 pages), large enough that the
/// table stays small (8 bytes per 256 KiB: 128 KiB for 4 GiB).
pub const MEMORY_CHUNK: u64 = 256 << 10;
/// Copied disks are checked in chunks of this size.
pub const DISK_CHUNK: u64 = 1 << 20;

/// Header of the state file: magic, major, minor, reserved, payload length.
pub const STATE_HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8;

/// Errors reading a snapshot's own structures.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFormatError {
    #[error("not a vmm snapshot state file (bad magic)")]
    BadMagic,
    #[error("snapshot format {major}.{minor} cannot be read by this VMM (it reads {}.0 to {}.{})", SNAPSHOT_VERSION.major, SNAPSHOT_VERSION.major, SNAPSHOT_VERSION.minor)]
    Version { major: u16, minor: u16 },
    #[error("the state file is cut short ({got} bytes, {want} expected)")]
    Truncated { got: u64, want: u64 },
    #[error("the state file's payload of {0} bytes is over the {MAX_STATE_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("the state file is damaged: its CRC-64 is {got:#018x}, {want:#018x} was written")]
    Checksum { got: u64, want: u64 },
    #[error("the state file has {0} bytes after its checksum")]
    Trailing(u64),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// Version of the snapshot format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotVersion {
    pub major: u16,
    pub minor: u16,
}

impl SnapshotVersion {
    /// Whether a snapshot written as `self` can be read by this build.
    pub fn readable(self) -> bool {
        // Through a function: with the minor version at 0, clippy calls `<=` a constant.
        self.major == SNAPSHOT_VERSION.major && !newer_minor(self.minor, SNAPSHOT_VERSION.minor)
    }
}

fn newer_minor(theirs: u16, ours: u16) -> bool {
    theirs > ours
}

/// CRC-64 (ECMA-182, as XZ uses it) of `bytes`.
pub fn crc64(bytes: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(bytes);
    d.sum64()
}

/// A file of the snapshot as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the snapshot directory.
    pub file: String,
    /// Size in bytes (the apparent size of a sparse file).
    pub size: u64,
    /// CRC-64 of the whole file, for the state file; sparse files are checked by chunk instead.
    #[serde(default)]
    pub crc64: Option<u64>,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    pub version: SnapshotVersion,
    /// The VMM that wrote it (`CARGO_PKG_VERSION`), for people.
    pub vmm_version: String,
    /// When it was taken, µs since the Unix epoch.
    pub created_at_us: u64,
    pub state: FileEntry,
    pub memory: FileEntry,
    /// Guest memory in MiB, for people (the state file has the layout).
    pub mem_mib: u64,
    /// Bytes of memory the file holds as data (the rest are holes).
    pub memory_data_bytes: u64,
    /// Copied disks' files, in the guest's disk order (`None` for a disk kept by reference).
    #[serde(default)]
    pub disk_files: Vec<Option<FileEntry>>,
}

impl Manifest {
    /// Checks the format name and version.
    pub fn check(&self) -> Result<(), SnapshotFormatError> {
        if self.format != FORMAT {
            return Err(SnapshotFormatError::Invalid {
                what: "manifest",
                why: format!("format is {:?}, not {FORMAT:?}", self.format),
            });
        }
        if !self.version.readable() {
            return Err(SnapshotFormatError::Version { major: self.version.major, minor: self.version.minor });
        }
        Ok(())
    }
}

/// The state file's bytes: header, `payload`, CRC-64 of both.
pub fn encode_state(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_HEADER_LEN + payload.len() + 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.major.to_le_bytes());
    out.extend_from_slice(&SNAPSHOT_VERSION.minor.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a state file from `r`, whose length is `file_len`: checks magic, version, length limit
/// (before allocating) and CRC, and returns the payload.
pub fn decode_state(r: &mut impl std::io::Read, file_len: u64) -> Result<Vec<u8>, SnapshotFormatError> {
    let io = |e: std::io::Error| SnapshotFormatError::Invalid { what: "state file", why: e.to_string() };
    let mut h = [0u8; STATE_HEADER_LEN];
    if file_len < STATE_HEADER_LEN as u64 {
        return Err(SnapshotFormatError::Truncated { got: file_len, want: STATE_HEADER_LEN as u64 + 8 });
    }
    r.read_exact(&mut h).map_err(io)?;
    if h[0..8] != MAGIC {
        return Err(SnapshotFormatError::BadMagic);
    }
    let major = u16::from_le_bytes([h[8], h[9]]);
    let minor = u16::from_le_bytes([h[10], h[11]]);
    if !(SnapshotVersion { major, minor }).readable() {
        return Err(SnapshotFormatError::Version { major, minor });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&h[16..24]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_STATE_BYTES {
        return Err(SnapshotFormatError::TooLarge(len));
    }
    let want = STATE_HEADER_LEN as u64 + len + 8;
    if file_len < want {
        return Err(SnapshotFormatError::Truncated { got: file_len, want });
    }
    if file_len > want {
        return Err(SnapshotFormatError::Trailing(file_len - want));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(io)?;
    let mut crc8 = [0u8; 8];
    r.read_exact(&mut crc8).map_err(io)?;
    let mut d = crc64fast::Digest::new();
    d.write(&h);
    d.write(&payload);
    let (got, want) = (d.sum64(), u64::from_le_bytes(crc8));
    if got != want {
        return Err(SnapshotFormatError::Checksum { got, want });
    }
    Ok(payload)
}

/// Which chunks of a sparse file hold data, and the CRC-64 of each such chunk's full content
/// (holes read as zeros). A chunk without data reads as zero and is never read at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTable {
    pub chunk_size: u64,
    /// Bytes covered (the file's apparent size); the last chunk may be short.
    pub len: u64,
    /// One bit per chunk: it holds data.
    #[serde(with = "crate::state::compact")]
    pub data: Vec<u64>,
    /// CRC-64 of each data chunk, in chunk order (chunks without data have no entry).
    #[serde(with = "crate::state::compact")]
    pub crcs: Vec<u64>,
}

impl ChunkTable {
    /// An empty table (every chunk without data) for `len` bytes.
    pub fn new(chunk_size: u64, len: u64) -> Self {
        let chunks = len.div_ceil(chunk_size);
        ChunkTable { chunk_size, len, data: vec![0; chunks.div_ceil(64) as usize], crcs: Vec::new() }
    }

    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk_size)
    }

    /// Bytes of chunk `i` (the last may be short).
    pub fn chunk_len(&self, i: u64) -> u64 {
        self.chunk_size.min(self.len.saturating_sub(i * self.chunk_size))
    }

    /// Records chunk `i` (chunks must be pushed in order) as data with `crc`.
    pub fn push_data(&mut self, i: u64, crc: u64) {
        if let Some(w) = self.data.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
            self.crcs.push(crc);
        }
    }

    pub fn has_data(&self, i: u64) -> bool {
        self.data.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Chunks with data.
    pub fn data_chunks(&self) -> u64 {
        self.data.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Checks that the table is consistent with itself and describes `len` bytes in chunks of
    /// `chunk_size` (what the reader expects), so that no later lookup can go out of bounds.
    pub fn validate(&self, chunk_size: u64, len: u64) -> Result<(), SnapshotFormatError> {
        let bad = |why: String| Err(SnapshotFormatError::Invalid { what: "chunk table", why });
        if self.chunk_size != chunk_size || chunk_size == 0 {
            return bad(format!("chunks of {} bytes, {chunk_size} expected", self.chunk_size));
        }
        if self.len != len {
            return bad(format!("covers {} bytes, the file has {len}", self.len));
        }
        if self.data.len() as u64 != self.chunks().div_ceil(64) {
            return bad(format!("{} bitmap words for {} chunks", self.data.len(), self.chunks()));
        }
        let extra = self.chunks() % 64;
        if extra != 0 && self.data.last().is_some_and(|w| w >> extra != 0) {
            return bad("data bits beyond the last chunk".into());
        }
        if self.crcs.len() as u64 != self.data_chunks() {
            return bad(format!("{} checksums for {} data chunks", self.crcs.len(), self.data_chunks()));
        }
        Ok(())
    }

    /// The CRC of data chunk `i`: its rank among the data chunks indexes `crcs`. `O(i / 64)`;
    /// use [`ChunkTable::crc_index`] to look many up.
    pub fn crc(&self, i: u64) -> Option<u64> {
        if !self.has_data(i) {
            return None;
        }
        let word = (i / 64) as usize;
        let before: u64 = self.data[..word].iter().map(|w| u64::from(w.count_ones())).sum();
        let mask = (1u64 << (i % 64)) - 1;
        let rank = before + u64::from((self.data[word] & mask).count_ones());
        self.crcs.get(rank as usize).copied()
    }

    /// For every chunk, the index of its CRC in `crcs` (`u32::MAX` for chunks without data).
    pub fn crc_index(&self) -> Vec<u32> {
        let mut next = 0u32;
        (0..self.chunks())
            .map(|i| {
                if self.has_data(i) {
                    next += 1;
                    next - 1
                } else {
                    u32::MAX
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn state_round_trips_and_damage_is_refused() {
        let bytes = encode_state(b"{\"hello\":1}");
        let back = decode_state(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(back, b"{\"hello\":1}");

        // Every single flipped bit is caught, whatever its place.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_state(&mut Cursor::new(&bad), bad.len() as u64).is_err(), "byte {i}");
        }
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_state(&mut Cursor::new(&magic), magic.len() as u64),
            Err(SnapshotFormatError::BadMagic)
        ));
        let mut newer = bytes.clone();
        newer[8..10].copy_from_slice(&(SNAPSHOT_VERSION.major + 1).to_le_bytes());
        assert!(matches!(
            decode_state(&mut Cursor::new(&newer), newer.len() as u64),
            Err(SnapshotFormatError::Version { .. })
        ));
        let short = &bytes[..bytes.len() - 3];
        assert!(matches!(
            decode_state(&mut Cursor::new(short), short.len() as u64),
            Err(SnapshotFormatError::Truncated { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_state(&mut Cursor::new(&longer), longer.len() as u64),
            Err(SnapshotFormatError::Trailing(1))
        ));
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut bytes = encode_state(b"x");
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_state(&mut Cursor::new(&bytes), u64::MAX),
            Err(SnapshotFormatError::TooLarge(u64::MAX))
        ));
    }

    #[test]
    fn random_state_files_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..600usize {
            let mut bytes: Vec<u8> = crate::random_bytes(&mut x, len);
            if len >= STATE_HEADER_LEN && x % 2 == 0 {
                bytes[..8].copy_from_slice(&MAGIC);
                bytes[8..12].copy_from_slice(&[1, 0, 0, 0]);
            }
            let _ = decode_state(&mut Cursor::new(&bytes), len as u64);
        }
    }

    #[test]
    fn chunk_table_ranks_and_validates() {
        let mut t = ChunkTable::new(4096, 200 * 4096 + 100);
        assert_eq!(t.chunks(), 201);
        assert_eq!(t.chunk_len(200), 100);
        for (i, crc) in [(3u64, 33u64), (64, 640), (65, 650), (200, 2000)] {
            t.push_data(i, crc);
        }
        t.validate(4096, 200 * 4096 + 100).unwrap();
        assert_eq!(t.data_chunks(), 4);
        assert_eq!((t.crc(3), t.crc(4), t.crc(65), t.crc(200)), (Some(33), None, Some(650), Some(2000)));
        let idx = t.crc_index();
        assert_eq!((idx[3], idx[64], idx[65], idx[200], idx[0]), (0, 1, 2, 3, u32::MAX));
        let json = serde_json::to_string(&t).unwrap();
        let back: ChunkTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);

        assert!(t.validate(8192, 200 * 4096 + 100).is_err(), "other chunk size");
        assert!(t.validate(4096, 1 << 30).is_err(), "other length");
        let mut missing = t.clone();
        missing.crcs.pop();
        assert!(missing.validate(4096, 200 * 4096 + 100).is_err(), "a checksum short");
        let mut beyond = t.clone();
        *beyond.data.last_mut().unwrap() |= 1 << 63;
        assert!(beyond.validate(4096, 200 * 4096 + 100).is_err(), "a bit past the end");
        let mut words = t.clone();
        words.data.push(0);
        assert!(words.validate(4096, 200 * 4096 + 100).is_err(), "a bitmap too long");
    }

    #[test]
    fn manifest_versions() {
        let m = Manifest {
            format: FORMAT.into(),
            version: SNAPSHOT_VERSION,
            vmm_version: "0".into(),
            created_at_us: 1,
            state: FileEntry { file: "state".into(), size: 1, crc64: Some(2) },
            memory: FileEntry { file: "memory".into(), size: 1 << 20, crc64: None },
            mem_mib: 1,
            memory_data_bytes: 0,
            disk_files: vec![],
        };
        m.check().unwrap();
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        let mut newer = m.clone();
        newer.version.minor += 1;
        assert!(newer.check().is_err());
        let mut other = m.clone();
        other.format = "firecracker".into();
        assert!(other.check().is_err());
        assert_ne!(crc64(b"a"), crc64(b"b"));
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa, "CRC-64/XZ check value");
    }
}
