//! What eBPF CNIs (Cilium, Calico's eBPF data plane) do to a pod's traffic:
//! a tc ingress program on the node's pod-facing veth hands each packet to
//! the uplink with `bpf_redirect_neigh`, so it never passes the node's
//! netfilter (no FORWARD, no POSTROUTING, no masquerade).
//!
//! The program is a dozen instructions, assembled here (the tests crate has
//! no BPF toolchain of its own), loaded with `bpf(2)`, pinned just long
//! enough for `tc ... object-pinned` to attach it to a clsact qdisc, then
//! unpinned: the filter holds it, and deleting the namespace frees both.

use std::{
    ffi::CString,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use crate::{
    Result, SandboxError,
    bpf::{BPF_OBJ_PIN, bpf, load_program},
    netns::Netns,
    run, unique_name,
};

/// Which pod traffic the program leaves to the node's netfilter, as eBPF
/// CNIs leave what they do not handle themselves: Service addresses
/// (kube-proxy's DNAT is in netfilter here), IPv6 multicast and link-local
/// (neighbour discovery with the gateway), and anything not IP (ARP).
pub mod passed {
    /// `10.96.0.0/12`, the default Service range, as a 32-bit load of the
    /// destination reads it (bytes in packet order), and its mask.
    pub const SERVICE_V4: (u32, u32) = (
        u32::from_ne_bytes([10, 96, 0, 0]),
        u32::from_ne_bytes([0xff, 0xf0, 0, 0]),
    );
    /// `fd10:96::/32`, the sandbox's IPv6 Service range, read the same way.
    pub const SERVICE_V6_FIRST_WORD: u32 = u32::from_ne_bytes([0xfd, 0x10, 0x00, 0x96]);
}

/// Where bpffs is mounted (as for the daemon's pins).
const BPFFS: &str = "/sys/fs/bpf";
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `bpf_redirect_neigh`'s helper id (linux/bpf.h's helper list; 5.10+).
const HELPER_REDIRECT_NEIGH: i32 = 152;
/// `struct __sk_buff` offsets.
const SKB_PROTOCOL: i16 = 16;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const ETH_HLEN: i16 = 14;
const TC_ACT_OK: i32 = 0;

/// One instruction, or a jump to a label resolved when assembling.
enum Op {
    Insn {
        code: u8,
        dst: u8,
        src: u8,
        off: i16,
        imm: i32,
    },
    Jump {
        code: u8,
        dst: u8,
        src: u8,
        imm: i32,
        to: &'static str,
    },
    Label(&'static str),
}

// Opcodes (linux/bpf_common.h, linux/bpf.h): class | operation | source.
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const AND64_IMM: u8 = 0x57;
const LDX_W: u8 = 0x61;
const LDX_B: u8 = 0x71;
const JA: u8 = 0x05;
const JEQ_IMM: u8 = 0x15;
const JGT_REG: u8 = 0x2d;
/// Compares the low 32 bits only: the IPv6 word does not fit a positive
/// `imm`, which a 64-bit compare would sign-extend.
const JEQ32_IMM: u8 = 0x16;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Op {
    Op::Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

fn jump(code: u8, dst: u8, src: u8, imm: i32, to: &'static str) -> Op {
    Op::Jump {
        code,
        dst,
        src,
        imm,
        to,
    }
}

/// The program, for the uplink's ifindex. Registers: r6 the context, r2
/// and r3 the packet's start and end, r4 its protocol, r5 scratch.
fn program(uplink_ifindex: i32) -> Vec<Op> {
    let (service_v4, service_v4_mask) = passed::SERVICE_V4;
    // Reinterpreted, not converted: JEQ32 compares the bit pattern.
    let service_v6 = i32::from_ne_bytes(passed::SERVICE_V6_FIRST_WORD.to_ne_bytes());
    let protocol = |ethertype: u16| i32::from(u16::from_ne_bytes(ethertype.to_be_bytes()));
    vec![
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(LDX_W, 2, 6, SKB_DATA, 0),
        insn(LDX_W, 3, 6, SKB_DATA_END, 0),
        insn(LDX_W, 4, 6, SKB_PROTOCOL, 0),
        jump(JEQ_IMM, 4, 0, protocol(0x0800), "ipv4"),
        jump(JEQ_IMM, 4, 0, protocol(0x86dd), "ipv6"),
        jump(JA, 0, 0, 0, "pass"),
        Op::Label("ipv4"),
        // The verifier needs the bounds check before the load.
        insn(MOV64_REG, 5, 2, 0, 0),
        insn(ADD64_IMM, 5, 0, 0, i32::from(ETH_HLEN + 20)),
        jump(JGT_REG, 5, 3, 0, "pass"),
        insn(LDX_W, 5, 2, ETH_HLEN + 16, 0),
        insn(
            AND64_IMM,
            5,
            0,
            0,
            i32::try_from(service_v4_mask).unwrap_or(0),
        ),
        jump(
            JEQ_IMM,
            5,
            0,
            i32::try_from(service_v4).unwrap_or(0),
            "pass",
        ),
        jump(JA, 0, 0, 0, "redirect"),
        Op::Label("ipv6"),
        insn(MOV64_REG, 5, 2, 0, 0),
        insn(ADD64_IMM, 5, 0, 0, i32::from(ETH_HLEN + 40)),
        jump(JGT_REG, 5, 3, 0, "pass"),
        // The destination's first byte: ff00::/8 and fe80::/10 stay.
        insn(LDX_B, 5, 2, ETH_HLEN + 24, 0),
        jump(JEQ_IMM, 5, 0, 0xff, "pass"),
        jump(JEQ_IMM, 5, 0, 0xfe, "pass"),
        insn(LDX_W, 5, 2, ETH_HLEN + 24, 0),
        jump(JEQ32_IMM, 5, 0, service_v6, "pass"),
        Op::Label("redirect"),
        // bpf_redirect_neigh(ifindex, NULL, 0, 0): the kernel looks up the
        // next hop and its MAC itself.
        insn(MOV64_IMM, 1, 0, 0, uplink_ifindex),
        insn(MOV64_IMM, 2, 0, 0, 0),
        insn(MOV64_IMM, 3, 0, 0, 0),
        insn(MOV64_IMM, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_REDIRECT_NEIGH),
        insn(EXIT, 0, 0, 0, 0),
        Op::Label("pass"),
        insn(MOV64_IMM, 0, 0, 0, TC_ACT_OK),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Lays the program out in the kernel's 8-byte form, jumps resolved
/// (offsets count from the instruction after the jump).
fn assemble(ops: &[Op]) -> Result<Vec<u8>> {
    let mut labels = std::collections::BTreeMap::new();
    let mut index = 0i32;
    for op in ops {
        match op {
            Op::Label(name) => {
                labels.insert(*name, index);
            }
            _ => index += 1,
        }
    }
    let encode = |code: u8, dst: u8, src: u8, off: i16, imm: i32| {
        let mut bytes = vec![code, (src << 4) | (dst & 0x0f)];
        bytes.extend_from_slice(&off.to_le_bytes());
        bytes.extend_from_slice(&imm.to_le_bytes());
        bytes
    };
    let mut out = Vec::new();
    let mut index = 0i32;
    for op in ops {
        match op {
            Op::Label(_) => continue,
            Op::Insn {
                code,
                dst,
                src,
                off,
                imm,
            } => out.extend(encode(*code, *dst, *src, *off, *imm)),
            Op::Jump {
                code,
                dst,
                src,
                imm,
                to,
            } => {
                let target = labels
                    .get(to)
                    .ok_or_else(|| SandboxError::Process(format!("no label {to}")))?;
                let off = i16::try_from(target - index - 1)
                    .map_err(|_| SandboxError::Process(format!("jump to {to} too far")))?;
                out.extend(encode(*code, *dst, *src, off, *imm));
            }
        }
        index += 1;
    }
    Ok(out)
}

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn load(uplink_ifindex: i32) -> Result<OwnedFd> {
    let code = assemble(&program(uplink_ifindex))?;
    load_program(BPF_PROG_TYPE_SCHED_CLS, 0, "pod_redirect", &code)
}

/// A pin, removed on drop.
struct Pin(PathBuf);

impl Pin {
    fn create(fd: &OwnedFd, path: &Path) -> Result<Pin> {
        let text = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| SandboxError::Process("pin path has a NUL".to_owned()))?;
        let attr = ObjPinAttr {
            pathname: text.as_ptr() as u64,
            bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(fd)).unwrap_or(u32::MAX),
            file_flags: 0,
        };
        bpf(BPF_OBJ_PIN, &attr).map_err(|source| SandboxError::Io {
            what: "pinning the redirect program at",
            path: path.to_owned(),
            source,
        })?;
        Ok(Pin(path.to_owned()))
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Attaches the redirect program to `pod_if`'s tc ingress in `node`,
/// redirecting to `uplink_if` (by its ifindex in `node`). Uses clsact,
/// which every kernel with `bpf_redirect_neigh` has; tcx (6.6+) would do
/// the same for the next session's guard to be tested against.
pub fn attach(node: &Netns, pod_if: &str, uplink_ifindex: i32) -> Result<()> {
    let fd = load(uplink_ifindex)?;
    let pin = Pin::create(&fd, &Path::new(BPFFS).join(unique_name("redirect")))?;
    // nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs.
    let netns = format!("--net={}", node.path().display());
    let tc = |args: &[&str]| {
        let mut full = vec![netns.as_str(), "tc"];
        full.extend_from_slice(args);
        run("nsenter", &full)
    };
    tc(&["qdisc", "add", "dev", pod_if, "clsact"])?;
    let pinned = pin.0.display().to_string();
    tc(&[
        "filter",
        "add",
        "dev",
        pod_if,
        "ingress",
        "bpf",
        "direct-action",
        "object-pinned",
        &pinned,
    ])?;
    // The filter holds the program now; the pin goes with `pin`.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_resolve_past_labels() {
        let code = assemble(&[
            jump(JA, 0, 0, 0, "end"),
            insn(MOV64_IMM, 0, 0, 0, 1),
            Op::Label("end"),
            insn(EXIT, 0, 0, 0, 0),
        ])
        .unwrap();
        // ja +1, over the mov.
        assert_eq!(&code[..8], &[JA, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(code.len(), 24);
        assert!(assemble(&[jump(JA, 0, 0, 0, "nowhere")]).is_err());
    }
}
