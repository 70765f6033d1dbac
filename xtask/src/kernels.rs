//! `cargo xtask kernels`: the standalone traffic tests on the Debian kernels
//! nodes run, each booted under qemu (TCG: KVM here runs only special
//! guests) with no network device at all, as root and with the DaemonSet's
//! privileges. One line per kernel and privileges; kernels/matrix.txt in the
//! target directory keeps the table.
//!
//! Everything downloaded or built is cached under the target directory:
//! the kernel packages by version, the guest's root filesystem and each
//! kernel's modules once; only the binaries and /init are packed every run.

mod boot;
mod build;
mod fetch;
mod report;
mod rootfs;

use std::{
    fs::File,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    build::guest_files,
    report::{Row, render, rows_of, summary},
};

use crate::{
    interrupt::{catch_interrupts, interrupted},
    is_root, setup,
    setup::output,
    target_dir,
};

/// A Debian package, pinned so the matrix is reproducible: a new upload is
/// taken only by changing it here. The SHA256 is the archive's (from the
/// suite's signed Packages index).
pub struct Deb {
    pub package: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
}

/// One kernel of the matrix and the packages holding its image and modules.
pub struct Kernel {
    /// The upstream version, as the table shows it.
    pub version: &'static str,
    pub suite: &'static str,
    pub debs: &'static [Deb],
}

/// The kernels nodes run: each Debian release's, and the newest backport.
pub const KERNELS: [Kernel; 4] = [
    Kernel {
        version: "5.10.223",
        suite: "bullseye",
        debs: &[Deb {
            package: "linux-image-5.10.0-32-amd64",
            version: "5.10.223-1",
            sha256: "86a6792f3a03ab15a643f385830cdaa921f15e3e9c8bf63aa55a9243c62fc797",
        }],
    },
    Kernel {
        version: "6.1.176",
        suite: "bookworm",
        debs: &[Deb {
            package: "linux-image-6.1.0-50-amd64",
            version: "6.1.176-1",
            sha256: "7b5597492a0a65aee61985a492e6bcc3f2cde830072a0e3b3d8c7e1b90279bd3",
        }],
    },
    Kernel {
        version: "6.12.117",
        suite: "trixie",
        debs: &[Deb {
            package: "linux-image-6.12.117+deb13-amd64",
            version: "6.12.117-1",
            sha256: "ca712d36790184f6ac125ce2b20ea4e2202ae6bb7817b7de268f1f0115ccda73",
        }],
    },
    // From 7.x the image, the modules and the base files are packages of their own.
    Kernel {
        version: "7.3.4",
        suite: "trixie-backports",
        debs: &[
            Deb {
                package: "linux-binary-7.3.4+deb13-amd64",
                version: "7.3.4-1~bpo13+1",
                sha256: "7e3248d03a84dcdda88c567aa8c4038f2e7795d2dd167b112c56f8901b6f513f",
            },
            Deb {
                package: "linux-modules-7.3.4+deb13-amd64",
                version: "7.3.4-1~bpo13+1",
                sha256: "b3ea01922c9f133767a83cf6891c19b3693858ded617bf22d1e34f95382c08ea",
            },
            Deb {
                package: "linux-base-7.3.4+deb13-amd64",
                version: "7.3.4-1~bpo13+1",
                sha256: "5663505495b5c90be94af42105c7b28629802516779102dac48d5a00cc00fccf",
            },
        ],
    },
];

/// Modules the guest loads (Debian builds them as modules): the sandbox's
/// veth pairs; for the node-shaped sandboxes, the bridge, VXLAN, nftables
/// with NAT (kube-proxy's DNAT, the uplink masquerade, the sniffer) and
/// clsact with BPF filters (the node edge guard before tcx, the redirect
/// program).
///
/// A name starting with `?` is loaded where it is a module of its own and
/// skipped where it is not (`nft_counter` is one on 5.10; later kernels
/// build it into `nf_tables`).
const GUEST_MODULES: [&str; 12] = [
    "veth",
    "bridge",
    "vxlan",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "?nft_counter",
    "sch_ingress",
    "cls_bpf",
    "af_packet",
];
/// Where the guest finds the daemon and the probe, and the test executables.
const GUEST_BIN_DIR: &str = "/opt/imds-guard/bin";
const GUEST_TEST_DIR: &str = "/opt/imds-guard/tests";
/// A guest takes about a minute and a half under TCG (boot, two or three
/// test executables, power-off); this leaves room for a slow machine, not
/// for a hang.
const BOOT_TIMEOUT: Duration = Duration::from_mins(10);
/// The first kernel that charges BPF maps to memory cgroups, not `RLIMIT_MEMLOCK`.
const FIRST_MEMCG_KERNEL: (u32, u32) = (5, 11);

/// What the daemon under test may do (tests/src/privileges.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    Root,
    DaemonSet,
    /// deploy/overlays/kernel-5.10: the DaemonSet's plus CAP_SYS_RESOURCE.
    Kernel510Overlay,
    /// deploy/overlays/packet-socket-lsm: the DaemonSet's plus CAP_PERFMON
    /// (Linux 5.13 and newer).
    LsmOverlay,
}

impl Grant {
    fn label(self) -> &'static str {
        match self {
            Grant::Root => "root (every capability)",
            Grant::DaemonSet => "DaemonSet (BPF, NET_ADMIN, 64 KiB memlock)",
            Grant::Kernel510Overlay => "kernel-5.10 overlay (+ SYS_RESOURCE)",
            Grant::LsmOverlay => "packet-socket-lsm overlay (+ PERFMON)",
        }
    }

    /// `IMDS_GUARD_TEST_CAPS` for the harness; none means the DaemonSet's.
    fn caps_env(self) -> Option<&'static str> {
        match self {
            Grant::Root => Some("all"),
            Grant::DaemonSet => None,
            Grant::Kernel510Overlay => Some("bpf,net_admin,sys_resource"),
            Grant::LsmOverlay => Some("bpf,net_admin,perfmon"),
        }
    }
}

/// Test executables of one grant in one guest.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    /// In the guest's markers.
    pub id: &'static str,
    pub grant: Grant,
    /// What the tests assert, for the table.
    pub expected: &'static str,
    /// Integration test targets of imds-guard-tests.
    pub tests: &'static [&'static str],
}

/// The test targets any guest runs.
const TEST_TARGETS: [&str; 5] = [
    "standalone",
    "privileges",
    "node_guard",
    "packet_lsm",
    "doctor",
];

/// What a kernel runs: the traffic tests as root and with the DaemonSet's
/// privileges, which kernels before 5.11 refuse (maps are charged to the
/// 64 KiB `RLIMIT_MEMLOCK`): there the refusal is checked and the traffic
/// tests run with the documented overlay instead.
fn plan(version: &str) -> anyhow::Result<Vec<Run>> {
    let root = Run {
        id: "root",
        grant: Grant::Root,
        expected: "enforces",
        tests: &["standalone"],
    };
    Ok(if major_minor(version)? < FIRST_MEMCG_KERNEL {
        vec![
            root,
            Run {
                id: "daemonset",
                grant: Grant::DaemonSet,
                expected: "start refused naming RLIMIT_MEMLOCK, nothing left behind; doctor fails memlock",
                tests: &["privileges", "doctor"],
            },
            Run {
                id: "overlay",
                grant: Grant::Kernel510Overlay,
                expected: "enforces; node edge guard closes the node's routes; doctor passes",
                tests: &["standalone", "node_guard", "doctor"],
            },
        ]
    } else {
        vec![
            root,
            Run {
                id: "daemonset",
                grant: Grant::DaemonSet,
                expected: "enforces; node edge guard closes the node's routes; doctor passes",
                tests: &["privileges", "standalone", "node_guard", "doctor"],
            },
            Run {
                id: "lsm",
                grant: Grant::LsmOverlay,
                expected: "refuses AF_PACKET and AF_XDP sockets in the subtree (bpf LSM); doctor passes",
                tests: &["packet_lsm"],
            },
        ]
    })
}

fn major_minor(version: &str) -> anyhow::Result<(u32, u32)> {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor)),
        _ => bail!("kernel version {version:?} is not MAJOR.MINOR[...]"),
    }
}

/// The matrix's directories under `<target>/kernels`; the scratch
/// directory is this run's own and goes when it ends.
pub struct KernelDirs {
    root: PathBuf,
    apt: PathBuf,
    debs: PathBuf,
    guest: PathBuf,
    logs: PathBuf,
    scratch: PathBuf,
}

impl KernelDirs {
    fn new(target: &Path) -> anyhow::Result<KernelDirs> {
        let root = target.join("kernels");
        let dirs = KernelDirs {
            apt: root.join("apt"),
            debs: root.join("debs"),
            guest: root.join("guest"),
            logs: root.join("logs"),
            scratch: root.join("tmp").join(std::process::id().to_string()),
            root,
        };
        for dir in [
            &dirs.apt,
            &dirs.debs,
            &dirs.guest,
            &dirs.logs,
            &dirs.scratch,
        ] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(dirs)
    }
}

impl Drop for KernelDirs {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.scratch) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

/// Removes a directory tree, first unmounting anything mounted inside (an
/// interrupted debootstrap leaves /proc and /sys mounted in its target) and
/// never crossing into another file system.
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut inside: Vec<PathBuf> = enforcer_common::mountinfo::parse(&mountinfo)
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first.
    inside.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in inside {
        output("umount", &["--lazy", &point.to_string_lossy()])?;
    }
    output("rm", &["-rf", "--one-file-system", &dir.to_string_lossy()]).map(|_| ())
}

/// `cargo xtask kernels`: setup, then the matrix.
pub fn run(root: &Path) -> anyhow::Result<()> {
    setup::run(root)?;
    matrix(root)
}

/// The kernel matrix (`cargo xtask test` runs it after the host's tests).
pub fn matrix(root: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the kernel matrix needs root (debootstrap, depmod, the guests' images)");
    }
    let started = Instant::now();
    catch_interrupts()?;
    let files = guest_files(root)?;
    let dirs = KernelDirs::new(&target_dir(root)?)?;
    let mirror = fetch::mirror_uri()?;
    let mut fetcher = fetch::Fetcher::new(&dirs, mirror.clone());
    let base = rootfs::base(&dirs, &mirror)?;
    let binaries = rootfs::pack(&dirs, "binaries", |stage| {
        for (from, to) in &files {
            let to = stage.join(to.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // Without debug information the binaries are a tenth of the size.
            let (from, to) = (from.to_string_lossy(), to.to_string_lossy());
            output("strip", &["--strip-debug", "-o", &to, &from])?;
        }
        Ok(())
    })?;
    let mut guests = Vec::new();
    // A development aid: IMDS_GUARD_KERNELS=5.10,6.1 boots only those (by
    // version prefix). CI sets none and runs them all.
    let only = std::env::var("IMDS_GUARD_KERNELS").ok();
    let wanted = |version: &str| {
        only.as_deref().is_none_or(|list| {
            list.split(',')
                .any(|prefix| version.starts_with(prefix.trim()))
        })
    };
    for kernel in KERNELS.iter().filter(|k| wanted(k.version)) {
        interrupted()?;
        let cached = rootfs::cached_kernel(&dirs, kernel, &GUEST_MODULES);
        let prepared = if let Some(prepared) = cached {
            prepared
        } else {
            let debs = fetcher.debs(kernel)?;
            rootfs::prepare_kernel(&dirs, kernel, &debs, &GUEST_MODULES)?
        };
        let runs = plan(kernel.version)?;
        let init = rootfs::pack(&dirs, &format!("init-{}", kernel.version), |stage| {
            let path = stage.join("init");
            std::fs::write(&path, boot::init_script(&GUEST_MODULES, &runs))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            Ok(())
        })?;
        let initrd = dirs.scratch.join(format!("initrd-{}", kernel.version));
        concatenate(&[&base, &prepared.modules, &binaries, &init], &initrd)?;
        guests.push(Guest {
            kernel,
            log: dirs.logs.join(format!("{}.log", kernel.version)),
            prepared,
            initrd,
            runs,
        });
    }
    // One guest at a time: the tests keep both cores busy under TCG, and two
    // guests side by side took longer in all than one after the other.
    let mut rows: Vec<Row> = Vec::new();
    for guest in &guests {
        interrupted()?;
        rows.extend(boot_one(guest)?);
    }
    let table = render(&rows);
    let path = dirs.root.join("matrix.txt");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    println!("{table}");
    println!(
        "kernels: {} in {:.0?} (table in {})",
        summary(&rows),
        started.elapsed(),
        path.display()
    );
    if rows.iter().any(|r| !r.ok) {
        bail!("the kernel matrix failed: {}", summary(&rows));
    }
    Ok(())
}

/// A kernel ready to boot, with what it runs.
struct Guest {
    kernel: &'static Kernel,
    prepared: rootfs::GuestKernel,
    initrd: PathBuf,
    runs: Vec<Run>,
    log: PathBuf,
}

fn boot_one(guest: &Guest) -> anyhow::Result<Vec<Row>> {
    let kernel = guest.kernel;
    println!(
        "kernels: booting {} ({}, {}); console in {}",
        kernel.version,
        kernel.suite,
        guest.prepared.release,
        guest.log.display()
    );
    let start = || {
        boot::boot(
            &guest.prepared.vmlinuz,
            &guest.initrd,
            &guest.log,
            BOOT_TIMEOUT,
        )
    };
    let mut boot = start()?;
    if boot.died_before_init() {
        // Once more: the emulator's failure, not a result (see
        // `Boot::died_before_init`). A second one counts.
        println!(
            "kernels: {} panicked before its init ran; booting it once more",
            kernel.version
        );
        boot = start()?;
    }
    std::fs::remove_file(&guest.initrd)?;
    let rows = rows_of(kernel, &guest.runs, &boot);
    for row in &rows {
        println!(
            "kernels: {} {}: {} ({} s of the guest's {} s)",
            kernel.version,
            row.privileges,
            row.result,
            row.seconds,
            boot.elapsed.as_secs()
        );
    }
    Ok(rows)
}

fn concatenate(parts: &[&Path], into: &Path) -> anyhow::Result<()> {
    let mut out = File::create(into).with_context(|| format!("creating {}", into.display()))?;
    for part in parts {
        let mut input = File::open(part).with_context(|| format!("opening {}", part.display()))?;
        std::io::copy(&mut input, &mut out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_11_check_the_refusal_and_run_the_overlay() {
        let ids = |version| -> Vec<(&str, Grant)> {
            plan(version)
                .unwrap()
                .iter()
                .map(|r| (r.id, r.grant))
                .collect()
        };
        assert_eq!(
            ids("5.10.223"),
            [
                ("root", Grant::Root),
                ("daemonset", Grant::DaemonSet),
                ("overlay", Grant::Kernel510Overlay)
            ]
        );
        assert_eq!(
            ids("5.11"),
            [
                ("root", Grant::Root),
                ("daemonset", Grant::DaemonSet),
                ("lsm", Grant::LsmOverlay)
            ]
        );
        assert_eq!(ids("7.3.4").len(), 3);
        assert!(plan("seven").is_err());
        for kernel in &KERNELS {
            let runs = plan(kernel.version).unwrap();
            assert!(
                runs.iter()
                    .all(|r| r.tests.iter().all(|t| TEST_TARGETS.contains(t)))
            );
        }
    }
}
