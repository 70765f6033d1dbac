//! The image's filesystem, made from the workspace's build: the daemon at
//! the image's entrypoint, the test helper imds-probe beside it, the shared
//! libraries `ldd` names, and a minimal /etc, as the distroless image has.

use std::path::{Path, PathBuf};

use super::{BundleError, Result, ScratchDir, io_error};

/// The image's ENTRYPOINT (Dockerfile).
pub const ENTRYPOINT: &str = "/usr/local/bin/imds-guard";

/// The helper tests run inside containers (not in the image).
pub const PROBE: &str = "/usr/local/bin/imds-probe";

pub struct Rootfs {
    dir: ScratchDir,
}

impl Rootfs {
    /// From `IMDS_GUARD_BIN_DIR`'s binaries (see [`crate::probe::binary`]).
    pub fn build() -> Result<Rootfs> {
        let rootfs = Rootfs {
            dir: ScratchDir::new("rootfs")?,
        };
        for (name, destination) in [("imds-guard", ENTRYPOINT), ("imds-probe", PROBE)] {
            let binary =
                crate::probe::binary(name).map_err(|e| BundleError::Runtime(e.to_string()))?;
            rootfs.place(&binary, destination)?;
            for library in shared_libraries(&binary)? {
                let inside = library.display().to_string();
                rootfs.place(&library, &inside)?;
            }
        }
        let etc = rootfs.path().join("etc");
        std::fs::create_dir_all(&etc).map_err(io_error("creating", &etc))?;
        for (file, text) in [
            ("passwd", "root:x:0:0:root:/root:/sbin/nologin\n"),
            ("group", "root:x:0:\n"),
        ] {
            let path = etc.join(file);
            std::fs::write(&path, text).map_err(io_error("writing", &path))?;
        }
        Ok(rootfs)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Puts `source` at `inside`: a hard link where the filesystem allows
    /// (the debug binary is large), else a copy.
    fn place(&self, source: &Path, inside: &str) -> Result<()> {
        let real = source
            .canonicalize()
            .map_err(io_error("resolving", source))?;
        let target = self.path().join(inside.trim_start_matches('/'));
        if target.exists() {
            return Ok(());
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
        }
        if std::fs::hard_link(&real, &target).is_err() {
            std::fs::copy(&real, &target).map_err(io_error("copying into the rootfs", &target))?;
        }
        Ok(())
    }
}

/// The libraries (and the loader) `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listed = crate::run("ldd", &[&binary.display().to_string()])?;
    Ok(listed
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}
