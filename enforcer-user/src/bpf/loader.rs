//! The eBPF object built into this binary: loading its programs (the
//! enforce/audit mode is a load-time constant), attaching them to a cgroup
//! with pinned links, and telling builds apart.

use std::path::PathBuf;

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader, include_bytes_aligned,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, Lsm, SchedClassifier,
        links::{FdLink, LinkError},
    },
};
use enforcer_common::{MODE_AUDIT, MODE_ENFORCE, names};

use super::{BpfError, refusal};
use crate::{
    config::Mode,
    host::{cgroup::CgroupDir, kernel, memlock},
};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-guard-ebpf"));

/// The eBPF object built into this binary.
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// A fingerprint of the eBPF object built into this binary: pinned
/// generations of another object are upgraded, not adopted.
pub fn object_fingerprint() -> u64 {
    fingerprint(EBPF_OBJECT)
}

/// What a generation is made of: the object, and whether it loads the BPF
/// LSM program. Turning that on or off is then an upgrade: a new
/// generation attached before the old goes.
pub fn generation_fingerprint(refuse_packet_sockets: bool) -> u64 {
    const WITH_LSM: u64 = 0x4c53_4d00_0000_0001;
    object_fingerprint() ^ if refuse_packet_sockets { WITH_LSM } else { 0 }
}

/// FNV-1a, 64 bits: a stable fingerprint of the eBPF object (not a
/// security measure; it only tells builds apart).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The load-time value of `names::ENFORCE_MODE` for a mode.
fn kernel_value(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// aya's loader, made on a thread of its own as the daemon begins: making
/// one reads and parses the kernel's BTF (megabytes, about a quarter of a
/// start), which then overlaps checking the configuration, the host and
/// the allow list. Dropped unused when the pinned generation is adopted.
pub struct LoaderAhead(Option<std::thread::JoinHandle<EbpfLoader<'static>>>);

impl LoaderAhead {
    pub fn start() -> LoaderAhead {
        let thread = std::thread::Builder::new()
            .name("ebpf-loader".to_owned())
            .spawn(EbpfLoader::new);
        LoaderAhead(thread.ok())
    }

    /// The loader made ahead, or one made now when its thread could not
    /// be started or did not finish.
    pub fn take(self) -> EbpfLoader<'static> {
        self.0
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

/// Loads the object and every program into the kernel, unattached: both
/// halves of a start, [`create_maps`] then [`load_programs`].
pub fn load(
    mode: Mode,
    guarded_cgroup_id: u64,
    refuse_packet_sockets: bool,
    map_pins: Option<&dyn Fn(&str) -> PathBuf>,
) -> Result<Ebpf, BpfError> {
    let mut ebpf = create_maps(EbpfLoader::new(), mode, guarded_cgroup_id, map_pins)?;
    load_programs(&mut ebpf, refuse_packet_sockets)?;
    Ok(ebpf)
}

/// Creates the object's maps with `loader`, the programs not yet loaded.
/// The mode is a load-time constant, so the verifier drops the other
/// mode's path; so is the guarded cgroup, whose sockets alone the node
/// programs judge. With `map_pins`, each map is created pinned at the path
/// it gives.
pub fn create_maps(
    loader: EbpfLoader<'static>,
    mode: Mode,
    guarded_cgroup_id: u64,
    map_pins: Option<&dyn Fn(&str) -> PathBuf>,
) -> Result<Ebpf, BpfError> {
    let mode_value = kernel_value(mode);
    // Its lifetime shortened, to borrow what is set below.
    let mut loader: EbpfLoader<'_> = loader;
    loader.override_global(names::ENFORCE_MODE, &mode_value, true);
    loader.override_global(names::GUARDED_CGROUP_ID, &guarded_cgroup_id, true);
    let pin_paths: Vec<(&str, PathBuf)> = map_pins
        .map(|pin| names::MAPS.iter().map(|&m| (m, pin(m))).collect())
        .unwrap_or_default();
    for (map, path) in &pin_paths {
        loader.map_pin_path(map, path.as_path());
    }
    loader
        .load(EBPF_OBJECT)
        .map_err(|source| refusal::load_error(source, EBPF_OBJECT))
}

/// Loads every program of `ebpf` into the kernel, unattached: the
/// verifier's work, the longest part of a start, which needs nothing of
/// the maps' contents.
pub fn load_programs(ebpf: &mut Ebpf, refuse_packet_sockets: bool) -> Result<(), BpfError> {
    load_egress(ebpf)?;
    for name in names::SOCK_ADDR_PROGRAMS {
        let hook: &mut CgroupSockAddr = program(ebpf, name)?;
        hook.load()
            .map_err(|source| refusal::program_error(name, source))?;
    }
    for name in names::NODE_PROGRAMS {
        let classifier: &mut SchedClassifier = program(ebpf, name)?;
        classifier
            .load()
            .map_err(|source| refusal::program_error(name, source))?;
    }
    if refuse_packet_sockets {
        let name = names::PROG_SOCKET_CREATE;
        let btf = Btf::from_sys_fs().map_err(|e| BpfError::Edge {
            name,
            reason: format!("reading the kernel's BTF: {e}"),
        })?;
        let lsm: &mut Lsm = program(ebpf, name)?;
        lsm.load(SOCKET_CREATE_HOOK, &btf)
            .map_err(|source| refusal::program_error(name, source))?;
    }
    Ok(())
}

/// Loads the egress program that reads packets in place, or, where this
/// kernel's verifier refuses that without CAP_PERFMON (Linux 5.10), the
/// variant that copies what it reads through a helper.
fn load_egress(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let in_place: &mut CgroupSkb = program(ebpf, names::PROG_EGRESS)?;
    let Err(refused) = in_place.load() else {
        return Ok(());
    };
    let name = names::PROG_EGRESS_COPYING;
    // Said at info with the verifier's reason: a new kernel refusing the
    // in-place read for another cause would cost every packet a helper call.
    let reason = refusal::program_error(names::PROG_EGRESS, refused);
    tracing::info!(
        program = name,
        %reason,
        "the verifier refuses reading packets in place here; the egress program copies what it reads"
    );
    let copying: &mut CgroupSkb = program(ebpf, name)?;
    copying
        .load()
        .map_err(|source| refusal::program_error(name, source))
}

/// The generation's egress program: whichever [`load_egress`] loaded.
fn loaded_egress(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, BpfError> {
    let in_place: &mut CgroupSkb = program(ebpf, names::PROG_EGRESS)?;
    let name = if in_place.fd().is_ok() {
        names::PROG_EGRESS
    } else {
        names::PROG_EGRESS_COPYING
    };
    program(ebpf, name)
}

/// The LSM hook the socket program runs on.
const SOCKET_CREATE_HOOK: &str = "socket_create";

/// Pins the node edge guard's programs at the paths `program_pin` gives,
/// so a later daemon attaches the same programs to new interfaces.
pub fn pin_node_programs(
    ebpf: &mut Ebpf,
    program_pin: &dyn Fn(&str) -> PathBuf,
) -> Result<(), BpfError> {
    for name in names::NODE_PROGRAMS {
        let classifier: &mut SchedClassifier = program(ebpf, name)?;
        classifier
            .pin(program_pin(name))
            .map_err(|e| BpfError::Pin {
                name,
                path: program_pin(name),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// What the kernel needs of `RLIMIT_MEMLOCK` for one generation's maps, on
/// kernels that charge it: checked (and raised where allowed) before any
/// map exists, so a refusal leaves nothing behind.
pub fn ensure_memlock() -> Result<memlock::Memlock, BpfError> {
    let release = kernel::release();
    // Parsing the object for its maps' shapes is for those kernels only.
    if !memlock::charges(&release) {
        return Ok(memlock::Memlock::NotCharged);
    }
    let cpus = kernel::possible_cpus();
    let need = memlock_need(cpus).map_err(|e| BpfError::Load {
        source: EbpfError::ParseError(e),
    })?;
    memlock::ensure(&release, need, cpus).map_err(BpfError::from)
}

/// What one generation's maps are charged, on kernels that charge
/// `RLIMIT_MEMLOCK`, with `cpus` possible CPUs.
pub fn memlock_need(cpus: u64) -> Result<u64, aya_obj::ParseError> {
    memlock::shapes(EBPF_OBJECT).map(|shapes| memlock::need(&shapes, cpus))
}

/// Attaches every program to `cgroup` and pins each link at the path
/// `link_pin` gives, so enforcement outlives this process. Links are pinned
/// last: a generation with all its links pinned is complete.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    cgroup: &CgroupDir,
    link_pin: &dyn Fn(&str) -> PathBuf,
) -> Result<(), BpfError> {
    let attach_err = |name, source| BpfError::Attach {
        name,
        cgroup: cgroup.path().to_path_buf(),
        source,
    };
    let pin_err = |name, source: String| BpfError::Pin {
        name,
        path: link_pin(name),
        reason: source,
    };
    // `Single` links: AllowMultiple is refused (EINVAL) with link-based attach
    // here, and single links of other owners (or of our previous generation,
    // during an upgrade) still coexist on the cgroup, their verdicts AND-ed.
    let egress = loaded_egress(ebpf)?;
    let id = egress
        .attach(
            cgroup.file(),
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(|e| attach_err(names::PROG_EGRESS, e))?;
    let link: FdLink = egress
        .take_link(id)
        .map_err(|e| attach_err(names::PROG_EGRESS, e))?
        .try_into()
        .map_err(|e: LinkError| pin_err(names::PROG_EGRESS, e.to_string()))?;
    link.pin(link_pin(names::PROG_EGRESS))
        .map_err(|e| pin_err(names::PROG_EGRESS, e.to_string()))?;
    for name in names::SOCK_ADDR_PROGRAMS {
        let hook: &mut CgroupSockAddr = program(ebpf, name)?;
        let id = hook
            .attach(cgroup.file(), CgroupAttachMode::Single)
            .map_err(|e| attach_err(name, e))?;
        let link: FdLink = hook
            .take_link(id)
            .map_err(|e| attach_err(name, e))?
            .try_into()
            .map_err(|e: LinkError| pin_err(name, e.to_string()))?;
        link.pin(link_pin(name))
            .map_err(|e| pin_err(name, e.to_string()))?;
    }
    Ok(())
}

/// Attaches the BPF LSM program (loaded by [`load`] when asked) and pins
/// its link, before the cgroup links: a complete generation has it.
pub fn attach_lsm_pinned(
    ebpf: &mut Ebpf,
    link_pin: &dyn Fn(&str) -> PathBuf,
) -> Result<(), BpfError> {
    let name = names::PROG_SOCKET_CREATE;
    let lsm: &mut Lsm = program(ebpf, name)?;
    let failed = |e: &dyn std::fmt::Display| BpfError::Pin {
        name,
        path: link_pin(name),
        reason: e.to_string(),
    };
    let id = lsm.attach().map_err(|e| failed(&e))?;
    let link: FdLink = lsm.take_link(id).map_err(|e| failed(&e))?.into();
    link.pin(link_pin(name)).map_err(|e| failed(&e))?;
    Ok(())
}

/// The egress program, for `BPF_PROG_TEST_RUN`.
pub fn egress_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, BpfError> {
    loaded_egress(ebpf)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    let missing = || BpfError::Missing {
        kind: "program",
        name,
    };
    ebpf.program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The programs' calls to compiler-builtins' memory functions: their
    /// byte loops need `CAP_PERFMON` to pass the verifier (enforcer-ebpf's
    /// `stores` module says how the programs avoid them).
    #[test]
    fn programs_call_no_memory_builtins() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];
        let file = object::File::parse(EBPF_OBJECT).expect("the eBPF object parses");
        let mut calls = Vec::new();
        for section in file.sections() {
            let section_name = section.name().unwrap_or_default();
            if section_name.starts_with(".debug") || section_name.starts_with(".BTF") {
                continue;
            }
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(index).expect("relocation symbol");
                let name = symbol.name().unwrap_or_default();
                if BUILTINS.contains(&name) {
                    calls.push(format!("{section_name}+{offset:#x} calls {name}"));
                }
            }
        }
        assert!(calls.is_empty(), "{calls:#?}");
    }

    /// The object defines exactly the maps and programs the contract names:
    /// pins, health and status go by those lists.
    #[test]
    fn the_object_defines_the_contracts_maps_and_programs() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the eBPF object parses");
        // Globals live in maps named after their sections (.rodata, .bss).
        let maps: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.'))
            .collect();
        assert_eq!(maps, BTreeSet::from(names::MAPS));
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let contract: BTreeSet<&str> = names::PROGRAMS
            .into_iter()
            .chain(names::NODE_PROGRAMS)
            .chain([names::PROG_SOCKET_CREATE, names::PROG_EGRESS_COPYING])
            .collect();
        assert_eq!(programs, contract);
    }

    #[test]
    fn our_object_needs_megabytes_more_with_more_cpus() {
        let shapes = memlock::shapes(EBPF_OBJECT).expect("our object parses");
        assert!(shapes.len() >= 7, "{shapes:?}");
        let two = memlock::need(&shapes, 2);
        let many = memlock::need(&shapes, 64);
        assert!(
            (8 << 20..32 << 20).contains(&two),
            "{}",
            memlock::human(two)
        );
        assert!(many > two + (16 << 20), "{}", memlock::human(many));
    }

    #[test]
    fn fingerprint_is_stable_and_tells_bytes_apart() {
        assert_eq!(fingerprint(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fingerprint(b"ab"), fingerprint(b"ba"));
    }
}
