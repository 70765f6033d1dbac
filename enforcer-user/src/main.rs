//! The `imds-guard` daemon.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
use enforcer_user::{
    bpf::pins::PinRoot,
    config::{self, Mode, Overrides, Preset, Sources},
    host::privilege,
    k8s,
    report::status,
    standalone,
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
enum StatusOutput {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Settings every enforcing mode shares; each given flag wins over the config file.
#[derive(Args)]
struct CommonArgs {
    /// YAML configuration file (reloaded on SIGHUP and when it changes).
    #[arg(long, env = "IMDS_GUARD_CONFIG")]
    config: Option<PathBuf>,
    /// enforce refuses; audit only counts and reports.
    #[arg(long, value_enum, env = "IMDS_GUARD_MODE")]
    mode: Option<Mode>,
    /// Deny rules of a cloud provider. Repeatable.
    #[arg(long, value_enum)]
    preset: Vec<Preset>,
    /// Deny rule `PREFIX [proto=LIST] [ports=LIST|except-ports=LIST]`. Repeatable;
    /// with neither presets nor deny rules: 169.254.169.254/32 except-ports=53, fd00:ec2::254/128.
    #[arg(long)]
    deny: Vec<String>,
    /// Prefix never refused, even inside a deny rule (longest prefix wins). Repeatable;
    /// default: 169.254.170.23/32, fd00:ec2::23/128 (EKS Pod Identity), 169.254.20.10/32 (NodeLocal DNS).
    #[arg(long)]
    pass: Vec<String>,
    /// bpffs directory where programs, links and maps are pinned.
    #[arg(long, env = "IMDS_GUARD_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// Mount point of the cgroup v2 hierarchy (detected when absent).
    #[arg(long, env = "IMDS_GUARD_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Address to serve /metrics, /healthz and /readyz on (e.g. 0.0.0.0:9464).
    #[arg(long, env = "IMDS_GUARD_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Protect one cgroup v2 subtree on a plain Linux host (Docker host, CI runner).
    Standalone {
        #[command(flatten)]
        common: CommonArgs,
        /// Cgroup v2 directory whose processes lose metadata access
        /// (absolute, or relative to the cgroup2 mount).
        #[arg(long, env = "IMDS_GUARD_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Cgroup directory that keeps metadata access, with its subtree. Repeatable.
        #[arg(long)]
        allow: Vec<PathBuf>,
        /// File listing allowlisted cgroup directories, one a line; reloaded like the config.
        #[arg(long, env = "IMDS_GUARD_ALLOW_FILE")]
        allow_file: Option<PathBuf>,
    },
    /// Protect this Kubernetes node's pods; exempt those the label policy allows.
    Run {
        #[command(flatten)]
        common: CommonArgs,
        /// This node's name (the DaemonSet sets NODE_NAME from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Namespace whose pods may ask for access whatever its labels.
        /// Repeatable; default: kube-system.
        #[arg(long)]
        allow_namespace: Vec<String>,
        /// Label key on pods and namespaces (default imds-guard.io/metadata-access).
        #[arg(long)]
        label_key: Option<String>,
        /// Pod label value that asks for access (default allow).
        #[arg(long)]
        pod_allow_value: Option<String>,
        /// Namespace label value that permits its pods to ask (default allow-pods).
        #[arg(long)]
        namespace_allow_value: Option<String>,
        /// Pod cgroup subtree, when not one of the known kubelet layouts.
        #[arg(long)]
        pod_cgroup: Option<PathBuf>,
    },
    /// Show what is enforced: programs, mode, rules, allowlisted cgroups, counters.
    Status {
        /// bpffs directory where the pins are.
        #[arg(long, env = "IMDS_GUARD_BPFFS_DIR", default_value = config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Mount point of the cgroup v2 hierarchy (detected when absent).
        #[arg(long, env = "IMDS_GUARD_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
        /// The daemon's --http-listen address, to name pods.
        #[arg(long, default_value = "127.0.0.1:9464")]
        daemon: std::net::SocketAddr,
        /// Output format.
        #[arg(long, value_enum, default_value_t = StatusOutput::Text)]
        output: StatusOutput,
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

impl CommonArgs {
    fn overrides(self) -> (Option<PathBuf>, Overrides) {
        let overrides = Overrides {
            mode: self.mode,
            presets: self.preset,
            deny: self.deny,
            pass: self.pass,
            bpffs_dir: self.bpffs_dir,
            cgroup_root: self.cgroup_root,
            http_listen: self.http_listen,
            ..Overrides::default()
        };
        (self.config, overrides)
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Standalone {
            common,
            cgroup,
            allow,
            allow_file,
        } => {
            let (config_file, overrides) = common.overrides();
            let sources = Sources {
                config_file,
                overrides: Overrides {
                    cgroup,
                    allow,
                    allow_file,
                    ..overrides
                },
            };
            // The configuration is checked before anything touches the kernel.
            standalone::check(&sources)?;
            runtime()?.block_on(standalone::run(sources))?;
        }
        Command::Run {
            common,
            node_name,
            allow_namespace,
            label_key,
            pod_allow_value,
            namespace_allow_value,
            pod_cgroup,
        } => {
            let (config_file, overrides) = common.overrides();
            let sources = Sources {
                config_file,
                overrides: Overrides {
                    node_name,
                    allow_namespaces: allow_namespace,
                    label_key,
                    pod_allow_value,
                    namespace_allow_value,
                    pod_cgroup,
                    ..overrides
                },
            };
            k8s::run::check(&sources)?;
            runtime()?.block_on(k8s::run::run(sources))?;
        }
        Command::Status {
            bpffs_dir,
            cgroup_root,
            daemon,
            output,
        } => {
            let state = status::read(&bpffs_dir, cgroup_root.as_deref(), Some(daemon))?;
            match output {
                StatusOutput::Text => print!("{}", status::render(&state)),
                StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&state)?),
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
