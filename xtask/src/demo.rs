//! `cargo xtask demo`: the real daemon against our own fake metadata server,
//! in a sandbox of network namespaces, with a readable report.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::bail;
use imds_guard_tests::{
    Daemon, Outcome, PinDir, Probe, Sandbox, Server, TestCgroup, addrs, daemon::run_to_end,
};

use crate::{
    build_release,
    interrupt::{catch_interrupts, interrupted},
    is_root, setup,
};

struct Attempt {
    action: &'static str,
    addr: IpAddr,
    port: u16,
    what: &'static str,
}

fn attempts() -> Vec<Attempt> {
    let md = IpAddr::V4(addrs::METADATA_V4);
    let md6 = IpAddr::V6(addrs::METADATA_V6);
    let at = |action, addr, port, what| Attempt {
        action,
        addr,
        port,
        what,
    };
    vec![
        at("tcp", md, 80, "HTTP to the metadata API"),
        at("udp", md, 80, "UDP datagram to it"),
        at("ping", md, 0, "ICMP echo to it"),
        at("raw-udp", md, 80, "raw IP packet, handmade header"),
        at("tcp", md6, 80, "HTTP to AWS's IPv6 endpoint"),
        at(
            "tcp",
            addrs::metadata_v4_mapped(),
            80,
            "HTTP via ::ffff:169.254.169.254",
        ),
        at("udp", md, 53, "DNS on the same address (GCP)"),
        at(
            "tcp",
            IpAddr::V4(addrs::SERVER_V4),
            80,
            "HTTP to an ordinary server",
        ),
    ]
}

fn describe(outcome: &Outcome, elapsed: Duration) -> String {
    let ms = elapsed.as_secs_f64() * 1000.0;
    match outcome {
        Outcome::Reached => format!("reached the server ({ms:.2} ms)"),
        Outcome::Refused(errno) => format!("refused at once: {errno} ({ms:.2} ms)"),
        Outcome::TimedOut => format!("dropped: no answer (gave up after {ms:.0} ms)"),
        Outcome::Failed(why) => format!("probe failed: {why}"),
    }
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    setup::run(root)?;
    let bin_dir = build_release(root)?;
    if !is_root() {
        bail!("the demo needs root: it creates network namespaces, cgroups and BPF programs");
    }
    // SAFETY: still single-threaded; the harness reads this to find the binaries.
    unsafe { std::env::set_var("IMDS_GUARD_BIN_DIR", &bin_dir) };
    catch_interrupts()?;

    let sandbox = Sandbox::new()?;
    let _server = Server::start(&sandbox.server, &[80, 53])?;
    let mut cgroups = TestCgroup::new("demo")?;
    // Pins of the demo's own, removed (detaching the programs) at the end.
    let pins = PinDir::new("demo");
    let guarded = cgroups.child("workloads")?;
    let app = cgroups.child("workloads/app")?;
    let agent = cgroups.child("workloads/metadata-agent")?;
    interrupted()?;

    println!();
    println!("imds-guard demo");
    println!("  sandbox  a client namespace with no route out, joined by a veth pair to a");
    println!(
        "           server namespace where our own fake metadata server answers at {} and {}",
        addrs::METADATA_V4,
        addrs::METADATA_V6
    );
    println!(
        "           (and an ordinary server at {})",
        addrs::SERVER_V4
    );
    println!("  cgroups  {}/{{app, metadata-agent}}", guarded.display());
    let guarded_arg = guarded.display().to_string();
    let agent_arg = agent.display().to_string();
    let pins_arg = pins.path().display().to_string();
    let args = [
        "standalone",
        "--cgroup",
        &guarded_arg,
        "--allow",
        &agent_arg,
        "--bpffs-dir",
        &pins_arg,
    ];
    println!("  daemon   imds-guard {}", args.join(" "));
    let mut daemon = Daemon::start(&args)?;
    println!();
    println!("  {:<15} {:<35} {:<32} result", "client", "attempt", "to");

    let (app_reached_metadata, agent_missed) = try_every_attempt(&sandbox, &app, &agent)?;
    // Events reach the daemon within milliseconds; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(300));
    println!();
    println!("  what the daemon logged (once per workload, destination and verdict a minute):");
    for line in daemon
        .log()
        .lines()
        .filter(|l| l.contains("attempt to reach a metadata address"))
    {
        println!("    {line}");
    }
    println!();
    println!("  imds-guard status --bpffs-dir {pins_arg}");
    for line in run_to_end(&["status", "--bpffs-dir", &pins_arg])?.lines() {
        println!("    {line}");
    }
    daemon.stop()?;
    println!();
    if app_reached_metadata > 0 || agent_missed > 0 {
        bail!(
            "unexpected: app reached the metadata server {app_reached_metadata} time(s), \
             the allowlisted agent failed {agent_missed} time(s)"
        );
    }
    println!(
        "  result: app never reached the metadata server; the allowlisted metadata-agent always did;"
    );
    println!("          DNS on the metadata address and ordinary traffic worked for both.");
    println!("  cleaning up the sandbox, cgroups and daemon");
    Ok(())
}

/// Every attempt from both cgroups, each printed with its outcome; returns
/// how often `app` reached the metadata server and how often the
/// allowlisted agent failed.
fn try_every_attempt(
    sandbox: &Sandbox,
    app: &Path,
    agent: &Path,
) -> anyhow::Result<(usize, usize)> {
    let mut app_reached_metadata = 0;
    let mut agent_missed = 0;
    for attempt in attempts() {
        for (who, cgroup) in [("app", &app), ("metadata-agent", &agent)] {
            interrupted()?;
            let probe = Probe {
                netns: &sandbox.client,
                cgroup: Some(cgroup),
            };
            let source = addrs::CLIENT_V4.to_string();
            let extra: &[&str] = if attempt.action == "raw-udp" {
                &["--source", &source]
            } else {
                &[]
            };
            let result = probe.attempt(attempt.action, attempt.addr, attempt.port, extra)?;
            let target = if attempt.port == 0 {
                attempt.addr.to_string()
            } else {
                std::net::SocketAddr::new(attempt.addr, attempt.port).to_string()
            };
            println!(
                "  {who:<15} {:<35} {target:<32} {}",
                attempt.what,
                describe(&result.outcome, result.elapsed)
            );
            let is_metadata = attempt.port != 53 && attempt.addr != IpAddr::V4(addrs::SERVER_V4);
            let reached = result.outcome == Outcome::Reached;
            if who == "app" && is_metadata && reached {
                app_reached_metadata += 1;
            }
            if who == "metadata-agent" && !reached {
                agent_missed += 1;
            }
        }
    }
    Ok((app_reached_metadata, agent_missed))
}
