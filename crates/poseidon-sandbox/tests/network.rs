//! Network access of runners, against an "outside" host the test builds itself: a network
//! namespace with addresses in 203.0.113.0/24 (and a private and the metadata address routed
//! into it), connected to the host by a veth pair. Traffic never leaves this machine.
//! Each test has its own bridge, subnet, cgroup and outside namespace, so they run in parallel.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{batch, run, unique_name};
use poseidon_sandbox::{NetworkConfig, NetworkSpec, Runtime, Sandbox, SandboxSpec};

/// Port of the outside server, which answers each connection with the peer's address; the
/// same server listens on the DNS port too (a resolver in a denied range).
const OUTSIDE_PORT: u16 = 9000;
const DNS_PORT: u16 = 53;
const ECHO_PEER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode() + b"\n")
    c.close()
"#;

fn ip(args: &str) {
    let status = Command::new("ip").args(args.split_whitespace()).status().expect("run ip");
    assert!(status.success(), "ip {args}");
}

/// The outside host: namespace `name`, host side `<name>h` with `.1` of `base/28`, the
/// namespace's `eth0` with `.2`, and its server. Removed on drop.
struct Outside {
    name: String,
    host: Ipv4Addr,
    server: Ipv4Addr,
    children: Vec<Child>,
}

impl Outside {
    fn new(name: &str, base: Ipv4Addr, extra: &[Ipv4Addr]) -> Outside {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = Command::new("ip").args(["link", "del", &format!("{name}h")]).status();
        let [a, b, c, d] = base.octets();
        let mut outside = Outside {
            name: name.to_owned(),
            host: Ipv4Addr::new(a, b, c, d + 1),
            server: Ipv4Addr::new(a, b, c, d + 2),
            children: Vec::new(),
        };
        let (h, s) = (outside.host, outside.server);
        ip(&format!("netns add {name}"));
        ip(&format!("link add {name}h type veth peer name eth0 netns {name}"));
        ip(&format!("addr add {h}/28 dev {name}h"));
        ip(&format!("link set {name}h up"));
        ip(&format!("-n {name} addr add {s}/28 dev eth0"));
        for address in extra {
            ip(&format!("-n {name} addr add {address}/32 dev eth0"));
            ip(&format!("route add {address}/32 via {s} dev {name}h"));
        }
        ip(&format!("-n {name} link set eth0 up"));
        ip(&format!("-n {name} link set lo up"));
        ip(&format!("-n {name} route add default via {h}"));
        for port in [OUTSIDE_PORT, DNS_PORT] {
            let child = Command::new("ip")
                .args(["netns", "exec", name, "python3", "-c", ECHO_PEER, &port.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .expect("start the outside server");
            outside.children.push(child);
            wait_until_reachable(SocketAddr::from((s, port)));
        }
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}h", self.name)]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn wait_until_reachable(address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{address} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn network_config(bridge: &str, subnet: &str) -> NetworkConfig {
    NetworkConfig {
        bridge: bridge.into(),
        subnet: subnet.parse().unwrap(),
        resolvers: vec![Ipv4Addr::new(203, 0, 113, 53)],
        allow: Vec::new(),
        deny: Vec::new(),
        host_ports: (31000, 31999),
        advertised_address: None,
    }
}

fn network_runtime(tag: &str, network: NetworkConfig) -> Runtime {
    let cgroup = format!("poseidon-test-{tag}");
    let runtime = Runtime::with_network(common::config(&cgroup, tag), Some(network));
    runtime.expect("network runtime")
}

async fn networked(runtime: &Runtime, ports: &[u16]) -> Sandbox {
    let spec = SandboxSpec {
        name: unique_name("net"),
        image: runtime.host_image(),
        limits: Default::default(),
    };
    let network = NetworkSpec { exposed_ports: ports.to_vec() };
    runtime.create_with_network(spec, Some(network)).await.expect("networked sandbox")
}

/// A script that tries every `host:port` at once (2 s each) and prints `reached X` for each
/// that accepted a connection.
fn probe(targets: &[String]) -> String {
    let list = targets.join(" ");
    format!(
        "for t in {list}; do (timeout 2 bash -c \"exec 3<>/dev/tcp/${{t%:*}}/${{t#*:}}\" \
         2>/dev/null && echo reached $t) & done; wait"
    )
}

/// The runner's own address, found without sending anything (a UDP "connect").
async fn address_of(sandbox: &Sandbox) -> String {
    let script = "python3 -c \"import socket; s=socket.socket(2,2); \
                  s.connect(('203.0.113.77',9)); print(s.getsockname()[0])\"";
    run(sandbox, batch(script)).await.stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_masqueraded_and_private_destinations_are_dropped() {
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let private = Ipv4Addr::new(172, 31, 213, 2);
    let outside = Outside::new("pstout1", Ipv4Addr::new(203, 0, 113, 0), &[metadata, private]);
    let mut config = network_config("pstn1", "10.215.1.0/24");
    config.resolvers = vec![private];
    let runtime = network_runtime("net1", config);
    let gateway = "10.215.1.1";
    let on_loopback = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let on_any = TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = on_any.local_addr().unwrap().port();
    // The host itself reaches all of them: a refusal below is the policy's doing.
    for target in [format!("{private}:{OUTSIDE_PORT}"), format!("{gateway}:{any_port}")] {
        TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("host cannot reach {target}: {e}"));
    }

    let runner = networked(&runtime, &[]).await;
    let other = networked(&runtime, &[8080]).await;
    let server = other.spawn(batch("exec python3 -m http.server 8080")).await.unwrap();
    let mapped = other.mapped_ports()[0].1;
    wait_until_reachable(mapped);
    let other_address = address_of(&other).await;
    let pinned =
        Command::new("ip").args(["neigh", "show", &other_address, "dev", "pstn1"]).output();
    let pinned = String::from_utf8_lossy(&pinned.unwrap().stdout).into_owned();
    assert!(pinned.contains("PERMANENT"), "the runner's address is not pinned: {pinned}");

    let seen =
        run(&runner, batch(&format!("timeout 5 cat </dev/tcp/{}/9000", outside.server))).await;
    assert_eq!(seen.stdout.trim(), outside.host.to_string(), "{seen:?}");
    let resolv = run(&runner, batch("cat /etc/resolv.conf")).await;
    assert_eq!(resolv.stdout, format!("nameserver {private}\n"));

    let denied = [
        format!("{metadata}:{OUTSIDE_PORT}"),
        format!("{private}:{OUTSIDE_PORT}"),
        format!("{gateway}:{on_loopback}"),
        format!("{gateway}:{any_port}"),
        format!("{other_address}:8080"),
        mapped.to_string(),
        format!("{}:{OUTSIDE_PORT}", outside.server),
        format!("{private}:{DNS_PORT}"),
    ];
    let probed = run(&runner, batch(&probe(&denied))).await;
    let mut reached: Vec<&str> = probed.stdout.lines().collect();
    reached.sort_unstable();
    let expected = [
        format!("reached {private}:{DNS_PORT}"),
        format!("reached {}:{OUTSIDE_PORT}", outside.server),
    ];
    assert_eq!(reached, expected, "only the outside server and the resolver may answer");

    let isolated = common::sandbox(Default::default()).await;
    let probed = run(&isolated, batch(&probe(&[format!("{}:9000", outside.server)]))).await;
    assert_eq!(probed.stdout, "", "a runner without network access reached the outside");

    drop(server);
    for sandbox in [runner, other, isolated] {
        sandbox.destroy().await.unwrap();
    }
    drop(outside);
}

fn http_get(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_ports_answer_through_mapped_ports() {
    let runtime = network_runtime("net2", network_config("pstn2", "10.215.2.0/24"));
    let sandbox = networked(&runtime, &[8080, 8081]).await;
    let mapped = sandbox.mapped_ports();
    assert_eq!(mapped.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [8080, 8081]);
    assert!(mapped.iter().all(|(_, a)| a.ip().to_string() == "10.215.2.1"), "{mapped:?}");
    assert!(mapped.iter().all(|(_, a)| (31000..=31999).contains(&a.port())), "{mapped:?}");
    let file = sandbox.files().unwrap();
    drop(file);
    let _server = sandbox
        .spawn(batch("echo hello-from-runner > index.html; exec python3 -m http.server 8080"))
        .await
        .unwrap();
    wait_until_reachable(mapped[0].1);
    let response = http_get(mapped[0].1);
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.contains("hello-from-runner"), "{response}");
    let veths = links_named("pstn2-");
    let port = Command::new("bridge").args(["-d", "link", "show", "dev", &veths[0]]).output();
    let port = String::from_utf8_lossy(&port.unwrap().stdout).into_owned();
    for flag in ["isolated on", "learning off", "flood off", "mcast_flood off", "bcast_flood off"] {
        assert!(port.contains(flag), "the runner's bridge port lacks {flag:?}: {port}");
    }
    sandbox.destroy().await.unwrap();
    assert!(TcpStream::connect_timeout(&mapped[0].1, Duration::from_millis(500)).is_err());
}

fn links_named(prefix: &str) -> Vec<String> {
    let output = Command::new("ip").args(["-o", "link"]).output().expect("ip link").stdout;
    String::from_utf8_lossy(&output)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

fn nft_table(name: &str) -> Option<String> {
    let output = Command::new("nft").args(["list", "table", "inet", name]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_many_cycles() {
    let runtime = network_runtime("net3", network_config("pstn3", "10.215.3.0/24"));
    let mut creation = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let sandbox = networked(&runtime, &[]).await;
        creation.push(started.elapsed());
        sandbox.destroy().await.unwrap();
    }
    // A pool fill: creations without teardowns of earlier runners in between (the kernel
    // frees a destroyed runner's namespace in the background, which slows the next creation).
    let mut filling = Vec::new();
    let mut pool = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        pool.push(networked(&runtime, &[]).await);
        filling.push(started.elapsed());
    }
    for sandbox in pool {
        sandbox.destroy().await.unwrap();
    }
    filling.sort();
    eprintln!("network-enabled creation filling a pool: median {:?}", filling[10]);
    let mut isolated = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let spec = SandboxSpec {
            name: unique_name("iso"),
            image: runtime.host_image(),
            limits: Default::default(),
        };
        let sandbox = runtime.create(spec).await.unwrap();
        isolated.push(started.elapsed());
        sandbox.destroy().await.unwrap();
    }
    isolated.sort();
    eprintln!("creation without network: median {:?}", isolated[10]);
    let with_port = networked(&runtime, &[8080]).await;
    assert!(nft_table("pstn3").unwrap().contains(": 10.215.3."), "the port is mapped");
    with_port.destroy().await.unwrap();
    drop(with_port);
    creation.sort();
    eprintln!("network-enabled creation: median {:?}, max {:?}", creation[50], creation[99]);
    // Destroyed runners' links, neighbour entries and port mappings are reclaimed in the
    // background, in batches.
    let leftovers = || {
        let neighbours = Command::new("ip").args(["neigh", "show", "dev", "pstn3"]).output();
        let neighbours = String::from_utf8_lossy(&neighbours.unwrap().stdout).into_owned();
        let table = nft_table("pstn3").expect("the table stays while the runtime lives");
        (links_named("pstn3-"), neighbours.contains("PERMANENT"), table.contains(": 10.215.3."))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leftovers() != (Vec::new(), false, false) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (links, pinned, mapped) = leftovers();
    assert_eq!(links, Vec::<String>::new(), "links are left");
    assert!(!pinned, "pinned neighbours are left");
    assert!(!mapped, "a port mapping is left");
    drop(runtime);
    assert_eq!(links_named("pstn3"), Vec::<String>::new());
    assert!(nft_table("pstn3").is_none(), "the table is removed with the runtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_are_removed_at_start() {
    ip("link add pstn4-77 type veth peer name pstn4-78");
    let status = Command::new("nft").args(["add", "table", "inet", "pstn4"]).status().unwrap();
    assert!(status.success());
    let runtime = network_runtime("net4", network_config("pstn4", "10.215.4.0/24"));
    assert_eq!(links_named("pstn4-"), Vec::<String>::new());
    assert!(nft_table("pstn4").unwrap().contains("chain forward"));
    drop(runtime);
}
