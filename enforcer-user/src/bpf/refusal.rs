//! Why the kernel refused to load the object, in words that name the fix:
//! a verifier refusal shortened to its failing instruction and last lines,
//! and a refused map told apart as a seccomp filter, the memlock limit of
//! older kernels, or a security module.

use aya::{EbpfError, maps::MapError, programs::ProgramError};

use super::BpfError;
use crate::host::{
    kernel, memlock,
    privilege::{self, SeccompMode},
};

/// Names the cause of a failed object load where it can be told: a map the
/// kernel refused to create is a seccomp filter, the memlock limit, or a
/// security module, and each has its own fix.
pub(super) fn load_error(source: EbpfError, object: &[u8]) -> BpfError {
    let EbpfError::MapError(MapError::CreateError { name, io_error }) = source else {
        return BpfError::Load { source };
    };
    let cause = if io_error.raw_os_error() == Some(libc::EPERM) {
        refusal_cause(object)
    } else {
        "this kernel may lack the map type or feature it needs".to_owned()
    };
    BpfError::MapRefused {
        name,
        errno: io_error,
        cause,
    }
}

/// Why the kernel said EPERM to a process that holds `CAP_BPF` (privileges
/// are checked before loading).
fn refusal_cause(object: &[u8]) -> String {
    if privilege::bpf_syscall_refused() {
        return privilege::bpf_refusal_cause(
            privilege::seccomp_mode() == Some(SeccompMode::Filter),
        )
        .to_owned();
    }
    let release = kernel::release();
    if kernel::version(&release).is_some_and(|v| v < memlock::FIRST_MEMCG_KERNEL) {
        let need =
            memlock::shapes(object).map_or(0, |s| memlock::need(&s, kernel::possible_cpus()));
        return format!(
            "kernel {release} charges BPF maps to RLIMIT_MEMLOCK and the limit is too low \
             (the maps need about {} with {} possible CPUs; other processes of this user \
             count too): grant CAP_SYS_RESOURCE or raise the memlock limit",
            memlock::human(need),
            kernel::possible_cpus()
        );
    }
    "the kernel refused although this process holds CAP_BPF: a security module \
     (SELinux, AppArmor, Lockdown) may forbid BPF maps here"
        .to_owned()
}

/// The parts of a verifier log that explain a refusal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifierSummary {
    /// The last instruction the verifier printed before refusing.
    pub failing_instruction: Option<String>,
    /// Its last lines, without the statistics it ends with.
    pub last_lines: Vec<String>,
}

/// How many of the verifier's last lines an error carries.
const VERIFIER_LINES_SHOWN: usize = 3;

/// Picks the failing instruction and the closing lines out of a log.
pub fn summarize_verifier_log(log: &str) -> VerifierSummary {
    let is_statistics = |line: &str| {
        ["verification time", "stack depth", "processed "]
            .iter()
            .any(|p| line.starts_with(p))
    };
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_statistics(l) && !l.starts_with(';'))
        .collect();
    let is_instruction = |line: &str| {
        line.split_once(": (")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let failing_instruction = lines.iter().rev().find(|l| is_instruction(l)).map(|l| {
        // Drop the register state the verifier prints after `;`.
        l.split_once(" ; ")
            .map_or(*l, |(insn, _)| insn)
            .trim()
            .to_owned()
    });
    let tail = lines.len().saturating_sub(VERIFIER_LINES_SHOWN);
    VerifierSummary {
        failing_instruction,
        last_lines: lines[tail..]
            .iter()
            .filter(|l| !is_instruction(l))
            .map(|l| (*l).to_owned())
            .collect(),
    }
}

/// A refused program load, with its verifier log shortened for the error
/// and kept whole at debug level (logged once, here).
pub(super) fn program_error(name: &'static str, source: ProgramError) -> BpfError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!(program = name, log = %log, "the verifier's whole log");
            BpfError::ProgramRefused {
                name,
                errno: io_error,
                summary: summarize_verifier_log(&log),
            }
        }
        source => BpfError::ProgramLoad { name, source },
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::names;

    use super::*;

    /// The end of the log kernel 6.18 gave for the padding memset that
    /// CAP_PERFMON-less loaders were refused over.
    const REFUSED_MEMSET: &str = "\
1081: frame1: R1=ringbuf_mem(ref_obj_id=85,off=37,sz=48) R2=0 R3=7 R10=fp0 refs=85
; if self.start < self.end { @ range.rs:900
1081: (15) if r3 == 0x0 goto pc+6     ; frame1: R3=7 refs=85
1082: (b7) r4 = 0                     ; frame1: R4=0 refs=85
; unsafe { intrinsics::offset(self, count) } @ mut_ptr.rs:961
1083: (bf) r5 = r1                    ; frame1: R1=ringbuf_mem(ref_obj_id=85,off=37,sz=48) R5=ringbuf_mem(ref_obj_id=85,off=37,sz=48) refs=85
1084: (0f) r5 += r4
R5 has pointer with unsupported alu operation, pointer arithmetic with it prohibited for !root
verification time 3834 usec
stack depth 152+0
processed 924 insns (limit 1000000) max_states_per_insn 4 total_states 32 peak_states 32 mark_read 0
";

    #[test]
    fn verifier_logs_shrink_to_the_refusal() {
        let cases = [
            (
                REFUSED_MEMSET,
                Some("1084: (0f) r5 += r4"),
                vec![
                    "R5 has pointer with unsupported alu operation, pointer arithmetic with it \
                     prohibited for !root",
                ],
            ),
            (
                "0: (b7) r0 = 0 ; R0=0\n1: (95) exit\nR0 leaks addr as return value\n",
                Some("1: (95) exit"),
                vec!["R0 leaks addr as return value"],
            ),
            ("", None, vec![]),
            (
                "unknown func bpf_ringbuf_reserve#131\n",
                None,
                vec!["unknown func bpf_ringbuf_reserve#131"],
            ),
        ];
        for (log, instruction, lines) in cases {
            let summary = summarize_verifier_log(log);
            assert_eq!(summary.failing_instruction.as_deref(), instruction, "{log}");
            assert_eq!(summary.last_lines, lines, "{log}");
        }
    }

    #[test]
    fn refusal_message_names_program_instruction_and_reason_once() {
        let err = BpfError::ProgramRefused {
            name: names::PROG_EGRESS,
            errno: std::io::Error::from_raw_os_error(libc::EACCES),
            summary: summarize_verifier_log(REFUSED_MEMSET),
        }
        .to_string();
        assert!(err.contains("imds_guard_egress"), "{err}");
        assert!(err.contains("at instruction 1084: (0f) r5 += r4"), "{err}");
        assert_eq!(err.matches("prohibited for !root").count(), 1, "{err}");
        assert!(
            !err.contains("5.7"),
            "no hint unrelated to the failure: {err}"
        );
    }
}
