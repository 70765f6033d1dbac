//! The floor: the same five hooks as imds-guard's, on the same cgroup, with
//! programs that allow at once (`r0 = 1; exit`). What they cost is what any
//! program at those hooks costs, the kernel's cgroup hook machinery, so the
//! distance from it is what our own code adds.
//!
//! aya 0.14 builds programs only from an ELF object, so these two
//! instructions go to the kernel through bpf(2) directly: `BPF_PROG_LOAD`
//! with each hook's program type and expected attach type, then
//! `BPF_LINK_CREATE` on the cgroup. Nothing is pinned: the links live as
//! long as their descriptors, so dropping [`Floor`] (also while unwinding
//! or after an interrupt's error) detaches them, and so does our death.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use enforcer_common::names::{
    PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS, PROG_SENDMSG4, PROG_SENDMSG6, PROGRAMS,
};

use super::programs::Program;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

/// `r0 = 1; exit`: 1 is "allow" for `cgroup_skb` and `sock_addr` programs alike.
const ALLOW: [u8; 16] = [
    0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov64 r0, 1
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

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE`, without attach-type extras.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
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

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a `union bpf_attr` prefix of the size given, and the
    // pointers in it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    let fd = i32::try_from(ret).map_err(|_| std::io::Error::other("bpf(2) returned no fd"))?;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, which no one else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: &OwnedFd) -> u32 {
    // Descriptors are never negative.
    fd.as_raw_fd().unsigned_abs()
}

/// Loads the allow-at-once program for one hook, named `name`.
fn load(name: &str, prog_type: u32, attach_type: u32) -> anyhow::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    // The kernel takes 15 bytes and a NUL.
    let short = &name.as_bytes()[..name.len().min(15)];
    prog_name[..short.len()].copy_from_slice(short);
    let mut log = vec![0u8; 4096];
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: ALLOW.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len())?,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    bpf(BPF_PROG_LOAD, &attr).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "loading the floor program {name}: {}",
            String::from_utf8_lossy(&log[..end]).trim()
        )
    })
}

/// The program id the kernel gave `prog`: the second field of `bpf_prog_info`.
fn program_id(prog: &OwnedFd) -> anyhow::Result<u32> {
    let mut info = [0u32; 2];
    let attr = InfoAttr {
        bpf_fd: raw(prog),
        info_len: u32::try_from(std::mem::size_of_val(&info))?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: as in `bpf`; this command returns 0, not a descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("describing a floor program");
    }
    Ok(info[1])
}

/// The five floor programs, attached to a cgroup while this lives.
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
            let prog = load(
                &format!("floor{}", name.trim_start_matches("imds_guard")),
                prog_type,
                attach_type,
            )?;
            let attr = LinkCreateAttr {
                prog_fd: raw(&prog),
                target_fd: dir.as_raw_fd().unsigned_abs(),
                attach_type,
                flags: 0,
            };
            let link = bpf(BPF_LINK_CREATE, &attr).with_context(|| {
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
}
