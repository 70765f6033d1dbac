//! Building what the guests run, and finding it through cargo's JSON
//! messages (the target directory may be anywhere: `CARGO_TARGET_DIR`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{GUEST_BIN_DIR, GUEST_TEST_DIR, TEST_TARGETS};
use crate::{WORKSPACE, cargo_stdout};

/// Builds what the guest runs: (path here, path in the guest).
pub fn guest_files(root: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let json = cargo_stdout(
        root,
        &[
            "build",
            "-p",
            "enforcer-user",
            "-p",
            "imds-guard-tests",
            "--bins",
            "--message-format=json-render-diagnostics",
        ],
    )?;
    let bins = ["imds-guard", "imds-probe"];
    let mut files: Vec<(PathBuf, String)> = executables(&json, "bin", &bins)?
        .into_iter()
        .zip(bins)
        .map(|(path, name)| (path, format!("{GUEST_BIN_DIR}/{name}")))
        .collect();
    // Resolved as `cargo xtask test` builds the workspace's tests, so CI
    // reuses what the host's tests built.
    let mut args = vec!["test", "--no-run"];
    args.extend(WORKSPACE);
    args.push("--message-format=json-render-diagnostics");
    for target in TEST_TARGETS {
        args.extend(["--test", target]);
    }
    let json = cargo_stdout(root, &args)?;
    files.extend(
        executables(&json, "test", &TEST_TARGETS)?
            .into_iter()
            .zip(TEST_TARGETS)
            .map(|(path, name)| (path, format!("{GUEST_TEST_DIR}/{name}"))),
    );
    Ok(files)
}

/// The executables of `kind` targets named `names`, in that order, from
/// cargo's JSON messages.
fn executables(json: &str, kind: &str, names: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let artifacts: Vec<serde_json::Value> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .collect();
    names
        .iter()
        .map(|name| {
            artifacts
                .iter()
                .find(|m| {
                    m["target"]["name"] == *name
                        && m["target"]["kind"]
                            .as_array()
                            .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
                })
                .and_then(|m| m["executable"].as_str())
                .map(PathBuf::from)
                .with_context(|| format!("cargo built no {kind} executable {name}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_found_by_kind_and_name() {
        let json = [
            r#"{"reason":"compiler-artifact","target":{"name":"standalone","kind":["test"]},"executable":"/t/debug/deps/standalone-1"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"imds-probe","kind":["bin"]},"executable":"/t/debug/imds-probe"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"aya","kind":["lib"]},"executable":null}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executables(&json, "test", &["standalone"]).unwrap(),
            [PathBuf::from("/t/debug/deps/standalone-1")]
        );
        assert_eq!(
            executables(&json, "bin", &["imds-probe"]).unwrap(),
            [PathBuf::from("/t/debug/imds-probe")]
        );
        assert!(executables(&json, "bin", &["standalone"]).is_err());
    }
}
