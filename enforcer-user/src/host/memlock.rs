//! Kernels before 5.11 charge every BPF map to the owner's `RLIMIT_MEMLOCK`
//! (5.11 moved the charge to memory cgroups). A container runtime that sets
//! no memlock limit hands out the kernel's 64 KiB, far below what our maps
//! take, and the kernel then refuses map creation with a bare EPERM. So on
//! those kernels the need is computed before anything is created, the limit
//! raised when this process may, and otherwise the start refused with the
//! figure and the fix.

use aya_obj::Object;

/// `enum bpf_map_type` values of the maps the object defines.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

const PAGE_BYTES: u64 = 4096;
/// The per-map header the kernel allocates with every map (`struct bpf_map`
/// and the type's own, rounded up): a page covers each of them.
const MAP_HEADER_BYTES: u64 = PAGE_BYTES;
/// `struct htab_elem` before its key (hash node, free-list or LRU node, hash).
const HTAB_ELEM_HEADER_BYTES: u64 = 56;
/// `struct bucket`: list head and lock.
const HTAB_BUCKET_BYTES: u64 = 16;
/// `struct lpm_trie_node` before its data.
const LPM_NODE_HEADER_BYTES: u64 = 40;

/// The first kernel that charges maps to memory cgroups instead.
pub const FIRST_MEMCG_KERNEL: (u32, u32) = (5, 11);

/// What one map's charge depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

fn round_up(bytes: u64, to: u64) -> u64 {
    bytes.div_ceil(to) * to
}

/// The bytes kernel 5.10 charges for a map: its allocation sizes as
/// `*_map_alloc` computes them, rounded up to pages, plus the header page.
/// Slightly generous, never less than the kernel's figure for our types.
pub fn charge(map: &MapShape, possible_cpus: u64) -> u64 {
    let entries = u64::from(map.max_entries);
    let key = round_up(u64::from(map.key_size), 8);
    let value = round_up(u64::from(map.value_size), 8);
    let body = match map.map_type {
        BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH => {
            let element = HTAB_ELEM_HEADER_BYTES + key + value;
            // Prealloc'd elements, plus one spare per CPU for updates.
            entries.next_power_of_two() * HTAB_BUCKET_BYTES + element * (entries + possible_cpus)
        }
        BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH => {
            let element = HTAB_ELEM_HEADER_BYTES + key + 8;
            entries.next_power_of_two() * HTAB_BUCKET_BYTES
                + element * entries
                + value * possible_cpus * entries
        }
        BPF_MAP_TYPE_ARRAY => entries * value,
        BPF_MAP_TYPE_PERCPU_ARRAY => entries * 8 + entries * value * possible_cpus,
        BPF_MAP_TYPE_LPM_TRIE => {
            let data = u64::from(map.key_size.saturating_sub(4));
            entries * (LPM_NODE_HEADER_BYTES + u64::from(map.value_size) + data)
        }
        // The data area, plus the two control pages and the page array.
        BPF_MAP_TYPE_RINGBUF => entries + 2 * PAGE_BYTES + (entries / PAGE_BYTES) * 8,
        // Types we do not define; a generous flat figure keeps the sum an upper bound.
        _ => (key + value) * entries * possible_cpus,
    };
    round_up(body, PAGE_BYTES) + MAP_HEADER_BYTES
}

/// The shapes of every map in an eBPF object (globals' sections included).
pub fn shapes(object: &[u8]) -> Result<Vec<MapShape>, aya_obj::ParseError> {
    let parsed = Object::parse(object)?;
    Ok(parsed
        .maps
        .values()
        .map(|m| MapShape {
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
        })
        .collect())
}

/// What all the maps of one generation take.
pub fn need(shapes: &[MapShape], possible_cpus: u64) -> u64 {
    shapes.iter().map(|m| charge(m, possible_cpus)).sum()
}

/// Bytes as people read them: 64 KiB, 17 MiB.
pub fn human(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else if bytes >= MIB {
        format!("{} MiB", bytes.div_ceil(MIB))
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemlockError {
    #[error(
        "kernel {kernel} charges BPF maps to RLIMIT_MEMLOCK (kernels from 5.11 charge memory \
         cgroups instead): imds-guard's maps need about {need} with {cpus} possible CPUs, this \
         process may lock {limit} and cannot raise it (that needs CAP_SYS_RESOURCE). Grant \
         CAP_SYS_RESOURCE (the deploy/overlays/kernel-5.10 overlay does) or raise the memlock \
         limit the container runtime gives to at least {need}",
        need = human(*need),
        limit = human(*limit)
    )]
    TooLow {
        kernel: String,
        need: u64,
        limit: u64,
        cpus: u64,
    },
}

/// The current (soft, hard) `RLIMIT_MEMLOCK`.
pub fn current_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_limit(soft: u64, hard: u64) -> bool {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a plain system call on a struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) == 0 }
}

/// What [`ensure`] did, or [`plan`] would do.
#[derive(Debug, PartialEq, Eq)]
pub enum Memlock {
    /// The kernel charges memory cgroups: no limit applies.
    NotCharged,
    /// The limit was enough, or was raised to `limit`.
    Enough { need: u64, limit: u64 },
}

/// Whether kernel `kernel` (a release string) charges BPF maps to
/// `RLIMIT_MEMLOCK`.
pub fn charges(kernel: &str) -> bool {
    super::kernel::version(kernel).is_some_and(|v| v < FIRST_MEMCG_KERNEL)
}

/// What a process whose `RLIMIT_MEMLOCK` is `(soft, hard)` does on kernel
/// `kernel` to fit `need` bytes: nothing, raise the limit to unlimited
/// where it may (`CAP_SYS_RESOURCE`), or the soft limit up to the hard one;
/// otherwise it refuses.
pub fn plan(
    kernel: &str,
    need: u64,
    cpus: u64,
    (soft, hard): (u64, u64),
    may_raise_hard: bool,
) -> Result<Memlock, MemlockError> {
    if !charges(kernel) {
        Ok(Memlock::NotCharged)
    } else if soft >= need {
        Ok(Memlock::Enough { need, limit: soft })
    } else if may_raise_hard {
        Ok(Memlock::Enough {
            need,
            limit: libc::RLIM_INFINITY,
        })
    } else if hard >= need {
        Ok(Memlock::Enough { need, limit: hard })
    } else {
        Err(MemlockError::TooLow {
            kernel: kernel.to_owned(),
            need,
            limit: soft,
            cpus,
        })
    }
}

/// On kernels that charge `RLIMIT_MEMLOCK`, makes sure `need` bytes fit,
/// raising the limit as [`plan`] says. The kernel counts what every
/// process of this user has locked, so the check is necessary, not always
/// sufficient: a later EPERM still names the need.
pub fn ensure(kernel: &str, need: u64, cpus: u64) -> Result<Memlock, MemlockError> {
    let limits = current_limit().unwrap_or((0, 0));
    let may_raise_hard = super::privilege::effective()
        .is_ok_and(|caps| super::privilege::holds(caps, super::privilege::CAP_SYS_RESOURCE));
    let raise = |planned: Memlock| match planned {
        Memlock::Enough { limit, .. } if limit != limits.0 => {
            set_limit(limit, limit.max(limits.1)).then_some(planned)
        }
        other => Some(other),
    };
    // CAP_SYS_RESOURCE outside the initial user namespace, or a security
    // module, may still refuse lifting the hard limit: then the soft one
    // goes up to the hard one, if that is enough.
    if let Some(done) = raise(plan(kernel, need, cpus, limits, may_raise_hard)?) {
        return Ok(done);
    }
    plan(kernel, need, cpus, limits, false)
        .ok()
        .and_then(raise)
        .ok_or(MemlockError::TooLow {
            kernel: kernel.to_owned(),
            need,
            limit: limits.0,
            cpus,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> MapShape {
        MapShape {
            map_type,
            key_size,
            value_size,
            max_entries,
        }
    }

    #[test]
    fn charges_grow_with_entries_and_per_cpu_values() {
        let allow = shape(BPF_MAP_TYPE_HASH, 8, 8, 65536);
        let counters = shape(BPF_MAP_TYPE_LRU_PERCPU_HASH, 8, 24, 16384);
        // 64 K elements of 72 bytes and 64 K buckets of 16: about 5.5 MiB.
        let allow_bytes = charge(&allow, 2);
        assert!(
            (5_500_000..6_000_000).contains(&allow_bytes),
            "{allow_bytes}"
        );
        // Per-CPU values dominate on large machines.
        let small = charge(&counters, 2);
        let large = charge(&counters, 64);
        assert!(
            large > small + 24 * 62 * 16384 - PAGE_BYTES,
            "{small} {large}"
        );
        // Every charge is whole pages.
        for bytes in [allow_bytes, small, large] {
            assert_eq!(bytes % PAGE_BYTES, 0);
        }
        let ring = charge(&shape(BPF_MAP_TYPE_RINGBUF, 0, 0, 256 * 1024), 2);
        assert!(ring > 256 * 1024, "{ring}");
    }

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(human(64 * 1024), "64 KiB");
        assert_eq!(human(17 * 1024 * 1024 - 5), "17 MiB");
        assert_eq!(human(libc::RLIM_INFINITY), "unlimited");
    }

    #[test]
    fn kernels_from_5_11_need_no_memlock() {
        for kernel in ["5.11.0", "6.1.0-40-amd64", "7.3.1"] {
            assert!(!charges(kernel), "{kernel}");
            assert_eq!(ensure(kernel, u64::MAX, 2), Ok(Memlock::NotCharged));
        }
        assert!(charges("5.10.0-39-amd64"));
    }

    #[test]
    fn on_5_10_the_limit_is_kept_raised_or_the_start_refused() {
        const NEED: u64 = 17 << 20;
        const CONTAINER: (u64, u64) = (64 << 10, 64 << 10);
        let cases = [
            // Enough already, e.g. a runtime that sets LimitMEMLOCK=infinity.
            ((NEED, NEED), false, Ok(NEED)),
            // CAP_SYS_RESOURCE (the kernel-5.10 overlay) lifts both limits.
            (CONTAINER, true, Ok(libc::RLIM_INFINITY)),
            // Without it only the soft limit may rise, to the hard one.
            ((64 << 10, NEED * 2), false, Ok(NEED * 2)),
            // The DaemonSet's 64 KiB: refused.
            (CONTAINER, false, Err(64 << 10)),
        ];
        for (limits, may_raise, want) in cases {
            let got = plan("5.10.0-32-amd64", NEED, 2, limits, may_raise);
            let got = match got {
                Ok(Memlock::Enough { limit, need }) => {
                    assert_eq!(need, NEED);
                    Ok(limit)
                }
                Ok(Memlock::NotCharged) => panic!("5.10 charges"),
                Err(MemlockError::TooLow { limit, .. }) => Err(limit),
            };
            assert_eq!(got, want, "{limits:?} {may_raise}");
        }
        assert_eq!(
            plan("6.1.0", NEED, 2, CONTAINER, false),
            Ok(Memlock::NotCharged)
        );
    }

    #[test]
    fn refusal_names_need_limit_and_fix() {
        let err = MemlockError::TooLow {
            kernel: "5.10.0-39-amd64".to_owned(),
            need: 17 << 20,
            limit: 64 << 10,
            cpus: 2,
        }
        .to_string();
        for part in [
            "RLIMIT_MEMLOCK",
            "about 17 MiB with 2 possible CPUs",
            "may lock 64 KiB",
            "CAP_SYS_RESOURCE",
            "deploy/overlays/kernel-5.10",
        ] {
            assert!(err.contains(part), "{part:?} in {err}");
        }
    }
}
