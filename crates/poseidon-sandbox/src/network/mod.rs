//! Network access for runners that ask for it (`docs/security.md`, "Network").
//!
//! A runner's network namespace starts with loopback only. With a [`Network`] the runtime
//! gives a runner a veth pair to our bridge, an address of the configured range, a default
//! route via the bridge and NAT to the outside; an nftables table of ours enforces the egress
//! policy and maps exposed ports. Links and addresses are set up in-process through netlink
//! ([`netlink`]); rules change in batches through libnftables, also in-process ([`nft`]). A
//! runner without exposed ports costs no rule change at all: the policy is per bridge, not per
//! runner. A destroyed runner's share is torn down in the background ([`reclaim`]).

mod alloc;
mod netlink;
mod nft;
mod reclaim;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use alloc::Pool;
use reclaim::Reclaimer;

/// Lowest and highest prefix length of the runners' range: at most 65533 runners (veth names
/// must fit 15 bytes) and room for a gateway plus at least a few runners.
const MIN_PREFIX: u8 = 16;
const MAX_PREFIX: u8 = 29;
/// Most exposed ports of one runner: each takes a host port from a shared range.
const MAX_EXPOSED_PORTS: usize = 64;
/// Longest bridge name: `{bridge}-{65534}` must fit `IFNAMSIZ - 1` bytes.
const MAX_BRIDGE_NAME: usize = 9;

/// Configuration of runner networking.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// Our bridge: 1 to 9 of `[a-z0-9]`. It also names the nftables table (`inet <bridge>`)
    /// and prefixes every host-side veth (`<bridge>-<n>`), which is how leftovers are found.
    pub bridge: String,
    /// The runners' range; the first address is the bridge's (the gateway).
    pub subnet: Ipv4Cidr,
    /// Name servers written to each runner's `/etc/resolv.conf`; reachable on port 53 even
    /// when they lie in a denied range.
    pub resolvers: Vec<Ipv4Addr>,
    /// Destinations reachable even though a denied range contains them.
    pub allow: Vec<Ipv4Cidr>,
    /// Destinations denied on top of the built-in private and special ranges.
    pub deny: Vec<Ipv4Cidr>,
    /// Host ports handed out for exposed ports (inclusive).
    pub host_ports: (u16, u16),
    /// The address clients reach mapped ports on; `None` means the bridge's address, which
    /// only this machine reaches.
    pub advertised_address: Option<IpAddr>,
}

/// What a network-enabled runner gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkSpec {
    /// TCP ports inside the runner, each mapped to a host port.
    pub exposed_ports: Vec<u16>,
}

/// An IPv4 network in CIDR notation (`10.213.0.0/16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    fn first(&self) -> u32 {
        u32::from(self.address) & self.mask()
    }

    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }

    fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == self.first()
    }

    fn nth(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.first() + offset)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || NetworkError::Config(format!("invalid IPv4 CIDR {s:?}"));
        let (address, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let address = address.parse().map_err(|_| invalid())?;
        let prefix = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(invalid)?;
        Ok(Ipv4Cidr { address, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.first()), self.prefix)
    }
}

/// Errors of network set-up and tear-down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("netlink {step}: {reason}")]
    Netlink { step: &'static str, reason: String },
    #[error("nft: {0}")]
    Nft(String),
    #[error("cannot write {path}: {source}")]
    Sysctl { path: &'static str, source: std::io::Error },
    #[error("no free {0} left")]
    Exhausted(&'static str),
}

/// The bridge, the rules and the allocation of addresses and host ports.
#[derive(Debug)]
pub(crate) struct Network {
    config: NetworkConfig,
    gateway: Ipv4Addr,
    bridge_index: u32,
    allocations: Arc<Allocations>,
    /// `None` only while dropping.
    reclaimer: Option<Reclaimer>,
}

/// Addresses (as offsets into the subnet) and host ports in use.
#[derive(Debug)]
struct Allocations {
    addresses: Mutex<Pool>,
    ports: Mutex<Pool>,
}

/// One runner's share of the network; give it back with [`Network::release`].
#[derive(Debug)]
pub(crate) struct Attachment {
    offset: u32,
    veth: String,
    address: Ipv4Addr,
    /// `(exposed port, host port)`.
    ports: Vec<(u16, u16)>,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Network {
    /// Removes leftovers of a previous run, creates the bridge and loads the rules, then
    /// turns on IPv4 forwarding (which only our rules let runners' traffic use). Blocking.
    pub(crate) fn new(config: NetworkConfig) -> Result<Network, NetworkError> {
        validate(&config)?;
        let gateway = config.subnet.nth(1);
        netlink::remove_leftovers(&config.bridge)?;
        nft::remove_table(&config.bridge);
        refuse_host_overlap(config.subnet, &netlink::host_networks()?)?;
        let bridge_index = netlink::create_bridge(&config.bridge, gateway, config.subnet.prefix)?;
        let allocations = Arc::new(Allocations {
            addresses: Mutex::new(Pool::new(2, (1u32 << (32 - config.subnet.prefix)) - 2)),
            ports: Mutex::new(Pool::new(config.host_ports.0.into(), config.host_ports.1.into())),
        });
        let reclaimer = Reclaimer::start(&config.bridge, bridge_index, allocations.clone())?;
        let network =
            Network { config, gateway, bridge_index, allocations, reclaimer: Some(reclaimer) };
        // From here on, a failure drops `network`, which removes the bridge and the table.
        nft::load_table(&network.config)?;
        std::fs::write(IP_FORWARD, "1")
            .map_err(|source| NetworkError::Sysctl { path: IP_FORWARD, source })?;
        Ok(network)
    }

    /// The runners' `/etc/resolv.conf`.
    pub(crate) fn resolv_conf(&self) -> String {
        self.config.resolvers.iter().map(|r| format!("nameserver {r}\n")).collect()
    }

    /// Connects the runner whose PID 1 `pidfd` refers to. Blocking.
    pub(crate) fn attach(
        &self,
        pidfd: BorrowedFd<'_>,
        spec: &NetworkSpec,
    ) -> Result<Attachment, NetworkError> {
        let offset =
            lock(&self.allocations.addresses).take().ok_or(NetworkError::Exhausted("address"))?;
        let mut attachment = Attachment {
            offset,
            veth: format!("{}-{offset}", self.config.bridge),
            address: self.config.subnet.nth(offset),
            ports: Vec::new(),
        };
        let result = self.connect(pidfd, spec, &mut attachment);
        if let Err(e) = result {
            reclaim(&self.config.bridge, self.bridge_index, &[&attachment]);
            self.allocations.give_back(&[attachment]);
            return Err(e);
        }
        Ok(attachment)
    }

    fn connect(
        &self,
        pidfd: BorrowedFd<'_>,
        spec: &NetworkSpec,
        attachment: &mut Attachment,
    ) -> Result<(), NetworkError> {
        if spec.exposed_ports.len() > MAX_EXPOSED_PORTS {
            return Err(NetworkError::Config(format!(
                "at most {MAX_EXPOSED_PORTS} exposed ports per runner"
            )));
        }
        for &port in &spec.exposed_ports {
            let host =
                lock(&self.allocations.ports).take().ok_or(NetworkError::Exhausted("host port"))?;
            attachment.ports.push((port, host as u16));
        }
        netlink::attach_runner(&netlink::RunnerLink {
            bridge_index: self.bridge_index,
            veth: &attachment.veth,
            pidfd,
            address: attachment.address,
            prefix: self.config.subnet.prefix,
            gateway: self.gateway,
            mac: runner_mac(attachment.offset),
        })?;
        nft::map_ports(&self.config.bridge, attachment.address, &attachment.ports)
    }

    /// Hands a destroyed runner's share to the reclaimer, which removes its port mappings,
    /// neighbour entry and (if the kernel has not done so yet) its veth pair in the background,
    /// then frees its address and ports. The runner's init must be dead: its namespace is
    /// going away, and with it the veth pair.
    pub(crate) fn release(&self, attachment: Attachment) {
        if let Some(reclaimer) = &self.reclaimer {
            reclaimer.send(attachment);
        }
    }

    /// Where a client reaches `attachment`'s exposed ports.
    pub(crate) fn mapped_ports(&self, attachment: &Attachment) -> Vec<(u16, SocketAddr)> {
        let address = self.config.advertised_address.unwrap_or(IpAddr::V4(self.gateway));
        attachment
            .ports
            .iter()
            .map(|(port, host)| (*port, SocketAddr::new(address, *host)))
            .collect()
    }
}

impl Drop for Network {
    /// Every runner is gone (each holds the runtime): finish reclaiming, then remove the
    /// rules and the bridge.
    fn drop(&mut self) {
        if let Some(reclaimer) = self.reclaimer.take() {
            reclaimer.finish();
        }
        nft::remove_table(&self.config.bridge);
        if let Err(e) = netlink::delete_link(&self.config.bridge) {
            tracing::warn!(error = %e, "cannot remove the bridge");
        }
    }
}

/// The runners' range must be ours alone: an overlap with a network of the host would make
/// the host's own peers unreachable (or runners reachable as if they were those peers).
fn refuse_host_overlap(subnet: Ipv4Cidr, host: &[(Ipv4Addr, u8)]) -> Result<(), NetworkError> {
    let overlapping = host
        .iter()
        .map(|&(address, prefix)| Ipv4Cidr { address, prefix })
        .find(|network| network.contains(subnet.nth(0)) || subnet.contains(network.nth(0)));
    match overlapping {
        Some(network) => Err(NetworkError::Config(format!(
            "subnet {subnet} overlaps the host's network {network}"
        ))),
        None => Ok(()),
    }
}

/// A locally administered unicast MAC from the runner's offset (below 2^16), so that it is
/// known before the link exists and unique on the bridge.
fn runner_mac(offset: u32) -> [u8; 6] {
    let [.., high, low] = offset.to_be_bytes();
    [0x02, 0x70, 0x73, 0x64, high, low]
}

impl Allocations {
    fn give_back(&self, attachments: &[Attachment]) {
        let mut ports = lock(&self.ports);
        let mut addresses = lock(&self.addresses);
        for attachment in attachments {
            attachment.ports.iter().for_each(|(_, host)| ports.give_back((*host).into()));
            addresses.give_back(attachment.offset);
        }
    }
}

/// Removes what of `attachments` the kernel does not remove with their namespaces: port
/// mappings (one nft batch) and neighbour entries, plus veth pairs still present. Returns
/// whether everything is gone, so that addresses and ports may be handed out again.
fn reclaim(bridge: &str, bridge_index: u32, attachments: &[&Attachment]) -> bool {
    let ports: Vec<(u16, u16)> =
        attachments.iter().flat_map(|attachment| attachment.ports.iter().copied()).collect();
    let unmapped = nft::unmap_ports(bridge, &ports)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot remove runners' port mappings"));
    let links: Vec<(&str, Ipv4Addr)> =
        attachments.iter().map(|a| (a.veth.as_str(), a.address)).collect();
    let detached = netlink::detach_runners(&links, bridge_index)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot remove runners' links"));
    unmapped.is_ok() && detached.is_ok()
}

fn lock(pool: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

fn validate(config: &NetworkConfig) -> Result<(), NetworkError> {
    let bridge_ok = !config.bridge.is_empty()
        && config.bridge.len() <= MAX_BRIDGE_NAME
        && config.bridge.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let reason = if !bridge_ok {
        Some(format!("bridge must be 1 to {MAX_BRIDGE_NAME} of [a-z0-9]"))
    } else if !(MIN_PREFIX..=MAX_PREFIX).contains(&config.subnet.prefix) {
        Some(format!("subnet prefix must be /{MIN_PREFIX} to /{MAX_PREFIX}"))
    } else if config.host_ports.0 == 0 || config.host_ports.0 > config.host_ports.1 {
        Some("host port range must be non-empty and above 0".to_owned())
    } else if config.resolvers.iter().any(|r| config.subnet.contains(*r) || r.is_loopback()) {
        Some("resolvers must be reachable from runners (not loopback, not in the subnet)".into())
    } else {
        None
    };
    reason.map_or(Ok(()), |r| Err(NetworkError::Config(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_overlapping_a_host_network_are_refused() {
        let subnet: Ipv4Cidr = "10.213.0.0/16".parse().unwrap();
        let ok = [(Ipv4Addr::new(192, 0, 2, 2), 24), (Ipv4Addr::LOCALHOST, 8)];
        assert!(refuse_host_overlap(subnet, &ok).is_ok());
        for host in [(Ipv4Addr::new(10, 213, 5, 1), 24), (Ipv4Addr::new(10, 1, 2, 3), 8)] {
            assert!(refuse_host_overlap(subnet, &[host]).is_err(), "{host:?}");
        }
    }

    #[test]
    fn cidrs_parse_and_normalise() {
        let cidr: Ipv4Cidr = "10.213.7.9/16".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.213.0.0/16");
        assert_eq!(cidr.nth(1), Ipv4Addr::new(10, 213, 0, 1));
        assert!(cidr.contains(Ipv4Addr::new(10, 213, 255, 1)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert_eq!("1.2.3.4".parse::<Ipv4Cidr>().unwrap().to_string(), "1.2.3.4/32");
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().to_string(), "0.0.0.0/0");
        for bad in ["1.2.3.4/33", "x/8", "10.0.0.0/", "::1/128"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }
}
