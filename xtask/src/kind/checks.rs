//! The checks both end-to-end harnesses (kind and Vagrant) run against a
//! real cluster: imds-guard installed from deploy/, a fake metadata server on
//! every node, and real pods asking it.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The fake metadata server's whole answer. One word: the server script
/// hands it to socat, which splits on spaces.
pub const FAKE_METADATA_BODY: &str = "imds-guard-e2e-fake-metadata-server";

/// What a harness provides: kubectl and root shells on the nodes.
pub trait Cluster {
    /// Runs kubectl against this cluster: its standard output, or an error
    /// carrying its standard error.
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String>;
    /// Where kubectl finds `relative`, a path in this repository.
    fn repo_path(&self, relative: &str) -> String;
    /// Makes `relative`, a path in this repository, readable on `node`;
    /// returns its path there.
    fn put_on_node(&self, node: &str, relative: &str) -> anyhow::Result<String>;
    /// Runs a bash script as root on `node`: its standard output.
    fn on_node(&self, node: &str, script: &str) -> anyhow::Result<String>;
}

/// One request from a client to the fake metadata server, as curl reports it.
#[derive(Debug, PartialEq)]
pub enum Probe {
    /// The fake server answered.
    Reached,
    /// `connect()` failed with EPERM (imds-guard's refusal), after `seconds`.
    Refused { seconds: Option<f64> },
    /// Anything else: a timeout, another error, another server.
    Other,
}

/// What a client runs: curl with its verbose log (which names the connect
/// error) and its own timing, then its exit code.
const PROBE_SCRIPT: &str = "curl -v -sS --max-time 2 -w '\\ntime_total=%{time_total}\\n' \
     http://169.254.169.254/ 2>&1; echo \"exit=$?\"";

/// A refusal slower than this is not imds-guard's immediate EPERM.
const FAST_REFUSAL_SECONDS: f64 = 0.5;

/// Reads the output of `PROBE_SCRIPT`.
pub fn parse_probe(output: &str) -> Probe {
    let value = |key: &str| {
        output
            .lines()
            .find_map(|line| line.trim().strip_prefix(key))
            .map(str::to_owned)
    };
    let exit = value("exit=");
    let seconds = value("time_total=").and_then(|s| s.parse::<f64>().ok());
    match exit.as_deref() {
        Some("0") if output.contains(FAKE_METADATA_BODY) => Probe::Reached,
        // curl's 7 is "could not connect"; the verbose log names the errno.
        Some("7") if output.contains("Operation not permitted") => Probe::Refused { seconds },
        _ => Probe::Other,
    }
}

/// Polls `attempt` until it returns Some, for at most `limit`.
fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut attempt: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(done) = attempt()? {
            return Ok(done);
        }
        if started.elapsed() > limit {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        sleep(Duration::from_millis(500));
    }
}

/// Everything, in order; any failure stops the run (the harness then tears
/// the cluster down).
pub fn run(cluster: &dyn Cluster) -> anyhow::Result<()> {
    expect_recent_enough(cluster)?;
    install(cluster)?;
    for node in nodes(cluster)? {
        start_fake_server(cluster, &node)?;
    }
    start_clients(cluster)?;
    expect_refused(cluster, "imds-guard-e2e", "unlabelled")?;
    expect_refused(cluster, "imds-guard-e2e", "labelled-elsewhere")?;
    expect_refused(cluster, "imds-guard-e2e", "host-network")?;
    expect_reached(cluster, "kube-system", "labelled-in-kube-system")?;
    expect_no_window_while_the_daemon_is_replaced(cluster)?;
    expect_admission_policy(cluster)?;
    println!("e2e: every check passed");
    Ok(())
}

/// The oldest Kubernetes minor version whose API server accepts the
/// admission policy: its CEL uses the IP and CIDR libraries.
const OLDEST_MINOR: u32 = 31;

/// Fails at once, saying why, on a cluster too old for deploy/ (it would
/// fail later, at `kubectl apply`, less clearly).
fn expect_recent_enough(cluster: &dyn Cluster) -> anyhow::Result<()> {
    let version = cluster.kubectl(&["get", "--raw", "/version"])?;
    let minor = json_string(&version, "minor")
        .and_then(|m| m.trim_end_matches('+').parse::<u32>().ok())
        .with_context(|| format!("no minor version in {version}"))?;
    if minor < OLDEST_MINOR {
        bail!(
            "the cluster runs Kubernetes 1.{minor}; deploy/ needs 1.{OLDEST_MINOR} or newer \
             (its admission policy uses the CEL IP and CIDR libraries)"
        );
    }
    Ok(())
}

/// The string value of `key` in flat JSON such as the API server's /version.
fn json_string(json: &str, key: &str) -> Option<String> {
    let after_key = json.split_once(&format!("\"{key}\""))?.1;
    let value = after_key.trim_start().strip_prefix(':')?.trim_start();
    let value = value.strip_prefix('"')?;
    Some(value.split_once('"')?.0.to_owned())
}

fn install(cluster: &dyn Cluster) -> anyhow::Result<()> {
    println!("e2e: installing imds-guard (deploy/)");
    cluster.kubectl(&["apply", "-k", &cluster.repo_path("deploy")])?;
    wait_for_every_daemon(cluster)
}

/// Until a daemon pod runs, ready, on every node.
fn wait_for_every_daemon(cluster: &dyn Cluster) -> anyhow::Result<()> {
    cluster.kubectl(&[
        "-n",
        "imds-guard",
        "rollout",
        "status",
        "daemonset/imds-guard",
        "--timeout=300s",
    ])?;
    Ok(())
}

fn nodes(cluster: &dyn Cluster) -> anyhow::Result<Vec<String>> {
    let names = cluster.kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"])?;
    let nodes: Vec<String> = names.split_whitespace().map(str::to_owned).collect();
    if nodes.is_empty() {
        bail!("the cluster has no nodes");
    }
    Ok(nodes)
}

/// Starts the fake server on `node`. Nothing is sent to the metadata address
/// before it is on the node's own loopback, so no request can leave the node
/// for a real metadata service; then a process of the node itself (outside
/// every pod, so imds-guard leaves it alone) must get the fake answer.
fn start_fake_server(cluster: &dyn Cluster, node: &str) -> anyhow::Result<()> {
    println!("e2e: fake metadata server on {node}");
    let script = cluster.put_on_node(node, "deploy/e2e/fake-metadata-server.sh")?;
    cluster.on_node(
        node,
        &format!(
            "setsid -f bash {script} serve {FAKE_METADATA_BODY} \
             >/var/log/imds-guard-e2e-metadata.log 2>&1 </dev/null"
        ),
    )?;
    wait_for(
        "169.254.169.254 on the node's loopback",
        Duration::from_secs(10),
        || {
            let addresses = cluster.on_node(node, "ip -o address show dev lo")?;
            Ok(addresses.contains("169.254.169.254/32").then_some(()))
        },
    )
    .with_context(|| format!("node {node}: the fake server did not start (see its log there)"))?;
    wait_for(
        "the fake metadata server to answer its node",
        Duration::from_secs(10),
        || Ok((parse_probe(&cluster.on_node(node, PROBE_SCRIPT)?) == Probe::Reached).then_some(())),
    )
    .with_context(|| format!("node {node}: a node process must reach the fake server"))?;
    println!("  ok: a process of node {node} reaches it (outside the pods: not protected)");
    Ok(())
}

fn start_clients(cluster: &dyn Cluster) -> anyhow::Result<()> {
    println!("e2e: starting the client pods (deploy/e2e/pods.yaml)");
    cluster.kubectl(&["apply", "-f", &cluster.repo_path("deploy/e2e/pods.yaml")])?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all-namespaces",
        "-l",
        "imds-guard-e2e=client",
        "--timeout=300s",
    ])?;
    Ok(())
}

fn probe(cluster: &dyn Cluster, namespace: &str, pod: &str) -> anyhow::Result<(Probe, String)> {
    let output =
        cluster.kubectl(&["-n", namespace, "exec", pod, "--", "sh", "-c", PROBE_SCRIPT])?;
    Ok((parse_probe(&output), output))
}

fn expect_refused(cluster: &dyn Cluster, namespace: &str, pod: &str) -> anyhow::Result<()> {
    match probe(cluster, namespace, pod)? {
        (Probe::Refused { seconds }, _) if seconds.is_none_or(|s| s < FAST_REFUSAL_SECONDS) => {
            let took = seconds.map_or("time unknown".to_owned(), |s| format!("{:.1} ms", s * 1e3));
            println!("  ok: {namespace}/{pod} refused at once: EPERM ({took})");
            Ok(())
        }
        (_, output) => bail!("{namespace}/{pod} was not refused at once:\n{output}"),
    }
}

/// The pod may have started before the daemon saw it: its allow entry comes
/// within moments of its event.
fn expect_reached(cluster: &dyn Cluster, namespace: &str, pod: &str) -> anyhow::Result<()> {
    let mut last = String::new();
    let reached = wait_for(
        &format!("{namespace}/{pod} to reach the server"),
        Duration::from_secs(20),
        || {
            let (outcome, output) = probe(cluster, namespace, pod)?;
            last = output;
            Ok((outcome == Probe::Reached).then_some(()))
        },
    );
    reached.with_context(|| format!("last attempt:\n{last}"))?;
    println!("  ok: {namespace}/{pod} reaches the server");
    Ok(())
}

/// Outcomes the looping client has logged so far: (reached, refused).
fn looping_outcomes(cluster: &dyn Cluster) -> anyhow::Result<(usize, usize)> {
    let log = cluster.kubectl(&["-n", "imds-guard-e2e", "logs", "looping"])?;
    let count = |prefix: &str| log.lines().filter(|l| l.starts_with(prefix)).count();
    Ok((count("reached"), count("refused")))
}

/// Deletes the daemon pod on the looping client's node and waits for its
/// replacement, while the client asks every 50 ms: enforcement is pinned,
/// so not one request may get through, before, during or after.
fn expect_no_window_while_the_daemon_is_replaced(cluster: &dyn Cluster) -> anyhow::Result<()> {
    let node = cluster.kubectl(&[
        "-n",
        "imds-guard-e2e",
        "get",
        "pod",
        "looping",
        "-o",
        "jsonpath={.spec.nodeName}",
    ])?;
    let daemon = cluster.kubectl(&[
        "-n",
        "imds-guard",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=imds-guard",
        "--field-selector",
        &format!("spec.nodeName={}", node.trim()),
        "-o",
        "name",
    ])?;
    let daemon = daemon.trim();
    if daemon.is_empty() {
        bail!("no imds-guard pod on node {}", node.trim());
    }
    let (_, before) = looping_outcomes(cluster)?;
    println!(
        "e2e: deleting {daemon} on {} while a client keeps asking",
        node.trim()
    );
    cluster.kubectl(&["-n", "imds-guard", "delete", daemon, "--wait=true"])?;
    let (_, while_gone) = looping_outcomes(cluster)?;
    wait_for_every_daemon(cluster)?;
    sleep(Duration::from_secs(2));
    let (reached, after) = looping_outcomes(cluster)?;
    if reached > 0 {
        bail!("{reached} requests got through while the daemon pod was replaced");
    }
    // The client must have kept asking through the whole replacement.
    if !(before < while_gone && while_gone < after) {
        bail!(
            "the looping client did not keep asking ({before}, then {while_gone}, \
             then {after} refusals): the check proves nothing"
        );
    }
    println!("  ok: {after} requests, every one refused, across the replacement");
    Ok(())
}

/// The policy needs the API server's CEL IP library (Kubernetes 1.31).
fn expect_admission_policy(cluster: &dyn Cluster) -> anyhow::Result<()> {
    let dry_run = |file: &str| {
        cluster.kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &cluster.repo_path(&format!("deploy/e2e/{file}")),
        ])
    };
    dry_run("endpointslice-ordinary.yaml")
        .context("an EndpointSlice with an ordinary address must be admitted")?;
    match dry_run("endpointslice-metadata.yaml") {
        Err(refusal) if format!("{refusal:#}").contains("imds-guard") => {
            println!("  ok: an EndpointSlice pointing at 169.254.169.254 is rejected");
            Ok(())
        }
        Err(other) => bail!("rejected, but not by imds-guard's policy: {other:#}"),
        Ok(_) => bail!("an EndpointSlice pointing at 169.254.169.254 was admitted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// curl 7.88 refused by imds-guard (standalone mode, this project's
    /// daemon), as `PROBE_SCRIPT` prints it.
    const REFUSED: &str = "*   Trying 169.254.169.254:80...
* Immediate connect fail for 169.254.169.254: Operation not permitted
* Failed to connect to 169.254.169.254 port 80 after 0 ms: Couldn't connect to server
* Closing connection 0
curl: (7) Failed to connect to 169.254.169.254 port 80 after 0 ms: Couldn't connect to server

time_total=0.000162
exit=7
";

    #[test]
    fn reads_the_server_version() {
        let version = r#"{
  "major": "1",
  "minor": "34+",
  "gitVersion": "v1.34.1"
}"#;
        assert_eq!(json_string(version, "minor").as_deref(), Some("34+"));
        assert_eq!(json_string(version, "major").as_deref(), Some("1"));
        assert_eq!(json_string(version, "platform"), None);
    }

    #[test]
    fn reads_curl_outcomes() {
        assert_eq!(
            parse_probe(REFUSED),
            Probe::Refused {
                seconds: Some(0.000_162)
            }
        );
        let reached =
            format!("< HTTP/1.0 200 OK\n<\n{FAKE_METADATA_BODY}\n\ntime_total=0.008\nexit=0\n");
        assert_eq!(parse_probe(&reached), Probe::Reached);
        // Another server answering is not ours: never count it as reached.
        assert_eq!(
            parse_probe("< HTTP/1.1 200 OK\n\nami-id\ntime_total=0.01\nexit=0\n"),
            Probe::Other
        );
        let timed_out = "* Connection timed out after 2001 milliseconds\ntime_total=2.0\nexit=28\n";
        assert_eq!(parse_probe(timed_out), Probe::Other);
        assert_eq!(parse_probe(""), Probe::Other);
    }
}
