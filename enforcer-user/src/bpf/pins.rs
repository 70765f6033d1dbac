//! Where the enforcement lives between daemon runs: every map and link is
//! pinned under a bpffs directory of ours, one subdirectory a *generation*
//! (one loaded object, mode and target cgroup). A daemon that starts adopts
//! its generation if it is complete, or installs a new one next to the old
//! and only then removes the old: there is never a moment without programs
//! attached.
//!
//! Layout: `<root>/<key>_<nonce>/{map-<NAME>, link-<PROGRAM>}` with
//! `<key> = g-<object hash>-<mode>-<cgroup id>` (bpffs forbids dots in names).

use std::{
    collections::BTreeMap,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, LinkType, PinnedLink};
use enforcer_common::names::{MAPS, NODE_PROGRAMS, PROG_SOCKET_CREATE, PROGRAMS};

use crate::config::Mode;

/// Prefix of generation directory names: everything else under the root is
/// not ours and is left alone.
const GENERATION_PREFIX: &str = "g-";
/// The node edge guard's tcx links, beside the generations.
const TC_LINK_DIR: &str = "tc";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What identifies a generation: a daemon adopts pins only with the same key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationKey {
    pub object_hash: u64,
    pub mode: Mode,
    pub cgroup_id: u64,
}

impl GenerationKey {
    pub fn dir_prefix(&self) -> String {
        let mode = self.mode;
        format!(
            "{GENERATION_PREFIX}{:016x}-{mode}-{}",
            self.object_hash, self.cgroup_id
        )
    }
}

/// Reads a generation directory's name back into its key.
pub fn parse_generation(name: &str) -> Option<GenerationKey> {
    let key = name.strip_prefix(GENERATION_PREFIX)?.split('_').next()?;
    let mut parts = key.splitn(3, '-');
    let object_hash = u64::from_str_radix(parts.next()?, 16).ok()?;
    let mode = parts.next()?.parse().ok()?;
    let cgroup_id = parts.next()?.parse().ok()?;
    Some(GenerationKey {
        object_hash,
        mode,
        cgroup_id,
    })
}

/// A generation directory found under the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub name: String,
    /// All maps and all links are pinned (links are pinned last).
    pub complete: bool,
}

/// What a starting daemon does with what it finds.
#[derive(Debug, PartialEq, Eq)]
pub enum StartPlan {
    /// Reuse this complete generation of ours; remove the others.
    Adopt { current: String, stale: Vec<String> },
    /// Install a new generation, carrying the allow list and counters over
    /// from `carry_from` when there is one; then remove `stale`.
    Install {
        carry_from: Option<String>,
        stale: Vec<String>,
    },
}

/// Decides from the generations present (pure, so it is tested without a kernel).
pub fn plan(key: &GenerationKey, present: &[Generation]) -> StartPlan {
    let prefix = format!("{}_", key.dir_prefix());
    let names = |skip: Option<&str>| -> Vec<String> {
        present
            .iter()
            .filter(|g| Some(g.name.as_str()) != skip)
            .map(|g| g.name.clone())
            .collect()
    };
    if let Some(ours) = present
        .iter()
        .find(|g| g.complete && g.name.starts_with(&prefix))
    {
        return StartPlan::Adopt {
            current: ours.name.clone(),
            stale: names(Some(&ours.name)),
        };
    }
    StartPlan::Install {
        carry_from: present.iter().find(|g| g.complete).map(|g| g.name.clone()),
        stale: names(None),
    }
}

/// The pin root directory.
#[derive(Clone, Debug)]
pub struct PinRoot {
    root: PathBuf,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> PinRoot {
        PinRoot { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn map_pin(&self, generation: &str, map: &str) -> PathBuf {
        self.root.join(generation).join(format!("map-{map}"))
    }

    pub fn link_pin(&self, generation: &str, program: &str) -> PathBuf {
        self.root.join(generation).join(format!("link-{program}"))
    }

    /// Where a node edge guard program of `generation` is pinned: they are
    /// attached per interface, so the program itself is kept.
    pub fn program_pin(&self, generation: &str, program: &str) -> PathBuf {
        self.root.join(generation).join(format!("prog-{program}"))
    }

    /// The node edge guard's pinned tcx links, shared by the generations
    /// (each restart swaps its program into them).
    pub fn tc_link_dir(&self) -> PathBuf {
        self.root.join(TC_LINK_DIR)
    }

    /// Each program of `generation`, and whether its link is attached (see
    /// [`link_attached`]).
    pub fn attached_programs(&self, generation: &str) -> BTreeMap<&'static str, bool> {
        PROGRAMS
            .iter()
            .map(|&program| (program, link_attached(&self.link_pin(generation, program))))
            .collect()
    }

    /// A fresh, unused directory name for a generation with `key`.
    pub fn new_generation_name(&self, key: &GenerationKey) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}_{:x}{:x}", key.dir_prefix(), std::process::id(), nanos)
    }

    pub fn create_generation_dir(&self, generation: &str) -> Result<(), PinError> {
        let dir = self.root.join(generation);
        std::fs::create_dir_all(&dir).map_err(|source| PinError::Io {
            action: "creating",
            path: dir,
            source,
        })
    }

    /// The generations present, complete or not. A missing root has none.
    pub fn generations(&self) -> Result<Vec<Generation>, PinError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PinError::Io {
                    action: "reading",
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut found: Vec<Generation> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with(GENERATION_PREFIX))
            .map(|name| {
                let complete = MAPS.iter().all(|m| self.map_pin(&name, m).exists())
                    && PROGRAMS.iter().all(|p| self.link_pin(&name, p).exists());
                Generation { name, complete }
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Removes a generation: its link pins first (which detaches those
    /// programs, unless another holder keeps the link), then its maps.
    /// Anything that is not one of our pins is left, and reported.
    pub fn remove_generation(&self, generation: &str) -> Result<(), PinError> {
        let pins = PROGRAMS
            .iter()
            .chain([&PROG_SOCKET_CREATE])
            .map(|p| self.link_pin(generation, p))
            .chain(
                NODE_PROGRAMS
                    .iter()
                    .map(|p| self.program_pin(generation, p)),
            )
            .chain(MAPS.iter().map(|m| self.map_pin(generation, m)));
        for pin in pins {
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PinError::Io {
                        action: "unpinning",
                        path: pin,
                        source,
                    });
                }
            }
        }
        let dir = self.root.join(generation);
        std::fs::remove_dir(&dir).map_err(|source| PinError::Io {
            action: "removing (is something else pinned there?)",
            path: dir,
            source,
        })
    }

    /// Removes the node edge guard's filters and links, every generation,
    /// then the root if nothing else is in it. Entries that are not ours
    /// are left where they are.
    pub fn uninstall(&self) -> Result<Uninstalled, PinError> {
        let tc_links = self.tc_link_dir();
        let edge_attachments =
            super::edge::detach_all(&tc_links).map_err(|source| PinError::Io {
                action: "removing the node edge guard's links",
                path: tc_links,
                source,
            })?;
        let generations = self.generations()?;
        for generation in &generations {
            self.remove_generation(&generation.name)?;
        }
        let left: Vec<String> = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(PinError::Io {
                    action: "reading",
                    path: self.root.clone(),
                    source,
                });
            }
        };
        if left.is_empty() && self.root.exists() {
            std::fs::remove_dir(&self.root).map_err(|source| PinError::Io {
                action: "removing",
                path: self.root.clone(),
                source,
            })?;
        }
        Ok(Uninstalled {
            removed: generations.into_iter().map(|g| g.name).collect(),
            edge_attachments,
            not_ours: left,
        })
    }
}

/// Whether the link pinned at `path` holds a program on a cgroup: the pin
/// opens as a BPF link and the kernel describes it as a cgroup link with a
/// program. A removed pin (which detached the program, since nothing else
/// holds its link) or another object pinned there is not attached.
pub fn link_attached(path: &Path) -> bool {
    // aya's from_pin cannot take a path with a NUL byte; no pin has one.
    if path.as_os_str().as_bytes().contains(&0) {
        return false;
    }
    let Ok(pinned) = PinnedLink::from_pin(path) else {
        return false;
    };
    // Dropping the opened link closes only our descriptor: the pin keeps it.
    FdLink::from(pinned).info().is_ok_and(|info| {
        info.program_id() != 0 && matches!(info.link_type(), Ok(LinkType::Cgroup))
    })
}

/// Whether a generation's BPF LSM link is pinned and holds a program.
pub fn lsm_attached(root: &PinRoot, generation: &str) -> bool {
    let path = root.link_pin(generation, PROG_SOCKET_CREATE);
    PinnedLink::from_pin(&path).is_ok_and(|pinned| {
        FdLink::from(pinned)
            .info()
            .is_ok_and(|info| info.program_id() != 0)
    })
}

/// What `uninstall` did.
#[derive(Debug)]
pub struct Uninstalled {
    pub removed: Vec<String>,
    /// The node edge guard's filters and links removed.
    pub edge_attachments: usize,
    /// Entries under the root that are not ours, left in place.
    pub not_ours: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hash: u64, mode: Mode, cgroup: u64) -> GenerationKey {
        GenerationKey {
            object_hash: hash,
            mode,
            cgroup_id: cgroup,
        }
    }

    fn generation(name: &str, complete: bool) -> Generation {
        Generation {
            name: name.to_owned(),
            complete,
        }
    }

    /// The positive case needs a kernel and a pinned link: the end-to-end
    /// tests check /healthz and `status` with real and removed pins.
    #[test]
    fn only_a_pinned_link_counts_as_attached() {
        use std::os::unix::ffi::OsStringExt as _;
        assert!(!link_attached(Path::new(
            "/nonexistent/link-imds_guard_egress"
        )));
        // A file that is no BPF object at all.
        assert!(!link_attached(Path::new("/proc/self/status")));
        let with_nul = PathBuf::from(std::ffi::OsString::from_vec(b"/sys/fs/bpf/a\0b".to_vec()));
        assert!(!link_attached(&with_nul));
        let root = PinRoot::new("/nonexistent");
        assert!(
            root.attached_programs("g-0")
                .values()
                .all(|attached| !attached)
        );
        assert_eq!(root.attached_programs("g-0").len(), PROGRAMS.len());
    }

    #[test]
    fn key_names_object_mode_and_cgroup() {
        assert_eq!(
            key(0xabc, Mode::Audit, 42).dir_prefix(),
            "g-0000000000000abc-audit-42"
        );
    }

    #[test]
    fn generation_names_read_back() {
        let key = key(0xabc, Mode::Audit, 42);
        let name = format!("{}_1f2e", key.dir_prefix());
        assert_eq!(parse_generation(&name), Some(key));
        assert_eq!(parse_generation("not-ours"), None);
        assert_eq!(parse_generation("g-zz-enforce-1_a"), None);
    }

    #[test]
    fn start_plans() {
        let ours = key(1, Mode::Enforce, 7);
        let ours_done = "g-0000000000000001-enforce-7_a";
        let ours_partial = "g-0000000000000001-enforce-7_b";
        let old_build = "g-0000000000000002-enforce-7_c";
        let audit_mode = "g-0000000000000001-audit-7_d";
        let cases = [
            (
                vec![],
                StartPlan::Install {
                    carry_from: None,
                    stale: vec![],
                },
            ),
            (
                vec![generation(ours_done, true)],
                StartPlan::Adopt {
                    current: ours_done.into(),
                    stale: vec![],
                },
            ),
            (
                vec![generation(ours_done, true), generation(old_build, true)],
                StartPlan::Adopt {
                    current: ours_done.into(),
                    stale: vec![old_build.into()],
                },
            ),
            // An upgrade: carry the old build's state over, then retire it.
            (
                vec![generation(old_build, true)],
                StartPlan::Install {
                    carry_from: Some(old_build.into()),
                    stale: vec![old_build.into()],
                },
            ),
            // A crash mid-install left a partial generation: never adopt it.
            (
                vec![generation(old_build, true), generation(ours_partial, false)],
                StartPlan::Install {
                    carry_from: Some(old_build.into()),
                    stale: vec![old_build.into(), ours_partial.into()],
                },
            ),
            // A mode change is a new generation too.
            (
                vec![generation(audit_mode, true)],
                StartPlan::Install {
                    carry_from: Some(audit_mode.into()),
                    stale: vec![audit_mode.into()],
                },
            ),
        ];
        for (present, want) in cases {
            assert_eq!(plan(&ours, &present), want, "{present:?}");
        }
    }
}
