//! What a run reports: figures with their baseline, ratio and goals, the machine they were
//! taken on, and the table or JSON they are printed as.

use std::collections::HashMap;
use std::io::Write as _;

use serde::Serialize;

/// What a figure promises. Ratio goals compare with the baseline, in the figure's unit.
#[derive(Debug, Clone, Copy)]
pub(super) enum Goal {
    RatioAtMost(f64),
    RatioAtLeast(f64),
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn is_met(self, value: f64, ratio: Option<f64>) -> bool {
        match self {
            Self::RatioAtMost(r) => ratio.is_some_and(|x| x <= r),
            Self::RatioAtLeast(r) => ratio.is_some_and(|x| x >= r),
            Self::AtMost(v) => value <= v,
            Self::AtLeast(v) => value >= v,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Self::RatioAtMost(r) => format!("≤ {}× base", bound(r)),
            Self::RatioAtLeast(r) => format!("≥ {}× base", bound(r)),
            Self::AtMost(v) => format!("≤ {} {unit}", bound(v)),
            Self::AtLeast(v) => format!("≥ {} {unit}", bound(v)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    /// Every goal met.
    Ok,
    /// At least one goal missed.
    Missed,
    /// No goal: shown for context.
    Info,
    /// Not measured here (a tool or binary is missing); `note` says why and what to do.
    Skipped,
    /// The measurement itself failed; `note` holds the error.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Baseline {
    value: f64,
    /// What was measured to get it.
    what: String,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct GoalResult {
    goal: String,
    met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Figure {
    section: &'static str,
    pub(super) id: String,
    name: String,
    value: Option<f64>,
    unit: &'static str,
    /// In the figure's unit.
    baseline: Option<Baseline>,
    /// `value / baseline.value`.
    ratio: Option<f64>,
    goals: Vec<GoalResult>,
    pub(super) status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

impl Figure {
    pub(super) fn new(
        section: &'static str,
        id: impl Into<String>,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            section,
            id: id.into(),
            name: name.into(),
            value: Some(value),
            unit,
            baseline: None,
            ratio: None,
            goals: Vec::new(),
            status: Status::Info,
            note: None,
        }
    }

    pub(super) fn not_measured(
        section: &'static str,
        id: impl Into<String>,
        name: impl Into<String>,
        status: Status,
        why: String,
    ) -> Self {
        Self {
            value: None,
            status,
            note: Some(why),
            ..Self::new(section, id, name, 0.0, "")
        }
    }

    /// Sets the baseline (in the figure's unit) and the ratio.
    pub(super) fn against(mut self, value: f64, what: impl Into<String>) -> Self {
        self.ratio = self.value.filter(|_| value > 0.0).map(|v| v / value);
        self.baseline = Some(Baseline {
            value,
            what: what.into(),
        });
        self
    }

    /// Adds a goal; call after [`Figure::against`] for ratio goals.
    pub(super) fn goal(mut self, goal: Goal) -> Self {
        let met = self.value.is_some_and(|v| goal.is_met(v, self.ratio));
        self.goals.push(GoalResult {
            goal: goal.describe(self.unit),
            met,
        });
        self.status = if self.goals.iter().all(|g| g.met) {
            Status::Ok
        } else {
            Status::Missed
        };
        self
    }

    /// Adds a note; several are joined with "; ".
    pub(super) fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(earlier) => format!("{earlier}; {note}"),
            None => note,
        });
        self
    }
}

/// Turns a section's error into one failed figure, so the other sections still run.
pub(super) fn section_result(
    section: &'static str,
    result: anyhow::Result<Vec<Figure>>,
) -> Vec<Figure> {
    result.unwrap_or_else(|e| {
        eprintln!("bench: {section}: {e:#}");
        vec![Figure::not_measured(
            section,
            format!("{section}.error"),
            "section did not complete",
            Status::Failed,
            format!("{e:#}"),
        )]
    })
}

/// A goal's bound as written (`0.4`, `3`, `10,000`), not padded with digits it does not have.
fn bound(v: f64) -> String {
    if v >= 10_000.0 {
        num(v)
    } else {
        format!("{v}")
    }
}

/// A number with as many digits as a benchmark figure deserves.
pub(super) fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    pub(super) cores: usize,
    pub(super) cpu: String,
    /// `/proc/loadavg`'s 1-minute figure before and after the run: a busy machine skews figures.
    pub(super) load_before: Option<f64>,
    pub(super) load_after: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) version: &'static str,
    pub(super) quick: bool,
    pub(super) machine: Machine,
    pub(super) elapsed_s: f64,
    pub(super) figures: Vec<Figure>,
    /// Ids of figures that missed a goal.
    pub(super) missed: Vec<String>,
    /// Ids of figures that could not be measured (skipped or failed).
    pub(super) not_measured: Vec<String>,
}

pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub(super) fn print_table(report: &Report) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let m = &report.machine;
    writeln!(
        out,
        "ambient bench {}{}: {} cores, {}, load {} → {}, {:.0} s",
        report.version,
        if report.quick { " --quick" } else { "" },
        m.cores,
        m.cpu,
        m.load_before.map_or("?".into(), |l| format!("{l:.2}")),
        m.load_after.map_or("?".into(), |l| format!("{l:.2}")),
        report.elapsed_s
    )?;
    writeln!(
        out,
        "Medians unless marked p99. RATIO = AMBIENT / BASELINE, both measured in this run; only ratios compare across runs."
    )?;
    let mut by_section: Vec<(&str, Vec<&Figure>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for f in &report.figures {
        let i = *index.entry(f.section).or_insert_with(|| {
            by_section.push((f.section, Vec::new()));
            by_section.len() - 1
        });
        by_section[i].1.push(f);
    }
    for (section, figures) in by_section {
        writeln!(out, "\n{section}")?;
        writeln!(
            out,
            "  {:<40} {:>18} {:>18} {:>8}  {:<32} RESULT",
            "FIGURE", "AMBIENT", "BASELINE", "RATIO", "GOAL"
        )?;
        for f in figures {
            let with_unit = |v: f64| format!("{} {}", num(v), f.unit);
            let value = f.value.map_or("—".into(), with_unit);
            let baseline = f
                .baseline
                .as_ref()
                .map_or("—".into(), |b| with_unit(b.value));
            let ratio = f.ratio.map_or("—".into(), |r| format!("{}×", num(r)));
            let goal = if f.goals.is_empty() {
                "—".into()
            } else {
                f.goals
                    .iter()
                    .map(|g| g.goal.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let result = match f.status {
                Status::Ok => "ok".to_string(),
                Status::Missed if f.goals.len() > 1 => {
                    let missed: Vec<&str> = f
                        .goals
                        .iter()
                        .filter(|g| !g.met)
                        .map(|g| g.goal.as_str())
                        .collect();
                    format!("MISSED ({})", missed.join(", "))
                }
                Status::Missed => "MISSED".into(),
                Status::Info => "info".into(),
                Status::Skipped => "SKIPPED".into(),
                Status::Failed => "FAILED".into(),
            };
            writeln!(
                out,
                "  {:<40} {:>18} {:>18} {:>8}  {:<32} {result}",
                f.name, value, baseline, ratio, goal
            )?;
            if let Some(b) = &f.baseline {
                writeln!(out, "      baseline: {}", b.what)?;
            }
            if let Some(note) = &f.note {
                writeln!(out, "      note: {note}")?;
            }
        }
    }
    let missed = report.missed.len();
    let not_measured = report.not_measured.len();
    writeln!(
        out,
        "\n{} figures: {} goals met, {missed} MISSED, {not_measured} not measured",
        report.figures.len(),
        report
            .figures
            .iter()
            .filter(|f| f.status == Status::Ok)
            .count()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_carry_digits_by_magnitude() {
        assert_eq!(num(123_456.4), "123,456");
        assert_eq!(num(12_345.0), "12,345");
        assert_eq!(num(512.3), "512");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.1234), "0.123");
    }

    #[test]
    fn a_ratio_goal_is_missed_when_the_ratio_is_out_of_bounds() {
        let f = Figure::new("s", "x", "x", 7.0, "ms")
            .against(2.0, "raw")
            .goal(Goal::RatioAtMost(3.0));
        assert_eq!(f.ratio, Some(3.5));
        assert_eq!(f.status, Status::Missed);
        let f = Figure::new("s", "x", "x", 5.0, "ms")
            .against(2.0, "raw")
            .goal(Goal::RatioAtMost(3.0));
        assert_eq!(f.status, Status::Ok);
    }

    #[test]
    fn one_missed_goal_of_two_misses_the_figure() {
        let f = Figure::new("s", "x", "x", 9_000.0, "tasks/s")
            .against(10_000.0, "raw")
            .goal(Goal::RatioAtLeast(0.4))
            .goal(Goal::AtLeast(10_000.0));
        assert_eq!(f.status, Status::Missed);
        assert!(f.goals[0].met && !f.goals[1].met);
    }
}
