// SPDX-License-Identifier: Apache-2.0
//! The key schema, in one place. Everything lives under [`ROOT`]:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `hosts/<host>` | `HostRecord` | the agent's lease |
//! | `host-specs/<host>` | `HostSpec` | until changed |
//! | `vms/<vm>` | `VmRecord` | from `vm create` until the stopped VM is gone |
//! | `status/<vm>` | `VmStatus` | the owner agent's lease |
//! | `load/<host>` | `HostLoad` | the agent's lease |
//! | `moves/<vm>` | `MoveRecord` | from a move request until the next one replaces it |
//! | `balancer/leader` | `LeaderRecord` | the leading balancer's lease |
//! | `balancer/plan` | `PlanRecord` | the leading balancer's lease |

/// The prefix of every key of the cluster.
pub const ROOT: &str = "/vmm/v1/";

/// What a key under [`ROOT`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Host(String),
    HostSpec(String),
    Vm(String),
    Status(String),
    Load(String),
    Move(String),
    /// The balancer's records: `leader` and `plan`.
    Balancer(String),
}

/// A kind's prefix and the constructor of its keys.
type Kind = (&'static str, fn(String) -> Key);

const KINDS: [Kind; 7] = [
    ("hosts/", Key::Host),
    ("host-specs/", Key::HostSpec),
    ("vms/", Key::Vm),
    ("status/", Key::Status),
    ("load/", Key::Load),
    ("moves/", Key::Move),
    ("balancer/", Key::Balancer),
];

impl Key {
    /// The key's full text.
    pub fn path(&self) -> String {
        let (kind, name) = match self {
            Key::Host(n) => ("hosts/", n),
            Key::HostSpec(n) => ("host-specs/", n),
            Key::Vm(n) => ("vms/", n),
            Key::Status(n) => ("status/", n),
            Key::Load(n) => ("load/", n),
            Key::Move(n) => ("moves/", n),
            Key::Balancer(n) => ("balancer/", n),
        };
        format!("{ROOT}{kind}{name}")
    }

    /// What `path` names, if it is one of ours.
    pub fn parse(path: &str) -> Option<Key> {
        let rest = path.strip_prefix(ROOT)?;
        KINDS.iter().find_map(|(kind, make)| {
            let name = rest.strip_prefix(kind)?;
            (!name.is_empty() && !name.contains('/')).then(|| make(name.to_string()))
        })
    }
}

pub fn host(name: &str) -> String {
    Key::Host(name.into()).path()
}

pub fn host_spec(name: &str) -> String {
    Key::HostSpec(name.into()).path()
}

pub fn vm(name: &str) -> String {
    Key::Vm(name.into()).path()
}

pub fn status(name: &str) -> String {
    Key::Status(name.into()).path()
}

pub fn load(name: &str) -> String {
    Key::Load(name.into()).path()
}

pub fn moves(name: &str) -> String {
    Key::Move(name.into()).path()
}

/// The elected balancer's record.
pub fn balancer_leader() -> String {
    Key::Balancer("leader".into()).path()
}

/// The elected balancer's last plan.
pub fn balancer_plan() -> String {
    Key::Balancer("plan".into()).path()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in [
            Key::Host("a".into()),
            Key::HostSpec("a".into()),
            Key::Vm("vm-1".into()),
            Key::Status("vm-1".into()),
            Key::Load("b".into()),
            Key::Move("vm-1".into()),
            Key::Balancer("leader".into()),
        ] {
            assert_eq!(Key::parse(&k.path()), Some(k.clone()), "{}", k.path());
        }
        assert_eq!(vm("x"), "/vmm/v1/vms/x");
        // Prefixes of one another must not be confused: hosts/ vs host-specs/.
        assert_eq!(Key::parse("/vmm/v1/host-specs/a"), Some(Key::HostSpec("a".into())));
        for bad in ["/vmm/v1/vms/", "/vmm/v1/vms/a/b", "/vmm/v1/other/a", "/vmm/v2/vms/a", "vms/a"] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
    }
}
