//! What the benchmark reports: its rows with their targets, the table
//! printed at the end, the machine it ran on, and `bench.json` (serde).

use std::{
    fmt::{self, Write as _},
    path::Path,
};

use anyhow::Context as _;
use serde::{Serialize, Serializer};

/// What a figure must reach.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    None,
    AtLeast(f64),
    Below(f64, &'static str),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::None => write!(f, "-"),
            Target::AtLeast(min) => write!(f, "≥ {min}"),
            Target::Below(max, unit) => write!(f, "< {max} {unit}"),
        }
    }
}

impl Target {
    fn met(self, value: f64) -> Option<bool> {
        match self {
            Target::None => None,
            Target::AtLeast(min) => Some(value >= min),
            Target::Below(max, _) => Some(value < max),
        }
    }
}

/// One target of a row, judged: on what (`with/floor`; empty for the
/// row's result), and whether it was met or missed within noise.
#[derive(Debug)]
struct Judgement {
    on: &'static str,
    target: Target,
    met: bool,
    /// Missed, but the bracket reaches the target.
    within_noise: bool,
}

impl fmt::Display for Judgement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.on.is_empty() {
            write!(f, "{}", self.target)
        } else {
            write!(f, "{} {}", self.on, self.target)
        }
    }
}

/// In bench.json as the table shows it (`≥ 0.99`, `with/floor ≥ 0.97; with/peer ≥ 1`).
fn as_text<S: Serializer>(judged: &[Judgement], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&targets_text(judged))
}

fn targets_text(judged: &[Judgement]) -> String {
    if judged.is_empty() {
        return Target::None.to_string();
    }
    judged
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One line of the report; `raw` holds the numbers behind it. `result` is
/// with/without for ratio figures, which also fill `vs_floor` (with/floor),
/// `vs_peer` (with/peer) and `peer_ratio` (peer/without).
#[derive(Debug, Serialize)]
pub struct Row {
    figure: String,
    without: String,
    floor: String,
    peer: String,
    with: String,
    result: String,
    vs_floor: String,
    vs_peer: String,
    peer_ratio: String,
    #[serde(rename = "target", serialize_with = "as_text")]
    judged: Vec<Judgement>,
    /// Every target met; `None` for a row without one.
    pub met: Option<bool>,
    /// Missed, but every missed target's bracket reaches it.
    pub within_noise: bool,
    /// For the chart: the floor's, ours and the peer's medians against nothing.
    #[serde(skip)]
    charted: Option<[f64; 3]>,
    raw: serde_json::Value,
}

impl Row {
    pub fn new(figure: impl Into<String>, result: impl Into<String>) -> Row {
        Row {
            figure: figure.into(),
            without: "-".to_owned(),
            floor: "-".to_owned(),
            peer: "-".to_owned(),
            with: "-".to_owned(),
            result: result.into(),
            vs_floor: "-".to_owned(),
            vs_peer: "-".to_owned(),
            peer_ratio: "-".to_owned(),
            judged: Vec::new(),
            met: None,
            within_noise: false,
            charted: None,
            raw: serde_json::Value::Null,
        }
    }

    pub fn sides(self, without: String, with: String) -> Row {
        Row {
            without,
            with,
            ..self
        }
    }

    pub fn others(self, floor: String, peer: String) -> Row {
        Row {
            floor,
            peer,
            ..self
        }
    }

    /// The ratios against the floor and the peer, and of the peer against nothing.
    pub fn ratios(self, vs_floor: String, vs_peer: String, peer_ratio: String) -> Row {
        Row {
            vs_floor,
            vs_peer,
            peer_ratio,
            ..self
        }
    }

    /// Puts the row in the chart: the floor's, ours and the peer's
    /// throughput against nothing's.
    pub fn charted(self, floor: f64, with: f64, peer: f64) -> Row {
        Row {
            charted: Some([floor, with, peer]),
            ..self
        }
    }

    /// Judges the row's result against `target`.
    pub fn target(self, target: Target, value: f64) -> Row {
        self.target_bracketed("", target, value, [value, value])
    }

    /// Judges `value` (what `on` names, a median; empty for the row's
    /// result) against `target`, with the bracket `[low, high]` around
    /// it: a miss whose bracket reaches the target is within noise. A row
    /// may have several targets; it meets them only all together.
    pub fn target_bracketed(
        mut self,
        on: &'static str,
        target: Target,
        value: f64,
        [low, high]: [f64; 2],
    ) -> Row {
        let Some(met) = target.met(value) else {
            return self;
        };
        let within_noise =
            !met && (target.met(low) == Some(true) || target.met(high) == Some(true));
        self.judged.push(Judgement {
            on,
            target,
            met,
            within_noise,
        });
        self.met = Some(self.judged.iter().all(|judged| judged.met));
        self.within_noise = self.met == Some(false)
            && self
                .judged
                .iter()
                .all(|judged| judged.met || judged.within_noise);
        self
    }

    /// A miss not explained by the machine's noise.
    pub fn missed(&self) -> bool {
        self.met == Some(false) && !self.within_noise
    }

    /// The numbers behind the row, for bench.json.
    pub fn raw(self, raw: impl Serialize) -> anyhow::Result<Row> {
        Ok(Row {
            raw: serde_json::to_value(raw)?,
            ..self
        })
    }

    fn met_text(&self) -> &'static str {
        match (self.met, self.within_noise) {
            (None, _) => "-",
            (Some(true), _) => "yes",
            (Some(false), true) => "noise",
            (Some(false), false) => "NO",
        }
    }

    fn cells(&self) -> [String; COLUMNS] {
        [
            self.figure.clone(),
            self.without.clone(),
            self.floor.clone(),
            self.peer.clone(),
            self.with.clone(),
            self.result.clone(),
            self.vs_floor.clone(),
            self.vs_peer.clone(),
            self.peer_ratio.clone(),
            targets_text(&self.judged),
            self.met_text().to_owned(),
        ]
    }
}

const COLUMNS: usize = 11;

/// The rows as aligned columns, with a header.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "figure",
        "without",
        "floor",
        "peer",
        "with",
        "with/without",
        "with/floor",
        "with/peer",
        "peer/without",
        "target",
        "met",
    ]
    .map(str::to_owned);
    let lines: Vec<[String; COLUMNS]> = std::iter::once(header)
        .chain(rows.iter().map(Row::cells))
        .collect();
    let mut widths = [0usize; COLUMNS];
    for cells in &lines {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for cells in &lines {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Where the chart's axis starts and ends (ratios against nothing), and
/// how many characters lie between.
const CHART_FROM: f64 = 0.7;
const CHART_TO: f64 = 1.1;
const CHART_WIDTH: usize = 48;

/// The charted rows as bars, a glance at every traffic figure: floor, ours
/// and the peer against nothing (1.000), on an axis from [`CHART_FROM`].
pub fn chart(rows: &[Row]) -> String {
    let charted: Vec<(&str, [f64; 3])> = rows
        .iter()
        .filter_map(|row| row.charted.map(|bars| (row.figure.as_str(), bars)))
        .collect();
    let mut text = String::new();
    if charted.is_empty() {
        return text;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a bar's length, clamped to 0..=CHART_WIDTH"
    )]
    let bar = |ratio: f64| -> String {
        let fraction = ((ratio - CHART_FROM) / (CHART_TO - CHART_FROM)).clamp(0.0, 1.0);
        "█".repeat((fraction * CHART_WIDTH as f64).round() as usize)
    };
    let one = {
        let mut axis = format!("{CHART_FROM:<.1}");
        let at_one = bar(1.0).chars().count();
        axis.push_str(&" ".repeat(at_one.saturating_sub(axis.len())));
        axis.push_str("1.0");
        axis.push_str(&" ".repeat(CHART_WIDTH.saturating_sub(axis.len())));
        let _ = write!(axis, "{CHART_TO:.1}");
        axis
    };
    let _ = writeln!(text, "{:>7}{one}", "");
    for (figure, bars) in charted {
        let _ = writeln!(text, "{figure}");
        for (side, ratio) in ["floor", "with", "peer"].into_iter().zip(bars) {
            let _ = writeln!(text, "  {side:<5}|{:<CHART_WIDTH$}| {ratio:.3}", bar(ratio));
        }
    }
    text
}

/// When and where the run happened.
pub struct Machine {
    pub date: String,
    pub cores: usize,
    pub kernel: String,
    pub load_before: String,
}

impl Machine {
    pub fn now() -> anyhow::Result<Machine> {
        Ok(Machine {
            date: imds_guard_tests::run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?
                .trim()
                .to_owned(),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            load_before: load_average(),
        })
    }
}

/// The 1, 5 and 15 minute load averages: other work on the machine
/// weighs on every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

/// bench.json: the run and every row.
#[derive(Serialize)]
pub struct Report<'a> {
    pub date: &'a str,
    pub cores: usize,
    pub kernel: &'a str,
    pub load_average_before: &'a str,
    pub load_average_after: &'a str,
    pub rounds: usize,
    pub wall_seconds: f64,
    pub rows: &'a [Row],
}

impl Report<'_> {
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// The `q` quantile (0.5 is the median), interpolated between the two
/// nearest values; NaN for no values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a sample count far below 2^52; the floor of a position in 0..=last"
    )]
    let (position, below) = {
        let position = q * last as f64;
        (position, position.floor() as usize)
    };
    let above = (below + 1).min(last);
    let fraction = position - position.floor();
    sorted[below] * (1.0 - fraction) + sorted[above] * fraction
}

pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_draws_floor_ours_and_the_peer_against_nothing() {
        let rows = [
            Row::new("1 a figure", "0.990").charted(1.0, 0.99, 0.9),
            Row::new("4 not charted", "1.0 ns"),
        ];
        let text = chart(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].trim_start().starts_with("0.7"), "{text}");
        assert!(lines[0].trim_end().ends_with("1.1"), "{text}");
        assert_eq!(lines[1], "1 a figure");
        let length = |line: &str| line.chars().filter(|c| *c == '█').count();
        // 0.3 of the 0.4 axis, 0.29, 0.2: 36, 35 and 24 of 48 characters.
        assert_eq!(
            [lines[2], lines[3], lines[4]].map(length),
            [36, 35, 24],
            "{text}"
        );
        assert!(
            lines[4].starts_with("  peer ") && lines[4].ends_with("| 0.900"),
            "{text}"
        );
        assert!(chart(&rows[1..]).is_empty());
    }

    #[test]
    fn quantiles_interpolate() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[1.0, 2.0, 3.0, 4.0]) - 2.5).abs() < 1e-9);
        assert!((quantile(&[0.0, 10.0], 0.25) - 2.5).abs() < 1e-9);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn rows_read_as_the_table_and_the_json_show_them() {
        let rows = [
            Row::new("1 a figure", "0.950")
                .sides("10/s".to_owned(), "9/s".to_owned())
                .others("9/s".to_owned(), "8/s".to_owned())
                .ratios("1.000".to_owned(), "1.100".to_owned(), "0.800".to_owned())
                .target_bracketed("with/floor", Target::AtLeast(0.97), 0.96, [0.9, 0.98])
                .target_bracketed("with/peer", Target::AtLeast(1.0), 1.1, [1.0, 1.2])
                .raw(serde_json::json!({"ratio": 0.95, "nan": f64::NAN}))
                .unwrap(),
            Row::new("2 another", "1.0 µs").target(Target::Below(50.0, "µs"), 1.0),
        ];
        assert!(!rows[0].missed());
        assert_eq!(
            table(&rows),
            "figure      without  floor  peer  with  with/without  with/floor  with/peer  peer/without  target                            met\n\
             1 a figure  10/s     9/s    8/s   9/s   0.950         1.000       1.100      0.800         with/floor ≥ 0.97; with/peer ≥ 1  noise\n\
             2 another   -        -      -     -     1.0 µs        -           -          -             < 50 µs                           yes\n"
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "figure": "1 a figure", "without": "10/s", "floor": "9/s", "peer": "8/s",
                "with": "9/s", "result": "0.950", "vs_floor": "1.000", "vs_peer": "1.100",
                "peer_ratio": "0.800", "target": "with/floor ≥ 0.97; with/peer ≥ 1",
                "met": false, "within_noise": true,
                "raw": {"ratio": 0.95, "nan": null},
            })
        );
    }
}
