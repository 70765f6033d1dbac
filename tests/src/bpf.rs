//! `bpf(2)` for the few programs that are assembled by hand, without an
//! object file or aya: the redirect program of [`crate::redirect`] and the
//! benchmark's allow-at-once floor programs.

use std::os::fd::{FromRawFd as _, OwnedFd};

use crate::{Result, SandboxError};

pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_OBJ_PIN: libc::c_long = 6;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_LINK_CREATE: libc::c_long = 28;

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

/// `bpf(cmd, attr)`: what the kernel returned, or its error.
pub fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of the size given;
    // the pointers inside it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `bpf(cmd, attr)` for a command that returns a new descriptor.
pub fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    let fd = i32::try_from(bpf(cmd, attr)?)
        .map_err(|_| std::io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: the kernel just returned this descriptor; no one else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads `code` (encoded instructions, 8 bytes each) as a GPL program of
/// `prog_type`, expected at `expected_attach_type` (0 where the type has
/// no such thing), named `name` (up to 15 bytes are kept). A refusal
/// carries the verifier's log.
pub fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    code: &[u8],
) -> Result<OwnedFd> {
    // Kernels before 5.11 charge programs to RLIMIT_MEMLOCK against the
    // user's total, which the daemons of parallel tests (root too) share:
    // the harness, root, lifts its own limit. Where it cannot, the load
    // says why.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain setrlimit on this process.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) };
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    let kept = &name.as_bytes()[..name.len().min(15)];
    prog_name[..kept.len()].copy_from_slice(kept);
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(code.len() / 8).unwrap_or(0),
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).unwrap_or(0),
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    bpf_fd(BPF_PROG_LOAD, &attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        SandboxError::Process(format!(
            "loading the program {name}: {e}: {}",
            String::from_utf8_lossy(&log[..end]).trim()
        ))
    })
}
