//! The monitoring bundle (deploy/monitoring) as the tests read it: the alert
//! rules, every query of the rules and the dashboard, and the
//! metric names they use; and a real Prometheus server that evaluates the
//! rules against a daemon on loopback.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Result, SandboxError};

/// Metric names of the daemon's own: what the bundle's queries must find
/// on a real `/metrics`. (`up` is Prometheus's.)
const PREFIX: &str = "imds_guard_";

pub fn bundle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join("deploy/monitoring")
}

fn read(relative: &str) -> String {
    let path = bundle_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// The `PrometheusRule`'s `spec`: a Prometheus rule file's `groups`.
pub fn rule_file() -> Value {
    let rule: Value =
        serde_yaml_ng::from_str(&read("prometheusrule.yaml")).expect("prometheusrule.yaml is YAML");
    assert_eq!(rule["kind"], "PrometheusRule", "{rule}");
    rule["spec"].clone()
}

/// The committed dashboard.
pub fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/imds-guard.json")).expect("the dashboard is JSON")
}

/// The alerts' names and expressions.
pub fn alerts(rule_file: &Value) -> Vec<(String, String)> {
    rule_file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules"))
        .map(|rule| {
            (
                rule["alert"].as_str().expect("alert name").to_owned(),
                rule["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

/// Every target expression of the dashboard's panels.
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect()
}

/// The daemon's metric names an expression reads: its identifiers, outside
/// quoted strings (label values), with the daemon's prefix.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::with_capacity(expr.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (in_string, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, false, '"') | (false, _, '"') => in_string = !in_string,
            (true, ..) => escaped = false,
            (false, ..) => unquoted.push(c),
        }
    }
    let mut names = BTreeSet::new();
    let mut rest = unquoted.as_str();
    while let Some(start) = rest.find(PREFIX) {
        let before = rest[..start].chars().next_back();
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Part of a longer identifier (`my_imds_guard_x`) is not a name.
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// `rule_file` made quick for a test run: every `for:` becomes `hold` and
/// every range window in an expression (`[10m]`) becomes `window`, so an
/// alert fires and resolves in seconds rather than minutes. Conditions and
/// thresholds stay as shipped.
pub fn quickened(rule_file: &Value, hold: &str, window: &str) -> Value {
    let mut quick = rule_file.clone();
    for group in quick["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            if rule.get("for").is_some() {
                rule["for"] = json!(hold);
            }
            let expr = rule["expr"].as_str().expect("expr");
            rule["expr"] = json!(with_windows(expr, window));
        }
    }
    quick
}

/// `expr` with every `[<duration>]` replaced by `[window]`.
fn with_windows(expr: &str, window: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else {
            break;
        };
        out.push_str(&rest[..=open]);
        out.push_str(window);
        rest = &rest[open + close..];
    }
    out.push_str(rest);
    out
}

/// A loopback port nobody listens on now (the OS picks it; a race with
/// another process taking it in between is possible but rare).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A Prometheus server on loopback, storing in a temporary directory,
/// scraping `target` as job `imds-guard` every second and evaluating the
/// rules every second. Killed and its directory removed on drop.
pub struct Prometheus {
    child: Child,
    address: SocketAddr,
    dir: PathBuf,
}

/// An alert as `/api/v1/alerts` lists it (pending or firing).
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub name: String,
    pub state: String,
    pub labels: Value,
}

impl Prometheus {
    /// Starts it with `rule_file` and waits until it is ready.
    pub fn start(rule_file: &Value, target: SocketAddr) -> Result<Prometheus> {
        let dir = std::env::temp_dir().join(crate::unique_name("prometheus"));
        let io = |what, path: &Path, source| SandboxError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join("data")).map_err(|e| io("creating", &dir, e))?;
        let rules = dir.join("rules.yaml");
        std::fs::write(
            &rules,
            serde_yaml_ng::to_string(rule_file).expect("serializable"),
        )
        .map_err(|e| io("writing", &rules, e))?;
        let config = json!({
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [rules],
            "scrape_configs": [{
                // The job the PodMonitor's jobLabel gives, and the node
                // label its relabeling adds.
                "job_name": "imds-guard",
                "static_configs": [{
                    "targets": [target.to_string()],
                    "labels": {"node": "test-node"},
                }],
            }],
        });
        let config_path = dir.join("prometheus.yml");
        std::fs::write(
            &config_path,
            serde_yaml_ng::to_string(&config).expect("serializable"),
        )
        .map_err(|e| io("writing", &config_path, e))?;
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                SandboxError::Process(format!(
                    "cannot run prometheus ({e}): install Debian's prometheus package \
                     (cargo xtask setup)"
                ))
            })?;
        let mut prometheus = Prometheus {
            child,
            address,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !prometheus.get("/-/ready").is_ok_and(|r| r.0 == 200) {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                return Err(SandboxError::Process(format!(
                    "prometheus exited ({status}) before it was ready"
                )));
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Process(
                    "prometheus was not ready within 30 s".to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    /// `GET path` as HTTP/1.0 (a plain body, never chunked): status, body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::http::get(self.address, path, Duration::from_secs(10))
    }

    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        let parsed: Value = serde_json::from_str(&body).map_err(|e| {
            SandboxError::Process(format!("prometheus {path}: {e} in {status} {body:?}"))
        })?;
        if parsed["status"] != "success" {
            return Err(SandboxError::Process(format!("prometheus {path}: {body}")));
        }
        Ok(parsed["data"].clone())
    }

    /// The alerts pending or firing now.
    pub fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|alert| Alert {
                name: alert["labels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                state: alert["state"].as_str().unwrap_or_default().to_owned(),
                labels: alert["labels"].clone(),
            })
            .collect())
    }

    /// The values of an instant query's series.
    pub fn query(&self, expr: &str) -> Result<Vec<f64>> {
        let encoded: String = expr
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let data = self.api(&format!("/api/v1/query?query={encoded}"))?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|series| series["value"][1].as_str()?.parse().ok())
            .collect())
    }

    /// Waits until `check` holds of the alerts listed, up to `timeout`;
    /// returns them then.
    pub fn wait_for_alerts(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Alert]) -> bool,
    ) -> Result<Vec<Alert>> {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts()?;
            if check(&alerts) {
                return Ok(alerts);
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Process(format!(
                    "{what}: not within {timeout:?}; alerts now: {alerts:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The names of the samples in a text exposition (`name{labels} value`).
pub fn exposed_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_wherever_they_stand() {
        let names = metric_names(
            "sum by (le) (rate(imds_guard_x_bucket{kind=\"imds_guard_not\"}[5m])) \
             / imds_guard_y or my_imds_guard_z{a=\"x\\\"imds_guard_q\"}",
        );
        assert_eq!(
            names,
            BTreeSet::from(["imds_guard_x_bucket".to_owned(), "imds_guard_y".to_owned()])
        );
    }

    #[test]
    fn quickened_rules_keep_their_conditions() {
        let rules = json!({"groups": [{"name": "g", "rules": [
            {"alert": "A", "expr": "increase(x[10m]) > 0 or rate(y[5m]) > 1", "for": "5m"},
            {"alert": "B", "expr": "z == 0"},
        ]}]});
        let quick = quickened(&rules, "2s", "10s");
        assert_eq!(
            quick,
            json!({"groups": [{"name": "g", "rules": [
                {"alert": "A", "expr": "increase(x[10s]) > 0 or rate(y[10s]) > 1", "for": "2s"},
                {"alert": "B", "expr": "z == 0"},
            ]}]})
        );
    }

    #[test]
    fn exposition_names_are_the_samples() {
        let text = "# TYPE imds_guard_a counter\nimds_guard_a_total{x=\"1\"} 2\n\
                    imds_guard_b 1\n# EOF\n";
        assert_eq!(
            exposed_names(text),
            BTreeSet::from(["imds_guard_a_total".to_owned(), "imds_guard_b".to_owned()])
        );
    }
}
