//! What a guest boots: an initramfs made of cpio archives the kernel unpacks
//! one after the other (concatenated archives are allowed). The small Debian
//! root filesystem is built once; each kernel's modules once per pinned
//! version; the binaries and /init every run.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{Kernel, KernelDirs, fetch::KEYRING, remove_tree};
use crate::setup::output;

/// The guest's Debian release: the build machine's (`VERSION_CODENAME` in
/// /etc/os-release), so the binaries built here find the C library they
/// were linked against.
fn host_release() -> anyhow::Result<String> {
    let os_release = std::fs::read_to_string("/etc/os-release")?;
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|name| name.trim_matches('"').to_owned())
        .filter(|name| !name.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: the guest's root filesystem is built from this machine's Debian release")
}
/// What the tests run besides the Essential set: ip (netns, veth), modprobe,
/// sysctl, nft (the node-shaped sandboxes), the CA store (the daemon's
/// Kubernetes client loads it even for a plain-HTTP test API server);
/// bpftool to look at a guest's programs when a run fails.
const PACKAGES: [&str; 6] = [
    "iproute2",
    "kmod",
    "procps",
    "nftables",
    "ca-certificates",
    "bpftool",
];
/// Nothing in the guest reads these; without them the archive is half the size.
const TRIMMED: [&str; 6] = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
    "var/cache/apt",
    "var/lib/apt/lists",
];

/// Whether `dir` holds a finished build made with `stamp`.
fn cached(dir: &Path, stamp: &str) -> bool {
    std::fs::read_to_string(dir.join("stamp")).is_ok_and(|s| s == stamp)
}

/// The base archive: debootstrap's minbase with [`PACKAGES`], trimmed.
pub fn base(dirs: &KernelDirs, mirror: &str) -> anyhow::Result<PathBuf> {
    let suite = host_release()?;
    let cache = dirs.guest.join(format!("rootfs-{suite}"));
    let archive = cache.join("rootfs.cpio");
    let stamp = format!(
        "debootstrap --variant=minbase --include={} {suite}\ntrimmed: {}\n",
        PACKAGES.join(","),
        TRIMMED.join(" ")
    );
    if cached(&cache, &stamp) && archive.is_file() {
        return Ok(archive);
    }
    let tree = dirs.scratch.join("rootfs");
    remove_tree(&tree)?;
    println!("kernels: building the guest's root filesystem ({suite}, minbase; about a minute)");
    let built = debootstrap(&tree, &suite, mirror).and_then(|()| {
        for path in TRIMMED {
            remove_tree(&tree.join(path))?;
        }
        remove_tree(&cache)?;
        std::fs::create_dir_all(&cache)?;
        cpio(&tree, &archive)
    });
    remove_tree(&tree)?;
    built?;
    std::fs::write(cache.join("stamp"), stamp)?;
    Ok(archive)
}

fn debootstrap(tree: &Path, suite: &str, mirror: &str) -> anyhow::Result<()> {
    let include = format!("--include={}", PACKAGES.join(","));
    let keyring = format!("--keyring={KEYRING}");
    let tree = tree.to_string_lossy();
    let args = [
        "--variant=minbase",
        &include,
        &keyring,
        suite,
        &tree,
        mirror,
    ];
    output("debootstrap", &args).map(|_| ())
}

/// One kernel, ready to boot: its image and an archive of its modules.
pub struct GuestKernel {
    /// `uname -r`: the modules' directory name.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// The kernel from its cache directory, if it was prepared from exactly
/// these packages and modules.
pub fn cached_kernel(dirs: &KernelDirs, kernel: &Kernel, modules: &[&str]) -> Option<GuestKernel> {
    let dir = dirs.guest.join(kernel.version);
    if !cached(&dir, &kernel_stamp(kernel, modules)) {
        return None;
    }
    let release = std::fs::read_to_string(dir.join("release")).ok()?;
    Some(GuestKernel {
        release: release.trim().to_owned(),
        vmlinuz: dir.join("vmlinuz"),
        modules: dir.join("modules.cpio"),
    })
}

fn kernel_stamp(kernel: &Kernel, modules: &[&str]) -> String {
    let debs: Vec<String> = kernel
        .debs
        .iter()
        .map(|d| format!("{}={} {}", d.package, d.version, d.sha256))
        .collect();
    // "with softdeps": archives made before soft dependencies were followed
    // lack libcrc32c's crc32c.
    format!(
        "{}\nmodules: {} (with softdeps)\n",
        debs.join("\n"),
        modules.join(" ")
    )
}

/// Unpacks the kernel's packages, keeps the image and the modules the guest
/// loads (with what they depend on), and caches both.
pub fn prepare_kernel(
    dirs: &KernelDirs,
    kernel: &Kernel,
    debs: &[PathBuf],
    modules: &[&str],
) -> anyhow::Result<GuestKernel> {
    let unpacked = dirs.scratch.join(format!("unpacked-{}", kernel.version));
    let staged = dirs.scratch.join(format!("modules-{}", kernel.version));
    let dir = dirs.guest.join(kernel.version);
    let prepared = (|| {
        for path in [&unpacked, &staged, &dir] {
            remove_tree(path)?;
            std::fs::create_dir_all(path)?;
        }
        for deb in debs {
            let (deb, into) = (deb.to_string_lossy(), unpacked.to_string_lossy());
            output("dpkg-deb", &["-x", &deb, &into])?;
        }
        // Older packages ship /lib/modules, newer ones /usr/lib/modules.
        let base = ["", "usr"]
            .iter()
            .map(|prefix| unpacked.join(prefix))
            .find(|b| b.join("lib/modules").is_dir())
            .context("the kernel packages hold no lib/modules")?;
        let release = only_entry(&base.join("lib/modules"))?;
        let tree = base.join("lib/modules").join(&release);
        let vmlinuz = [
            unpacked.join("boot").join(format!("vmlinuz-{release}")),
            tree.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {release} in the packages"))?;
        depmod(&base, &release)?;
        let dep = std::fs::read_to_string(tree.join("modules.dep"))?;
        let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
        let soft = Softdeps {
            softdep: &std::fs::read_to_string(tree.join("modules.softdep")).unwrap_or_default(),
            alias: &std::fs::read_to_string(tree.join("modules.alias")).unwrap_or_default(),
        };
        let needed = module_closure(&dep, &builtin, &soft, modules)
            .map_err(|missing| anyhow::anyhow!("kernel {release} has no module {missing}"))?;
        // The guest's /lib is a link to usr/lib: the archive must not replace it.
        let staged_base = staged.join("usr");
        let staged_tree = staged_base.join("lib/modules").join(&release);
        let kept = [
            "modules.order",
            "modules.builtin",
            "modules.builtin.modinfo",
        ];
        for relative in needed.iter().map(String::as_str).chain(kept) {
            let from = tree.join(relative);
            if !from.is_file() {
                continue;
            }
            let to = staged_tree.join(relative);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
        depmod(&staged_base, &release)?;
        cpio(&staged, &dir.join("modules.cpio"))?;
        std::fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
        std::fs::write(dir.join("release"), &release)?;
        std::fs::write(dir.join("stamp"), kernel_stamp(kernel, modules))?;
        anyhow::Ok(GuestKernel {
            release,
            vmlinuz: dir.join("vmlinuz"),
            modules: dir.join("modules.cpio"),
        })
    })();
    remove_tree(&unpacked)?;
    remove_tree(&staged)?;
    prepared.with_context(|| format!("preparing kernel {}", kernel.version))
}

fn only_entry(dir: &Path) -> anyhow::Result<String> {
    let names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel in {}, found {names:?}", dir.display()),
    }
}

/// depmod for the modules below `<base>/lib/modules/<release>`.
fn depmod(base: &Path, release: &str) -> anyhow::Result<()> {
    output("depmod", &["-b", &base.to_string_lossy(), release]).map(|_| ())
}

/// A module's name from its path: `kernel/drivers/net/veth.ko.xz` is `veth`
/// (modprobe treats `-` and `_` alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// depmod's `modules.softdep` and `modules.alias`: what modprobe loads
/// besides a module's hard dependencies (`libcrc32c`, which `nf_tables` needs
/// on older kernels, asks for a `crc32c` implementation this way).
pub struct Softdeps<'a> {
    pub softdep: &'a str,
    pub alias: &'a str,
}

impl Softdeps<'_> {
    /// The names (modules or aliases) `module` softly depends on.
    fn of(&self, module: &str) -> Vec<String> {
        self.softdep
            .lines()
            .filter_map(|line| line.strip_prefix("softdep "))
            .filter_map(|rest| rest.split_once(' '))
            .filter(|(name, _)| name.replace('-', "_") == module)
            .flat_map(|(_, deps)| deps.split_whitespace())
            .filter(|word| !word.ends_with(':'))
            .map(|name| name.replace('-', "_"))
            .collect()
    }

    /// The modules an alias (or a module name) stands for.
    fn resolve(&self, name: &str) -> Vec<String> {
        let aliased: Vec<String> = self
            .alias
            .lines()
            .filter_map(|line| line.strip_prefix("alias "))
            .filter_map(|rest| rest.split_once(' '))
            .filter(|(alias, _)| alias.replace('-', "_") == name)
            .map(|(_, module)| module.trim().replace('-', "_"))
            .collect();
        if aliased.is_empty() {
            vec![name.to_owned()]
        } else {
            aliased
        }
    }
}

/// The module files (paths as modules.dep writes them) that loading
/// `wanted` needs, hard and soft dependencies included (a soft one that is
/// no module here is skipped, as modprobe does); built-in modules need
/// none. Fails with the first wanted name that is neither a module nor
/// built in.
fn module_closure(
    dep: &str,
    builtin: &str,
    soft: &Softdeps,
    wanted: &[&str],
) -> Result<Vec<String>, String> {
    let deps: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|line| {
            let (module, needs) = line.split_once(':')?;
            Some((module.trim(), needs.split_whitespace().collect()))
        })
        .collect();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut needed = BTreeSet::new();
    let mut queue: Vec<String> = Vec::new();
    for wanted_name in wanted {
        let optional = wanted_name.starts_with('?');
        let name = wanted_name.trim_start_matches('?').replace('-', "_");
        match deps.iter().find(|(m, _)| module_name(m) == name) {
            Some((module, _)) => queue.push((*module).to_owned()),
            None if builtin.contains(&name) || optional => {}
            None => return Err(name),
        }
    }
    while let Some(module) = queue.pop() {
        if !needed.insert(module.clone()) {
            continue;
        }
        if let Some((_, needs)) = deps.iter().find(|(m, _)| *m == module) {
            queue.extend(needs.iter().map(|n| (*n).to_owned()));
        }
        for name in soft
            .of(&module_name(&module))
            .iter()
            .flat_map(|n| soft.resolve(n))
        {
            if let Some((path, _)) = deps.iter().find(|(m, _)| module_name(m) == name) {
                queue.push((*path).to_owned());
            }
        }
    }
    Ok(needed.into_iter().collect())
}

/// An archive of what `fill` puts into an empty directory (the guest's root).
pub fn pack(
    dirs: &KernelDirs,
    name: &str,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let stage = dirs.scratch.join(name);
    let archive = dirs.scratch.join(format!("{name}.cpio"));
    remove_tree(&stage)?;
    std::fs::create_dir_all(&stage)?;
    let packed = fill(&stage).and_then(|()| cpio(&stage, &archive));
    remove_tree(&stage)?;
    packed.with_context(|| format!("packing {name} for the guest"))?;
    Ok(archive)
}

/// Packs `dir` into a newc cpio archive at `archive` (written whole, then
/// renamed). /dev stays empty: the guest mounts devtmpfs there.
fn cpio(dir: &Path, archive: &Path) -> anyhow::Result<()> {
    let partial = archive.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut find = Command::new("find")
        .args([".", "-path", "./dev/*", "-prune", "-o", "-print"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("running find")?;
    let names = find.stdout.take().context("find has no stdout")?;
    let packed = Command::new("cpio")
        .args(["--create", "--format=newc", "--owner=0:0", "--quiet"])
        .current_dir(dir)
        .stdin(names)
        .stdout(file)
        .status()
        .context("running cpio")?;
    let listed = find.wait()?;
    if !packed.success() || !listed.success() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "packing {} failed (find {listed}, cpio {packed})",
            dir.display()
        );
    }
    std::fs::rename(&partial, archive)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_follows_dependencies_and_skips_built_in_modules() {
        let dep = "kernel/drivers/net/veth.ko.xz:\n\
                   kernel/net/sched/sch-fq.ko: kernel/net/core/helper.ko\n\
                   kernel/net/core/helper.ko: kernel/lib/base.ko\n\
                   kernel/lib/base.ko:\n\
                   kernel/fs/unused.ko:\n";
        let builtin = "kernel/net/ipv6/ipv6.ko\n";
        let none = Softdeps {
            softdep: "",
            alias: "",
        };
        assert_eq!(
            module_closure(dep, builtin, &none, &["veth", "sch_fq", "ipv6"]).unwrap(),
            [
                "kernel/drivers/net/veth.ko.xz",
                "kernel/lib/base.ko",
                "kernel/net/core/helper.ko",
                "kernel/net/sched/sch-fq.ko",
            ]
        );
        assert_eq!(
            module_closure(dep, builtin, &none, &["wireguard"]),
            Err("wireguard".to_owned())
        );
        // Optional: a module where it is one, nothing where it is not.
        assert_eq!(
            module_closure(dep, builtin, &none, &["?veth", "?wireguard"]).unwrap(),
            ["kernel/drivers/net/veth.ko.xz"]
        );
        // Debian 5.10: nf_tables needs libcrc32c, which asks for any crc32c
        // (an alias); one that is no module here is skipped.
        let dep = "kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko\n\
                   kernel/lib/libcrc32c.ko:\n\
                   kernel/crypto/crc32c_generic.ko:\n";
        let soft = Softdeps {
            softdep: "# Soft dependencies\nsoftdep libcrc32c pre: crc32c missing\n",
            alias: "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\n",
        };
        assert_eq!(
            module_closure(dep, "", &soft, &["nf_tables"]).unwrap(),
            [
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_tables.ko",
            ]
        );
    }
}
