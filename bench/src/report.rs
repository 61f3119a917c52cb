//! Samples to numbers: median and p99 per server, Cairn/baseline ratios
//! pair by pair, and the markdown table and JSON file of a run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::target::Kind;

/// Median and p99 (nearest rank) of a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub samples: Vec<f64>,
    pub median: f64,
    /// With fewer than 100 samples, the nearest rank is the largest sample.
    pub p99: f64,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Summary {
            samples: samples.to_vec(),
            median: median(samples),
            p99: percentile(&sorted, 99.0),
        }
    }
}

/// One line of the results: a measure of one scenario on every server.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub repo: String,
    pub unit: String,
    pub lower_is_better: bool,
    pub results: BTreeMap<String, Summary>,
    /// Cairn ÷ baseline: the median of the per-iteration ratios, iteration
    /// i of Cairn against iteration i of the baseline (same run, taken
    /// back to back).
    pub ratios: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    pub fn new(
        scenario: &str,
        repo: &str,
        unit: &str,
        lower_is_better: bool,
        samples: &BTreeMap<Kind, Vec<f64>>,
    ) -> Row {
        let results = samples
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.key().to_owned(), Summary::of(v)))
            .collect();
        let mut ratios = BTreeMap::new();
        if let Some(base) = samples.get(&Kind::Baseline) {
            for kind in [Kind::CairnSingle, Kind::Cairn] {
                let Some(ours) = samples.get(&kind) else {
                    continue;
                };
                let pairs: Vec<f64> = ours
                    .iter()
                    .zip(base)
                    .filter(|(_, b)| **b != 0.0)
                    .map(|(o, b)| o / b)
                    .collect();
                if !pairs.is_empty() {
                    ratios.insert(kind.key().to_owned(), median(&pairs));
                }
            }
        }
        Row {
            scenario: scenario.to_owned(),
            repo: repo.to_owned(),
            unit: unit.to_owned(),
            lower_is_better,
            results,
            ratios,
            note: None,
        }
    }

    pub fn with_note(mut self, note: String) -> Row {
        self.note = Some(note);
        self
    }
}

/// Three significant digits, without exponent for everyday magnitudes.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 1.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.4}")
    }
}

fn cell(s: Option<&Summary>) -> String {
    match s {
        None => "n/a".to_owned(),
        Some(s) if s.samples.len() <= 1 => num(s.median),
        Some(s) => format!("{} ({})", num(s.median), num(s.p99)),
    }
}

fn ratio_cell(row: &Row, kind: Kind) -> String {
    match row.ratios.get(kind.key()) {
        None => "–".to_owned(),
        Some(r) => {
            // A mark when Cairn does better than the baseline.
            let better = if row.lower_is_better {
                *r < 1.0
            } else {
                *r > 1.0
            };
            format!("{:.2}{}", r, if better { " ✓" } else { "" })
        }
    }
}

/// The results table: median (p99) per server, ratios to the baseline.
pub fn markdown(rows: &[Row], rss: &BTreeMap<String, BTreeMap<String, u64>>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | repo | unit | {} | {} | {} | 1 replica ÷ baseline | 3 replicas ÷ baseline |",
        Kind::Baseline.title(),
        Kind::CairnSingle.title(),
        Kind::Cairn.title()
    );
    let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|");
    for r in rows {
        let unit = if r.lower_is_better {
            format!("{} ↓", r.unit)
        } else {
            format!("{} ↑", r.unit)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.repo,
            unit,
            cell(r.results.get(Kind::Baseline.key())),
            cell(r.results.get(Kind::CairnSingle.key())),
            cell(r.results.get(Kind::Cairn.key())),
            ratio_cell(r, Kind::CairnSingle),
            ratio_cell(r, Kind::Cairn),
        );
    }
    let notes: Vec<&Row> = rows.iter().filter(|r| r.note.is_some()).collect();
    if !notes.is_empty() {
        let _ = writeln!(out);
        for r in notes {
            let _ = writeln!(
                out,
                "- {} ({}): {}",
                r.scenario,
                r.repo,
                r.note.as_deref().unwrap_or("")
            );
        }
    }
    if !rss.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "| server | process | peak RSS (MB) |");
        let _ = writeln!(out, "|---|---|--:|");
        for (kind, procs) in rss {
            for (name, bytes) in procs {
                let _ = writeln!(out, "| {kind} | {name} | {:.1} |", *bytes as f64 / 1e6);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p99() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let sorted: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 99.0), 198.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 99.0), 3.0);
    }

    #[test]
    fn ratios_pair_iterations() {
        let mut samples = BTreeMap::new();
        samples.insert(Kind::Baseline, vec![1.0, 2.0, 4.0]);
        samples.insert(Kind::Cairn, vec![0.5, 1.0, 4.0]);
        let row = Row::new("s", "r", "s", true, &samples);
        // Pairs: 0.5, 0.5, 1.0 → median 0.5.
        assert_eq!(row.ratios["cairn-3"], 0.5);
        assert!(!row.ratios.contains_key("cairn-1"));
        let table = markdown(&[row], &BTreeMap::new());
        assert!(table.contains("| 0.50 ✓ |"), "{table}");
    }
}
