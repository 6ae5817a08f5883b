// SPDX-License-Identifier: Apache-2.0
//! The test bed: hosts and a client on one L2 segment, each in its own network namespace.
//!
//! ```text
//!  segment netns (vmmtb-P-N)             host netns (vmmtb-P-N-a)
//!  +---------------------------+         +---------------------------------+
//!  | br0 -- port0 =============|== veth =|= uplink -- br0 [10.A.B.10] -- tap0 <- VMM --net tap=tap0
//!  |     -- port1 =============|== veth =|= (host b, same layout)         |
//!  |     -- port-client =======|== veth =|= uplink [10.A.B.1]  (client netns vmmtb-P-N-client)
//!  +---------------------------+         +---------------------------------+
//! ```
//!
//! Addresses in the bed's 10.A.B.0/24: the client is .1 (and the guests' gateway), host `i`
//! (in declaration order) is .(10+i) when it has an address, guest `i` is .(100+i). Nothing is
//! created in the root namespace: every interface is made inside (or moved at creation into) a
//! namespace of the bed, so deleting the namespaces removes everything.

use std::fs::File;
use std::net::Ipv4Addr;
use std::ops::Deref;

use crate::TestBedError;
use crate::l2;
use crate::netns::{self, Netns};

/// Most hosts in one bed: their addresses .10 to .99 stop where the guests' begin.
pub const MAX_HOSTS: usize = 90;
/// Guest numbers are 0 to `MAX_GUESTS - 1` (addresses .100 to .199).
pub const MAX_GUESTS: u8 = 100;
/// The TAP device in every host namespace.
pub const TAP_NAME: &str = "tap0";
/// The bridge in the segment namespace and in every host namespace.
pub const BRIDGE_NAME: &str = "br0";
/// The veth end in a host or client namespace that leads to the segment.
pub const UPLINK_NAME: &str = "uplink";
/// The prefix length of the bed's subnet.
pub const PREFIX_LEN: u8 = 24;

const CLIENT_HOST_PART: u8 = 1;
const FIRST_HOST_HOST_PART: u8 = 10;
const FIRST_GUEST_HOST_PART: u8 = 100;
/// The client's port in the segment namespace (hosts use `port<i>`).
const CLIENT_PORT: &str = "port-client";

/// Collects the nodes of a [`TestBed`]; see [`TestBed::builder`].
#[derive(Debug, Default)]
pub struct TestBedBuilder {
    hosts: Vec<String>,
    client: Option<String>,
    host_ips: bool,
}

impl TestBedBuilder {
    /// Adds a host: a namespace with a TAP device bridged onto the segment.
    pub fn host(mut self, name: &str) -> Self {
        self.hosts.push(name.to_string());
        self
    }

    /// Adds the client: a namespace with an address on the segment (at most one; the last wins).
    pub fn client(mut self, name: &str) -> Self {
        self.client = Some(name.to_string());
        self
    }

    /// Gives every host an address on its bridge (hosts have none by default: a VMM only needs
    /// L2, but a migration connection between hosts needs addresses).
    pub fn host_ips(mut self) -> Self {
        self.host_ips = true;
        self
    }

    /// Creates the namespaces and interfaces. Removes stale beds of dead processes first
    /// ([`netns::sweep_stale`]). On error, whatever was already created is removed again.
    pub fn build(self) -> Result<TestBed, TestBedError> {
        let names = self.hosts.iter().chain(&self.client);
        for (i, name) in names.clone().enumerate() {
            let valid = (1..=32).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(TestBedError::InvalidName(name.clone()));
            }
            if names.clone().take(i).any(|other| other == name) {
                return Err(TestBedError::DuplicateName(name.clone()));
            }
        }
        if self.hosts.len() > MAX_HOSTS {
            return Err(TestBedError::TooManyHosts { max: MAX_HOSTS });
        }

        // A failed sweep must not stop this test: it only concerns other, dead processes.
        if let Err(e) = netns::sweep_stale() {
            eprintln!("test bed: failed to sweep stale namespaces: {e}");
        }

        let (n, id) = netns::next_bed();
        // The subnet only has to be unique for readability (beds are isolated anyway); wrap
        // after 56 * 256 beds in one process.
        let subnet =
            Ipv4Addr::new(10, 200 + u8::try_from((n >> 8) % 56).unwrap_or(0), u8::try_from(n & 0xff).unwrap_or(0), 0);
        let segment = Netns::create(id.clone())?;
        add_bridge(&segment, None)?;
        // Built up step by step so that an error drops (and deletes) what exists so far.
        let mut bed = TestBed { id, subnet, hosts: Vec::new(), client: None, segment };
        for (index, name) in self.hosts.into_iter().enumerate() {
            bed.add_host(index, name, self.host_ips)?;
        }
        if let Some(name) = self.client {
            bed.add_client(name)?;
        }
        Ok(bed)
    }
}

/// Creates `br0` in `netns`, without STP delays or multicast snooping (a test segment is a dumb
/// hub with learning), optionally with a fixed MAC address, and brings it up.
fn add_bridge(netns: &Netns, mac: Option<&str>) -> Result<(), TestBedError> {
    netns.run_ip(&["link", "add", BRIDGE_NAME, "type", "bridge", "forward_delay", "0", "mcast_snooping", "0"])?;
    if let Some(mac) = mac {
        netns.run_ip(&["link", "set", BRIDGE_NAME, "address", mac])?;
    }
    netns.run_ip(&["link", "set", BRIDGE_NAME, "up"])?;
    Ok(())
}

/// A host of the bed: a namespace where a VMM runs with `--net tap=tap0`.
///
/// Derefs to its [`Netns`] for `netns()`, `command()`, `spawn()`, `run_in()`, `wait_for_tcp()`...
#[derive(Debug)]
pub struct Host {
    name: String,
    index: usize,
    ip: Option<Ipv4Addr>,
    netns: Netns,
}

impl Host {
    /// The name given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP device a VMM in this host attaches to.
    pub fn tap(&self) -> &str {
        TAP_NAME
    }

    /// The host's bridge, which holds its address if it has one.
    pub fn bridge(&self) -> &str {
        BRIDGE_NAME
    }

    /// The host's address on the segment, if it was given one.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.ip
    }

    /// Attaches to the host's TAP like a VMM would (see [`l2::open_tap`]).
    pub fn open_tap(&self) -> Result<File, TestBedError> {
        self.netns.run_in(|| l2::open_tap(TAP_NAME))?
    }
}

impl Deref for Host {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// The client of the bed: a namespace with an address on the segment, to talk to guests.
///
/// Derefs to its [`Netns`] like [`Host`].
#[derive(Debug)]
pub struct Client {
    name: String,
    ip: Ipv4Addr,
    netns: Netns,
}

impl Client {
    /// The name given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client's address on the segment.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The client's interface on the segment.
    pub fn interface(&self) -> &str {
        UPLINK_NAME
    }
}

impl Deref for Client {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// Hosts and a client on one L2 segment; see the module doc. Dropping it (also while a test
/// panics) kills the processes started through its namespaces and deletes all its namespaces.
#[derive(Debug)]
pub struct TestBed {
    id: String,
    subnet: Ipv4Addr,
    hosts: Vec<Host>,
    client: Option<Client>,
    segment: Netns,
}

impl TestBed {
    /// Starts describing a bed.
    pub fn builder() -> TestBedBuilder {
        TestBedBuilder::default()
    }

    /// The bed's id, `vmmtb-<pid>-<n>`: the segment namespace's name, and followed by `-` the
    /// prefix of every other namespace of the bed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the namespace name `netns` belongs to this bed (now or in the past).
    pub fn owns_netns(&self, netns: &str) -> bool {
        netns == self.id || netns.strip_prefix(&self.id).is_some_and(|rest| rest.starts_with('-'))
    }

    /// The names of the bed's namespaces that exist now: segment, hosts, client.
    pub fn netns_names(&self) -> Vec<String> {
        let hosts = self.hosts.iter().map(|host| host.netns());
        let client = self.client.iter().map(|client| client.netns());
        std::iter::once(self.segment.netns()).chain(hosts).chain(client).map(str::to_string).collect()
    }

    /// The namespace of the segment bridge (e.g. to watch all traffic on its `br0`).
    pub fn segment(&self) -> &Netns {
        &self.segment
    }

    /// The host called `name`, if it exists (and was not removed).
    pub fn try_host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|host| host.name == name)
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// If there is no such host: a mistake in the test, like an index out of bounds.
    pub fn host(&self, name: &str) -> &Host {
        self.try_host(name).unwrap_or_else(|| panic!("no host {name:?} in test bed {}", self.id))
    }

    /// The hosts, in declaration order.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter()
    }

    /// The client, if the bed has one.
    pub fn try_client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// The client.
    ///
    /// # Panics
    /// If the builder was not given a client.
    pub fn client(&self) -> &Client {
        self.client.as_ref().unwrap_or_else(|| panic!("test bed {} has no client", self.id))
    }

    /// The network address of the bed's /24.
    pub fn subnet(&self) -> Ipv4Addr {
        self.subnet
    }

    /// The netmask of the bed's subnet, 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)))
    }

    fn addr(&self, host_part: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, host_part)
    }

    /// The client's address (also when the bed has no client).
    pub fn client_ip(&self) -> Ipv4Addr {
        self.addr(CLIENT_HOST_PART)
    }

    /// The gateway to give guests: the client, which is the peer they talk to.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.client_ip()
    }

    /// The address of guest `i`.
    ///
    /// # Panics
    /// If `i >= MAX_GUESTS`.
    pub fn guest_ip(&self, i: u8) -> Ipv4Addr {
        assert!(i < MAX_GUESTS, "guest number {i} >= {MAX_GUESTS}");
        self.addr(FIRST_GUEST_HOST_PART + i)
    }

    /// The kernel `ip=` parameter that configures guest `i`'s eth0 statically:
    /// `ip=GUEST::GATEWAY:255.255.255.0::eth0:off`.
    ///
    /// # Panics
    /// If `i >= MAX_GUESTS`.
    pub fn guest_ip_cmdline(&self, i: u8) -> String {
        format!("ip={}::{}:{}::eth0:off", self.guest_ip(i), self.gateway_ip(), self.netmask())
    }

    fn host_index(&self, name: &str) -> Result<usize, TestBedError> {
        self.hosts.iter().position(|host| host.name == name).ok_or_else(|| TestBedError::UnknownHost(name.to_string()))
    }

    /// Gives host `name` its address on its bridge (if it has none yet) and returns it.
    pub fn assign_host_ip(&mut self, name: &str) -> Result<Ipv4Addr, TestBedError> {
        let pos = self.host_index(name)?;
        if let Some(ip) = self.hosts[pos].ip {
            return Ok(ip);
        }
        let index = u8::try_from(self.hosts[pos].index).unwrap_or(u8::MAX);
        let ip = self.addr(FIRST_HOST_HOST_PART + index);
        let host = &mut self.hosts[pos];
        host.netns.run_ip(&["addr", "add", &format!("{ip}/{PREFIX_LEN}"), "dev", BRIDGE_NAME])?;
        host.ip = Some(ip);
        Ok(ip)
    }

    /// Deletes host `name`'s TAP device, e.g. to show that a migrated guest no longer needs it.
    /// The host keeps its bridge, uplink and address.
    pub fn remove_tap(&self, name: &str) -> Result<(), TestBedError> {
        let pos = self.host_index(name)?;
        self.hosts[pos].netns.run_ip(&["link", "del", TAP_NAME]).map(drop)
    }

    /// Takes host `name` off the segment and deletes it, killing the processes started in it.
    pub fn remove_host(&mut self, name: &str) -> Result<(), TestBedError> {
        let pos = self.host_index(name)?;
        let host = self.hosts.remove(pos);
        // Deleting the veth end is synchronous, unlike the kernel's cleanup of a deleted
        // namespace, so the host is off the segment when this returns.
        let port = format!("port{}", host.index);
        let unplugged = self.segment.run_ip(&["link", "del", &port]).map(drop);
        host.netns.destroy().and(unplugged)
    }

    fn add_host(&mut self, index: usize, name: String, with_ip: bool) -> Result<(), TestBedError> {
        let netns = Netns::create(format!("{}-{name}", self.id))?;
        self.plug(&netns, &format!("port{index}"))?;
        // A fixed MAC: otherwise the bridge takes the lowest MAC of its ports and changes it
        // when remove_tap() takes one away, which would break the peers' ARP entries.
        let [_, b, c, _] = self.subnet.octets();
        let index_byte = u8::try_from(index).unwrap_or(u8::MAX);
        let mac = format!("02:74:62:{b:02x}:{c:02x}:{index_byte:02x}");
        add_bridge(&netns, Some(&mac))?;
        netns.run_ip(&["link", "set", UPLINK_NAME, "master", BRIDGE_NAME])?;
        netns.run_ip(&["tuntap", "add", "dev", TAP_NAME, "mode", "tap"])?;
        netns.run_ip(&["link", "set", TAP_NAME, "master", BRIDGE_NAME, "up"])?;
        self.hosts.push(Host { name: name.clone(), index, ip: None, netns });
        if with_ip {
            self.assign_host_ip(&name)?;
        }
        Ok(())
    }

    fn add_client(&mut self, name: String) -> Result<(), TestBedError> {
        let netns = Netns::create(format!("{}-{name}", self.id))?;
        self.plug(&netns, CLIENT_PORT)?;
        let ip = self.client_ip();
        netns.run_ip(&["addr", "add", &format!("{ip}/{PREFIX_LEN}"), "dev", UPLINK_NAME])?;
        self.client = Some(Client { name, ip, netns });
        Ok(())
    }

    /// Connects `netns` to the segment: a veth pair created in the segment namespace with its
    /// other end created directly inside `netns` (never in the root namespace), both up.
    fn plug(&self, netns: &Netns, port: &str) -> Result<(), TestBedError> {
        self.segment.run_ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK_NAME,
            "netns",
            netns.netns(),
        ])?;
        self.segment.run_ip(&["link", "set", port, "master", BRIDGE_NAME, "up"])?;
        netns.run_ip(&["link", "set", UPLINK_NAME, "up"])?;
        Ok(())
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        // Hosts and client first, the segment last (each Netns kills its processes and deletes
        // itself when dropped).
        self.hosts.clear();
        self.client = None;
    }
}
