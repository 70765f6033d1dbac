//! The floor: the same five hooks as imds-guard's, on the same cgroup, with
//! programs that allow at once (`r0 = 1; exit`). What they cost is what any
//! program at those hooks costs, the kernel's cgroup hook machinery, so the
//! distance from it is what our own code adds.
//!
//! aya 0.14 builds programs only from an ELF object, so these two
//! instructions go to the kernel through bpf(2) directly: `BPF_PROG_LOAD`
//! with each hook's program type and expected attach type, then
//! `BPF_LINK_CREATE` on the cgroup. The node edge guard's floor is the
//! same on its uplink: a tc program with no verdict (`r0 = -1`, what ours
//! returns for what it lets through), attached through tcx as the daemon
//! attaches there on Linux 6.6 and later. Nothing is pinned: the links live as
//! long as their descriptors, so dropping [`Floor`] (also while unwinding
//! or after an interrupt's error) detaches them, and so does our death.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use enforcer_common::names::{
    PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS, PROG_SENDMSG4, PROG_SENDMSG6, PROG_UPLINK, PROGRAMS,
};
use imds_guard_tests::{
    bpf::{BPF_LINK_CREATE, BPF_OBJ_GET_INFO_BY_FD, bpf, bpf_fd, load_program},
    netns::Netns,
};

use super::programs::Program;

const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;

/// `r0 = 1; exit`: 1 is "allow" for `cgroup_skb` and `sock_addr` programs alike.
const ALLOW: [u8; 16] = [
    0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov64 r0, 1
    0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // exit
];

/// `r0 = -1; exit`: -1 is tcx's "next", no verdict of this program's.
const NO_VERDICT: [u8; 16] = [
    0xb7, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, // mov64 r0, -1
    0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // exit
];

/// Each of our programs, with the program type and attach type of its hook.
const HOOKS: [(&str, u32, u32); 5] = [
    (
        PROG_EGRESS,
        BPF_PROG_TYPE_CGROUP_SKB,
        BPF_CGROUP_INET_EGRESS,
    ),
    (
        PROG_CONNECT4,
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
    ),
    (
        PROG_CONNECT6,
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET6_CONNECT,
    ),
    (
        PROG_SENDMSG4,
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_UDP4_SENDMSG,
    ),
    (
        PROG_SENDMSG6,
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_UDP6_SENDMSG,
    ),
];

/// `union bpf_attr` for `BPF_LINK_CREATE`, without attach-type extras.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    /// A cgroup's descriptor, or for tcx an interface index.
    target: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn raw(fd: &impl AsRawFd) -> u32 {
    // Descriptors are never negative.
    fd.as_raw_fd().unsigned_abs()
}

/// The program id the kernel gave `prog`: the second field of `bpf_prog_info`.
fn program_id(prog: &OwnedFd) -> anyhow::Result<u32> {
    let mut info = [0u32; 2];
    let attr = InfoAttr {
        bpf_fd: raw(prog),
        info_len: u32::try_from(std::mem::size_of_val(&info))?,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr).context("describing a floor program")?;
    Ok(info[1])
}

/// The floor's programs, attached while this lives.
pub struct Floor {
    pub programs: Vec<Program>,
    /// Each link, and the program it holds; closing both detaches.
    _attached: Vec<(OwnedFd, OwnedFd)>,
}

impl Floor {
    /// Loads and attaches a floor program for each of [`PROGRAMS`].
    pub fn attach(cgroup: &Path) -> anyhow::Result<Floor> {
        const _: () = assert!(HOOKS.len() == PROGRAMS.len(), "a floor hook per program");
        let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut programs = Vec::new();
        let mut attached = Vec::new();
        for (name, prog_type, attach_type) in HOOKS {
            let prog = load_program(
                prog_type,
                attach_type,
                &format!("floor{}", name.trim_start_matches("imds_guard")),
                &ALLOW,
            )?;
            let attr = LinkCreateAttr {
                prog_fd: raw(&prog),
                target: raw(&dir),
                attach_type,
                flags: 0,
            };
            let link = bpf_fd(BPF_LINK_CREATE, &attr).with_context(|| {
                format!(
                    "attaching the floor program for {name} to {}",
                    cgroup.display()
                )
            })?;
            programs.push(Program {
                name,
                id: program_id(&prog)?,
            });
            attached.push((link, prog));
        }
        Ok(Floor {
            programs,
            _attached: attached,
        })
    }

    /// A no-verdict program on `uplink`'s egress in `netns`, the node
    /// edge guard's hook.
    pub fn attach_uplink(netns: &Netns, uplink: &str) -> anyhow::Result<Floor> {
        // `IFINDEX: NAME@PEER: ...`
        let link = netns.ip(&["-o", "link", "show", "dev", uplink])?;
        let ifindex: u32 = link
            .split(':')
            .next()
            .and_then(|index| index.trim().parse().ok())
            .with_context(|| format!("no interface index for {uplink}: {link}"))?;
        let prog = load_program(BPF_PROG_TYPE_SCHED_CLS, 0, "floor_uplink", &NO_VERDICT)?;
        let attr = LinkCreateAttr {
            prog_fd: raw(&prog),
            target: ifindex,
            attach_type: BPF_TCX_EGRESS,
            flags: 0,
        };
        // The interface index is looked up in the caller's network namespace.
        let link = netns
            .run_inside(|| bpf_fd(BPF_LINK_CREATE, &attr))?
            .with_context(|| {
                format!("attaching the floor program to {uplink}'s egress through tcx (Linux 6.6 or later)")
            })?;
        Ok(Floor {
            programs: vec![Program {
                name: PROG_UPLINK,
                id: program_id(&prog)?,
            }],
            _attached: vec![(link, prog)],
        })
    }
}
