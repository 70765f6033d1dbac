//! The `imds-guard` daemon.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use enforcer_user::{bpf::Mode, rules::RuleSet, standalone};
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
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Protect one cgroup v2 subtree on a plain Linux host (Docker host, CI runner).
    Standalone {
        /// Cgroup v2 directory whose processes lose metadata access
        /// (absolute, or relative to the cgroup2 mount).
        #[arg(long, env = "IMDS_GUARD_CGROUP")]
        cgroup: PathBuf,
        /// Cgroup directory that keeps metadata access, with its subtree. Repeatable.
        #[arg(long)]
        allow: Vec<PathBuf>,
        /// File listing allowlisted cgroup directories, one a line; re-read on SIGHUP.
        #[arg(long, env = "IMDS_GUARD_ALLOW_FILE")]
        allow_file: Option<PathBuf>,
        /// Deny rule `PREFIX [proto=LIST] [ports=LIST|except-ports=LIST]`. Repeatable;
        /// replaces the defaults (169.254.169.254/32 except-ports=53, fd00:ec2::254/128).
        #[arg(long)]
        deny: Vec<String>,
        /// Prefix never refused, even inside a deny rule (longest prefix wins). Repeatable.
        #[arg(long)]
        pass: Vec<String>,
        /// enforce refuses; audit only counts and reports.
        #[arg(long, value_enum, default_value_t = Mode::Enforce, env = "IMDS_GUARD_MODE")]
        mode: Mode,
        /// Mount point of the cgroup v2 hierarchy (detected when absent).
        #[arg(long, env = "IMDS_GUARD_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
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
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match command {
        Command::Standalone {
            cgroup,
            allow,
            allow_file,
            deny,
            pass,
            mode,
            cgroup_root,
        } => {
            // Rules are checked before anything touches the kernel.
            let rules = RuleSet::from_texts(&deny, &pass)?;
            let settings = standalone::Settings {
                cgroup,
                allow,
                allow_file,
                rules,
                mode,
                cgroup_root,
            };
            runtime.block_on(standalone::run(settings))?;
        }
    }
    Ok(())
}
