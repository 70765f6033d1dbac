//! `cargo xtask image`: the daemon's container image (Dockerfile), built with
//! docker or podman, tagged as deploy/ expects it.

use std::path::Path;

use anyhow::bail;

use crate::{run_in, setup::output};

/// What deploy/base/daemonset.yaml runs: imds-guard:<workspace version>.
pub fn reference() -> String {
    format!("imds-guard:{}", env!("CARGO_PKG_VERSION"))
}

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

/// The arguments of `<engine> build` for the image, run in the workspace
/// root (the Vagrant harness runs them inside its VM).
pub fn build_args(root: &Path) -> Vec<String> {
    // The image records the commit it was built from; .git stays out of the
    // build context, so it is passed in.
    let revision = output("git", &["-C", &root.to_string_lossy(), "rev-parse", "HEAD"])
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned());
    vec![
        "build".to_owned(),
        "--file".to_owned(),
        "Dockerfile".to_owned(),
        "--tag".to_owned(),
        reference(),
        "--build-arg".to_owned(),
        format!("VERSION={}", env!("CARGO_PKG_VERSION")),
        "--build-arg".to_owned(),
        format!("REVISION={revision}"),
        ".".to_owned(),
    ]
}

/// Builds the image with `engine`; returns its reference.
pub fn build(root: &Path, engine: &str) -> anyhow::Result<String> {
    let args = build_args(root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_in(root, engine, &args, &[("DOCKER_BUILDKIT", "1")])?;
    let reference = reference();
    println!("image: built {reference}");
    Ok(reference)
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let engine = engine()?;
    build(root, engine).map(|_| ())
}
