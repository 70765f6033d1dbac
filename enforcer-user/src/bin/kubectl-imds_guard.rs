//! `kubectl imds-guard`, the kubectl plugin: asks the daemon on a pod's
//! node through the API server, with the caller's own credentials.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use enforcer_user::{k8s::mode, report::explain};

#[derive(Parser)]
#[command(
    name = "kubectl imds-guard",
    version,
    about = "Ask imds-guard about a pod, through the API server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Say why a pod is blocked or allowed: the policy's decision, its
    /// cgroup, the allow-map entry and guards on its node, its attempts.
    Explain {
        /// The pod: pod/NAME or NAME.
        pod: String,
        /// The pod's namespace (default: the kubeconfig context's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Where imds-guard's DaemonSet runs.
        #[arg(long, default_value = "imds-guard")]
        daemon_namespace: String,
        /// Kubeconfig file (default: as kubectl finds it).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
}

fn main() -> ExitCode {
    let Command::Explain {
        pod,
        namespace,
        daemon_namespace,
        kubeconfig,
        output,
    } = Cli::parse().command;
    match run(
        &pod,
        namespace,
        &daemon_namespace,
        kubeconfig.as_deref(),
        output,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    pod: &str,
    namespace: Option<String>,
    daemon_namespace: &str,
    kubeconfig: Option<&Path>,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let name = explain::pod_name(pod).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let explanation = runtime.block_on(async {
        let client = mode::client(kubeconfig).await?;
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        anyhow::Ok(explain::ask_through_api(client, &namespace, name, daemon_namespace).await?)
    })?;
    match output {
        OutputFormat::Text => print!("{}", explain::render(&explanation)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
    }
    Ok(())
}
