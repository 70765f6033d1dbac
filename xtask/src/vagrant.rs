//! `cargo xtask vagrant-e2e`: imds-guard on a single-node k3s cluster in a
//! Vagrant VM (deploy/vagrant/Vagrantfile), checked by the same checks as the
//! kind harness. The image is built inside the VM, from the repository that
//! `vagrant rsync` copies in, and handed to k3s's containerd.
//!
//! The fake metadata server binds 169.254.169.254 on the VM's own loopback.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{
    image,
    kind::checks::{self, Cluster},
    run_in,
    setup::{output, output_of},
};

/// Set to 1 to keep the VM after the run (to look around with `vagrant ssh`).
const KEEP_ENV: &str = "IMDS_GUARD_E2E_KEEP";

/// Where the Vagrantfile syncs the repository in the VM.
const REPO_IN_VM: &str = "/vagrant";

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `program args`, quoted for the VM's shell (`vagrant ssh -c`).
fn remote_command(program: &str, args: &[&str]) -> String {
    std::iter::once(program.to_owned())
        .chain(args.iter().map(|arg| shell_quote(arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The VM, destroyed when dropped (unless `IMDS_GUARD_E2E_KEEP=1`), so a
/// failed check still tears it down.
struct Vm {
    root: PathBuf,
}

impl Vm {
    fn up(root: &Path) -> anyhow::Result<Vm> {
        let vm = Vm {
            root: root.to_path_buf(),
        };
        vm.vagrant(&["up"])?;
        // `up` syncs only when it creates or boots the VM.
        vm.vagrant(&["rsync"])?;
        Ok(vm)
    }

    /// Runs vagrant for this VM, its output shown as it comes.
    fn vagrant(&self, args: &[&str]) -> anyhow::Result<()> {
        run_in(&self.root, "vagrant", args, &[])
    }

    /// Runs a shell command line in the VM: its standard output.
    fn ssh(&self, command_line: &str) -> anyhow::Result<String> {
        output_of(
            Command::new("vagrant")
                .args(["ssh", "-c", command_line])
                .current_dir(&self.root),
        )
    }

    /// Builds the image in the VM and hands it to k3s.
    fn load_image(&self) -> anyhow::Result<()> {
        let args = image::build_args(&self.root)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let build = remote_command("sudo DOCKER_BUILDKIT=1 docker", &args);
        println!("vagrant-e2e: building {} in the VM", image::reference());
        self.ssh(&format!("cd {REPO_IN_VM} && {build}"))
            .context("building the image in the VM")?;
        let reference = shell_quote(&image::reference());
        self.ssh(&format!(
            "sudo docker save {reference} | sudo k3s ctr images import -"
        ))
        .context("handing the image to k3s")?;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            println!(
                "vagrant-e2e: {KEEP_ENV}=1: the VM stays (vagrant destroy -f in deploy/vagrant)"
            );
            return;
        }
        if let Err(err) = self.vagrant(&["destroy", "-f"]) {
            eprintln!("vagrant-e2e: could not destroy the VM: {err:#}");
        }
    }
}

impl Cluster for Vm {
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ssh(&remote_command("sudo k3s kubectl", args))
    }

    fn repo_path(&self, relative: &str) -> String {
        format!("{REPO_IN_VM}/{relative}")
    }

    /// The repository is synced into the VM: nothing to copy.
    fn put_on_node(&self, _node: &str, relative: &str) -> anyhow::Result<String> {
        Ok(self.repo_path(relative))
    }

    /// A single node: the VM itself.
    fn on_node(&self, _node: &str, script: &str) -> anyhow::Result<String> {
        self.ssh(&remote_command("sudo bash -c", &[script]))
    }
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    output("vagrant", &["--version"]).context(
        "vagrant-e2e needs Vagrant (and a provider such as VirtualBox or libvirt) on PATH",
    )?;
    // Every vagrant command of this run is about deploy/vagrant's VM.
    // SAFETY: single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("VAGRANT_CWD", root.join("deploy/vagrant")) };
    let vm = Vm::up(root)?;
    vm.load_image()?;
    checks::run(&vm).context("the Vagrant VM (k3s)")?;
    println!("vagrant-e2e: passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_remote_shell() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            remote_command(
                "sudo k3s kubectl",
                &["get", "pods", "-o", "jsonpath={.items[*]}"]
            ),
            "sudo k3s kubectl 'get' 'pods' '-o' 'jsonpath={.items[*]}'"
        );
    }
}
