//! The matrix's table: one row per kernel and privileges.

use super::{Kernel, Run, boot};

/// One line of the table.
pub struct Row {
    pub kernel: String,
    pub suite: String,
    pub cgroup: String,
    pub privileges: &'static str,
    pub expected: &'static str,
    pub result: String,
    pub seconds: u64,
    pub ok: bool,
}

/// The rows of one guest: a run is as expected when each of its test
/// executables ran tests, all passed, and it exited 0.
pub fn rows_of(kernel: &Kernel, runs: &[Run], boot: &boot::Boot) -> Vec<Row> {
    let console = boot::parse_console(&boot.console);
    let cgroup = match console.guest.as_ref().map(|(_, fs)| fs.as_str()) {
        Some("cgroup2fs") => "unified".to_owned(),
        Some(other) => other.to_owned(),
        None => "?".to_owned(),
    };
    let stopped = if boot.timed_out {
        format!("the guest was killed after {:.0?}", boot.elapsed)
    } else {
        "the guest stopped first".to_owned()
    };
    runs.iter()
        .map(|run| {
            let (mut passed, mut failed, mut seconds, mut ok) = (0, 0, 0, true);
            let mut missing = Vec::new();
            for test in run.tests {
                match console
                    .outcomes
                    .get(&(run.id.to_owned(), (*test).to_owned()))
                {
                    Some(outcome) if outcome.exit.is_some() => {
                        passed += outcome.passed;
                        failed += outcome.failed;
                        seconds += outcome.seconds;
                        ok &= outcome.exit == Some(0)
                            && outcome.summarized
                            && outcome.failed == 0
                            && outcome.passed > 0;
                    }
                    _ => missing.push(*test),
                }
            }
            let mut result = format!("{passed} passed, {failed} failed");
            if !missing.is_empty() {
                ok = false;
                result = format!(
                    "no result from {} ({stopped}); {result}",
                    missing.join(", ")
                );
            }
            if !console.errors.is_empty() {
                ok = false;
                result = format!("{result}; guest: {}", console.errors.join("; "));
            }
            if !ok {
                result = format!("FAILED: {result}");
            }
            Row {
                kernel: kernel.version.to_owned(),
                suite: kernel.suite.to_owned(),
                cgroup: cgroup.clone(),
                privileges: run.grant.label(),
                expected: run.expected,
                result,
                seconds,
                ok,
            }
        })
        .collect()
}

/// The table, in Markdown with aligned columns.
pub fn render(rows: &[Row]) -> String {
    let header = [
        "kernel",
        "suite",
        "cgroup",
        "privileges",
        "expected",
        "result",
        "time",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.kernel.clone(),
                r.suite.clone(),
                r.cgroup.clone(),
                r.privileges.to_owned(),
                r.expected.to_owned(),
                r.result.clone(),
                format!("{} s", r.seconds),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut table = line(&header.map(str::to_owned));
    table.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &cells {
        table.push_str(&line(row));
    }
    table
}

pub fn summary(rows: &[Row]) -> String {
    let failed = rows.iter().filter(|r| !r.ok).count();
    format!("{} of {} runs as expected", rows.len() - failed, rows.len())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kernels::{KERNELS, plan};

    #[test]
    fn a_guest_that_stops_early_fails_the_runs_it_did_not_finish() {
        let runs = plan("6.1.176").unwrap();
        let boot = boot::Boot {
            console: "@@imds-guard-matrix guest 6.1.0-50-amd64 cgroup2fs\n\
                      @@imds-guard-matrix begin root standalone\n\
                      test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 40s\n\
                      @@imds-guard-matrix end root standalone exit=0 seconds=41\n\
                      @@imds-guard-matrix begin daemonset privileges\n"
                .to_owned(),
            elapsed: Duration::from_mins(15),
            timed_out: true,
        };
        let rows = rows_of(&KERNELS[1], &runs, &boot);
        assert_eq!(rows.len(), 3);
        assert!(rows[0].ok, "{}", rows[0].result);
        assert_eq!(rows[0].result, "12 passed, 0 failed");
        assert_eq!(rows[0].cgroup, "unified");
        assert!(!rows[1].ok);
        assert!(
            rows[1]
                .result
                .contains("no result from privileges, standalone"),
            "{}",
            rows[1].result
        );
        let table = render(&rows);
        assert_eq!(table.lines().count(), 5, "{table}");
        assert!(
            table
                .lines()
                .all(|l| l.len() == table.lines().next().unwrap().len()),
            "{table}"
        );
    }
}
