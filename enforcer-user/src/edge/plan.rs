//! Which interfaces the node edge guard attaches to and which pods'
//! interfaces it lets through, from what netlink says of the node (pure,
//! so it is tested without a kernel).
//!
//! - Uplinks: every interface a unicast route of any table sends some
//!   denied destination to (the default route included), so a packet to a
//!   metadata address leaves through a guarded interface whatever the
//!   table, policy rule or multipath choice.
//! - Pod interfaces: the node's end of each veth whose other end is in a
//!   namespace that holds an allowed pod's address. The address comes from
//!   the API server, the namespace from the kernel: a pod changing its own
//!   addresses (it needs CAP_NET_ADMIN for that) to claim another's makes
//!   the address ambiguous, and an ambiguous address lets nobody through.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::bpf::maps::InterfaceAccess;
use crate::{
    bpf::{
        edge::{EdgeTargets, Interface},
        maps::Access,
    },
    host::netlink::{Link, Route},
};

/// What the guard should look like on this node now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgePlan {
    pub targets: EdgeTargets,
    /// Allowed pods' addresses found in more than one namespace.
    pub ambiguous: BTreeSet<IpAddr>,
    /// Allowed pods' addresses found in no namespace behind a veth (yet).
    pub unplaced: BTreeSet<IpAddr>,
}

/// Whether two prefixes share an address.
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Computes the plan. `denied` are the deny rules' prefixes, `pods` the
/// allowed pods' addresses, `netns_addresses` the addresses of each
/// namespace a veth leads to.
pub fn plan(
    links: &[Link],
    routes: &[Route],
    denied: &[IpNet],
    pods: &BTreeMap<IpAddr, Access>,
    netns_addresses: &BTreeMap<i32, Vec<IpAddr>>,
) -> EdgePlan {
    let by_index: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let interface = |link: &Link| Interface {
        index: link.index,
        name: link.name.clone(),
    };
    let uplinks = routes
        .iter()
        .filter(|route| denied.iter().any(|d| overlap(d, &route.prefix)))
        .flat_map(|route| &route.interfaces)
        .filter_map(|index| by_index.get(index))
        .filter(|link| !link.loopback)
        .map(|link| interface(link))
        .collect();

    let mut owners: BTreeMap<IpAddr, BTreeSet<i32>> = BTreeMap::new();
    for (netnsid, addresses) in netns_addresses {
        for address in addresses.iter().filter(|a| pods.contains_key(a)) {
            owners.entry(*address).or_default().insert(*netnsid);
        }
    }
    let mut plan = EdgePlan {
        targets: EdgeTargets {
            uplinks,
            allowed: Some(InterfaceAccess::new()),
            ..EdgeTargets::default()
        },
        ..EdgePlan::default()
    };
    let mut netns_access: BTreeMap<i32, Access> = BTreeMap::new();
    let mut allowed = InterfaceAccess::new();
    for (address, access) in pods {
        match owners
            .get(address)
            .map(|o| o.iter().copied().collect::<Vec<_>>())
        {
            Some(only) if only.len() == 1 => {
                let entry = netns_access.entry(only[0]).or_insert(*access);
                // One namespace, two pods' addresses: the stricter wins.
                if *access == Access::Audit {
                    *entry = Access::Audit;
                }
            }
            Some(_) => {
                plan.ambiguous.insert(*address);
            }
            None => {
                plan.unplaced.insert(*address);
            }
        }
    }
    // A namespace that holds an ambiguous address is nobody's for sure.
    for address in &plan.ambiguous {
        for netnsid in owners.get(address).into_iter().flatten() {
            netns_access.remove(netnsid);
        }
    }
    for link in links {
        let Some(access) = link.peer_netnsid.and_then(|id| netns_access.get(&id)) else {
            continue;
        };
        allowed.insert(link.index, *access);
        if link
            .master
            .and_then(|m| by_index.get(&m))
            .is_some_and(|m| m.bridge)
        {
            plan.targets.bridge_ports.insert(interface(link));
        }
    }
    plan.targets.allowed = Some(allowed);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.to_owned(),
            ..Link::default()
        }
    }

    fn veth(index: u32, name: &str, netnsid: i32, master: Option<u32>) -> Link {
        Link {
            peer_netnsid: Some(netnsid),
            master,
            ..link(index, name)
        }
    }

    fn route(prefix: &str, interfaces: &[u32]) -> Route {
        Route {
            prefix: prefix.parse().unwrap(),
            interfaces: interfaces.to_vec(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn names(interfaces: &BTreeSet<Interface>) -> Vec<&str> {
        interfaces.iter().map(|i| i.name.as_str()).collect()
    }

    /// Routes seen on real nodes: which of their interfaces carry some
    /// denied destination.
    #[test]
    fn uplinks_are_the_interfaces_routes_to_denied_destinations_use() {
        let denied = nets(&[
            "169.254.169.254/32",
            "fd00:ec2::254/128",
            "168.63.129.16/32",
        ]);
        let links = [
            Link {
                loopback: true,
                ..link(1, "lo")
            },
            link(2, "ens5"),
            link(3, "ens6"),
            veth(4, "eni1a2b", 0, None),
            link(5, "vxlan.calico"),
            link(6, "cni0"),
        ];
        let cases: [(&str, Vec<Route>, Vec<&str>); 6] = [
            (
                "default route",
                vec![route("0.0.0.0/0", &[2])],
                vec!["ens5"],
            ),
            (
                "EKS: link-local host route and pod /32 routes",
                vec![
                    route("169.254.169.254/32", &[2]),
                    route("10.0.1.7/32", &[4]),
                    route("10.0.0.0/16", &[2]),
                ],
                vec!["ens5"],
            ),
            (
                "AWS VPC CNI: the second ENI's table has its own default",
                vec![route("0.0.0.0/0", &[2]), route("0.0.0.0/0", &[3])],
                vec!["ens5", "ens6"],
            ),
            (
                "multipath default",
                vec![route("0.0.0.0/0", &[2, 3])],
                vec!["ens5", "ens6"],
            ),
            (
                "IPv6 only via ens6; overlay and bridge routes carry none",
                vec![
                    route("::/0", &[3]),
                    route("10.244.1.0/24", &[5]),
                    route("10.244.0.0/24", &[6]),
                ],
                vec!["ens6"],
            ),
            (
                "a route on loopback is never a way out",
                vec![route("169.254.0.0/16", &[1])],
                vec![],
            ),
        ];
        for (name, routes, expected) in cases {
            let plan = plan(&links, &routes, &denied, &BTreeMap::new(), &BTreeMap::new());
            assert_eq!(names(&plan.targets.uplinks), expected, "{name}");
        }
    }

    #[test]
    fn allowed_pods_get_their_veths_and_bridge_ports_marks() {
        let links = [
            link(2, "uplink"),
            Link {
                bridge: true,
                ..link(3, "cni0")
            },
            veth(10, "vethpod1", 1, Some(3)),
            veth(11, "vethpod2", 2, Some(3)),
            veth(12, "calipod1", 3, None),
        ];
        let netns = BTreeMap::from([
            (
                1,
                vec![ip("10.244.0.2"), ip("fd10:244::2"), ip("127.0.0.1")],
            ),
            (2, vec![ip("10.244.0.3")]),
            (3, vec![ip("10.244.1.2")]),
        ]);
        let pods = BTreeMap::from([
            (ip("10.244.0.2"), Access::Allow),
            (ip("fd10:244::2"), Access::Allow),
            (ip("10.244.1.2"), Access::Audit),
            (ip("10.244.9.9"), Access::Allow),
        ]);
        let plan = plan(&links, &[], &[], &pods, &netns);
        assert_eq!(
            plan.targets.allowed.unwrap(),
            BTreeMap::from([(10, Access::Allow), (12, Access::Audit)])
        );
        assert_eq!(names(&plan.targets.bridge_ports), ["vethpod1"]);
        assert_eq!(plan.unplaced, BTreeSet::from([ip("10.244.9.9")]));
        assert!(plan.ambiguous.is_empty());
    }

    /// A blocked pod that adds an allowed pod's address to its own
    /// interface gains nothing: the address is ambiguous, and neither
    /// namespace is let through.
    #[test]
    fn an_address_claimed_twice_lets_nobody_through() {
        let links = [veth(10, "veth1", 1, None), veth(11, "veth2", 2, None)];
        let netns = BTreeMap::from([
            (1, vec![ip("10.244.0.2"), ip("10.244.0.5")]),
            (2, vec![ip("10.244.0.2")]),
        ]);
        let pods = BTreeMap::from([
            (ip("10.244.0.2"), Access::Allow),
            (ip("10.244.0.5"), Access::Allow),
        ]);
        let plan = plan(&links, &[], &[], &pods, &netns);
        assert!(
            plan.targets.allowed.as_ref().unwrap().is_empty(),
            "{:?}",
            plan.targets.allowed
        );
        assert_eq!(plan.ambiguous, BTreeSet::from([ip("10.244.0.2")]));
    }
}
