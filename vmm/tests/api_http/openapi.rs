// SPDX-License-Identifier: Apache-2.0
//! `vmm/api/openapi.yaml` describes what the server serves.

use super::*;

const OPENAPI: &str = include_str!("../../api/openapi.yaml");

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines of the block under `key` (a line `key:` at `level` spaces), up to the next line at
/// that indentation or less.
fn block<'a>(lines: &[&'a str], key: &str, level: usize) -> Vec<&'a str> {
    let start = lines
        .iter()
        .position(|l| indent(l) == level && l.trim_end() == format!("{}{key}:", " ".repeat(level)))
        .unwrap_or_else(|| panic!("no `{key}:` at indentation {level}"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > level)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .copied()
        .collect()
}

/// Keys of the entries directly under a block (at `level` spaces).
fn keys(lines: &[&str], level: usize) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|l| indent(l) == level)
        .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k.trim_matches('"').to_string()))
        .collect()
}

/// The `(method, path, success status)` triples in `paths:`.
fn openapi_operations() -> BTreeSet<(String, String, u16)> {
    let lines: Vec<&str> = OPENAPI.lines().collect();
    let paths = block(&lines, "paths", 0);
    let mut ops = BTreeSet::new();
    for path in keys(&paths, 2) {
        let path_block = block(&paths, &path, 2);
        for method in keys(&path_block, 4) {
            let responses = block(&block(&path_block, &method, 4), "responses", 6);
            let success: Vec<u16> =
                keys(&responses, 8).iter().filter_map(|c| c.parse().ok()).filter(|c| (200..300).contains(c)).collect();
            assert_eq!(success.len(), 1, "{method} {path} documents {success:?}");
            ops.insert((method.to_uppercase(), path.clone(), success[0]));
        }
    }
    ops
}

fn schema(name: &str) -> Vec<&'static str> {
    let lines: Vec<&str> = OPENAPI.lines().collect();
    block(&block(&block(&lines, "components", 0), "schemas", 2), name, 4)
}

fn schema_properties(name: &str) -> BTreeSet<String> {
    keys(&block(&schema(name), "properties", 6), 8)
}

fn schema_enum(name: &str) -> BTreeSet<String> {
    let lines = schema(name);
    let line = lines.iter().find(|l| l.trim_start().starts_with("enum:")).unwrap();
    let list = line.trim().trim_start_matches("enum:").trim().trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(|v| v.trim().to_string()).collect()
}

fn json_keys(value: impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

fn json_strings<T: serde::Serialize>(values: &[T]) -> BTreeSet<String> {
    values.iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().to_string()).collect()
}

#[test]
fn openapi_routes_match_the_server() {
    let served: BTreeSet<(String, String, u16)> = ROUTES
        .iter()
        .map(|&(method, path)| {
            let status = routes::route(method, path).unwrap().success_status();
            (method.to_string(), path.to_string(), status)
        })
        .collect();
    assert_eq!(openapi_operations(), served);
}

#[test]
fn openapi_schemas_match_serde() {
    let vm = VmInfo { state: VmState::Running, config: sample_config(), uptime_ms: 1, disks: vec![sample_disk()] };
    assert_eq!(schema_properties("VmInfo"), json_keys(&vm));
    assert_eq!(schema_properties("DiskInfo"), json_keys(&vm.disks[0]));
    assert_eq!(schema_properties("DiskCounters"), json_keys(&vm.disks[0].io));
    assert_eq!(schema_properties("VmConfig"), json_keys(&vm.config));
    assert_eq!(schema_properties("NetConfig"), json_keys(&vm.config.nets[0]));
    let migrate = MigrateRequest { to: "h:1".into(), ..migrate_defaults() };
    assert_eq!(schema_properties("MigrateRequest"), json_keys(&migrate));
    assert_eq!(schema_properties("MigrationInfo"), json_keys(MigrationInfo::default()));
    assert_eq!(schema_properties("RoundInfo"), json_keys(RoundInfo::default()));
    let snap = SnapshotRequest { to: "/s".into(), resume: false, with_disks: false };
    assert_eq!(schema_properties("SnapshotRequest"), json_keys(&snap));
    assert_eq!(schema_properties("SnapshotInfo"), json_keys(SnapshotInfo::default()));
    assert_eq!(schema_properties("RestoreRequest"), json_keys(&RestoreRequest { from: "/s".into() }));
    assert_eq!(schema_properties("RestoreInfo"), json_keys(RestoreInfo::default()));
    assert_eq!(schema_properties("Error"), BTreeSet::from(["error".to_string()]));

    // The match has no wildcard arm so that a new variant fails to compile here until the
    // document (and this list) has it.
    let all_states = [
        VmState::Running,
        VmState::Paused,
        VmState::Migrating,
        VmState::Migrated,
        VmState::ShuttingDown,
        VmState::Snapshotting,
    ];
    for s in all_states {
        match s {
            VmState::Running
            | VmState::Paused
            | VmState::Migrating
            | VmState::Migrated
            | VmState::ShuttingDown
            | VmState::Snapshotting => {}
        }
    }
    assert_eq!(schema_enum("VmState"), json_strings(&all_states));

    use MigrationPhase as P;
    let all_phases =
        [P::None, P::Setup, P::Precopy, P::StopAndCopy, P::Postcopy, P::PostcopyPaused, P::Completed, P::Failed];
    for p in all_phases {
        match p {
            P::None
            | P::Setup
            | P::Precopy
            | P::StopAndCopy
            | P::Postcopy
            | P::PostcopyPaused
            | P::Completed
            | P::Failed => {}
        }
    }
    assert_eq!(schema_enum("MigrationPhase"), json_strings(&all_phases));

    use SnapshotPhase as S;
    let all_snapshot_phases = [S::None, S::Saving, S::Completed, S::Failed];
    for p in all_snapshot_phases {
        match p {
            S::None | S::Saving | S::Completed | S::Failed => {}
        }
    }
    assert_eq!(schema_enum("SnapshotPhase"), json_strings(&all_snapshot_phases));

    let all_templates = [CpuTemplate::Host, CpuTemplate::Baseline];
    for t in all_templates {
        match t {
            CpuTemplate::Host | CpuTemplate::Baseline => {}
        }
    }
    assert_eq!(schema_enum("CpuTemplate"), json_strings(&all_templates));
}
