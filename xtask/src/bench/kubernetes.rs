//! Figure 7's Kubernetes rows: the real `imds-guard run` against the test
//! API server, with pod cgroups in the kubelet's systemd layout.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use imds_guard_tests::{
    Daemon, PinDir, TestCgroup,
    apiserver::{ApiServerOptions, FakeApiServer},
};
use k8s_openapi::api::core::v1::Pod;

use super::{
    daemon::rss_kib,
    progress,
    report::{Row, Target, quantile},
};
use crate::interrupt::interrupted;

const NODE: &str = "bench-node";
const LABEL: &str = "imds-guard.io/metadata-access";
/// Pods that run on the node throughout.
const RESIDENT_PODS: usize = 250;
/// Label changes timed for propagation.
const CHANGES: usize = 100;
/// What the daemon logs, with its own timestamp, when the allow map changed.
const UPDATED: &str = "allow list updated";
/// Pods created and deleted through the node while memory is watched.
const CHURN_PODS: usize = 5000;
/// Allowed pods whose cgroup is made after their pod event, timed.
const LATE_CGROUPS: usize = 50;
/// How long the test API server lets a watch last while the API cost is
/// counted, and for how many timeouts.
const COST_WATCH_TIMEOUT: Duration = Duration::from_secs(5);
const COST_TIMEOUTS: u32 = 6;
/// What kube's watcher asks the API server for (`timeoutSeconds=290`), so
/// how often a real cluster ends and renews each watch.
const REAL_WATCH_TIMEOUT_S: f64 = 290.0;
/// The fleet the projection is for.
const FLEET: f64 = 5000.0;

fn uid(index: usize) -> String {
    format!("{index:08x}-bbbb-4ccc-8ddd-eeeeeeeeeeee")
}

/// A Burstable pod in kube-system, labelled to ask for access or not.
fn pod(index: usize, name: &str, allow: bool) -> anyhow::Result<Pod> {
    let mut labels = serde_json::json!({"app": "bench"});
    if allow {
        labels[LABEL] = serde_json::json!("allow");
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "kube-system", "uid": uid(index), "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "bench"}]},
        "status": {"qosClass": "Burstable"},
    }))?)
}

fn pod_cgroup(index: usize) -> String {
    format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid(index).replace('-', "_")
    )
}

/// Unix time of a log line, from its RFC 3339 timestamp
/// (`2026-11-27T06:24:01.123456Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut civil = date.split('-').map(str::parse::<i32>);
    let (year, month, day) = (
        civil.next()?.ok()?,
        civil.next()?.ok()?,
        civil.next()?.ok()?,
    );
    let mut clock = time.split(':');
    let (hours, minutes) = (
        clock.next()?.parse::<f64>().ok()?,
        clock.next()?.parse::<f64>().ok()?,
    );
    let seconds = clock.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(f64::from(days) * 86_400.0 + hours * 3600.0 + minutes * 60.0 + seconds)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Waits until the daemon has logged `count` lines containing `needle` and
/// returns the last one.
fn nth_line(daemon: &mut Daemon, needle: &str, count: usize) -> anyhow::Result<String> {
    daemon.wait_for_log_count(needle, count, Duration::from_secs(10))?;
    daemon
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .nth(count - 1)
        .map(str::to_owned)
        .context("the log line went missing")
}

pub fn figures() -> anyhow::Result<Vec<Row>> {
    progress(
        "7 Kubernetes: 250 pods, 100 label changes, 50 late cgroups, 5,000 pods of churn, API cost",
    );
    let mut root = TestCgroup::new("bench-k8s")?;
    root.child("kubepods.slice")?;
    let api = FakeApiServer::start_with(&ApiServerOptions {
        max_watch_timeout: Some(COST_WATCH_TIMEOUT),
        ..ApiServerOptions::default()
    })?;
    // The node object the daemon looks at for its startup taint.
    api.apply_node(imds_guard_tests::pods::node(NODE, &[]))?;
    for index in 0..RESIDENT_PODS {
        root.child(&pod_cgroup(index))?;
        api.apply_pod(pod(
            index,
            &format!("resident-{index}"),
            index.is_multiple_of(2),
        )?)?;
    }
    let kubeconfig = std::env::temp_dir().join(imds_guard_tests::unique_name("bench-kubeconfig"));
    api.write_kubeconfig(&kubeconfig)?;
    let pins = PinDir::new("bench-k8s");
    let result = measure(&api, &mut root, &pins, &kubeconfig);
    let _ = std::fs::remove_file(&kubeconfig);
    result
}

/// Requests per watch timeout of one quiet node, counted over
/// [`COST_TIMEOUTS`] timeouts.
fn api_cost(api: &FakeApiServer) -> anyhow::Result<f64> {
    let from = Instant::now();
    for _ in 0..COST_TIMEOUTS {
        interrupted()?;
        std::thread::sleep(COST_WATCH_TIMEOUT);
    }
    let requests = api.requests().iter().filter(|r| r.at > from).count();
    let requests = u32::try_from(requests).context("a few requests")?;
    Ok(f64::from(requests) / f64::from(COST_TIMEOUTS))
}

/// What a quiet node costs the API server, and a fleet of them.
fn api_cost_rows(per_timeout: f64) -> Vec<Row> {
    vec![
        Row::new(
            format!(
                "7 Kubernetes: API requests of a quiet node per watch timeout ({COST_TIMEOUTS} \
                 timeouts of {COST_WATCH_TIMEOUT:?})"
            ),
            format!("{per_timeout:.2}"),
        ),
        Row::new(
            format!(
                "7 Kubernetes: API requests per node per hour (watches renewed every \
                 {REAL_WATCH_TIMEOUT_S:.0} s, as kube asks)"
            ),
            format!("{:.0}", per_timeout * 3600.0 / REAL_WATCH_TIMEOUT_S),
        ),
        Row::new(
            format!("7 Kubernetes: API requests per second from {FLEET:.0} quiet nodes"),
            format!("{:.1}", per_timeout * FLEET / REAL_WATCH_TIMEOUT_S),
        ),
    ]
}

/// From making an allowed pod's cgroup, [`LATE_CGROUPS`] times a little
/// after its pod event, to the daemon's allow list update.
fn late_cgroups(
    api: &FakeApiServer,
    root: &mut TestCgroup,
    daemon: &mut Daemon,
) -> anyhow::Result<Vec<f64>> {
    let mut updates = daemon.count_log(UPDATED);
    let mut latencies_ms = Vec::with_capacity(LATE_CGROUPS);
    for late in 0..LATE_CGROUPS {
        interrupted()?;
        let index = RESIDENT_PODS + CHURN_PODS + late;
        api.apply_pod(pod(index, &format!("late-{late}"), true)?)?;
        // The pod event is handled (nothing to list yet), then the kubelet
        // is slow to make the cgroup.
        std::thread::sleep(Duration::from_millis(150));
        let made = unix_now();
        root.child(&pod_cgroup(index))?;
        updates += 1;
        let line = nth_line(daemon, UPDATED, updates)?;
        let at = log_time(&line).with_context(|| format!("no timestamp in {line:?}"))?;
        latencies_ms.push((at - made) * 1000.0);
    }
    Ok(latencies_ms)
}

/// From changing a resident pod's label to the daemon's allow list update,
/// [`CHANGES`] times.
fn label_changes(api: &FakeApiServer, daemon: &mut Daemon) -> anyhow::Result<Vec<f64>> {
    // Each change flips one resident pod's label; the daemon logs the allow
    // list update with its own timestamp.
    let mut updates = daemon.count_log(UPDATED);
    let mut latencies_ms = Vec::with_capacity(CHANGES);
    for change in 0..CHANGES {
        interrupted()?;
        let index = change % RESIDENT_PODS;
        let allow = !index.is_multiple_of(2);
        let before = unix_now();
        api.apply_pod(pod(index, &format!("resident-{index}"), allow)?)?;
        updates += 1;
        let line = nth_line(daemon, UPDATED, updates)?;
        let at = log_time(&line).with_context(|| format!("no timestamp in {line:?}"))?;
        latencies_ms.push((at - before) * 1000.0);
        // Put it back, so every change is a real flip of the allow list.
        api.apply_pod(pod(index, &format!("resident-{index}"), !allow)?)?;
        updates += 1;
        nth_line(daemon, UPDATED, updates)?;
    }
    Ok(latencies_ms)
}

fn measure(
    api: &FakeApiServer,
    root: &mut TestCgroup,
    pins: &PinDir,
    kubeconfig: &Path,
) -> anyhow::Result<Vec<Row>> {
    let spawned = Instant::now();
    let mut daemon = Daemon::kubernetes(NODE, root.path(), pins.path(), kubeconfig).start()?;
    let to_enforcing = spawned.elapsed();
    daemon.wait_for_log("synced with the API server", Duration::from_secs(20))?;
    let to_ready = spawned.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let idle_kib = rss_kib(daemon.pid())?;
    let per_timeout = api_cost(api)?;

    let latencies_ms = label_changes(api, &mut daemon)?;
    let (p50, p99) = (quantile(&latencies_ms, 0.5), quantile(&latencies_ms, 0.99));
    let late_ms = late_cgroups(api, root, &mut daemon)?;
    let (late_p50, late_p99) = (quantile(&late_ms, 0.5), quantile(&late_ms, 0.99));

    // Churn: pods come and go as fast as the API server takes them.
    let mut peak_kib = idle_kib;
    let churn_started = Instant::now();
    for index in 0..CHURN_PODS {
        if index.is_multiple_of(100) {
            interrupted()?;
            peak_kib = peak_kib.max(rss_kib(daemon.pid())?);
        }
        let name = format!("churn-{index}");
        api.apply_pod(pod(RESIDENT_PODS + index, &name, false)?)?;
        if index >= 50 {
            api.delete_pod("kube-system", &format!("churn-{}", index - 50))?;
        }
    }
    let churn = churn_started.elapsed();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        peak_kib = peak_kib.max(rss_kib(daemon.pid())?);
    }
    let status = daemon.stop()?;
    ensure!(
        status.success(),
        "imds-guard exited with {status}:\n{}",
        daemon.log()
    );
    let mib = |kib: f64| kib / 1024.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut rows = vec![
        Row::new(
            "7 Kubernetes: label change to allow map updated, p50",
            format!("{p50:.1} ms"),
        )
        .raw(&latencies_ms)?,
        Row::new(
            "7 Kubernetes: label change to allow map updated, p99",
            format!("{p99:.1} ms"),
        )
        .target(Target::Below(100.0, "ms"), p99),
        Row::new(
            "7 Kubernetes: late cgroup (made after its pod event) to allow map updated, p50",
            format!("{late_p50:.1} ms"),
        )
        .target(Target::Below(100.0, "ms"), late_p50)
        .raw(&late_ms)?,
        Row::new(
            "7 Kubernetes: late cgroup to allow map updated, p99",
            format!("{late_p99:.1} ms"),
        )
        .target(Target::Below(100.0, "ms"), late_p99),
        Row::new(
            format!("7 Kubernetes: daemon memory, idle, {RESIDENT_PODS} pods"),
            format!("{:.1} MiB", mib(idle_kib)),
        )
        .target(Target::Below(32.0, "MiB"), mib(idle_kib)),
        Row::new(
            format!(
                "7 Kubernetes: daemon memory, peak, {CHURN_PODS} pods churning ({:.1} s)",
                churn.as_secs_f64()
            ),
            format!("{:.1} MiB", mib(peak_kib)),
        )
        .target(Target::Below(32.0, "MiB"), mib(peak_kib)),
        Row::new(
            format!("8 Kubernetes: daemon start to enforcing, {RESIDENT_PODS} pods"),
            format!("{:.1} ms", ms(to_enforcing)),
        )
        .target(Target::Below(100.0, "ms"), ms(to_enforcing)),
        Row::new(
            format!("8 Kubernetes: daemon start to ready (first sync), {RESIDENT_PODS} pods"),
            format!("{:.1} ms", ms(to_ready)),
        ),
    ];
    rows.extend(api_cost_rows(per_timeout));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_read_as_unix_time() {
        let line = "2026-11-27T06:24:01.500000Z  INFO enforcer_user::k8s::run: allow list updated";
        // 2026-11-27T00:00:00Z is 1795737600.
        assert_eq!(
            log_time(line),
            Some(1_795_737_600.0 + 6.0 * 3600.0 + 24.0 * 60.0 + 1.5)
        );
        assert_eq!(log_time("1970-01-01T00:00:00Z x"), Some(0.0));
        assert_eq!(log_time("no timestamp"), None);
    }
}
