//! The `imds-guard` daemon.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
use enforcer_user::{
    app,
    bpf::{loader::LoaderAhead, pins::PinRoot},
    config::{self, KubernetesSection, Layer, Sources, StandaloneSection},
    host::privilege,
    k8s::mode::KubernetesMode,
    report::{doctor, explain, status},
    standalone::StandaloneMode,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "imds-guard",
    version,
    about = "Keeps workloads away from the cloud instance metadata API"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "IMDS_GUARD_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What an enforcing command takes: the configuration file, and settings
/// given as flags or environment, which win over the file's.
#[derive(Args)]
struct EnforcingArgs<S: Args> {
    /// YAML configuration file (reloaded on SIGHUP and when it changes).
    #[arg(long, env = "IMDS_GUARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    common: Layer,
    #[command(flatten)]
    mode: S,
}

#[derive(Subcommand)]
enum Command {
    /// Protect one cgroup v2 subtree on a plain Linux host (Docker host, CI runner).
    Standalone(EnforcingArgs<StandaloneSection>),
    /// Protect this Kubernetes node's pods; exempt those the label policy allows.
    Run(EnforcingArgs<KubernetesSection>),
    /// Show what is enforced: programs, mode, rules, allowlisted cgroups, counters.
    Status {
        /// bpffs directory where the pins are.
        #[arg(long, env = "IMDS_GUARD_BPFFS_DIR", default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Mount point of the cgroup v2 hierarchy (detected when absent).
        #[arg(long, env = "IMDS_GUARD_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
        /// The daemon's node-local --status-socket, to name pods.
        #[arg(long, default_value = config::DEFAULT_STATUS_SOCKET)]
        daemon: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Say why a pod on this node is blocked or allowed, asking the local daemon
    /// (from a workstation: `kubectl imds-guard explain`).
    Explain {
        /// The pod: pod/NAME or NAME.
        pod: String,
        /// The pod's namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The daemon's node-local --status-socket.
        #[arg(long, default_value = config::DEFAULT_STATUS_SOCKET)]
        daemon: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Check this node before a start: everything a start checks and what the
    /// kernel offers, each line ok, warn or fail with its fix; exits non-zero
    /// on a fail. Run it with the daemon's privileges (in its container).
    Doctor {
        /// bpffs directory where the pins go.
        #[arg(long, env = "IMDS_GUARD_BPFFS_DIR", default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Judge the node for refusePacketSockets (the BPF LSM program) too.
        #[arg(long)]
        refuse_packet_sockets: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Detach every program and remove every pin imds-guard made.
    Uninstall {
        /// bpffs directory where the pins are.
        #[arg(long, env = "IMDS_GUARD_BPFFS_DIR", default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("IMDS_GUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: our errors
/// already spell out their sources, and anyhow's `{:#}` would repeat them.
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

impl<S: Args> EnforcingArgs<S> {
    /// Where the settings come from; `place` puts the mode's own flags in
    /// their section.
    fn sources(self, place: impl FnOnce(&mut Layer, S)) -> Sources {
        let mut flags = self.common;
        place(&mut flags, self.mode);
        Sources {
            config_file: self.config,
            flags,
        }
    }
}

/// Runs a mode; the configuration is checked before anything touches the kernel.
fn enforce<M: app::DaemonMode>(sources: Sources) -> anyhow::Result<()> {
    let ahead = LoaderAhead::start();
    let checked = app::check::<M>(&sources)?;
    runtime()?.block_on(app::run::<M>(sources, checked, ahead))?;
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Prints a report as its text rendering or as JSON.
fn print_as<T: serde::Serialize + ?Sized>(
    output: OutputFormat,
    report: &T,
    render: impl Fn(&T) -> String,
) -> serde_json::Result<()> {
    match output {
        OutputFormat::Text => print!("{}", render(report)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(report)?),
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Standalone(args) => {
            enforce::<StandaloneMode>(args.sources(|flags, own| flags.standalone = Some(own)))?;
        }
        Command::Run(args) => {
            enforce::<KubernetesMode>(args.sources(|flags, own| flags.kubernetes = Some(own)))?;
        }
        Command::Status {
            bpffs_dir,
            cgroup_root,
            daemon,
            output,
        } => {
            let state = status::read(&bpffs_dir, cgroup_root.as_deref(), Some(&daemon))?;
            print_as(output, &state, status::render)?;
        }
        Command::Explain {
            pod,
            namespace,
            daemon,
            output,
        } => {
            let name = explain::pod_name(&pod).map_err(anyhow::Error::msg)?;
            let explanation = explain::ask_node_local(&daemon, &namespace, name)?;
            print_as(output, &explanation, explain::render)?;
        }
        Command::Doctor {
            bpffs_dir,
            refuse_packet_sockets,
            output,
        } => {
            let wants = doctor::Wants {
                pin_root: bpffs_dir,
                refuse_packet_sockets,
            };
            let findings = doctor::judge(&wants, &doctor::gather(&wants));
            print_as(output, findings.as_slice(), doctor::render)?;
            if doctor::failed(&findings) {
                anyhow::bail!("doctor: this node cannot run imds-guard as asked (the fails above)");
            }
        }
        Command::Uninstall { bpffs_dir } => {
            privilege::check()?;
            let done = PinRoot::new(&bpffs_dir).uninstall()?;
            for entry in &done.not_ours {
                tracing::warn!(entry, pins = %bpffs_dir.display(), "left in place: not ours");
            }
            tracing::info!(
                pins = %bpffs_dir.display(),
                generations = done.removed.len(),
                "uninstalled: our programs detached and our pins removed"
            );
        }
    }
    Ok(())
}
