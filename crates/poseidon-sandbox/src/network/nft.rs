//! Our nftables table: the egress policy of runners and the map of exposed ports.
//!
//! The table is `inet <bridge>` and is loaded atomically with one batch (through libnftables, in-process); per-runner
//! changes are one batch of element adds or deletes on the `ports` map. `docs/security.md`
//! explains each rule.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use crate::sys::Nftables;

use super::{NetworkConfig, NetworkError};

/// Private, shared, link-local (with the cloud metadata address), loopback, "this network",
/// multicast and reserved ranges: never reachable from a runner unless allowed.
const DENIED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
];

/// The complete table. Only traffic in or out of our bridge is matched, so the host's other
/// traffic is untouched.
fn table(config: &NetworkConfig) -> String {
    let name = &config.bridge;
    let subnet = config.subnet;
    let deny: Vec<String> = DENIED_RANGES
        .iter()
        .map(|r| r.to_string())
        .chain(config.deny.iter().map(|c| c.to_string()))
        .collect();
    let allow: Vec<String> = config.allow.iter().map(|c| c.to_string()).collect();
    let resolvers: Vec<String> = config.resolvers.iter().map(|r| r.to_string()).collect();
    format!(
        r#"table inet {name}
delete table inet {name}
table inet {name} {{
    set deny {{ type ipv4_addr; flags interval; auto-merge; {deny} }}
    set allow {{ type ipv4_addr; flags interval; auto-merge; {allow} }}
    set resolvers {{ type ipv4_addr; {resolvers} }}
    map ports {{ type inet_service : ipv4_addr . inet_service; }}

    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{name}" ct state established,related accept
        iifname "{name}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{name}" oifname "{name}" drop
        iifname "{name}" meta nfproto != ipv4 drop
        iifname "{name}" ip saddr != {subnet} drop
        iifname "{name}" ct state established,related accept
        iifname "{name}" ip daddr @resolvers meta l4proto {{ tcp, udp }} th dport 53 accept
        iifname "{name}" ip daddr @allow accept
        iifname "{name}" ip daddr @deny drop
        iifname "{name}" accept
        oifname "{name}" ct state established,related accept
        oifname "{name}" ct status dnat accept
        oifname "{name}" drop
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local dnat ip addr . port to tcp dport map @ports
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        fib daddr type local dnat ip addr . port to tcp dport map @ports
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{name}" masquerade
    }}
}}
"#,
        deny = elements(&deny),
        allow = elements(&allow),
        resolvers = elements(&resolvers),
    )
}

fn elements(items: &[String]) -> String {
    if items.is_empty() { String::new() } else { format!("elements = {{ {} }}", items.join(", ")) }
}

/// Replaces our table (if any) with a fresh one, atomically.
pub(super) fn load_table(config: &NetworkConfig) -> Result<(), NetworkError> {
    apply(&table(config))
}

/// Deletes our table; a missing table is fine (best effort at start-up and shutdown).
pub(super) fn remove_table(name: &str) {
    let _ = apply(&format!("table inet {name}\ndelete table inet {name}\n"));
}

/// Maps each `(exposed, host)` port pair to `address`.
pub(super) fn map_ports(
    table: &str,
    address: Ipv4Addr,
    ports: &[(u16, u16)],
) -> Result<(), NetworkError> {
    if ports.is_empty() {
        return Ok(());
    }
    let elements: Vec<String> =
        ports.iter().map(|(exposed, host)| format!("{host} : {address} . {exposed}")).collect();
    apply(&format!("add element inet {table} ports {{ {} }}\n", elements.join(", ")))
}

/// Removes the mappings of `ports`.
pub(super) fn unmap_ports(table: &str, ports: &[(u16, u16)]) -> Result<(), NetworkError> {
    if ports.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = ports.iter().map(|(_, host)| host.to_string()).collect();
    apply(&format!("delete element inet {table} ports {{ {} }}\n", keys.join(", ")))
}

/// Runs one batch (all or nothing) through libnftables, loaded at first use. The context's
/// netlink socket belongs to the network namespace it was first used in: callers are always
/// in the host's (runner namespaces are only ever entered by threads of `netlink`).
fn apply(batch: &str) -> Result<(), NetworkError> {
    static NFTABLES: OnceLock<Result<Nftables, String>> = OnceLock::new();
    let nftables =
        NFTABLES.get_or_init(Nftables::load).as_ref().map_err(|e| NetworkError::Nft(e.clone()))?;
    nftables.run(batch).map_err(NetworkError::Nft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_denies_configured_ranges_and_allows_resolvers() {
        let config = NetworkConfig {
            bridge: "psdn0".into(),
            subnet: "10.213.0.0/16".parse().unwrap(),
            resolvers: vec![Ipv4Addr::new(10, 255, 255, 53)],
            allow: vec!["10.9.0.0/16".parse().unwrap()],
            deny: vec!["8.8.8.8".parse().unwrap()],
            host_ports: (30000, 30999),
            advertised_address: None,
        };
        let text = table(&config);
        assert!(text.contains("169.254.0.0/16"));
        assert!(text.contains("8.8.8.8/32"));
        assert!(text.contains("elements = { 10.9.0.0/16 }"));
        assert!(text.contains("ip saddr 10.213.0.0/16 oifname != \"psdn0\" masquerade"));
    }
}
