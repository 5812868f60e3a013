//! Links, addresses and routes through rtnetlink, in-process.
//!
//! Each operation runs on a fresh thread with its own single-threaded tokio runtime: the
//! caller may be a runtime worker, a blocking-pool thread or a `Drop`, and the thread that
//! configures a runner enters the runner's network namespace (`setns` is per thread), which
//! must not leak into any thread that outlives the operation.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::NetworkError;

/// The interface name inside every runner.
const RUNNER_INTERFACE: &str = "eth0";

/// What [`attach_runner`] connects.
pub(super) struct RunnerLink<'a> {
    pub bridge_index: u32,
    pub veth: &'a str,
    pub pidfd: BorrowedFd<'a>,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
}

fn error(step: &'static str) -> impl Fn(rtnetlink::Error) -> NetworkError {
    move |e| NetworkError::Netlink { step, reason: e.to_string() }
}

fn os_error(step: &'static str) -> impl Fn(std::io::Error) -> NetworkError {
    move |e| NetworkError::Netlink { step, reason: e.to_string() }
}

/// Runs `operation` to completion on a fresh thread (see the module doc).
fn run<F, T>(operation: F) -> Result<T, NetworkError>
where
    F: Future<Output = Result<T, NetworkError>> + Send,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(os_error("start a runtime"))?
                    .block_on(operation)
            })
            .join()
            .unwrap_or_else(|_| Err(NetworkError::Netlink { step: "run", reason: "panic".into() }))
    })
}

/// A netlink connection in the calling thread's current network namespace.
fn connect() -> Result<Handle, NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(os_error("connect"))?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(error("find a link")(e)),
    }
}

/// Deletes our bridge and every host-side veth of ours (`<bridge>-*`).
pub(super) fn remove_leftovers(bridge: &str) -> Result<(), NetworkError> {
    let prefix = format!("{bridge}-");
    run(async {
        let handle = connect()?;
        let mut links = handle.link().get().execute();
        let mut ours = Vec::new();
        while let Some(link) = links.try_next().await.map_err(error("list links"))? {
            let named = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            });
            if named.is_some_and(|n| n == bridge || n.starts_with(&prefix)) {
                ours.push(link.header.index);
            }
        }
        for index in ours {
            ignore_missing(handle.link().del(index).execute().await)
                .map_err(error("delete a leftover link"))?;
        }
        Ok(())
    })
}

fn ignore_missing(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        other => other,
    }
}

/// Every IPv4 address of the host with its prefix length.
pub(super) fn host_networks() -> Result<Vec<(Ipv4Addr, u8)>, NetworkError> {
    run(async {
        let handle = connect()?;
        let mut addresses = handle.address().get().execute();
        let mut networks = Vec::new();
        while let Some(message) = addresses.try_next().await.map_err(error("list addresses"))? {
            let prefix = message.header.prefix_len;
            networks.extend(message.attributes.iter().filter_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(address)) => Some((*address, prefix)),
                _ => None,
            }));
        }
        Ok(networks)
    })
}

/// Creates the bridge with the gateway address and brings it up; returns its index.
pub(super) fn create_bridge(
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<u32, NetworkError> {
    run(async {
        let handle = connect()?;
        handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(error("create the bridge"))?;
        let index = link_index(&handle, name)
            .await?
            .ok_or(NetworkError::Netlink { step: "find the bridge", reason: "gone".into() })?;
        handle
            .address()
            .add(index, IpAddr::V4(gateway), prefix)
            .execute()
            .await
            .map_err(error("address the bridge"))?;
        Ok(index)
    })
}

/// Deletes a link by name; a missing link is not an error.
pub(super) fn delete_link(name: &str) -> Result<(), NetworkError> {
    run(async {
        let handle = connect()?;
        let message = LinkUnspec::new_with_name(name).build();
        ignore_missing(handle.link().del_with_message(message).execute().await)
            .map_err(error("delete a link"))
    })
}

/// Creates the veth pair with its inner end (`eth0`) directly in the runner's namespace,
/// attaches the outer end to the bridge as an isolated port and configures `eth0`.
pub(super) fn attach_runner(link: &RunnerLink<'_>) -> Result<(), NetworkError> {
    run(async {
        let host = connect()?;
        // The pidfd names the runner's PID 1 race-free (a pid could have been reused).
        setns(link.pidfd, CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Netlink {
            step: "enter the runner",
            reason: e.to_string(),
        })?;
        let runner_ns = File::open("/proc/thread-self/ns/net").map_err(os_error("open netns"))?;
        disable_ipv6()?;
        let inner = connect()?;
        create_veth(&host, link, &runner_ns).await?;
        configure_inner(&inner, link).await
    })
}

/// Runners get no IPv6 (nothing of it is forwarded): without it `eth0` has no link-local
/// address either, and the namespace is cheaper to tear down. `/proc/sys/net` belongs to the
/// network namespace of the thread that opens it: the runner's, here.
fn disable_ipv6() -> Result<(), NetworkError> {
    for scope in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
        std::fs::write(&path, "1").map_err(os_error("disable IPv6 in the runner"))?;
    }
    Ok(())
}

async fn create_veth(
    host: &Handle,
    link: &RunnerLink<'_>,
    runner_ns: &File,
) -> Result<(), NetworkError> {
    let peer = LinkUnspec::new_with_name(RUNNER_INTERFACE)
        .address(link.mac.to_vec())
        .setns_by_fd(runner_ns.as_raw_fd())
        .build();
    let veth = LinkVeth::new(link.veth, RUNNER_INTERFACE)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .controller(link.bridge_index)
        .up()
        .build();
    host.link().add(veth).execute().await.map_err(error("create the veth pair"))?;
    let index = link_index(host, link.veth)
        .await?
        .ok_or(NetworkError::Netlink { step: "find the veth", reason: "gone".into() })?;
    // Isolated ports forward only to the bridge itself: no layer-2 path between runners.
    // Without learning, and with the runner's MAC pinned to its port and its address pinned
    // to its MAC, a runner that changes its own MAC or answers ARP for another runner's
    // address cannot draw the host's traffic for that runner. Nothing is flooded to the port
    // either (every runner's MAC is pinned, so flooding is never needed): frames for a
    // destroyed runner, whose port is gone before its address is reclaimed, reach no one.
    let port = LinkBridgePort::new(index)
        .isolated(true)
        .learning(false)
        .flood(false)
        .mcast_flood(false)
        .bcast_flood(false)
        .build();
    host.link().set_port(port).execute().await.map_err(error("isolate the bridge port"))?;
    host.neighbours()
        .add_bridge(index, &link.mac)
        .state(NeighbourState::Noarp)
        .execute()
        .await
        .map_err(error("pin the runner's MAC to its port"))?;
    host.neighbours()
        .add(link.bridge_index, IpAddr::V4(link.address))
        .link_layer_address(&link.mac)
        .replace()
        .execute()
        .await
        .map_err(error("pin the runner's address to its MAC"))
}

/// Deletes each runner's veth pair (when the kernel has not yet removed it with the runner's
/// namespace) and the bridge's neighbour entry for its address; missing ones are not an error.
pub(super) fn detach_runners(
    runners: &[(&str, Ipv4Addr)],
    bridge_index: u32,
) -> Result<(), NetworkError> {
    run(async {
        let handle = connect()?;
        for &(veth, address) in runners {
            let message = LinkUnspec::new_with_name(veth).build();
            ignore_missing(handle.link().del_with_message(message).execute().await)
                .map_err(error("delete the veth"))?;
            let mut neighbour = NeighbourMessage::default();
            neighbour.header.family = AddressFamily::Inet;
            neighbour.header.ifindex = bridge_index;
            neighbour
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(address)));
            match handle.neighbours().del(neighbour).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
                other => other.map_err(error("delete the neighbour entry"))?,
            }
        }
        Ok(())
    })
}

async fn configure_inner(inner: &Handle, link: &RunnerLink<'_>) -> Result<(), NetworkError> {
    let index = link_index(inner, RUNNER_INTERFACE)
        .await?
        .ok_or(NetworkError::Netlink { step: "find eth0", reason: "not in the runner".into() })?;
    inner
        .address()
        .add(index, IpAddr::V4(link.address), link.prefix)
        .execute()
        .await
        .map_err(error("address eth0"))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(error("bring eth0 up"))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(link.gateway).build();
    inner.route().add(route).execute().await.map_err(error("add the default route"))
}
