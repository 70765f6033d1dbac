//! `imds-guard status`: what is enforced, read from the pins, with or
//! without the daemon running. Pod names come from the daemon when it is
//! reachable; otherwise cgroups are shown by path and pod UID.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    bpf::{
        BpfError,
        edge::{self, Interface, Role, TC_HANDLE, TC_PRIORITY},
        maps::{Access, CgroupAllowMap, CountersMap, DestRulesMap, DroppedEvents},
        pins::{self, PinError, PinRoot},
    },
    config::rules::Rule,
    host::{cgroup, identity::identify, netlink::RouteSocket},
    report::{events::PodIndex, http},
};
use enforcer_common::{FORWARDED_KEY, names};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("nothing is installed under {0} (no complete generation of pins)")]
    NotInstalled(PathBuf),
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub bpffs_dir: PathBuf,
    pub generation: String,
    pub mode: &'static str,
    pub protected_cgroup_id: u64,
    pub protected_cgroup: Option<PathBuf>,
    /// Program name -> whether its pinned link is attached.
    pub programs: BTreeMap<&'static str, bool>,
    pub rules: Vec<String>,
    pub allowed: Vec<CgroupEntry>,
    /// Listed cgroups whose attempts are audited (a namespace in audit mode).
    pub audited: Vec<CgroupEntry>,
    pub counters: Vec<CounterEntry>,
    pub events_dropped: u64,
    /// Whether pod names came from a running daemon.
    pub daemon_reachable: bool,
    pub node_edge_guard: EdgeStatus,
}

/// The node edge guard as the kernel has it in this network namespace.
#[derive(Debug, Serialize)]
pub struct EdgeStatus {
    /// `interface: role` for each of our attachments.
    pub attached: Vec<String>,
    /// The routes to denied destinations besides pod sockets, and whether
    /// this node closes each one.
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug, Serialize)]
pub struct RouteEntry {
    pub route: &'static str,
    pub what: &'static str,
    pub guarded: bool,
}

/// Reads where our tc programs are attached (an unreadable network counts
/// as none: every route is then reported open).
pub(crate) fn edge_status(root: &PinRoot, generation: &str) -> EdgeStatus {
    let attached = RouteSocket::open()
        .and_then(|mut socket| {
            let interfaces: Vec<Interface> = socket
                .links()?
                .into_iter()
                .map(|l| Interface {
                    index: l.index,
                    name: l.name,
                })
                .collect();
            let mut has_filter = |ifindex, egress| {
                socket
                    .has_filter(ifindex, egress, TC_HANDLE.into(), TC_PRIORITY)
                    .unwrap_or(false)
            };
            Ok(edge::attached(
                &root.tc_link_dir(),
                &interfaces,
                &mut has_filter,
            ))
        })
        .unwrap_or_default();
    let running = attached.iter().any(|(role, _)| *role == Role::Uplink);
    EdgeStatus {
        attached: attached
            .iter()
            .map(|(role, interface)| format!("{}: {}", interface.name, role.name()))
            .collect(),
        routes: edge::routes(running, pins::lsm_attached(root, generation))
            .into_iter()
            .map(|r| RouteEntry {
                route: r.route,
                what: r.what,
                guarded: r.guarded,
            })
            .collect(),
    }
}

#[derive(Debug, Serialize)]
pub struct CgroupEntry {
    pub cgroup_id: u64,
    pub cgroup: Option<PathBuf>,
    pub pod_uid: Option<String>,
    /// `namespace/name`, when the daemon could tell.
    pub pod: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CounterEntry {
    #[serde(flatten)]
    pub cgroup: CgroupEntry,
    pub connect: u64,
    pub sendmsg: u64,
    pub egress: u64,
}

/// This node's pods by UID, from `/pods` on the daemon's node-local socket.
fn daemon_pods(socket: &Path) -> Option<PodIndex> {
    let (status, body) = http::get_node_local(socket, "/pods").ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

struct Namer {
    root: Option<PathBuf>,
    pods: Option<PodIndex>,
}

impl Namer {
    fn entry(&self, cgroup_id: u64) -> CgroupEntry {
        // Forwarded packets are counted by interface, not by cgroup.
        let path = (cgroup_id & FORWARDED_KEY == 0)
            .then(|| {
                self.root
                    .as_deref()
                    .and_then(|root| cgroup::find_by_id(root, cgroup_id))
            })
            .flatten();
        let pod_uid = path.as_deref().and_then(identify).map(|id| id.pod_uid);
        let pod = pod_uid.as_ref().and_then(|uid| {
            self.pods
                .as_ref()?
                .get(uid)
                .map(|(ns, name)| format!("{ns}/{name}"))
        });
        CgroupEntry {
            cgroup_id,
            cgroup: path,
            pod_uid,
            pod,
        }
    }
}

/// Reads the state of the complete generation under `bpffs_dir`.
pub fn read(
    bpffs_dir: &Path,
    cgroup_root: Option<&Path>,
    daemon: Option<&Path>,
) -> Result<Status, StatusError> {
    let root = PinRoot::new(bpffs_dir);
    let generation = root
        .generations()?
        .into_iter()
        .find(|g| g.complete)
        .ok_or_else(|| StatusError::NotInstalled(bpffs_dir.to_path_buf()))?
        .name;
    let key = pins::parse_generation(&generation)
        .ok_or_else(|| StatusError::NotInstalled(bpffs_dir.to_path_buf()))?;
    let pin = |map: &str| root.map_pin(&generation, map);
    let cgroup_root = cgroup_root
        .map(Path::to_path_buf)
        .or_else(|| cgroup::detect_cgroup2_mount().ok());
    let pods = daemon.and_then(daemon_pods);
    let namer = Namer {
        root: cgroup_root.clone(),
        pods,
    };
    let mut rules: Vec<(u8, String)> = DestRulesMap::from_pins(&pin)?
        .entries()?
        .into_iter()
        .filter_map(|(len, addr, value)| Rule::from_kernel(len, addr, &value))
        .map(|rule| (rule.prefix.prefix_len(), rule.to_string()))
        .collect();
    rules.sort();
    let (allowed, audited): (Vec<_>, Vec<_>) =
        CgroupAllowMap::from_pin(&pin(names::ALLOWED_CGROUPS))?
            .entries()?
            .into_iter()
            .partition(|(_, access)| *access == Access::Allow);
    let entries = |listed: Vec<(u64, Access)>| -> Vec<CgroupEntry> {
        listed.into_iter().map(|(id, _)| namer.entry(id)).collect()
    };
    let (allowed, audited) = (entries(allowed), entries(audited));
    let counters = CountersMap::from_pin(&pin(names::BLOCK_COUNTERS))?
        .read()?
        .into_iter()
        .map(|(id, c)| CounterEntry {
            cgroup: namer.entry(id),
            connect: c.connect,
            sendmsg: c.sendmsg,
            egress: c.egress,
        })
        .collect();
    Ok(Status {
        bpffs_dir: bpffs_dir.to_path_buf(),
        mode: key.mode.as_str(),
        protected_cgroup_id: key.cgroup_id,
        protected_cgroup: cgroup_root
            .as_deref()
            .and_then(|r| cgroup::find_by_id(r, key.cgroup_id)),
        programs: root.attached_programs(&generation),
        rules: rules.into_iter().map(|(_, r)| r).collect(),
        allowed,
        audited,
        counters,
        events_dropped: DroppedEvents::from_pin(&pin(names::EVENTS_DROPPED))?.total()?,
        daemon_reachable: namer.pods.is_some(),
        node_edge_guard: edge_status(&root, &generation),
        generation,
    })
}

fn describe(entry: &CgroupEntry) -> String {
    if entry.cgroup_id & FORWARDED_KEY != 0 {
        return format!(
            "forwarded, entered the node on interface {}",
            entry.cgroup_id & u64::from(u32::MAX)
        );
    }
    let path = entry.cgroup.as_ref().map_or_else(
        || format!("cgroup id {} (gone)", entry.cgroup_id),
        |p| p.display().to_string(),
    );
    match (&entry.pod, &entry.pod_uid) {
        (Some(pod), _) => format!("{pod}  ({path})"),
        (None, Some(uid)) => format!("pod {uid}  ({path})"),
        (None, None) => path,
    }
}

/// The human-readable form.
pub fn render(status: &Status) -> String {
    let attached = status.programs.values().filter(|a| **a).count();
    let protected = status.protected_cgroup.as_ref().map_or_else(
        || format!("cgroup id {}", status.protected_cgroup_id),
        |p| p.display().to_string(),
    );
    let programs: Vec<String> = status
        .programs
        .iter()
        .map(|(name, on)| format!("{name}{}", if *on { "" } else { " MISSING" }))
        .collect();
    let mut lines = vec![
        format!("pins        {}", status.bpffs_dir.display()),
        format!("generation  {}", status.generation),
        format!("mode        {}", status.mode),
        format!("protecting  {protected}"),
        format!(
            "programs    {attached} of {} attached ({})",
            status.programs.len(),
            programs.join(", ")
        ),
        "rules".to_owned(),
    ];
    lines.extend(status.rules.iter().map(|rule| format!("  {rule}")));
    lines.push(format!("allowed     {} cgroup(s)", status.allowed.len()));
    lines.extend(status.allowed.iter().map(|e| format!("  {}", describe(e))));
    if !status.audited.is_empty() {
        lines.push(format!("audited     {} cgroup(s)", status.audited.len()));
        lines.extend(status.audited.iter().map(|e| format!("  {}", describe(e))));
    }
    lines.push("attempts    connect sendmsg  egress  cgroup".to_owned());
    lines.extend(status.counters.iter().map(|c| {
        format!(
            "  {:>15} {:>7} {:>7}  {}",
            c.connect,
            c.sendmsg,
            c.egress,
            describe(&c.cgroup)
        )
    }));
    lines.push(format!("events dropped  {}", status.events_dropped));
    let edge = &status.node_edge_guard;
    lines.push(format!(
        "node edge guard  {}",
        if edge.attached.is_empty() {
            "not attached in this network namespace".to_owned()
        } else {
            edge.attached.join(", ")
        }
    ));
    lines.extend(edge.routes.iter().map(|r| {
        let state = if r.guarded { "closed" } else { "OPEN" };
        format!("  {state:<6}  {}", r.what)
    }));
    let unnamed_pods = status
        .allowed
        .iter()
        .chain(&status.audited)
        .chain(status.counters.iter().map(|c| &c.cgroup))
        .any(|e| e.pod_uid.is_some() && e.pod.is_none());
    if unnamed_pods && !status.daemon_reachable {
        lines.push("(daemon not reachable: pods shown by UID)".to_owned());
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}
