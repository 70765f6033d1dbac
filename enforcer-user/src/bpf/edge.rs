//! The node edge guard's attachments: the uplink program on egress of the
//! interfaces that route to denied destinations, the bridge-port program
//! on ingress of allowlisted pods' bridge ports.
//!
//! The hook per kernel: tcx links from 6.6, placed first, so a CNI's own
//! tcx program that ends the chain (Cilium returns "pass") cannot skip us;
//! before 6.6, a clsact filter at preference 1 (run before other filters)
//! with a fixed handle. Both programs answer "no opinion" for what they do
//! not drop, so the CNI's programs after them still run. Attachments
//! outlive the daemon like the cgroup links do: a tcx link is pinned under
//! `<pin root>/tc/`, a clsact filter lives with its interface. A restart
//! swaps this generation's program in: `bpf_link_update` on a pinned link,
//! a replace of the filter with our handle; no moment without one.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use enforcer_common::names;

use super::{BpfError, maps::InterfaceAccess};
use crate::host::{kernel, netlink::RouteSocket};

/// An interface the guard attaches to, by index and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Where the guard should be: the programs' interfaces, and the allowed
/// pods' interfaces for the map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeTargets {
    /// Egress of these judges what leaves for denied destinations.
    pub uplinks: BTreeSet<Interface>,
    /// The allowed interfaces that are bridge ports: their ingress marks.
    pub bridge_ports: BTreeSet<Interface>,
    /// Allowed pods' interfaces and what they may do; `None` keeps what
    /// the pinned map holds (Kubernetes mode, before its first sync).
    pub allowed: Option<InterfaceAccess>,
}

/// The clsact filter preference and handle of ours (kernels before 6.6).
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: TcHandle = TcHandle::new(0x1d5, 0x6a7d);

/// Where a program goes on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Egress of an interface that routes to denied destinations.
    Uplink,
    /// Ingress of an allowlisted pod's bridge port.
    BridgePort,
}

impl Role {
    fn attach_type(self) -> TcAttachType {
        match self {
            Role::Uplink => TcAttachType::Egress,
            Role::BridgePort => TcAttachType::Ingress,
        }
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::BridgePort => "port",
        }
    }
}

/// Which tc interface this kernel gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Tcx,
    Clsact,
}

impl TcHook {
    pub fn of_this_kernel() -> TcHook {
        TcHook::of_kernel(&kernel::release())
    }

    /// tcx from Linux 6.6, clsact before.
    pub fn of_kernel(release: &str) -> TcHook {
        if kernel::version(release).is_some_and(|v| v >= (6, 6)) {
            TcHook::Tcx
        } else {
            TcHook::Clsact
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcHook::Tcx => "tcx",
            TcHook::Clsact => "clsact",
        }
    }
}

/// What one [`EdgePrograms::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeAttached {
    /// Interfaces with our program, by role.
    pub uplinks: BTreeSet<Interface>,
    pub bridge_ports: BTreeSet<Interface>,
    /// Attachments that failed, as `interface: reason`.
    pub failures: Vec<String>,
}

/// The loaded tc programs, opened from the generation's pins.
pub struct EdgePrograms {
    uplink: SchedClassifier,
    bridge_port: SchedClassifier,
    hook: TcHook,
    /// `<pin root>/tc`: pinned tcx links, one per interface and role.
    link_dir: PathBuf,
    /// What this process attached (or swapped in) already.
    attached: BTreeSet<(Role, Interface)>,
}

fn edge_err(name: &'static str, reason: &impl ToString) -> BpfError {
    BpfError::Edge {
        name,
        reason: reason.to_string(),
    }
}

impl EdgePrograms {
    /// Opens the pinned programs; `prog_pin` gives each one's pin path.
    pub fn from_pins(
        prog_pin: &dyn Fn(&str) -> PathBuf,
        link_dir: &Path,
    ) -> Result<EdgePrograms, BpfError> {
        let open = |name: &'static str| {
            SchedClassifier::from_pin(prog_pin(name)).map_err(|e| edge_err(name, &e))
        };
        Ok(EdgePrograms {
            uplink: open(names::PROG_UPLINK)?,
            bridge_port: open(names::PROG_BRIDGE_PORT)?,
            hook: TcHook::of_this_kernel(),
            link_dir: link_dir.to_path_buf(),
            attached: BTreeSet::new(),
        })
    }

    pub fn hook(&self) -> TcHook {
        self.hook
    }

    /// Attaches to every interface of `plan` not attached yet. Interfaces
    /// that went away take their filters with them; their pinned tcx links
    /// are removed. One failure does not stop the others.
    pub fn apply(&mut self, plan: &EdgeTargets) -> EdgeAttached {
        let wanted: BTreeSet<(Role, Interface)> = plan
            .uplinks
            .iter()
            .map(|i| (Role::Uplink, i.clone()))
            .chain(
                plan.bridge_ports
                    .iter()
                    .map(|i| (Role::BridgePort, i.clone())),
            )
            .collect();
        let mut result = EdgeAttached::default();
        for (role, interface) in &wanted {
            if !self.attached.contains(&(*role, interface.clone())) {
                match self.attach(*role, interface) {
                    Ok(()) => {
                        self.attached.insert((*role, interface.clone()));
                    }
                    Err(reason) => {
                        result
                            .failures
                            .push(format!("{}: {reason}", interface.name));
                        continue;
                    }
                }
            }
            match role {
                Role::Uplink => result.uplinks.insert(interface.clone()),
                Role::BridgePort => result.bridge_ports.insert(interface.clone()),
            };
        }
        // What is no longer wanted is forgotten (and attached again if it
        // comes back): a bridge port of a pod no longer allowed marks
        // nothing without its map entry, and interfaces come and go.
        self.attached
            .retain(|attachment| wanted.contains(attachment));
        self.remove_stale_links(&wanted);
        result
    }

    fn attach(&mut self, role: Role, interface: &Interface) -> Result<(), String> {
        let program = match role {
            Role::Uplink => &mut self.uplink,
            Role::BridgePort => &mut self.bridge_port,
        };
        match self.hook {
            TcHook::Tcx => {
                let pin = self
                    .link_dir
                    .join(format!("{}-{}", role.pin_prefix(), interface.index));
                attach_tcx(program, role, interface, &pin)
            }
            TcHook::Clsact => attach_clsact(program, role, interface),
        }
    }

    /// Unpins tcx links of interfaces (or roles) no longer wanted: the link
    /// goes with its last reference.
    fn remove_stale_links(&self, wanted: &BTreeSet<(Role, Interface)>) {
        let Ok(entries) = std::fs::read_dir(&self.link_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = wanted.iter().any(|(role, interface)| {
                name == format!("{}-{}", role.pin_prefix(), interface.index)
            });
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// tcx: swaps the program into the pinned link if there is one, else
/// attaches first in the chain and pins the link.
fn attach_tcx(
    program: &mut SchedClassifier,
    role: Role,
    interface: &Interface,
    pin: &Path,
) -> Result<(), String> {
    if let Ok(pinned) = PinnedLink::from_pin(pin) {
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string());
        let updated = link.and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
        match updated {
            Ok(id) => {
                // The pin holds the link; dropping our handle must not detach it.
                let link = program.take_link(id).map_err(|e| e.to_string())?;
                let _: FdLink = link
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
                return Ok(());
            }
            // A link whose interface went away (its index reused): start over.
            Err(_) => {
                let _ = std::fs::remove_file(pin);
            }
        }
    }
    let id = program
        .attach_with_options(
            &interface.name,
            role.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| e.to_string())?;
    let link: FdLink = program
        .take_link(id)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    link.pin(pin).map_err(|e| e.to_string())?;
    Ok(())
}

/// clsact: our filter at preference 1, created, or replaced in place.
fn attach_clsact(
    program: &mut SchedClassifier,
    role: Role,
    interface: &Interface,
) -> Result<(), String> {
    // An interface that has the qdisc already (another CNI's) is fine.
    if let Err(err) = tc::qdisc_add_clsact(&interface.name)
        && !is_exists(&err)
    {
        return Err(format!("adding clsact: {err}"));
    }
    let options = || {
        TcAttachOptions::Netlink(NlOptions {
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            classid: None,
        })
    };
    let id = match program.attach_with_options(&interface.name, role.attach_type(), options()) {
        Ok(id) => id,
        Err(err) if error_is_exists(&err) => {
            let ours = SchedClassifierLink::attached(
                &interface.name,
                role.attach_type(),
                TC_PRIORITY,
                TC_HANDLE,
                None,
            )
            .map_err(|e| e.to_string())?;
            program.attach_to_link(ours).map_err(|e| e.to_string())?
        }
        Err(err) => return Err(err.to_string()),
    };
    let link = program.take_link(id).map_err(|e| e.to_string())?;
    // The filter outlives this process, as the pinned cgroup links do: a
    // dropped link would detach it.
    std::mem::forget(link);
    Ok(())
}

/// EEXIST: the qdisc, or a filter with our handle, is there already.
fn is_exists(err: &tc::TcError) -> bool {
    match err {
        tc::TcError::AlreadyAttached => true,
        tc::TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        tc::TcError::IoError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

fn error_is_exists(err: &aya::programs::ProgramError) -> bool {
    matches!(err, aya::programs::ProgramError::TcError(e) if is_exists(e))
}

/// A route to denied destinations besides pod sockets, and whether the
/// guard closes it on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteState {
    /// The metric label.
    pub route: &'static str,
    pub what: &'static str,
    pub guarded: bool,
}

/// The routes as the guard leaves them, with the tc programs `running` or
/// not, and the BPF LSM program refusing packet sockets (`lsm`) or not.
pub fn routes(running: bool, lsm: bool) -> [RouteState; 4] {
    [
        RouteState {
            route: "forwarded",
            what: "forwarded packets (AF_PACKET frames from pods, Services DNATed to a \
                   metadata address, overlay-decapsulated packets)",
            guarded: running,
        },
        RouteState {
            route: "host_packet_socket",
            what: "AF_PACKET frames of hostNetwork pods through an uplink's qdisc",
            guarded: running,
        },
        RouteState {
            route: "host_packet_qdisc_bypass",
            what: "AF_PACKET frames of hostNetwork pods with PACKET_QDISC_BYPASS",
            guarded: lsm,
        },
        RouteState {
            route: "host_af_xdp",
            what: "AF_XDP sockets of hostNetwork pods",
            guarded: lsm,
        },
    ]
}

/// Where the guard is attached now, as the kernel says: each interface of
/// this namespace with our tcx link pinned or our clsact filter, and its
/// role; `has_filter(ifindex, egress)` asks for a clsact filter of ours.
pub fn attached(
    link_dir: &Path,
    interfaces: &[Interface],
    has_filter: &mut dyn FnMut(u32, bool) -> bool,
) -> Vec<(Role, Interface)> {
    let mut found = Vec::new();
    for interface in interfaces {
        for role in [Role::Uplink, Role::BridgePort] {
            let pinned = link_dir
                .join(format!("{}-{}", role.pin_prefix(), interface.index))
                .exists();
            if pinned || has_filter(interface.index, role == Role::Uplink) {
                found.push((role, interface.clone()));
            }
        }
    }
    found
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Uplink => "uplink (egress)",
            Role::BridgePort => "bridge port (ingress)",
        }
    }
}

/// Removes our filters from every interface of this namespace and the
/// pinned tcx links (`imds-guard uninstall`); returns how many went.
pub fn detach_all(link_dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    // From routing netlink, not /sys/class/net: sysfs shows the namespace
    // of whoever mounted it, which need not be ours.
    let links = RouteSocket::open()
        .and_then(|mut socket| socket.links())
        .map_err(io::Error::other)?;
    for name in links.into_iter().map(|link| link.name) {
        for role in [Role::Uplink, Role::BridgePort] {
            let ours = SchedClassifierLink::attached(
                &name,
                role.attach_type(),
                TC_PRIORITY,
                TC_HANDLE,
                None,
            );
            if let Ok(link) = ours
                && aya::programs::Link::detach(link).is_ok()
            {
                removed += 1;
            }
        }
    }
    if link_dir.exists() {
        removed += std::fs::read_dir(link_dir)?.count();
        std::fs::remove_dir_all(link_dir)?;
    }
    Ok(removed)
}
