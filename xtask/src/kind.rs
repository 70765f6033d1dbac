//! `cargo xtask kind-e2e`: imds-guard on real kind clusters, once with the
//! systemd cgroup driver and once with cgroupfs (the kubelet lays pods out
//! differently under each), checked from real pods by `checks`.
//!
//! Everything that touches a metadata address happens inside the kind node
//! containers and their pods: the fake server binds 169.254.169.254 on a
//! node's own loopback, never on this machine.

pub mod checks;

use std::path::Path;

use anyhow::Context as _;

use crate::{image, run_in, setup::output};
use checks::Cluster;

/// Node image override (kind picks its default otherwise): the admission
/// policy needs Kubernetes 1.31 or newer.
const NODE_IMAGE_ENV: &str = "IMDS_GUARD_KIND_NODE_IMAGE";

#[derive(Clone, Copy)]
enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    fn name(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "systemd",
            CgroupDriver::Cgroupfs => "cgroupfs",
        }
    }

    /// The kubelet's pod subtree under this driver, inside a kind node
    /// (kind sets the kubelet's cgroupRoot to /kubelet).
    fn pod_subtree(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice",
            CgroupDriver::Cgroupfs => "/sys/fs/cgroup/kubelet/kubepods",
        }
    }
}

/// A kind cluster of ours, deleted when dropped, so a failed check still
/// tears it down.
struct KindCluster<'a> {
    root: &'a Path,
    name: String,
}

impl<'a> KindCluster<'a> {
    fn create(root: &'a Path, driver: CgroupDriver) -> anyhow::Result<KindCluster<'a>> {
        // The guard first: a half-created cluster is deleted too.
        let cluster = KindCluster {
            root,
            name: format!("imds-guard-e2e-{}", driver.name()),
        };
        // A cluster left by an interrupted run would make `create` fail.
        let _ = output("kind", &["delete", "cluster", "--name", &cluster.name]);
        let config = root.join(format!("deploy/e2e/kind-{}.yaml", driver.name()));
        let config = config.to_string_lossy();
        let mut args = vec![
            "create",
            "cluster",
            "--name",
            &cluster.name,
            "--config",
            &config,
            "--wait",
            "300s",
        ];
        let node_image = std::env::var(NODE_IMAGE_ENV).ok();
        if let Some(image) = &node_image {
            args.extend(["--image", image]);
        }
        run_in(root, "kind", &args, &[])?;
        cluster.expect_driver(driver)?;
        Ok(cluster)
    }

    fn node_names(&self) -> anyhow::Result<Vec<String>> {
        let nodes = output("kind", &["get", "nodes", "--name", &self.name])?;
        Ok(nodes.split_whitespace().map(str::to_owned).collect())
    }

    /// The cluster really runs the driver under test: its pod subtree exists
    /// on every node.
    fn expect_driver(&self, driver: CgroupDriver) -> anyhow::Result<()> {
        for node in self.node_names()? {
            self.on_node(&node, &format!("test -d {}", driver.pod_subtree()))
                .with_context(|| {
                    format!(
                        "node {node} has no {}: not the {} cgroup driver",
                        driver.pod_subtree(),
                        driver.name()
                    )
                })?;
        }
        println!(
            "kind-e2e: cluster {} uses the {} cgroup driver",
            self.name,
            driver.name()
        );
        Ok(())
    }

    fn load_image(&self, reference: &str) -> anyhow::Result<()> {
        run_in(
            self.root,
            "kind",
            &["load", "docker-image", reference, "--name", &self.name],
            &[],
        )
    }
}

impl Drop for KindCluster<'_> {
    fn drop(&mut self) {
        println!("kind-e2e: deleting cluster {}", self.name);
        if let Err(err) = output("kind", &["delete", "cluster", "--name", &self.name]) {
            eprintln!("kind-e2e: could not delete cluster {}: {err:#}", self.name);
        }
    }
}

impl Cluster for KindCluster<'_> {
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let context = format!("kind-{}", self.name);
        let mut all = vec!["--context", &context];
        all.extend_from_slice(args);
        output("kubectl", &all)
    }

    fn repo_path(&self, relative: &str) -> String {
        self.root.join(relative).to_string_lossy().into_owned()
    }

    fn put_on_node(&self, node: &str, relative: &str) -> anyhow::Result<String> {
        let name = Path::new(relative)
            .file_name()
            .context("a file to copy has no name")?
            .to_string_lossy();
        let on_node = format!("/usr/local/bin/{name}");
        output(
            "docker",
            &[
                "cp",
                &self.repo_path(relative),
                &format!("{node}:{on_node}"),
            ],
        )?;
        Ok(on_node)
    }

    fn on_node(&self, node: &str, script: &str) -> anyhow::Result<String> {
        output("docker", &["exec", node, "bash", "-c", script])
    }
}

/// Fails, saying what is missing, unless docker (with a reachable engine),
/// kind and kubectl are all here.
fn check_tools() -> anyhow::Result<()> {
    image::engine_named("docker").context("kind-e2e runs kind, which needs a Docker engine")?;
    output("kind", &["version"]).context("kind-e2e needs `kind` on PATH")?;
    output("kubectl", &["version", "--client"]).context("kind-e2e needs `kubectl` on PATH")?;
    Ok(())
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    check_tools()?;
    // This machine's platform only: kind's nodes are this machine's.
    let native =
        image::Platform::this_machine().context("kind-e2e runs on amd64 or arm64 machines")?;
    let reference = image::build(root, "docker", &[native])?;
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        println!("kind-e2e: {} cgroup driver", driver.name());
        let cluster = KindCluster::create(root, driver)?;
        cluster.load_image(&reference)?;
        checks::run(&cluster)
            .with_context(|| format!("kind cluster {} ({} driver)", cluster.name, driver.name()))?;
    }
    println!("kind-e2e: passed with the systemd and the cgroupfs cgroup drivers");
    Ok(())
}
