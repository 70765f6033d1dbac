//! The runtime's default seccomp profile (`seccompProfile: RuntimeDefault`)
//! as containerd builds it: containerd v2.3.4,
//! `contrib/seccomp/seccomp_default.go` (`DefaultProfile`), for `x86_64`. The
//! same rules in the same order: one list allowed to everyone, argument
//! rules for socket(2) and personality(2), the calls newer kernels made
//! safe, the architecture's own, those allowed by each capability in the
//! bounding set, and clone(2) without namespace flags unless CAP_SYS_ADMIN.

use super::{
    BundleError,
    spec::{Seccomp, SeccompArg, SyscallRule},
};

/// Allowed whatever the capabilities.
#[rustfmt::skip]
const ALWAYS: &[&str] = &[
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat", "capget",
    "capset", "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64",
    "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group",
    "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark",
    "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl",
    "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr",
    "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync",
    "ftruncate", "ftruncate64", "futex", "futex_requeue", "futex_time64", "futex_wait",
    "futex_waitv", "futex_wake", "futimesat", "getcpu", "getcwd", "getdents", "getdents64",
    "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getitimer", "getpeername", "getpgid", "getpgrp", "getpid", "getppid",
    "getpriority", "getrandom", "getresgid", "getresgid32", "getresuid", "getresuid32",
    "getrlimit", "get_robust_list", "getrusage", "getsid", "getsockname", "getsockopt",
    "get_thread_area", "gettid", "gettimeofday", "getuid", "getuid32", "getxattr",
    "getxattrat", "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch",
    "io_cancel", "ioctl", "io_destroy", "io_getevents", "io_pgetevents",
    "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit", "ipc",
    "kill", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "lchown", "lchown32", "lgetxattr", "link", "linkat", "listen", "listmount", "listxattr",
    "listxattrat", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr",
    "lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr", "lstat", "lstat64",
    "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat",
    "mknod", "mknodat", "mlock", "mlock2", "mlockall", "map_shadow_stack", "mmap", "mmap2",
    "mprotect", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "mremap",
    "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall",
    "munmap", "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat",
    "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64",
    "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6", "pselect6_time64",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "remap_file_pages",
    "removexattr", "removexattrat", "rename", "renameat", "renameat2", "restart_syscall",
    "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp",
    "select", "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send",
    "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32",
    "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32", "setitimer",
    "setpgid", "setpriority", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit", "set_robust_list",
    "setsid", "setsockopt", "set_thread_area", "set_tid_address", "setuid", "setuid32",
    "setxattr", "setxattrat", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack",
    "signalfd", "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice",
    "stat", "stat64", "statfs", "statfs64", "statmount", "statx", "symlink", "symlinkat",
    "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64",
    "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "uretprobe", "utime", "utimensat",
    "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write",
    "writev",
];

/// Allowed from Linux 4.8 on, where ptrace can no longer get round seccomp.
const FROM_LINUX_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

/// `x86_64`'s own.
const X86_64: &[&str] = &["arch_prctl", "modify_ldt"];

/// What each capability in the bounding set adds.
#[rustfmt::skip]
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
            "lookup_dcookie", "mount", "mount_setattr", "move_mount", "open_tree",
            "perf_event_open", "quotactl", "quotactl_fd", "setdomainname", "sethostname",
            "setns", "syslog", "umount", "umount2", "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_MODULE", &["delete_module", "init_module", "finit_module"]),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// socket(2) for every address family but `AF_ALG` (38) and `AF_VSOCK` (40):
/// three single-condition rules, since runc ORs repeated conditions on one
/// argument.
const SOCKET_FAMILIES: [(u64, &str); 3] = [
    (38, "SCMP_CMP_LT"),
    (39, "SCMP_CMP_EQ"),
    (40, "SCMP_CMP_GT"),
];

/// personality(2) with these personas only (`PER_LINUX`, UNAME26,
/// `PER_LINUX32`, both, and the query).
const PERSONAS: [u64; 5] = [0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// `CLONE_NEWNS` | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWCGROUP:
/// without CAP_SYS_ADMIN, clone(2) may set none of them.
const NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000 | 0x0200_0000;

const ENOSYS: u32 = 38;

fn allow(names: &[&str]) -> SyscallRule {
    SyscallRule {
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        action: "SCMP_ACT_ALLOW".to_owned(),
        errno_ret: None,
        args: Vec::new(),
    }
}

fn allow_if(name: &str, index: u32, value: u64, value_two: u64, op: &str) -> SyscallRule {
    SyscallRule {
        args: vec![SeccompArg {
            index,
            value,
            value_two,
            op: op.to_owned(),
        }],
        ..allow(&[name])
    }
}

/// The profile for a container whose bounding set is `bounding` (names
/// with `CAP_`), on a kernel of version `kernel`.
pub fn runtime_default(bounding: &[String], kernel: (u32, u32)) -> Result<Seccomp, BundleError> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(BundleError::Unsupported(format!(
            "the default seccomp profile for {} (only x86_64 is written down)",
            std::env::consts::ARCH
        )));
    }
    let mut syscalls = vec![allow(ALWAYS)];
    for (value, op) in SOCKET_FAMILIES {
        syscalls.push(allow_if("socket", 0, value, 0, op));
    }
    for persona in PERSONAS {
        syscalls.push(allow_if("personality", 0, persona, 0, "SCMP_CMP_EQ"));
    }
    if kernel >= (4, 8) {
        syscalls.push(allow(FROM_LINUX_4_8));
    }
    syscalls.push(allow(X86_64));
    for capability in bounding {
        if let Some((_, names)) = BY_CAPABILITY.iter().find(|(c, _)| c == capability) {
            syscalls.push(allow(names));
        }
    }
    if !bounding.iter().any(|c| c == "CAP_SYS_ADMIN") {
        syscalls.push(allow_if(
            "clone",
            0,
            NAMESPACE_FLAGS,
            0,
            "SCMP_CMP_MASKED_EQ",
        ));
        // ENOSYS, not EPERM, so that libc falls back to clone(2).
        syscalls.push(SyscallRule {
            action: "SCMP_ACT_ERRNO".to_owned(),
            errno_ret: Some(ENOSYS),
            ..allow(&["clone3"])
        });
    }
    Ok(Seccomp {
        default_action: "SCMP_ACT_ERRNO".to_owned(),
        architectures: ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
            .map(str::to_owned)
            .to_vec(),
        syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(profile: &Seccomp, name: &str) -> bool {
        profile
            .syscalls
            .iter()
            .any(|r| r.action == "SCMP_ACT_ALLOW" && r.names.iter().any(|n| n == name))
    }

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn capabilities_decide_bpf_perf_and_namespaces() {
        let daemonset = runtime_default(&caps(&["CAP_BPF", "CAP_NET_ADMIN"]), (6, 1)).unwrap();
        assert!(allowed(&daemonset, "bpf"));
        for refused in ["perf_event_open", "mount", "setns", "unshare", "clone3"] {
            assert!(!allowed(&daemonset, refused), "{refused}");
        }
        let clone = daemonset
            .syscalls
            .iter()
            .find(|r| r.names == ["clone"])
            .expect("a clone rule");
        assert_eq!(clone.args[0].op, "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone.args[0].value, 0x7e02_0000);

        let no_bpf = runtime_default(&caps(&["CAP_NET_ADMIN"]), (6, 1)).unwrap();
        assert!(!allowed(&no_bpf, "bpf"));
        let admin = runtime_default(&caps(&["CAP_SYS_ADMIN"]), (6, 1)).unwrap();
        for call in ["bpf", "perf_event_open", "mount", "clone3"] {
            assert!(allowed(&admin, call), "{call}");
        }
        assert!(!admin.syscalls.iter().any(|r| r.action == "SCMP_ACT_ERRNO"));
        let perfmon = runtime_default(&caps(&["CAP_PERFMON"]), (6, 1)).unwrap();
        assert!(allowed(&perfmon, "perf_event_open"));
    }

    #[test]
    fn old_kernels_get_no_ptrace() {
        assert!(!allowed(&runtime_default(&[], (4, 4)).unwrap(), "ptrace"));
        assert!(allowed(&runtime_default(&[], (4, 8)).unwrap(), "ptrace"));
    }
}
