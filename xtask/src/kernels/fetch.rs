//! The pinned kernel packages, fetched with apt from this machine's Debian
//! mirror through a private apt configuration under the target directory
//! (the machine's own lists and state stay untouched). apt checks every file against the
//! suites' signed indexes (debian-archive-keyring); the cache is keyed by
//! version and checked against the pinned SHA256 before use.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use super::{Deb, KERNELS, Kernel, KernelDirs, remove_tree};
use crate::setup::{output, output_of};

/// Where this machine's apt finds Debian (deb822, `URIs:` lines).
const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian mirror this machine uses: the first `URIs:` of a stanza that
/// is not only security suites (those live under another path).
pub fn mirror_uri() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(SOURCES)
        .with_context(|| format!("reading {SOURCES}, which names this machine's Debian mirror"))?;
    parse_mirror(&text).with_context(|| format!("{SOURCES} names no Debian mirror (URIs:)"))
}

fn parse_mirror(deb822: &str) -> Option<String> {
    deb822.split("\n\n").find_map(|stanza| {
        let suites = field(stanza, "Suites")?;
        if suites.split_whitespace().all(|s| s.ends_with("-security")) {
            return None;
        }
        field(stanza, "URIs")?
            .split_whitespace()
            .next()
            .map(str::to_owned)
    })
}

/// A one-line field of a deb822 stanza (sources, `apt-cache show`).
fn field<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    stanza.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// `apt-cache madison` lines: (version, suite) of each package offered.
fn parse_madison(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split('|').map(str::trim);
            let (_package, version, source) = (fields.next()?, fields.next()?, fields.next()?);
            // `<uri> <suite>/<component> <arch> Packages`
            let suite = source.split_whitespace().nth(1)?.split('/').next()?;
            Some((version.to_owned(), suite.to_owned()))
        })
        .collect()
}

/// The file name of a cached package: its version is the key.
fn cached_name(deb: &Deb) -> String {
    format!("{}_{}_amd64.deb", deb.package, deb.version)
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = output("sha256sum", &[&path.to_string_lossy()])?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("sha256sum printed nothing for {}", path.display()))
}

/// Fetches packages on demand; apt is set up and its lists refreshed only
/// when something is not cached yet.
pub struct Fetcher<'a> {
    dirs: &'a KernelDirs,
    mirror: String,
    apt: Option<Apt>,
}

impl<'a> Fetcher<'a> {
    pub fn new(dirs: &'a KernelDirs, mirror: String) -> Fetcher<'a> {
        Fetcher {
            dirs,
            mirror,
            apt: None,
        }
    }

    /// The kernel's packages, from the cache or the mirror, verified.
    pub fn debs(&mut self, kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for deb in kernel.debs {
            let path = self.dirs.debs.join(cached_name(deb));
            if path.is_file() && sha256(&path)? != deb.sha256 {
                println!(
                    "kernels: {} does not match its pin; fetching it again",
                    path.display()
                );
                std::fs::remove_file(&path)?;
            }
            if !path.is_file() {
                self.download(kernel.suite, deb, &path)?;
                let actual = sha256(&path)?;
                if actual != deb.sha256 {
                    std::fs::remove_file(&path)?;
                    bail!(
                        "apt fetched {} {} with SHA256 {actual}, but it is pinned with {}: \
                         the pin in xtask/src/kernels.rs is wrong",
                        deb.package,
                        deb.version,
                        deb.sha256
                    );
                }
            }
            paths.push(path);
        }
        Ok(paths)
    }

    fn download(&mut self, suite: &str, deb: &Deb, path: &Path) -> anyhow::Result<()> {
        if self.apt.is_none() {
            self.apt = Some(Apt::set_up(&self.dirs.apt, &self.mirror)?);
        }
        let apt = self.apt.as_ref().context("apt is set up")?;
        apt.check_offered(suite, deb)?;
        // Into a directory of its own, then renamed: an interrupted download
        // never looks cached.
        let partial = self
            .dirs
            .debs
            .join(format!("partial-{}", std::process::id()));
        remove_tree(&partial)?;
        std::fs::create_dir_all(&partial)?;
        println!("kernels: fetching {} {}", deb.package, deb.version);
        let result = apt.download(deb, &partial).and_then(|()| {
            let file = std::fs::read_dir(&partial)?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .with_context(|| format!("apt-get download left no .deb for {}", deb.package))?;
            std::fs::rename(&file, path).with_context(|| format!("moving {}", file.display()))
        });
        remove_tree(&partial)?;
        result
    }
}

/// apt with its own sources, lists and state under the target directory.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn set_up(dir: &Path, mirror: &str) -> anyhow::Result<Apt> {
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: install the debian-archive-keyring package");
        }
        let lists = dir.join("lists");
        let parts = dir.join("sources.list.d");
        for d in [lists.join("partial"), parts.clone(), dir.join("cache")] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut suites: Vec<&str> = Vec::new();
        for kernel in &KERNELS {
            if !suites.contains(&kernel.suite) {
                suites.push(kernel.suite);
            }
        }
        let sources = suites.iter().fold(String::new(), |mut sources, suite| {
            let _ = writeln!(
                sources,
                "deb [arch=amd64 signed-by={KEYRING}] {mirror} {suite} main"
            );
            sources
        });
        let source_list = dir.join("sources.list");
        std::fs::write(&source_list, sources)?;
        let status = dir.join("status");
        std::fs::write(&status, "")?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let options = [
            format!("Dir::Etc::SourceList={}", path(&source_list)),
            format!("Dir::Etc::SourceParts={}", path(&parts)),
            format!("Dir::State::Lists={}", path(&lists)),
            format!("Dir::State::status={}", path(&status)),
            format!("Dir::Cache={}", path(&dir.join("cache"))),
            "APT::Architecture=amd64".to_owned(),
            // Our directories belong to root; apt's _apt user could not write them.
            "APT::Sandbox::User=root".to_owned(),
            // Only the Packages indexes: no translations, no AppStream data.
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect();
        let apt = Apt { options };
        println!(
            "kernels: refreshing the package lists of {}",
            suites.join(", ")
        );
        apt.run("apt-get", &["-q", "update"], None)?;
        Ok(apt)
    }

    fn run(&self, program: &str, args: &[&str], dir: Option<&Path>) -> anyhow::Result<String> {
        let mut command = std::process::Command::new(program);
        command.args(&self.options).args(args);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        output_of(&mut command)
    }

    /// Fails, naming what the suite has now, unless it offers the pinned version.
    fn check_offered(&self, suite: &str, deb: &Deb) -> anyhow::Result<()> {
        let in_suite = |package: &str| -> anyhow::Result<Vec<String>> {
            let offered = parse_madison(&self.run("apt-cache", &["madison", package], None)?);
            Ok(offered
                .into_iter()
                .filter(|(_, s)| s == suite)
                .map(|(v, _)| v)
                .collect())
        };
        let versions = in_suite(deb.package)?;
        if versions.iter().any(|v| v == deb.version) {
            return Ok(());
        }
        let available = if versions.is_empty() {
            // A new kernel ABI is a new package name: say where the suite's
            // default kernel points now.
            let current = in_suite("linux-image-amd64")?;
            let depends = match current.first() {
                Some(version) => {
                    let wanted = format!("linux-image-amd64={version}");
                    let shown = self.run("apt-cache", &["show", &wanted], None)?;
                    field(&shown, "Depends").unwrap_or("nothing").to_owned()
                }
                None => "nothing".to_owned(),
            };
            format!(
                "{suite} no longer has {} at all; its linux-image-amd64 is {} and depends on {depends}",
                deb.package,
                current.join(", ")
            )
        } else {
            format!("{suite} has {}", versions.join(", "))
        };
        bail!(
            "the pinned {} {} ({suite}) is gone from the mirror: {available}. \
             Update the pin in xtask/src/kernels.rs (package, version and SHA256)",
            deb.package,
            deb.version
        )
    }

    fn download(&self, deb: &Deb, into: &Path) -> anyhow::Result<()> {
        let wanted = format!("{}={}", deb.package, deb.version);
        self.run("apt-get", &["-q", "download", &wanted], Some(into))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_the_first_non_security_source() {
        let sources = "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian-security\n\
                       Suites: bookworm-security\nComponents: main\n\n\
                       Types: deb\nURIs: http://mirror.invalid/debian http://other.invalid/debian\n\
                       Suites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            parse_mirror(sources).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(parse_mirror("Types: deb\nSuites: bookworm\n"), None);
    }

    #[test]
    fn madison_lines_give_version_and_suite() {
        let out = " linux-image-amd64 | 7.3.4-1~bpo13+1 | http://mirror.invalid/debian trixie-backports/main amd64 Packages\n\
                   linux-image-amd64 | 6.12.117-1 | http://mirror.invalid/debian trixie/main amd64 Packages\n\
                   garbage\n";
        assert_eq!(
            parse_madison(out),
            [
                ("7.3.4-1~bpo13+1".to_owned(), "trixie-backports".to_owned()),
                ("6.12.117-1".to_owned(), "trixie".to_owned()),
            ]
        );
    }
}
