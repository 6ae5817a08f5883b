// SPDX-License-Identifier: Apache-2.0
//! `--disk path=FILE[,ro][,shared]`: one virtio-blk device on a raw image file.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A disk as the user described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest may read but not write it.
    #[serde(default)]
    pub read_only: bool,
    /// The image is on storage a migration's destination reaches at the same path: a migration
    /// flushes it and hands it over instead of copying it.
    #[serde(default)]
    pub shared: bool,
}

impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut read_only = false;
        let mut shared = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                None if part == "ro" => read_only = true,
                None if part == "shared" => shared = true,
                _ => return Err(format!("invalid --disk '{s}': expected path=FILE[,ro][,shared], got '{part}'")),
            }
        }
        let path = path.ok_or_else(|| format!("invalid --disk '{s}': path=FILE is required"))?;
        Ok(DiskConfig { path, read_only, shared })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_flags() {
        let d: DiskConfig = "path=/var/disk.img".parse().unwrap();
        assert_eq!(d, DiskConfig { path: "/var/disk.img".into(), read_only: false, shared: false });
        let d: DiskConfig = "path=a.img,ro,shared".parse().unwrap();
        assert!(d.read_only && d.shared);
        for bad in ["", "path=", "ro", "path=a,rw", "path=a,size=1G", "file=a"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn old_configs_without_disk_flags_still_parse() {
        let d: DiskConfig = serde_json::from_str(r#"{"path": "x.img"}"#).unwrap();
        assert!(!d.read_only && !d.shared);
    }
}
