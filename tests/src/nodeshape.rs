//! Sandboxes shaped like a Kubernetes node, for the routes a pod has to the
//! metadata address besides its own sockets: forwarding, kube-proxy's DNAT,
//! uplink SNAT, overlay decapsulation, `AF_PACKET` frames.
//!
//! Every shape is three kinds of network namespace, all ours:
//! - `pod` (and `pod2` in the bridge shape): a pod's namespace, `eth0`;
//! - `node`: forwards IPv4 and IPv6, DNATs "Service" ClusterIPs like
//!   kube-proxy, masquerades what leaves through `uplink`;
//! - `upstream`: the cloud network. It owns the metadata addresses and an
//!   ordinary one on its end of the uplink, runs the fake server, and records
//!   every packet that arrives, by source and destination, in nftables
//!   sets with counters: the sniffer that says whether a route is open,
//!   whatever the client saw.
//!
//! Shapes: routed veth (`NodeShape::routed_veth`), bridge plus VXLAN
//! (`bridge_vxlan`), and routed veth whose pod traffic a tc program sends
//! past netfilter (`redirect_past_netfilter`). Clients run in a pod
//! (`Pod::probe`) or in the node itself as a hostNetwork pod would
//! (`host_network_probe`); `*_args` give `imds-probe` what its `AF_PACKET`
//! and VXLAN senders need.
//!
//! Namespaces are deleted on drop (also on panic), and with them every
//! device, route, tc program and nftables table in them.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    Result, SandboxError, TempFile,
    netns::Netns,
    probe::{Outcome, Probe, Server},
};

/// The shapes' addresses. The pod, Service and link-local gateway addresses
/// are the ones Kubernetes and its CNIs use by default (they exist only in
/// our namespaces); the uplink is in the benchmarking range.
pub mod addrs {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub use crate::netns::addrs::{METADATA_V4, METADATA_V6, SERVER_V4, SERVER_V6};

    /// The node's end of the uplink: the source upstream sees after SNAT.
    pub const NODE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    pub const NODE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x19, 0, 0, 0, 0, 0, 1);
    /// Upstream's end of the uplink, the node's default gateway.
    pub const UPSTREAM_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    pub const UPSTREAM_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x19, 0, 0, 0, 0, 0, 2);

    /// The cluster's pod network, routed back to the node by upstream (for
    /// shapes that do not SNAT, and for replies to spoofed sources).
    pub const POD_CIDR_V4: &str = "10.244.0.0/16";
    pub const POD_CIDR_V6: &str = "fd10:244::/32";

    /// Routed veth: the pod's /32 and /128, and the gateway it is given
    /// (Calico's: link-local, answered by proxy ARP on the node's veth).
    pub const ROUTED_POD_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    pub const ROUTED_POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0x244, 1, 0, 0, 0, 0, 2);
    pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
    pub const ROUTED_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

    /// Bridge: cni0's addresses (the pods' gateway) and the pods' own.
    pub const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    pub const BRIDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0x244, 0, 0, 0, 0, 0, 1);
    pub const BRIDGE_PODS_V4: [Ipv4Addr; 2] =
        [Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3)];
    pub const BRIDGE_PODS_V6: [Ipv6Addr; 2] = [
        Ipv6Addr::new(0xfd10, 0x244, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0xfd10, 0x244, 0, 0, 0, 0, 0, 3),
    ];
    /// flannel.1's address: the network address of the node's pod subnet.
    pub const FLANNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);
    /// Flannel's VXLAN port (Linux's default, 8472, not IANA's 4789).
    pub const VXLAN_PORT: u16 = 8472;

    /// The Services' port, and the fake server's.
    pub const SERVICE_PORT: u16 = 80;
    /// A Service whose endpoint is the metadata address.
    pub const CLUSTER_IP_METADATA_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    pub const CLUSTER_IP_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0x96, 0, 0, 0, 0, 0, 0x10);
    /// A Service whose endpoint is the ordinary upstream server.
    pub const CLUSTER_IP_ORDINARY_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    pub const CLUSTER_IP_ORDINARY_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0x96, 0, 0, 0, 0, 0, 0x11);

    /// (ClusterIP, endpoint) pairs the node DNATs, on `SERVICE_PORT`.
    pub const SERVICES: [(IpAddr, IpAddr); 4] = [
        (IpAddr::V4(CLUSTER_IP_METADATA_V4), IpAddr::V4(METADATA_V4)),
        (IpAddr::V4(CLUSTER_IP_ORDINARY_V4), IpAddr::V4(SERVER_V4)),
        (IpAddr::V6(CLUSTER_IP_METADATA_V6), IpAddr::V6(METADATA_V6)),
        (IpAddr::V6(CLUSTER_IP_ORDINARY_V6), IpAddr::V6(SERVER_V6)),
    ];

    /// (endpoint, ClusterIP) of the metadata Service, each family.
    pub const METADATA_SERVICES: [(IpAddr, IpAddr); 2] = [
        (IpAddr::V4(METADATA_V4), IpAddr::V4(CLUSTER_IP_METADATA_V4)),
        (IpAddr::V6(METADATA_V6), IpAddr::V6(CLUSTER_IP_METADATA_V6)),
    ];
    /// (endpoint, ClusterIP) of the ordinary Service, each family.
    pub const ORDINARY_SERVICES: [(IpAddr, IpAddr); 2] = [
        (IpAddr::V4(SERVER_V4), IpAddr::V4(CLUSTER_IP_ORDINARY_V4)),
        (IpAddr::V6(SERVER_V6), IpAddr::V6(CLUSTER_IP_ORDINARY_V6)),
    ];

    /// The node's uplink address of `dest`'s family: what upstream sees as
    /// the source of masqueraded traffic.
    pub fn node_uplink_for(dest: IpAddr) -> IpAddr {
        if dest.is_ipv4() {
            NODE_UPLINK_V4.into()
        } else {
            NODE_UPLINK_V6.into()
        }
    }
}

/// The pod's interface, in every shape.
pub const POD_IF: &str = "eth0";
/// The node's interface to upstream, where it masquerades.
pub const NODE_UPLINK_IF: &str = "uplink";
const UPSTREAM_UPLINK_IF: &str = "nodelink";
pub const BRIDGE_IF: &str = "cni0";
pub const VXLAN_IF: &str = "flannel.1";
const FLANNEL_VNI: &str = "1";
/// What Calico gives its host-side veths, so every pod sees one gateway MAC.
const CALICO_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// Which node a shape imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Calico, Cilium (legacy routing), AWS VPC CNI: one veth per pod, a
    /// host route to the pod's /32, a link-local gateway by proxy ARP.
    RoutedVeth,
    /// Flannel (also Canal, RKE2, k3s): pods on the bridge cni0, and a
    /// VXLAN device flannel.1 that decapsulates what arrives on UDP 8472.
    BridgeVxlan,
    /// Shape A with an eBPF CNI's data path: a tc program on the pod's veth
    /// redirects its traffic to the uplink (`bpf_redirect_neigh`), past the
    /// node's netfilter; Service addresses are left to netfilter's DNAT.
    RedirectPastNetfilter,
}

/// A pod's namespace and what a client in it needs to know.
pub struct Pod {
    pub netns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// `eth0`'s MAC, and the MAC of the next hop on it (the node's veth or
    /// the bridge), for hand-built frames.
    pub mac: String,
    pub gateway_mac: String,
}

impl Pod {
    /// A client in this pod (no cgroup: nothing enforces here yet).
    /// A client in the pod's namespace and in `cgroup` (its container's).
    pub fn probe_in<'a>(&'a self, cgroup: &'a std::path::Path) -> Probe<'a> {
        Probe {
            netns: &self.netns,
            cgroup: Some(cgroup),
        }
    }

    pub fn probe(&self) -> Probe<'_> {
        Probe {
            netns: &self.netns,
            cgroup: None,
        }
    }

    /// The pod's own address of `dest`'s family.
    pub fn addr_for(&self, dest: IpAddr) -> IpAddr {
        if dest.is_ipv4() {
            self.v4.into()
        } else {
            self.v6.into()
        }
    }

    /// `imds-probe packet-raw|packet-dgram` options that send from this pod
    /// to `dest` straight onto `eth0`, addressed to the gateway's MAC.
    pub fn packet_args(&self, dest: IpAddr) -> Vec<String> {
        self.packet_args_from(self.addr_for(dest))
    }

    /// As [`Pod::packet_args`], with `source` written as the frame's source
    /// address (another pod's, to spoof it).
    pub fn packet_args_from(&self, source: IpAddr) -> Vec<String> {
        packet_args(POD_IF, &self.gateway_mac, &self.mac, source)
    }
}

/// `imds-probe packet-*` options: the device, the next hop's MAC, our own,
/// and the source address to write.
fn packet_args(dev: &str, gateway_mac: &str, mac: &str, source: IpAddr) -> Vec<String> {
    [
        "--dev",
        dev,
        "--gateway-mac",
        gateway_mac,
        "--source-mac",
        mac,
        "--source",
        &source.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The cloud side: the fake server and the sniffer's namespace.
pub struct Upstream {
    // Declared first so it is killed before its namespace goes.
    _server: Server,
    pub netns: Netns,
}

/// One (source, destination) pair upstream saw, with its packet count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub source: IpAddr,
    pub dest: IpAddr,
    pub packets: u64,
}

/// The sniffer: a raw-priority prerouting chain (before conntrack and any
/// NAT of upstream's own) that adds each packet's addresses to a set, with
/// a counter per element the update statement attaches (a set-wide
/// `counter;` needs Linux 5.11). It records every flow, not only those a test
/// thought to watch for. Neighbour discovery is left out: it never crosses
/// a router, and the node answers upstream's solicitations, sent from
/// whichever upstream address the queued reply had, to that address.
const SNIFFER_RULESET: &str = "
table inet sniffer {
    set seen4 { type ipv4_addr . ipv4_addr; flags dynamic; size 65535; }
    set seen6 { type ipv6_addr . ipv6_addr; flags dynamic; size 65535; }
    chain arrivals {
        type filter hook prerouting priority raw; policy accept;
        icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept
        meta nfproto ipv4 update @seen4 { ip saddr . ip daddr counter }
        meta nfproto ipv6 update @seen6 { ip6 saddr . ip6 daddr counter }
    }
}
";

impl Upstream {
    /// Every flow that has arrived so far.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let mut flows = Vec::new();
        for set in ["seen4", "seen6"] {
            let listing = self
                .netns
                .exec("nft", &["-j", "list", "set", "inet", "sniffer", set])?;
            flows.extend(parse_flows(&listing)?);
        }
        Ok(flows)
    }

    /// Packets that have arrived for `dest`, from `source` or from anyone.
    pub fn packets(&self, source: Option<IpAddr>, dest: IpAddr) -> Result<u64> {
        Ok(self
            .flows()?
            .iter()
            .filter(|f| f.dest == dest && source.is_none_or(|s| s == f.source))
            .map(|f| f.packets)
            .sum())
    }
}

/// Reads `nft -j list set`'s elements: `{"elem": {"val": {"concat":
/// [source, dest]}, "counter": {"packets": N, ...}}}`.
fn parse_flows(listing: &str) -> Result<Vec<Flow>> {
    let unreadable = |why: &str| SandboxError::Process(format!("sniffer set {why}: {listing}"));
    let json: serde_json::Value =
        serde_json::from_str(listing).map_err(|e| unreadable(&e.to_string()))?;
    let sets = json
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| unreadable("without `nftables`"))?;
    let mut flows = Vec::new();
    for element in sets
        .iter()
        .filter_map(|item| item.pointer("/set/elem")?.as_array())
        .flatten()
    {
        let addr = |i: usize| -> Option<IpAddr> {
            element
                .pointer(&format!("/elem/val/concat/{i}"))?
                .as_str()?
                .parse()
                .ok()
        };
        let (Some(source), Some(dest), Some(packets)) = (
            addr(0),
            addr(1),
            element
                .pointer("/elem/counter/packets")
                .and_then(serde_json::Value::as_u64),
        ) else {
            return Err(unreadable("element unreadable"));
        };
        flows.push(Flow {
            source,
            dest,
            packets,
        });
    }
    Ok(flows)
}

/// A node-shaped sandbox. Fields drop in order: pods, node, upstream.
pub struct NodeShape {
    pub shape: Shape,
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub upstream: Upstream,
}

/// A namespace for a shape: DAD off, so addresses (and the link-local ones
/// the kernel adds) are usable at once rather than after a second or so.
fn namespace(tag: &str) -> Result<Netns> {
    let ns = Netns::create(tag)?;
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
    }
    Ok(ns)
}

/// `ip addr add` with the right prefix for a host address of either family.
fn add_host_addr(ns: &Netns, addr: IpAddr, dev: &str) -> Result<()> {
    let prefix = match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    };
    ns.ip(&["addr", "add", &prefix, "dev", dev])?;
    Ok(())
}

/// Gives `dev` an address on a /24 and a /64, and brings it up.
fn add_subnet_addrs(
    ns: &Netns,
    dev: &str,
    v4: impl std::fmt::Display,
    v6: impl std::fmt::Display,
) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev])?;
    ns.ip(&["link", "set", dev, "up"])?;
    Ok(())
}

/// Loads an nftables ruleset into the namespace.
fn load_nft(ns: &Netns, tag: &str, ruleset: &str) -> Result<()> {
    let file = TempFile::new(tag, ruleset)?;
    ns.exec("nft", &["-f", &file.arg()])?;
    Ok(())
}

/// A veth pair made from inside `inside` (so no name is ever taken in the
/// host's namespace), its peer moved straight into `outside`.
fn veth(inside: &Netns, inside_if: &str, outside: &Netns, outside_if: &str) -> Result<()> {
    inside.ip(&[
        "link",
        "add",
        inside_if,
        "type",
        "veth",
        "peer",
        "name",
        outside_if,
        "netns",
        outside.name(),
    ])?;
    Ok(())
}

/// One field of `ip -j [-s] link show dev DEV`'s only entry.
fn link_field(ns: &Netns, dev: &str, stats: bool, pointer: &str) -> Result<serde_json::Value> {
    let mut args = vec!["-j"];
    if stats {
        args.push("-s");
    }
    args.extend(["link", "show", "dev", dev]);
    let text = ns.ip(&args)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| SandboxError::Process(format!("ip -j link show {dev}: {e}: {text}")))?;
    json.pointer(&format!("/0{pointer}"))
        .cloned()
        .ok_or_else(|| SandboxError::Process(format!("ip -j link show {dev}: no {pointer}")))
}

/// A device's MAC address.
pub fn link_mac(ns: &Netns, dev: &str) -> Result<String> {
    link_field(ns, dev, false, "/address")?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| SandboxError::Process(format!("{dev}'s address is not text")))
}

/// Packets a device has received: what proves a frame went through it.
pub fn link_rx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    link_field(ns, dev, true, "/stats64/rx/packets")?
        .as_u64()
        .ok_or_else(|| SandboxError::Process(format!("{dev}'s rx packets is not a number")))
}

/// kube-proxy's part, in nftables: each ClusterIP rewritten (DNAT) to its endpoint
/// (TCP and UDP), and masquerade of everything leaving through the uplink,
/// as a node without a cloud-routable pod network does.
fn node_ruleset() -> String {
    let mut services = String::new();
    for (cluster_ip, endpoint) in addrs::SERVICES {
        let (family, to) = match endpoint {
            IpAddr::V4(a) => ("ip", a.to_string()),
            IpAddr::V6(a) => ("ip6", format!("[{a}]")),
        };
        let port = addrs::SERVICE_PORT;
        // Writing to a String cannot fail.
        let _ = writeln!(
            services,
            "        {family} daddr {cluster_ip} meta l4proto {{ tcp, udp }} th dport {port} \
             dnat {family} to {to}:{port}"
        );
    }
    format!(
        "table inet kube-proxy-like {{
    chain services {{
        type nat hook prerouting priority dstnat; policy accept;
{services}    }}
    chain uplink_snat {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"{NODE_UPLINK_IF}\" masquerade
    }}
}}
"
    )
}

/// The node and upstream namespaces, joined by the uplink, upstream with
/// its addresses, sniffer and server, the node forwarding and translating.
fn node_and_upstream() -> Result<(Netns, Upstream)> {
    let node = namespace("node")?;
    let upstream = namespace("up")?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    // Loose reverse-path filtering, as most node images set it (strict
    // breaks asymmetric CNI routes; the value is inherited from the host
    // for IPv4, so it is set rather than assumed).
    for scope in ["all", "default"] {
        node.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "2")?;
    }

    veth(&node, NODE_UPLINK_IF, &upstream, UPSTREAM_UPLINK_IF)?;
    for (ns, dev, v4, v6) in [
        (
            &node,
            NODE_UPLINK_IF,
            addrs::NODE_UPLINK_V4,
            addrs::NODE_UPLINK_V6,
        ),
        (
            &upstream,
            UPSTREAM_UPLINK_IF,
            addrs::UPSTREAM_UPLINK_V4,
            addrs::UPSTREAM_UPLINK_V6,
        ),
    ] {
        add_subnet_addrs(ns, dev, v4, v6)?;
    }
    // The node reaches everything, the metadata address included, through
    // its default gateway, as on a cloud VM.
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        &addrs::UPSTREAM_UPLINK_V4.to_string(),
    ])?;
    node.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &addrs::UPSTREAM_UPLINK_V6.to_string(),
    ])?;
    load_nft(&node, "node-nft", &node_ruleset())?;

    // Every address the harness's server binds, the metadata ones included,
    // on the uplink itself (kernels built without the dummy device exist).
    for addr in crate::netns::addrs::server_addrs() {
        add_host_addr(&upstream, addr, UPSTREAM_UPLINK_IF)?;
    }
    upstream.ip(&[
        "route",
        "add",
        addrs::POD_CIDR_V4,
        "via",
        &addrs::NODE_UPLINK_V4.to_string(),
    ])?;
    upstream.ip(&[
        "-6",
        "route",
        "add",
        addrs::POD_CIDR_V6,
        "via",
        &addrs::NODE_UPLINK_V6.to_string(),
    ])?;
    load_nft(&upstream, "sniffer-nft", SNIFFER_RULESET)?;
    let server = Server::start(&upstream, &[addrs::SERVICE_PORT])?;
    Ok((
        node,
        Upstream {
            _server: server,
            netns: upstream,
        },
    ))
}

/// One attempt for [`NodeShape::attempt`]: the probe's action, its target,
/// its extra arguments (on [`addrs::SERVICE_PORT`]).
pub type Attempt<'a> = (&'a str, IpAddr, &'a [String]);

impl NodeShape {
    /// Makes one attempt from `client` and returns what it ended with and
    /// the packets upstream saw arrive at `seen_at` during it, from
    /// `source` and from anyone.
    ///
    /// # Panics
    /// When the probe or the sniffer cannot be run.
    pub fn attempt(
        &self,
        client: &Probe,
        (action, target, extra): Attempt,
        seen_at: IpAddr,
        source: IpAddr,
    ) -> (Outcome, u64, u64) {
        let counts = || {
            (
                self.upstream
                    .packets(Some(source), seen_at)
                    .expect("sniffer"),
                self.upstream.packets(None, seen_at).expect("sniffer"),
            )
        };
        let before = counts();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let result = client
            .attempt(action, target, addrs::SERVICE_PORT, &extra)
            .expect("probe");
        let after = counts();
        (result.outcome, after.0 - before.0, after.1 - before.1)
    }

    /// The attempt reached the server at `seen_at` through the node: the
    /// client got its echo, and upstream saw packets from `source` only (the
    /// node's uplink address after SNAT; the pod's own where netfilter is
    /// bypassed).
    ///
    /// # Panics
    /// When it did not.
    pub fn assert_arrives_from(
        &self,
        client: &Probe,
        attempt: Attempt,
        seen_at: IpAddr,
        source: IpAddr,
    ) {
        let (action, target, extra) = attempt;
        let (outcome, from_source, from_anyone) = self.attempt(client, attempt, seen_at, source);
        assert_eq!(
            outcome,
            Outcome::Reached,
            "{action} {target} {extra:?} from {}",
            client.netns.name()
        );
        assert!(
            from_source > 0,
            "{action} {target}: upstream saw nothing from {source} arrive at {seen_at}: {:?}",
            self.upstream.flows()
        );
        assert_eq!(
            from_source,
            from_anyone,
            "{action} {target}: packets arrived at {seen_at} from other sources than {source}: {:?}",
            self.upstream.flows()
        );
    }

    /// The attempt did not reach `seen_at`: the client got no answer, and
    /// upstream saw no packet at all arrive there during it. Returns what
    /// the client saw.
    ///
    /// # Panics
    /// When something arrived.
    pub fn assert_never_arrives(
        &self,
        client: &Probe,
        attempt: Attempt,
        seen_at: IpAddr,
    ) -> Outcome {
        let (action, target, extra) = attempt;
        let any = addrs::node_uplink_for(seen_at);
        let (outcome, _, from_anyone) = self.attempt(client, attempt, seen_at, any);
        assert_eq!(
            from_anyone,
            0,
            "{action} {target} {extra:?} from {}: {from_anyone} packets arrived at {seen_at}: {:?}",
            client.netns.name(),
            self.upstream.flows()
        );
        assert_ne!(
            outcome,
            Outcome::Reached,
            "{action} {target} {extra:?} from {}: the client got an answer",
            client.netns.name()
        );
        outcome
    }

    /// The source upstream sees for `pod`'s traffic to `dest` that is no
    /// Service: the node's uplink after its masquerade, or, where the
    /// redirect program hands it to the uplink past netfilter, the pod's own.
    pub fn source_past_node(&self, pod: &Pod, dest: IpAddr) -> IpAddr {
        if self.shape == Shape::RedirectPastNetfilter {
            pod.addr_for(dest)
        } else {
            addrs::node_uplink_for(dest)
        }
    }

    /// Ordinary traffic from `pod` arrives, both families: directly (TCP
    /// and UDP) and through the ordinary Service, whose ClusterIP never
    /// leaves the node (DNAT happened there).
    ///
    /// # Panics
    /// When it does not.
    pub fn assert_ordinary_routes(&self, pod: &Pod) {
        let client = pod.probe();
        for (server, cluster_ip) in addrs::ORDINARY_SERVICES {
            let direct = self.source_past_node(pod, server);
            self.assert_arrives_from(&client, ("tcp", server, &[]), server, direct);
            self.assert_arrives_from(&client, ("udp", server, &[]), server, direct);
            self.assert_arrives_from(
                &client,
                ("tcp", cluster_ip, &[]),
                server,
                addrs::node_uplink_for(server),
            );
            assert_eq!(
                self.upstream.packets(None, cluster_ip).expect("sniffer"),
                0,
                "a ClusterIP reached upstream"
            );
        }
    }

    /// The first (in the routed shape, only) pod.
    pub fn pod(&self) -> &Pod {
        &self.pods[0]
    }

    /// Shape A, routed veth (Calico style):
    /// - pod: `eth0` `10.244.1.2/32` and `fd10:244:1::2/128`; default
    ///   routes via `169.254.1.1` (on-link) and `fe80::1`;
    /// - node: `calipod1` (MAC `ee:ee:ee:ee:ee:ee`, no IPv4 address, proxy
    ///   ARP, `fe80::1`), host routes to the pod's /32 and /128 over it;
    ///   `uplink` `198.19.0.1/24`, `fd99:19::1/64`, default routes to
    ///   upstream;
    /// - upstream: `nodelink` `198.19.0.2/24`, `fd99:19::2/64` and the
    ///   server addresses (`198.18.0.2`, `fd99:1::2`, `169.254.169.254`,
    ///   `169.254.170.23`, `fd00:ec2::254`), routes to the pod network via
    ///   the node.
    pub fn routed_veth() -> Result<NodeShape> {
        NodeShape::routed(Shape::RoutedVeth)
    }

    /// Shape C: shape A, plus the redirect program (`crate::redirect`) on
    /// tc ingress (clsact) of `calipod1`, to `uplink`. Pod traffic to
    /// anything but a Service, the gateway's link-local address or IPv6
    /// multicast leaves unmasqueraded: upstream sees the pod's source.
    pub fn redirect_past_netfilter() -> Result<NodeShape> {
        NodeShape::routed(Shape::RedirectPastNetfilter)
    }

    fn routed(shape: Shape) -> Result<NodeShape> {
        let (node, upstream) = node_and_upstream()?;
        let pod_ns = namespace("pod")?;
        let node_if = "calipod1";
        veth(&pod_ns, POD_IF, &node, node_if)?;
        node.ip(&["link", "set", node_if, "address", CALICO_VETH_MAC])?;
        node.sysctl(&format!("net.ipv4.conf.{node_if}.proxy_arp"), "1")?;
        // Answer ARP at once, not after up to 0.8 s (Calico sets it too).
        node.sysctl(&format!("net.ipv4.neigh.{node_if}.proxy_delay"), "0")?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", addrs::ROUTED_GATEWAY_V6),
            "dev",
            node_if,
        ])?;
        node.ip(&["link", "set", node_if, "up"])?;
        for pod in [
            IpAddr::V4(addrs::ROUTED_POD_V4),
            IpAddr::V6(addrs::ROUTED_POD_V6),
        ] {
            node.ip(&["route", "add", &pod.to_string(), "dev", node_if])?;
        }

        add_host_addr(&pod_ns, addrs::ROUTED_POD_V4.into(), POD_IF)?;
        add_host_addr(&pod_ns, addrs::ROUTED_POD_V6.into(), POD_IF)?;
        pod_ns.ip(&["link", "set", POD_IF, "up"])?;
        let gateway_v4 = addrs::ROUTED_GATEWAY_V4.to_string();
        pod_ns.ip(&["route", "add", &gateway_v4, "dev", POD_IF, "scope", "link"])?;
        pod_ns.ip(&["route", "add", "default", "via", &gateway_v4, "dev", POD_IF])?;
        let gateway_v6 = addrs::ROUTED_GATEWAY_V6.to_string();
        pod_ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_v6,
            "dev",
            POD_IF,
        ])?;

        if shape == Shape::RedirectPastNetfilter {
            let uplink = link_field(&node, NODE_UPLINK_IF, false, "/ifindex")?
                .as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| SandboxError::Process("uplink has no ifindex".to_owned()))?;
            crate::redirect::attach(&node, node_if, uplink)?;
        }

        let pod = Pod {
            mac: link_mac(&pod_ns, POD_IF)?,
            gateway_mac: link_mac(&node, node_if)?,
            netns: pod_ns,
            v4: addrs::ROUTED_POD_V4,
            v6: addrs::ROUTED_POD_V6,
        };
        Ok(NodeShape {
            shape,
            pods: vec![pod],
            node,
            upstream,
        })
    }

    /// Shape B, bridge plus VXLAN (flannel style):
    /// - pods `pod` and `pod2`: `eth0` `10.244.0.2/24` (`.3`) and
    ///   `fd10:244::2/64` (`::3`), default routes via `cni0`;
    /// - node: bridge `cni0` `10.244.0.1/24`, `fd10:244::1/64` with the
    ///   pods' `vethpod1`, `vethpod2`; `flannel.1` (VXLAN VNI 1, UDP 8472,
    ///   local `198.19.0.1` over `uplink`) `10.244.0.0/32`; uplink as in
    ///   shape A;
    /// - upstream as in shape A.
    pub fn bridge_vxlan() -> Result<NodeShape> {
        let (node, upstream) = node_and_upstream()?;
        node.ip(&["link", "add", BRIDGE_IF, "type", "bridge"])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", addrs::BRIDGE_V4),
            "dev",
            BRIDGE_IF,
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", addrs::BRIDGE_V6),
            "dev",
            BRIDGE_IF,
        ])?;
        node.ip(&["link", "set", BRIDGE_IF, "up"])?;

        let mut pods = Vec::new();
        for (i, (v4, v6)) in addrs::BRIDGE_PODS_V4
            .into_iter()
            .zip(addrs::BRIDGE_PODS_V6)
            .enumerate()
        {
            let pod_ns = namespace(if i == 0 { "pod" } else { "pod2" })?;
            let node_if = format!("vethpod{}", i + 1);
            veth(&pod_ns, POD_IF, &node, &node_if)?;
            node.ip(&["link", "set", &node_if, "master", BRIDGE_IF, "up"])?;
            add_subnet_addrs(&pod_ns, POD_IF, v4, v6)?;
            pod_ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &addrs::BRIDGE_V4.to_string(),
            ])?;
            pod_ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addrs::BRIDGE_V6.to_string(),
            ])?;
            pods.push((pod_ns, v4, v6));
        }

        node.ip(&[
            "link",
            "add",
            VXLAN_IF,
            "type",
            "vxlan",
            "id",
            FLANNEL_VNI,
            "local",
            &addrs::NODE_UPLINK_V4.to_string(),
            "dev",
            NODE_UPLINK_IF,
            "dstport",
            &addrs::VXLAN_PORT.to_string(),
            "nolearning",
        ])?;
        add_host_addr(&node, addrs::FLANNEL_V4.into(), VXLAN_IF)?;
        node.ip(&["link", "set", VXLAN_IF, "up"])?;

        // The bridge takes its MAC from its ports: read it once they are in.
        let gateway_mac = link_mac(&node, BRIDGE_IF)?;
        let pods = pods
            .into_iter()
            .map(|(netns, v4, v6)| {
                Ok(Pod {
                    mac: link_mac(&netns, POD_IF)?,
                    gateway_mac: gateway_mac.clone(),
                    netns,
                    v4,
                    v6,
                })
            })
            .collect::<Result<Vec<Pod>>>()?;
        Ok(NodeShape {
            shape: Shape::BridgeVxlan,
            pods,
            node,
            upstream,
        })
    }

    /// A client in the node's own namespace: a hostNetwork pod (no cgroup
    /// yet).
    pub fn host_network_probe(&self) -> Probe<'_> {
        Probe {
            netns: &self.node,
            cgroup: None,
        }
    }

    /// `imds-probe packet-raw|packet-dgram` options that send from a
    /// hostNetwork pod straight onto the node's uplink, to upstream's MAC,
    /// from the node's uplink address.
    pub fn host_network_packet_args(&self, dest: IpAddr) -> Result<Vec<String>> {
        Ok(packet_args(
            NODE_UPLINK_IF,
            &link_mac(&self.upstream.netns, UPSTREAM_UPLINK_IF)?,
            &link_mac(&self.node, NODE_UPLINK_IF)?,
            addrs::node_uplink_for(dest),
        ))
    }

    /// `imds-probe vxlan` options that send, from `pod`, a VXLAN datagram to
    /// the node's flannel port whose inner frame is addressed to flannel.1
    /// and carries a UDP datagram to `dest` (the probe's ADDR; IPv4 or
    /// IPv6) from the pod's address of that family, or from `inner_source`
    /// (spoofed).
    pub fn vxlan_args(
        &self,
        pod: &Pod,
        dest: IpAddr,
        inner_source: Option<IpAddr>,
    ) -> Result<Vec<String>> {
        if self.shape != Shape::BridgeVxlan {
            return Err(SandboxError::Process(format!(
                "{:?} has no VXLAN device",
                self.shape
            )));
        }
        let mut args = vec![
            "--vtep".to_owned(),
            format!("{}:{}", addrs::NODE_UPLINK_V4, addrs::VXLAN_PORT),
            "--inner-mac".to_owned(),
            link_mac(&self.node, VXLAN_IF)?,
            "--source".to_owned(),
            pod.addr_for(dest).to_string(),
        ];
        if let Some(spoofed) = inner_source {
            args.extend(["--inner-source".to_owned(), spoofed.to_string()]);
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sniffer_elements() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet",
            "name": "seen4", "elem": [{"elem": {"val": {"concat": ["198.19.0.1", "198.18.0.2"]},
            "counter": {"packets": 4, "bytes": 200}}}]}}]}"#;
        assert_eq!(
            parse_flows(listing).unwrap(),
            [Flow {
                source: "198.19.0.1".parse().unwrap(),
                dest: "198.18.0.2".parse().unwrap(),
                packets: 4
            }]
        );
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "seen6"}}]}"#;
        assert!(parse_flows(empty).unwrap().is_empty());
    }

    #[test]
    fn node_ruleset_dnats_each_service() {
        let ruleset = node_ruleset();
        assert!(ruleset.contains(
            "ip daddr 10.96.0.10 meta l4proto { tcp, udp } th dport 80 dnat ip to 169.254.169.254:80"
        ));
        assert!(ruleset.contains("dnat ip6 to [fd00:ec2::254]:80"));
        assert!(ruleset.contains("oifname \"uplink\" masquerade"));
    }
}
