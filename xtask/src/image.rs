//! `cargo xtask image`: the daemon's container image (Dockerfile), built with
//! docker or podman for linux/amd64 and linux/arm64, tagged as deploy/
//! expects it, labelled with where it comes from, and carrying its SBOM
//! (see `sbom`).

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

use crate::{run_in, sbom, setup::output};

/// What deploy/base/daemonset.yaml runs: imds-guard:<workspace version>.
pub fn reference() -> String {
    format!("imds-guard:{}", env!("CARGO_PKG_VERSION"))
}

/// A platform the image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    /// The OCI architecture (`--platform linux/<arch>`, `TARGETARCH`).
    pub arch: &'static str,
    /// The Rust target the Dockerfile builds for it.
    pub rust_target: &'static str,
    /// The ELF header's `e_machine` of its binaries.
    elf_machine: u16,
}

/// The nodes imds-guard runs on: `x86_64`, and arm64 (Graviton, Ampere).
pub const PLATFORMS: [Platform; 2] = [
    Platform {
        arch: "amd64",
        rust_target: "x86_64-unknown-linux-gnu",
        elf_machine: 62,
    },
    Platform {
        arch: "arm64",
        rust_target: "aarch64-unknown-linux-gnu",
        elf_machine: 183,
    },
];

impl Platform {
    /// `imds-guard:<version>-<arch>`; [`reference`] is also given to the
    /// build machine's own.
    pub fn reference(self) -> String {
        format!("{}-{}", reference(), self.arch)
    }

    /// The platform of the machine this runs on.
    pub fn this_machine() -> Option<Platform> {
        let rust_arch = std::env::consts::ARCH;
        PLATFORMS
            .into_iter()
            .find(|p| p.rust_target.starts_with(&format!("{rust_arch}-")))
    }
}

/// Where the Dockerfile installs the daemon in the image.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/imds-guard";

/// `engine` if it is installed and its engine answers (`docker info` fails
/// when only the client is installed).
pub fn engine_named(engine: &'static str) -> anyhow::Result<&'static str> {
    output(engine, &["info"])?;
    Ok(engine)
}

/// The first of docker and podman whose engine answers.
fn engine() -> anyhow::Result<&'static str> {
    let mut reasons = Vec::new();
    for candidate in ["docker", "podman"] {
        match engine_named(candidate) {
            Ok(engine) => return Ok(engine),
            Err(err) => reasons.push(format!("  {candidate}: {err:#}")),
        }
    }
    bail!(
        "no container engine is available to build the image (a docker client \
         without a running engine does not count):\n{}",
        reasons.join("\n")
    )
}

/// Where the SBOM's label points: a key of our own, as the OCI annotation
/// set has none for it.
pub const SBOM_LABEL: &str = "imds-guard.sbom";

/// The image's config labels that depend on the checkout and the time
/// (the Dockerfile carries the fixed title and description): the OCI
/// annotation keys for source, revision, version, licences and creation,
/// and where the SBOM is.
pub fn labels(root: &Path) -> anyhow::Result<Vec<Label>> {
    let mut labels = vec![
        ("org.opencontainers.image.revision", revision(root)),
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        (
            "org.opencontainers.image.licenses",
            env!("CARGO_PKG_LICENSE").to_owned(),
        ),
        ("org.opencontainers.image.created", created()?),
        (SBOM_LABEL, sbom::IN_IMAGE.to_owned()),
    ];
    let origin = git(root, &["remote", "get-url", "origin"]).ok();
    match origin.as_deref().and_then(source_url) {
        Some(url) => labels.push(("org.opencontainers.image.source", url)),
        None => println!(
            "image: no public `origin` remote, so no org.opencontainers.image.source label"
        ),
    }
    Ok(labels)
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec![
        "-C",
        root.to_str().context("the workspace path is not UTF-8")?,
    ];
    all.extend(args);
    Ok(output("git", &all)?.trim().to_owned())
}

/// The commit the image is built from, `-dirty` when the build context
/// differs from it: changed files, or untracked ones not ignored (the
/// Dockerfile copies those too). `unknown` outside a git checkout.
fn revision(root: &Path) -> String {
    let Ok(head) = git(root, &["rev-parse", "HEAD"]) else {
        return "unknown".to_owned();
    };
    match git(root, &["status", "--porcelain"]) {
        Ok(changes) if changes.is_empty() => head,
        _ => format!("{head}-dirty"),
    }
}

/// When the image is built: `SOURCE_DATE_EPOCH` if set (reproducible
/// builds), else now.
fn created() -> anyhow::Result<String> {
    let seconds = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text.parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH={text:?} is not a count of seconds since 1970")
        })?,
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs(),
    };
    Ok(rfc3339(seconds))
}

/// Seconds since 1970 as an RFC 3339 UTC time.
fn rfc3339(seconds: u64) -> String {
    let (year, month, day) = civil_date(seconds / 86_400);
    let time = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

/// The Gregorian date `days` after 1970-01-01. Counted in 400-year cycles
/// of 146 097 days, each year starting on March 1st so that the leap day
/// is the last day of its year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719 468 counted from 0000-03-01.
    let since_0000 = days + 719_468;
    let cycle = since_0000 / 146_097;
    let day_of_cycle = since_0000 % 146_097;
    let year_of_cycle =
        (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524 - day_of_cycle / 146_096) / 365;
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);
    // Months from March, of 31, 30, 31, 30, 31 (153 days per five).
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = cycle * 400 + year_of_cycle + u64::from(month <= 2);
    (year, month, day)
}

/// A remote's address as a URL others can fetch from: credentials dropped,
/// scp-like `user@host:path` as `https://host/path`; none for a local path.
fn source_url(remote: &str) -> Option<String> {
    if let Some((scheme, rest)) = remote.split_once("://") {
        if scheme == "file" {
            return None;
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        return Some(format!("{scheme}://{host}/{path}"));
    }
    let (authority, path) = remote.split_once(':')?;
    if authority.contains('/') {
        return None;
    }
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    Some(format!("https://{host}/{path}"))
}

/// A label's key and value.
pub type Label = (&'static str, String);

/// The arguments of `<engine> build` for the image, run in the workspace
/// root (the Vagrant harness runs them inside its VM).
/// Building the image for the machine that builds it, tagged [`reference`].
pub fn build_args(root: &Path) -> anyhow::Result<Vec<String>> {
    Ok(build_args_labelled(&labels(root)?, None))
}

/// The engine's build arguments: for `platform` (tagged with its
/// reference), or for the build machine's own (tagged [`reference`]).
fn build_args_labelled(labels: &[Label], platform: Option<Platform>) -> Vec<String> {
    let mut args: Vec<String> = ["build", "--file", "Dockerfile"].map(str::to_owned).into();
    match platform {
        Some(platform) => args.extend([
            "--platform".to_owned(),
            format!("linux/{}", platform.arch),
            "--tag".to_owned(),
            platform.reference(),
        ]),
        None => args.extend(["--tag".to_owned(), reference()]),
    }
    // .git stays out of the build context: what it says comes in as labels.
    for (key, value) in labels {
        args.extend(["--label".to_owned(), format!("{key}={value}")]);
    }
    args.push(".".to_owned());
    args
}

/// Builds the image with `engine` for `platforms` (the build stage runs on
/// this machine and cross-compiles), checks what each carries, and tags
/// this machine's own, which must be among them, as [`reference`], which
/// it returns.
pub fn build(root: &Path, engine: &str, platforms: &[Platform]) -> anyhow::Result<String> {
    let native = Platform::this_machine()
        .filter(|native| platforms.contains(native))
        .context("this machine's architecture is none the image is built for")?;
    let labels = labels(root)?;
    for &platform in platforms {
        let args = build_args_labelled(&labels, Some(platform));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_in(root, engine, &args, &[("DOCKER_BUILDKIT", "1")])?;
        verify(root, engine, platform, &labels)?;
        println!("image: built {}", platform.reference());
    }
    let reference = reference();
    run_in(root, engine, &["tag", &native.reference(), &reference], &[])?;
    println!("image: {reference} is {}", native.reference());
    Ok(reference)
}

/// Copies `path` out of the image `reference` into a scratch file (the
/// image has no shell to cat with: from a container that is created,
/// never started).
fn copy_out(engine: &str, reference: &str, path: &str) -> anyhow::Result<std::path::PathBuf> {
    let container = output(engine, &["create", reference])?.trim().to_owned();
    let name = path.rsplit('/').next().unwrap_or("file");
    let scratch =
        std::env::temp_dir().join(format!("imds-guard-image-{}-{name}", std::process::id()));
    let copied = output(
        engine,
        &[
            "cp",
            &format!("{container}:{path}"),
            &scratch.to_string_lossy(),
        ],
    );
    let _ = output(engine, &["rm", &container]);
    copied.with_context(|| format!("the built image {reference} has no {path}"))?;
    Ok(scratch)
}

/// The ELF `e_machine` of a binary's header, if it is one.
fn elf_machine(binary: &[u8]) -> Option<u16> {
    let machine = binary.get(18..20)?;
    binary
        .starts_with(b"\x7fELF")
        .then(|| u16::from_le_bytes([machine[0], machine[1]]))
}

/// Reads the built image's labels, architecture, binary and SBOM back from
/// the engine: the labels must be the ones given, the image and its binary
/// the platform's, the SBOM is checked as the tests check a generated one.
fn verify(root: &Path, engine: &str, platform: Platform, labels: &[Label]) -> anyhow::Result<()> {
    let reference = &platform.reference();
    let found = output(
        engine,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            reference,
        ],
    )?;
    let found: serde_json::Value =
        serde_json::from_str(&found).context("reading the image's labels")?;
    for (key, value) in labels {
        if found[key] != value.as_str() {
            bail!(
                "the built image {reference} has the label {key}={}, not {value:?}",
                found[key]
            );
        }
    }
    let arch = output(
        engine,
        &[
            "image",
            "inspect",
            "--format",
            "{{.Architecture}}",
            reference,
        ],
    )?;
    if arch.trim() != platform.arch {
        bail!(
            "the built image {reference} is for {}, not {}",
            arch.trim(),
            platform.arch
        );
    }
    let binary = copy_out(engine, reference, BINARY_IN_IMAGE)?;
    let machine = std::fs::read(&binary).ok().as_deref().and_then(elf_machine);
    let _ = std::fs::remove_file(&binary);
    if machine != Some(platform.elf_machine) {
        bail!(
            "{BINARY_IN_IMAGE} in {reference} is not a {} binary (ELF machine {machine:?}, not {})",
            platform.rust_target,
            platform.elf_machine
        );
    }
    let scratch = copy_out(engine, reference, sbom::IN_IMAGE)?;
    let checked = sbom::Sbom::read(&scratch).and_then(|sbom| {
        sbom.check(root)?;
        match sbom.target() {
            Some(target) if target == platform.rust_target => Ok(()),
            other => bail!(
                "it lists the build for {}, not {}",
                other.unwrap_or("no target"),
                platform.rust_target
            ),
        }
    });
    let _ = std::fs::remove_file(&scratch);
    checked.with_context(|| format!("the SBOM in {reference}"))
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let engine = engine()?;
    build(root, engine, &PLATFORMS).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn the_revision_is_the_commit_and_says_when_the_context_differs() {
        let dir = std::env::temp_dir().join(format!("imds-guard-revision-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(revision(&dir), "unknown");
        let git = |args: &[&str]| git(&dir, args).unwrap();
        git(&["init", "--quiet"]);
        std::fs::write(dir.join(".gitignore"), "/target\n").unwrap();
        std::fs::write(dir.join("a"), "a").unwrap();
        git(&["add", "a", ".gitignore"]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "commit",
            "--quiet",
            "-m",
            "a",
        ]);
        let head = git(&["rev-parse", "HEAD"]);
        assert_eq!(head.len(), 40, "{head}");
        assert_eq!(revision(&dir), head);
        std::fs::create_dir(dir.join("target")).unwrap();
        std::fs::write(dir.join("target/built"), "ignored").unwrap();
        assert_eq!(
            revision(&dir),
            head,
            "an ignored file is not in the context"
        );
        std::fs::write(dir.join("b"), "untracked").unwrap();
        assert_eq!(revision(&dir), format!("{head}-dirty"));
        std::fs::remove_file(dir.join("b")).unwrap();
        std::fs::write(dir.join("a"), "changed").unwrap();
        assert_eq!(revision(&dir), format!("{head}-dirty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_build_labels_the_image_with_this_checkout() {
        let root = crate::workspace_root().unwrap();
        let args = build_args(&root).unwrap();
        let labels: Vec<(&str, &str)> = args
            .windows(2)
            .filter(|pair| pair[0] == "--label")
            .filter_map(|pair| pair[1].split_once('='))
            .collect();
        let label = |key: &str| {
            let found = labels.iter().find(|(k, _)| *k == key);
            found.unwrap_or_else(|| panic!("no {key} in {args:?}")).1
        };
        assert_eq!(
            label("org.opencontainers.image.version"),
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            label("org.opencontainers.image.licenses"),
            "MIT OR Apache-2.0"
        );
        assert_eq!(label("org.opencontainers.image.revision"), revision(&root));
        assert!(
            label("org.opencontainers.image.revision")
                .starts_with(&git(&root, &["rev-parse", "HEAD"]).unwrap())
        );
        let created = label("org.opencontainers.image.created");
        assert!(
            created.len() == 20 && created.starts_with("20") && created.ends_with('Z'),
            "{created}"
        );
        assert_eq!(label(SBOM_LABEL), sbom::IN_IMAGE);
        assert_eq!(args.last().map(String::as_str), Some("."));
    }

    /// A script standing in for docker or podman (no engine runs here),
    /// answering what `verify` asks about an image whose labels are
    /// `dir`/labels.json, its architecture `dir`/arch and whose files are
    /// under `dir`/rootfs.
    fn fake_engine(dir: &Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let engine = dir.join("engine");
        let dir = dir.display();
        let script = format!(
            "#!/bin/sh\ncase \"$1\" in\n\
             image) case \"$4\" in *Architecture*) cat '{dir}/arch' ;; *) cat '{dir}/labels.json' ;; esac ;;\n\
             create) echo fake-container ;;\n\
             cp) cp \"{dir}/rootfs${{2#fake-container:}}\" \"$3\" ;;\n\
             rm) ;;\n\
             *) exit 2 ;;\n\
             esac\n"
        );
        std::fs::write(&engine, script).unwrap();
        std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o755)).unwrap();
        engine
    }

    #[test]
    fn a_built_image_is_checked_for_its_labels_and_its_sbom() {
        let root = crate::workspace_root().unwrap();
        let dir =
            std::env::temp_dir().join(format!("imds-guard-fake-engine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let in_rootfs = dir
            .join("rootfs")
            .join(sbom::IN_IMAGE.trim_start_matches('/'));
        std::fs::create_dir_all(in_rootfs.parent().unwrap()).unwrap();
        sbom::generate(&root, &in_rootfs, Some(PLATFORMS[1].rust_target)).unwrap();
        let labels = labels(&root).unwrap();
        let found: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.as_str().into()))
            .collect();
        let write_labels = |found: &serde_json::Map<String, serde_json::Value>| {
            std::fs::write(
                dir.join("labels.json"),
                serde_json::to_string(found).unwrap(),
            )
            .unwrap();
        };
        write_labels(&found);
        // An arm64 image: its architecture, and a binary whose ELF header
        // says aarch64 (the first 20 bytes are all that is read).
        let arm64 = PLATFORMS[1];
        std::fs::write(dir.join("arch"), "arm64\n").unwrap();
        let binary = dir
            .join("rootfs")
            .join(BINARY_IN_IMAGE.trim_start_matches('/'));
        std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
        let elf = |machine: u16| {
            let mut header = b"\x7fELF\x02\x01\x01".to_vec();
            header.resize(18, 0);
            header.extend(machine.to_le_bytes());
            header
        };
        std::fs::write(&binary, elf(183)).unwrap();
        let engine = fake_engine(&dir);
        let engine = engine.to_str().unwrap();
        let verify = || verify(&root, engine, arm64, &labels).map_err(|e| format!("{e:#}"));
        verify().unwrap();
        let reference = arm64.reference();

        std::fs::write(dir.join("arch"), "amd64\n").unwrap();
        let err = verify().unwrap_err();
        assert!(
            err.contains(&format!("{reference} is for amd64, not arm64")),
            "{err}"
        );
        std::fs::write(dir.join("arch"), "arm64\n").unwrap();
        std::fs::write(&binary, elf(62)).unwrap();
        let err = verify().unwrap_err();
        assert!(
            err.contains("is not a aarch64-unknown-linux-gnu binary"),
            "{err}"
        );
        std::fs::write(&binary, elf(183)).unwrap();

        let mut other = found.clone();
        other.insert(
            "org.opencontainers.image.revision".to_owned(),
            "0123abc".into(),
        );
        write_labels(&other);
        let err = verify().unwrap_err();
        assert!(
            err.contains("org.opencontainers.image.revision=\"0123abc\""),
            "{err}"
        );
        write_labels(&found);

        let arm64_sbom = std::fs::read(&in_rootfs).unwrap();
        sbom::generate(&root, &in_rootfs, Some(PLATFORMS[0].rust_target)).unwrap();
        let err = verify().unwrap_err();
        assert!(
            err.contains("lists the build for x86_64-unknown-linux-gnu, not aarch64"),
            "{err}"
        );
        std::fs::write(&in_rootfs, arm64_sbom).unwrap();

        let sbom_text = std::fs::read_to_string(&in_rootfs).unwrap();
        let wrong = sbom_text.replace(
            "\"name\": \"enforcer-user\"",
            "\"name\": \"something-else\"",
        );
        assert_ne!(wrong, sbom_text);
        std::fs::write(&in_rootfs, wrong).unwrap();
        let err = verify().unwrap_err();
        assert!(
            err.contains(&format!("the SBOM in {reference}")) && err.contains("something-else"),
            "{err}"
        );

        std::fs::remove_file(&in_rootfs).unwrap();
        let err = verify().unwrap_err();
        assert!(
            err.contains(&format!("{reference} has no {}", sbom::IN_IMAGE)),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each platform is built with its own tag, and the Dockerfile's build
    /// stage runs on the build machine and compiles for the platform's
    /// Rust target.
    #[test]
    fn each_platform_is_built_for_its_target() {
        let args = build_args_labelled(&[], Some(PLATFORMS[1]));
        let reference = format!("imds-guard:{}-arm64", env!("CARGO_PKG_VERSION"));
        assert!(
            args.windows(4)
                .any(|w| w == ["--platform", "linux/arm64", "--tag", reference.as_str()]),
            "{args:?}"
        );
        assert!(!build_args_labelled(&[], None).contains(&"--platform".to_owned()));
        let root = crate::workspace_root().unwrap();
        let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
        assert!(
            dockerfile.contains("\nFROM --platform=$BUILDPLATFORM "),
            "{dockerfile}"
        );
        for platform in PLATFORMS {
            let mapping = format!("{}) echo {}", platform.arch, platform.rust_target);
            assert!(dockerfile.contains(&mapping), "{mapping} in the Dockerfile");
        }
        assert!(Platform::this_machine().is_some());
    }

    #[test]
    fn a_source_url_carries_no_credentials_and_no_local_path() {
        for (remote, url) in [
            (
                "https://user:token@example.org/team/imds-guard.git",
                Some("https://example.org/team/imds-guard.git"),
            ),
            (
                "https://example.org/imds-guard",
                Some("https://example.org/imds-guard"),
            ),
            (
                "git@example.org:team/imds-guard.git",
                Some("https://example.org/team/imds-guard.git"),
            ),
            ("/srv/git/imds-guard.git", None),
            ("file:///srv/git/imds-guard.git", None),
            ("../imds-guard", None),
        ] {
            assert_eq!(source_url(remote).as_deref(), url, "{remote}");
        }
    }
}
