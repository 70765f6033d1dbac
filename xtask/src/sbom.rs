//! The SBOM: a CycloneDX document of the daemon's crate and everything
//! compiled into it, made by cargo-cyclonedx from the workspace's
//! Cargo.lock. The image build makes it beside the binary (`cargo xtask
//! sbom`, Dockerfile) and ships it at `IN_IMAGE`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{cargo_stdout, run_in, setup::CargoTool};

pub const CYCLONEDX: CargoTool = CargoTool {
    krate: "cargo-cyclonedx",
    subcommand: "cyclonedx",
    version: "0.5.9",
    purpose: "the image's SBOM",
};

/// Where the image carries the SBOM.
pub const IN_IMAGE: &str = "/usr/share/doc/imds-guard/sbom.cdx.json";

/// The CycloneDX version written: the newest cargo-cyclonedx 0.5 writes.
const SPEC_VERSION: &str = "1.5";

/// The crate the SBOM describes, and its binary the image runs.
const CRATE: &str = "enforcer-user";
const BINARY: &str = "imds-guard";

/// `cargo xtask sbom OUT [--target T]`: the pinned cargo-cyclonedx
/// (installed when missing), the SBOM of the build for `target` written to
/// `out`, then checked.
pub fn run(root: &Path, out: &Path, target: Option<&str>) -> anyhow::Result<()> {
    CYCLONEDX.ensure()?;
    generate(root, out, target)?;
    Sbom::read(out)?.check(root)?;
    println!("sbom: {} written and checked", out.display());
    Ok(())
}

/// Writes the daemon crate's SBOM, for the build for `target` (this
/// machine's when `None`: cargo-cyclonedx lists the dependencies of one
/// target), to `out`. cargo-cyclonedx writes one file into every workspace
/// member's directory, under the name given: the daemon's is moved to
/// `out`, the others removed.
pub fn generate(root: &Path, out: &Path, target: Option<&str>) -> anyhow::Result<()> {
    generate_as(root, out, &scratch_name(), target)
}

/// A name no other generation uses, in this process (tests run in
/// parallel) or another.
fn scratch_name() -> String {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let count = COUNT.fetch_add(1, Ordering::Relaxed);
    format!("imds-guard-sbom-{}-{count}.cdx", std::process::id())
}

fn generate_as(root: &Path, out: &Path, name: &str, target: Option<&str>) -> anyhow::Result<()> {
    CYCLONEDX.require()?;
    let written = written_files(root, &format!("{name}.json"))?;
    let manifest = root.join("Cargo.toml");
    let manifest = manifest.to_string_lossy();
    let mut args = vec![
        "cyclonedx",
        "--manifest-path",
        &manifest,
        "--format",
        "json",
        "--spec-version",
        SPEC_VERSION,
        "--override-filename",
        name,
        "--quiet",
    ];
    if let Some(target) = target {
        args.extend(["--target", target]);
    }
    let generated = run_in(root, "cargo", &args, &[]);
    let mut moved = generated.and_then(|()| {
        let ours = written
            .iter()
            .find(|(package, _)| package == CRATE)
            .map(|(_, path)| path)
            .context("cargo metadata lists no enforcer-user")?;
        std::fs::rename(ours, out)
            .or_else(|_| std::fs::copy(ours, out).map(|_| ()))
            .with_context(|| format!("moving {} to {}", ours.display(), out.display()))
    });
    for (_, path) in &written {
        if let Err(err) = std::fs::remove_file(path)
            && err.kind() != std::io::ErrorKind::NotFound
            && moved.is_ok()
        {
            moved = Err(err).with_context(|| format!("removing {}", path.display()));
        }
    }
    moved
}

/// Each workspace member's name and where cargo-cyclonedx writes `file`
/// for it.
fn written_files(root: &Path, file: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let metadata = cargo_stdout(root, &["metadata", "--format-version", "1", "--no-deps"])?;
    let metadata: Value = serde_json::from_str(&metadata).context("reading cargo metadata")?;
    metadata["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?
        .iter()
        .map(|package| {
            let name = package["name"]
                .as_str()
                .context("a package without a name")?;
            let manifest = package["manifest_path"]
                .as_str()
                .context("a package without a manifest_path")?;
            let dir = Path::new(manifest)
                .parent()
                .context("a manifest path without a directory")?;
            Ok((name.to_owned(), dir.join(file)))
        })
        .collect()
}

/// A CycloneDX JSON document, read.
pub struct Sbom {
    document: Value,
    path: PathBuf,
}

/// A crate as the SBOM or Cargo.lock names it.
type NameVersion = (String, String);

impl Sbom {
    pub fn read(path: &Path) -> anyhow::Result<Sbom> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let document = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Sbom {
            document,
            path: path.to_path_buf(),
        })
    }

    /// Fails, naming what is wrong, unless this is a CycloneDX document of
    /// the daemon's crate at the workspace version whose every component is
    /// a package of `root`'s Cargo.lock at its locked version, with a
    /// licence.
    pub fn check(&self, root: &Path) -> anyhow::Result<()> {
        let path = self.path.display();
        let doc = &self.document;
        if doc["bomFormat"] != "CycloneDX" || doc["specVersion"] != SPEC_VERSION {
            bail!(
                "{path} is not CycloneDX {SPEC_VERSION}: bomFormat {}, specVersion {}",
                doc["bomFormat"],
                doc["specVersion"]
            );
        }
        let described = &doc["metadata"]["component"];
        if described["name"] != CRATE || described["version"] != env!("CARGO_PKG_VERSION") {
            bail!(
                "{path} describes {} {}, not {CRATE} {}",
                described["name"],
                described["version"],
                env!("CARGO_PKG_VERSION")
            );
        }
        let targets = described["components"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if !targets
            .iter()
            .any(|t| t["name"] == BINARY && t["type"] == "application")
        {
            bail!("{path} names no {BINARY} application among {CRATE}'s targets");
        }
        let locked = locked_packages(root)?;
        let components = self.components()?;
        for component in &components {
            if !locked.contains(&component.crate_) {
                let (name, version) = &component.crate_;
                bail!("{path} lists {name} {version}, which Cargo.lock does not");
            }
            if !component.licensed {
                bail!(
                    "{path} gives {} {} no licence",
                    component.crate_.0,
                    component.crate_.1
                );
            }
        }
        Ok(())
    }

    /// The components listed, each checked to have a name and a version.
    /// The Rust target whose build it lists (cargo-cyclonedx's
    /// `cdx:rustc:sbom:target:triple` property).
    pub fn target(&self) -> Option<&str> {
        self.document["metadata"]["properties"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "cdx:rustc:sbom:target:triple")?["value"]
            .as_str()
    }

    fn components(&self) -> anyhow::Result<Vec<Component>> {
        self.document["components"]
            .as_array()
            .with_context(|| format!("{} has no components", self.path.display()))?
            .iter()
            .map(|c| {
                let field = |key: &str| {
                    c[key]
                        .as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("a component without a {key}: {c}"))
                };
                let licensed = c["licenses"].as_array().is_some_and(|licences| {
                    licences.iter().any(|l| {
                        l["expression"].is_string()
                            || l["license"]["id"].is_string()
                            || l["license"]["name"].is_string()
                    })
                });
                Ok(Component {
                    crate_: (field("name")?, field("version")?),
                    licensed,
                })
            })
            .collect()
    }
}

struct Component {
    crate_: NameVersion,
    licensed: bool,
}

/// Every package Cargo.lock pins, by name and version.
fn locked_packages(root: &Path) -> anyhow::Result<BTreeSet<NameVersion>> {
    let path = root.join("Cargo.lock");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_lock(&text))
}

/// The `name` and `version` of each `[[package]]` of a Cargo.lock.
fn parse_lock(text: &str) -> BTreeSet<NameVersion> {
    let quoted = |line: &str, key: &str| {
        line.strip_prefix(key)?
            .strip_prefix(" = \"")?
            .strip_suffix('"')
            .map(str::to_owned)
    };
    let mut packages = BTreeSet::new();
    let mut name = None;
    for line in text.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(found) = quoted(line, "name") {
            name = Some(found);
        } else if let (Some(version), Some(found)) = (quoted(line, "version"), name.take()) {
            packages.insert((found, version));
        }
    }
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version_of<'a>(components: &'a [Component], name: &str) -> Option<&'a str> {
        components
            .iter()
            .find(|c| c.crate_.0 == name)
            .map(|c| c.crate_.1.as_str())
    }

    /// Generates the SBOM as the image build does and reads it back.
    #[test]
    fn the_sbom_names_the_daemon_and_the_locked_crates_built_into_it() {
        let root = crate::workspace_root().unwrap();
        let out =
            std::env::temp_dir().join(format!("imds-guard-sbom-test-{}.json", std::process::id()));
        let name = scratch_name();
        generate_as(&root, &out, &name, None).unwrap();
        let sbom = Sbom::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        sbom.check(&root).unwrap();

        let components = sbom.components().unwrap();
        let locked = locked_packages(&root).unwrap();
        let locked_version = |name: &str| {
            let versions: Vec<&str> = locked
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(versions.len(), 1, "{name}: {versions:?} in Cargo.lock");
            versions[0]
        };
        assert_eq!(version_of(&components, "aya"), Some("0.14.0"));
        // The eBPF side is compiled into the binary too.
        assert_eq!(
            version_of(&components, "aya-ebpf"),
            Some(locked_version("aya-ebpf"))
        );
        for name in [
            "kube",
            "kube-runtime",
            "tokio",
            "hyper",
            "rustls",
            "k8s-openapi",
        ] {
            assert_eq!(
                version_of(&components, name),
                Some(locked_version(name)),
                "{name}"
            );
        }
        // What only the tests and xtask use is not shipped.
        for name in ["imds-guard-tests", "xtask", "imds-guard-test-apiserver"] {
            assert_eq!(version_of(&components, name), None, "{name}");
        }
        assert!(
            components.len() > 100,
            "only {} components",
            components.len()
        );

        // Nothing left in the members' directories.
        for (_, path) in written_files(&root, &format!("{name}.json")).unwrap() {
            assert!(!path.exists(), "{} left behind", path.display());
        }
    }

    /// The checks can fail: each mutation of a good document is named.
    #[test]
    fn a_wrong_sbom_is_named_for_what_is_wrong() {
        let root = crate::workspace_root().unwrap();
        let (aya, _) = locked_packages(&root)
            .unwrap()
            .into_iter()
            .find(|(name, _)| name == "aya")
            .unwrap();
        let good = serde_json::json!({
            "bomFormat": "CycloneDX",
            "specVersion": "1.5",
            "metadata": {"component": {
                "name": "enforcer-user",
                "version": env!("CARGO_PKG_VERSION"),
                "components": [{"type": "application", "name": "imds-guard"}],
            }},
            "components": [{
                "name": aya,
                "version": "0.14.0",
                "licenses": [{"expression": "MIT OR Apache-2.0"}],
            }],
        });
        let sbom = |document: Value| Sbom {
            document,
            path: PathBuf::from("sbom.json"),
        };
        sbom(good.clone()).check(&root).unwrap();
        let wrong_crate = format!("not enforcer-user {}", env!("CARGO_PKG_VERSION"));
        // What each replacement, at a JSON pointer, is named as.
        let mutations = [
            ("not CycloneDX 1.5", "/specVersion", "1.3".into()),
            ("not CycloneDX 1.5", "/bomFormat", "SPDX".into()),
            (&wrong_crate, "/metadata/component/version", "9.9.9".into()),
            (
                "no imds-guard application",
                "/metadata/component/components",
                Value::Null,
            ),
            (
                "lists aya 0.13.0, which Cargo.lock does not",
                "/components/0/version",
                "0.13.0".into(),
            ),
            (
                "gives aya 0.14.0 no licence",
                "/components/0/licenses",
                serde_json::json!([]),
            ),
        ];
        for (named, pointer, replacement) in mutations {
            let mut document = good.clone();
            *document.pointer_mut(pointer).unwrap() = replacement;
            let err = sbom(document).check(&root).unwrap_err().to_string();
            assert!(err.contains(named), "{named:?} not in {err}");
        }
    }

    #[test]
    fn cargo_lock_packages_are_read_by_name_and_version() {
        let lock = "version = 4\n\n[[package]]\nname = \"aya\"\nversion = \"0.14.0\"\nsource = \"x\"\n\
                    dependencies = [\n \"libc\",\n]\n\n[[package]]\nname = \"libc\"\nversion = \"0.2.1\"\n";
        let packages = parse_lock(lock);
        let expected: BTreeSet<NameVersion> = [("aya", "0.14.0"), ("libc", "0.2.1")]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .into();
        assert_eq!(packages, expected);
    }

    /// The Dockerfile installs our cargo-cyclonedx, generates the SBOM
    /// beside the binary and copies it to where the label and the README
    /// say it is.
    #[test]
    fn the_dockerfile_ships_the_sbom_it_generates() {
        let root = crate::workspace_root().unwrap();
        let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
        let (build, runtime) = dockerfile.rsplit_once("\nFROM ").unwrap();
        let (before_sources, _) = build.split_once("\nCOPY . .\n").unwrap();
        let install = format!(
            "cargo install --locked --version {} {}",
            CYCLONEDX.version, CYCLONEDX.krate
        );
        assert!(
            before_sources.lines().any(|line| line.trim() == install),
            "{before_sources}"
        );
        assert!(
            build.contains(
                "cargo --locked xtask sbom /out/sbom.cdx.json --target \"$(cat /rust-target)\"\n"
            ),
            "{build}"
        );
        assert!(
            runtime.contains(&format!(
                "\nCOPY --from=build /out/sbom.cdx.json {IN_IMAGE}\n"
            )),
            "{runtime}"
        );
    }
}
