//! The node edge guard's task: keeps the tc programs attached to the
//! interfaces that route to denied destinations, and the allowed pods'
//! interfaces in the map, as links, routes, rules and allowed pods change.
//! It asks the kernel through routing netlink (`host::netlink`), decides with
//! [`plan`], and has the enforcer task, which owns the programs and maps,
//! apply the result.
//!
//! Routes this guard closes, and the ones it leaves open, are listed once
//! (`bpf::edge::routes`) for the log, the metrics and `status`.

use std::{collections::BTreeMap, net::IpAddr, os::fd::AsRawFd as _, sync::Arc, time::Duration};

use ipnet::IpNet;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    bpf::{
        edge::{Interface, TcHook, routes},
        maps::Access,
        owner::EnforcerHandle,
    },
    config::rules::{Action, RuleSet},
    host::netlink::{self, RouteSocket},
    report::metrics::{ErrorKind, Metrics},
};

pub mod plan;

use plan::EdgePlan;

/// Allowed pods' addresses (pod network only: a hostNetwork pod has the
/// node's) and what they may do.
pub type PodAddresses = BTreeMap<IpAddr, Access>;

/// Logs and records (metrics) which routes are guarded and which are open.
pub fn announce(hook: Option<TcHook>, lsm: bool, metrics: &Metrics) {
    let running = hook.is_some();
    for route in routes(running, lsm) {
        metrics.set_route_guarded(route.route, route.guarded);
    }
    if lsm {
        info!(
            "BPF LSM on socket_create: AF_PACKET and AF_XDP sockets of the protected subtree are refused unless allowlisted"
        );
    }
    let open: Vec<&str> = routes(running, lsm)
        .iter()
        .filter(|r| !r.guarded)
        .map(|r| r.what)
        .collect();
    if let Some(hook) = hook {
        info!(
            hook = hook.name(),
            open_routes = %open.join("; "),
            "node edge guard on: forwarded packets and hostNetwork AF_PACKET frames to denied \
             destinations are judged on egress of the uplinks; open routes, if any, need \
             refusePacketSockets (the bpf LSM)"
        );
    } else {
        warn!(
            open_routes = %open.join("; "),
            "node edge guard off (--node-guard=off): only pod sockets are judged"
        );
    }
}

/// The deny rules' prefixes: the destinations uplinks are chosen for.
pub fn denied_prefixes(rules: &RuleSet) -> Vec<IpNet> {
    rules
        .rules()
        .iter()
        .filter(|r| r.action == Action::Deny)
        .map(|r| r.prefix)
        .collect()
}

/// How long changes are gathered before one sync (a pod start brings a
/// burst of link and route messages).
const SETTLE: Duration = Duration::from_millis(50);
/// Resync at least this often: a missed netlink message (the socket
/// overflowed) is made good.
const RESYNC: Duration = Duration::from_secs(30);
/// Sooner while an allowed pod's address is in no namespace yet.
const RESYNC_UNPLACED: Duration = Duration::from_secs(1);

/// Reads what the plan needs from the kernel.
fn read_plan(denied: &[IpNet], pods: &PodAddresses) -> Result<EdgePlan, netlink::NetlinkError> {
    let mut socket = RouteSocket::open()?;
    let links = socket.links()?;
    let routes = socket.routes()?;
    let netnsids: std::collections::BTreeSet<i32> =
        links.iter().filter_map(|l| l.peer_netnsid).collect();
    let addresses = if pods.is_empty() {
        BTreeMap::new()
    } else {
        socket.addresses_by_netns(netnsids)?
    };
    Ok(plan::plan(&links, &routes, denied, pods, &addresses))
}

/// Runs the guard until the daemon stops.
pub async fn run(
    handle: EnforcerHandle,
    mut rules: watch::Receiver<RuleSet>,
    mut pods: watch::Receiver<Option<PodAddresses>>,
    metrics: Arc<Metrics>,
) {
    let changes = match RouteSocket::changes().and_then(|socket| {
        // SAFETY: the socket owns its descriptor until the AsyncFd drops it.
        unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| netlink::NetlinkError::Socket(e.into()))
    }) {
        Ok(changes) => Some(changes),
        Err(err) => {
            warn!("cannot follow link and route changes, resyncing every {RESYNC:?}: {err}");
            None
        }
    };
    let mut last: Option<EdgePlan> = None;
    loop {
        let denied = denied_prefixes(&rules.borrow_and_update());
        // `None`: the mode has not said yet which pods are allowed (before
        // Kubernetes mode's first sync); the pinned map stays as it was.
        let wanted = pods.borrow_and_update().clone();
        let known = wanted.is_some();
        let addresses = wanted.unwrap_or_default();
        let resync = match tokio::task::spawn_blocking(move || read_plan(&denied, &addresses)).await
        {
            Ok(Ok(mut plan)) => {
                if !known {
                    plan.targets.allowed = None;
                }
                let unplaced = !plan.unplaced.is_empty();
                if last.as_ref() != Some(&plan) {
                    apply(&handle, &plan, &metrics).await;
                    last = Some(plan);
                }
                if unplaced { RESYNC_UNPLACED } else { RESYNC }
            }
            Ok(Err(err)) => {
                metrics.count_error(ErrorKind::Edge);
                warn!("node edge guard: cannot read the node's network: {err}");
                RESYNC_UNPLACED
            }
            Err(_) => return,
        };
        tokio::select! {
            rules_changed = rules.changed() => if rules_changed.is_err() { return },
            pods_changed = pods.changed() => if pods_changed.is_err() { return },
            () = netlink_change(changes.as_ref()) => {}
            () = tokio::time::sleep(resync) => {}
        }
        tokio::time::sleep(SETTLE).await;
        drain(changes.as_ref());
    }
}

/// Has the enforcer apply `plan`, and reports what came of it.
async fn apply(handle: &EnforcerHandle, plan: &EdgePlan, metrics: &Metrics) {
    match handle.set_edge(plan.targets.clone()).await {
        Ok(attached) => {
            metrics.set_edge_interfaces("uplink", attached.uplinks.len());
            metrics.set_edge_interfaces("bridge_port", attached.bridge_ports.len());
            let names = |set: &std::collections::BTreeSet<Interface>| {
                set.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            info!(
                uplinks = %names(&attached.uplinks),
                bridge_ports = %names(&attached.bridge_ports),
                allowed_interfaces = plan.targets.allowed.as_ref().map_or(0, std::collections::BTreeMap::len),
                waiting_for_interface = plan.unplaced.len(),
                "node edge guard updated"
            );
            if attached.uplinks.is_empty() {
                warn!("node edge guard: no route to a denied destination, so no uplink to guard");
            }
            for address in &plan.ambiguous {
                warn!(%address, "an allowed pod's address is in more than one pod namespace: none of them is let through the node");
            }
            for failure in &attached.failures {
                metrics.count_error(ErrorKind::Edge);
                warn!("node edge guard: cannot attach to {failure}");
            }
        }
        Err(err) => {
            metrics.count_error(ErrorKind::Edge);
            warn!("node edge guard: {err}");
        }
    }
}

/// Waits until a link or route change arrives; forever without a socket.
async fn netlink_change(changes: Option<&AsyncFd<netlink_sys::Socket>>) {
    match changes {
        Some(fd) => {
            if let Ok(mut ready) = fd.readable().await {
                ready.clear_ready();
            }
        }
        None => std::future::pending().await,
    }
}

/// Empties the change socket: one sync covers everything in it.
fn drain(changes: Option<&AsyncFd<netlink_sys::Socket>>) {
    let Some(fd) = changes else {
        return;
    };
    let mut buffer = [0u8; 16 * 1024];
    // SAFETY: a plain non-blocking read into our buffer.
    while unsafe {
        libc::recv(
            fd.get_ref().as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
}
