//! The result of a run: metrics with baselines and targets, as a human table and as JSON.

use crate::stats::Summary;
use serde::Serialize;
use std::fmt::Write as _;

/// Which statistic of a summary a target or ratio refers to.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stat {
    P50,
    P99,
    Max,
}

impl Stat {
    fn of(self, summary: &Summary) -> f64 {
        match self {
            Stat::P50 => summary.p50,
            Stat::P99 => summary.p99,
            Stat::Max => summary.max,
        }
    }
}

/// A promise from the issue, e.g. "first byte p50 ≤ 3 ms".
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub stat: Stat,
    /// `true` for "at least" (rates), `false` for "at most" (latencies, memory).
    pub at_least: bool,
    pub value: f64,
}

impl Target {
    pub fn at_most(stat: Stat, value: f64) -> Target {
        Target { stat, at_least: false, value }
    }

    pub fn at_least(stat: Stat, value: f64) -> Target {
        Target { stat, at_least: true, value }
    }

    fn is_met(&self, summary: &Summary) -> bool {
        let observed = self.stat.of(summary);
        if self.at_least { observed >= self.value } else { observed <= self.value }
    }

    fn describe(&self, unit: &str) -> String {
        let relation = if self.at_least { "≥" } else { "≤" };
        let stat = match self.stat {
            Stat::P50 => "p50",
            Stat::P99 => "p99",
            Stat::Max => "max",
        };
        format!("{stat} {relation} {} {unit}", format_value(self.value))
    }
}

/// The same measurement without Poseidon (the floor) or through Docker.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub name: String,
    pub summary: Option<Summary>,
    /// Our p50 divided by the baseline's p50: above 1 means slower for times, below 1 means
    /// fewer for rates.
    pub ratio: Option<f64>,
}

/// One measured quantity of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: &'static str,
    pub summary: Option<Summary>,
    pub baselines: Vec<Baseline>,
    pub target: Option<Target>,
    pub target_text: Option<String>,
    pub met: Option<bool>,
}

impl Metric {
    pub fn new(name: &str, unit: &'static str, samples: &[f64]) -> Metric {
        Metric {
            name: name.to_owned(),
            unit,
            summary: Summary::of(samples),
            baselines: Vec::new(),
            target: None,
            target_text: None,
            met: None,
        }
    }

    /// Adds a baseline and computes the ratio of the medians; a baseline without samples (not
    /// run) is left out.
    pub fn baseline(mut self, name: &str, samples: &[f64]) -> Metric {
        if samples.is_empty() {
            return self;
        }
        let summary = Summary::of(samples);
        let ratio = match (&self.summary, &summary) {
            (Some(ours), Some(theirs)) if theirs.p50 > 0.0 => Some(ours.p50 / theirs.p50),
            _ => None,
        };
        self.baselines.push(Baseline { name: name.to_owned(), summary, ratio });
        self
    }

    pub fn target(mut self, target: Target) -> Metric {
        self.met = self.summary.as_ref().map(|summary| target.is_met(summary));
        self.target_text = Some(target.describe(self.unit));
        self.target = Some(target);
        self
    }
}

/// Everything one scenario produced.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: &'static str,
    pub parameters: serde_json::Value,
    pub metrics: Vec<Metric>,
    /// Failed operations (HTTP errors, wrong outcomes); the first few are kept as text.
    pub error_count: usize,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub cpu: Option<CpuUse>,
}

/// Where the time of a scenario went: on two shared cores, wall time alone hides whether the
/// service or the load generator was busy.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    /// The service and its runners; `None` when the service was not spawned by the harness.
    pub service_s: Option<f64>,
    pub harness_s: f64,
    /// The spawned service's own RSS when the scenario ended, in MiB.
    pub service_rss_mib: Option<f64>,
}

/// How many error texts a scenario keeps; the count covers the rest.
const KEPT_ERRORS: usize = 10;

impl ScenarioReport {
    pub fn new(name: &'static str, parameters: serde_json::Value) -> ScenarioReport {
        ScenarioReport {
            name,
            parameters,
            metrics: Vec::new(),
            error_count: 0,
            errors: Vec::new(),
            notes: Vec::new(),
            cpu: None,
        }
    }

    /// Records an error with its whole chain of causes.
    pub fn error(&mut self, error: &dyn std::error::Error) {
        self.failure(chain(error));
    }

    /// Records an error of the step `step` (e.g. the floor) with its chain of causes.
    pub fn error_in(&mut self, step: &str, error: &dyn std::error::Error) {
        self.failure(format!("{step}: {}", chain(error)));
    }

    /// Records a failure that is not an error value, e.g. a leak found by the harness.
    pub fn failure(&mut self, text: String) {
        self.error_count += 1;
        if self.errors.len() < KEPT_ERRORS {
            self.errors.push(text);
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
}

/// `error: cause: cause …`, the way anyhow prints `{:#}`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The machine the figures were taken on; figures mean nothing without it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
}

impl Machine {
    pub fn describe() -> Machine {
        let kernel = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        Machine {
            kernel,
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            mem_total_kib: crate::memory::meminfo_kib("MemTotal").unwrap_or(0),
        }
    }
}

/// The whole run, written with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub machine: Machine,
    pub service: String,
    pub build: &'static str,
    pub smoke: bool,
    pub docker_baseline: String,
    pub scenarios: Vec<ScenarioReport>,
}

impl RunReport {
    pub fn error_count(&self) -> usize {
        self.scenarios.iter().map(|scenario| scenario.error_count).sum()
    }

    /// The lines above the tables: what the figures were taken on.
    pub fn render_header(&self) -> String {
        let m = &self.machine;
        format!(
            "machine: {} ({} cores), {:.1} GiB, kernel {}\nservice: {}; harness build: {}\n\
             docker baseline: {}\n",
            m.cpu_model,
            m.cpus,
            m.mem_total_kib as f64 / 1024.0 / 1024.0,
            m.kernel,
            self.service,
            self.build,
            self.docker_baseline
        )
    }
}

const HEADER: [&str; 11] =
    ["metric", "unit", "n", "p50", "p95", "p99", "min", "max", "ratio", "target", "met?"];

impl ScenarioReport {
    /// The scenario as a table, then its errors and notes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        render_scenario(&mut out, self);
        out
    }
}

fn render_scenario(out: &mut String, scenario: &ScenarioReport) {
    if scenario.parameters.is_null() {
        let _ = writeln!(out, "== {}", scenario.name);
    } else {
        let _ = writeln!(out, "== {} {}", scenario.name, scenario.parameters);
    }
    if !scenario.metrics.is_empty() {
        write_table(out, &metric_rows(&scenario.metrics));
    }
    if let Some(cpu) = scenario.cpu {
        let service = cpu.service_s.map_or("not measured".to_owned(), |s| format!("{s:.2} s"));
        let rss =
            cpu.service_rss_mib.map_or(String::new(), |mib| format!("; service RSS {mib:.1} MiB"));
        let _ = writeln!(
            out,
            "wall {:.2} s; CPU: service + runners {service}, harness {:.2} s{rss}",
            cpu.wall_s, cpu.harness_s
        );
    }
    let _ = writeln!(out, "errors: {}", scenario.error_count);
    for error in &scenario.errors {
        let _ = writeln!(out, "  error: {error}");
    }
    for note in &scenario.notes {
        let _ = writeln!(out, "  note: {note}");
    }
}

/// The header, then a row per metric followed by a row per baseline.
fn metric_rows(metrics: &[Metric]) -> Vec<[String; 11]> {
    let mut rows: Vec<[String; 11]> = vec![HEADER.map(str::to_owned)];
    for metric in metrics {
        let met = match metric.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        rows.push(summary_row(
            &metric.name,
            metric.unit,
            metric.summary.as_ref(),
            None,
            metric.target_text.as_deref().unwrap_or(""),
            met,
        ));
        for baseline in &metric.baselines {
            rows.push(summary_row(
                &format!("  baseline: {}", baseline.name),
                metric.unit,
                baseline.summary.as_ref(),
                baseline.ratio,
                "",
                "",
            ));
        }
    }
    rows
}

fn summary_row(
    name: &str,
    unit: &str,
    summary: Option<&Summary>,
    ratio: Option<f64>,
    target: &str,
    met: &str,
) -> [String; 11] {
    let cell =
        |pick: fn(&Summary) -> f64| summary.map_or("-".to_owned(), |s| format_value(pick(s)));
    [
        name.to_owned(),
        unit.to_owned(),
        summary.map_or("0".to_owned(), |s| s.count.to_string()),
        cell(|s| s.p50),
        cell(|s| s.p95),
        cell(|s| s.p99),
        cell(|s| s.min),
        cell(|s| s.max),
        ratio.map_or(String::new(), |r| format!("{r:.2}x")),
        target.to_owned(),
        met.to_owned(),
    ]
}

fn write_table(out: &mut String, rows: &[[String; 11]]) {
    let mut widths = [0usize; 11];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(widths).enumerate() {
            let pad = width - cell.chars().count();
            if index == 0 || index >= 9 {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// Three significant digits or so: enough to compare, short enough to read.
pub fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_target_follow_the_medians() {
        let metric = Metric::new("first byte", "ms", &[2.0, 4.0, 6.0])
            .baseline("floor", &[1.0, 2.0, 3.0])
            .target(Target::at_most(Stat::P50, 3.0));
        assert_eq!(metric.baselines[0].ratio, Some(2.0));
        assert_eq!(metric.met, Some(false));
        assert_eq!(metric.target_text.as_deref(), Some("p50 ≤ 3.00 ms"));
        let rate =
            Metric::new("cycles", "1/s", &[120.0]).target(Target::at_least(Stat::P50, 100.0));
        assert_eq!(rate.met, Some(true));
    }

    #[test]
    fn empty_metrics_have_no_ratio_and_no_verdict() {
        let metric = Metric::new("x", "ms", &[])
            .baseline("floor", &[1.0])
            .target(Target::at_most(Stat::P50, 1.0));
        assert_eq!(metric.baselines[0].ratio, None);
        assert_eq!(metric.met, None);
    }
}
