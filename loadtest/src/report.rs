//! What a run found, printed twice: a table for people, then exactly one JSON line (starting
//! with `{"scenario":`) for scripts, which `scripts/bench.sh` greps out of the output.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::stats::{CpuUse, Summary};

/// The error texts kept in a report; the count covers all of them.
const ERROR_SAMPLES: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub label: Option<String>,
    pub nodes: Vec<String>,
    /// The scenario's parameters as given.
    pub params: Value,
    /// Length of the measured phase (sending, or connecting and holding), seconds.
    pub measured_secs: f64,
    pub sent: u64,
    /// Acknowledged sends (each acknowledged message is committed).
    pub commits: u64,
    pub commits_per_sec: f64,
    /// Messages received by all subscribers together.
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub ack_latency: Option<Summary>,
    /// Receive time minus the send time carried in the body.
    pub e2e_latency: Option<Summary>,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub cpu: Option<CpuUse>,
    /// This process's resident memory at the end, KiB.
    pub loadgen_rss_kib: Option<u64>,
    /// Scenario-specific figures.
    pub extra: Map<String, Value>,
}

impl Report {
    pub fn new(scenario: &'static str, params: Value) -> Report {
        Report {
            scenario,
            label: None,
            nodes: Vec::new(),
            params,
            measured_secs: 0.0,
            sent: 0,
            commits: 0,
            commits_per_sec: 0.0,
            deliveries: 0,
            deliveries_per_sec: 0.0,
            ack_latency: None,
            e2e_latency: None,
            lost: 0,
            duplicates: 0,
            out_of_order: 0,
            errors: 0,
            error_samples: Vec::new(),
            cpu: None,
            loadgen_rss_kib: None,
            extra: Map::new(),
        }
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(text.into());
        }
    }

    pub fn errors_from(&mut self, count: u64, samples: Vec<String>) {
        self.errors += count;
        let room = ERROR_SAMPLES.saturating_sub(self.error_samples.len());
        self.error_samples.extend(samples.into_iter().take(room));
    }

    pub fn extra(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.insert(key.to_owned(), value.into());
    }

    /// The run is clean: nothing lost, duplicated or reordered, no error.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.out_of_order == 0 && self.errors == 0
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            (
                "scenario".into(),
                match &self.label {
                    Some(label) => format!("{} ({label})", self.scenario),
                    None => self.scenario.into(),
                },
            ),
            ("nodes".into(), self.nodes.join(", ")),
            ("params".into(), self.params.to_string()),
            ("measured".into(), format!("{:.2} s", self.measured_secs)),
            ("sent".into(), self.sent.to_string()),
            (
                "commits".into(),
                format!("{} ({:.0}/s)", self.commits, self.commits_per_sec),
            ),
            (
                "deliveries".into(),
                format!("{} ({:.0}/s)", self.deliveries, self.deliveries_per_sec),
            ),
            ("ack latency".into(), latency_cell(self.ack_latency)),
            ("end-to-end latency".into(), latency_cell(self.e2e_latency)),
            ("lost".into(), self.lost.to_string()),
            ("duplicates".into(), self.duplicates.to_string()),
            ("out of order".into(), self.out_of_order.to_string()),
            ("errors".into(), self.errors.to_string()),
        ];
        for sample in &self.error_samples {
            rows.push(("  error".into(), sample.clone()));
        }
        if let Some(cpu) = &self.cpu {
            rows.push((
                "loadgen CPU".into(),
                format!(
                    "{:.2} s = {:.0}% of a core, {:.0}% of the {} CPUs",
                    cpu.loadgen_cpu_secs,
                    cpu.loadgen_core_percent,
                    cpu.loadgen_machine_percent,
                    cpu.cpus
                ),
            ));
            if let Some(secs) = cpu.servers_cpu_secs {
                rows.push((
                    "server CPU".into(),
                    format!(
                        "{secs:.2} s = {:.0}% of a core",
                        100.0 * secs / cpu.wall_secs
                    ),
                ));
            }
            for (name, secs) in &cpu.watched_cpu_secs {
                rows.push((
                    format!("{name} CPU"),
                    format!(
                        "{secs:.2} s = {:.0}% of a core",
                        100.0 * secs / cpu.wall_secs
                    ),
                ));
            }
            if let Some(busy) = cpu.machine_busy_percent {
                rows.push(("machine busy".into(), format!("{busy:.0}%")));
            }
        }
        if let Some(rss) = self.loadgen_rss_kib {
            rows.push((
                "loadgen RSS".into(),
                format!("{:.1} MiB", rss as f64 / 1024.0),
            ));
        }
        for (key, value) in &self.extra {
            let text = match value {
                Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.2}"),
                    _ => n.to_string(),
                },
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            rows.push((key.replace('_', " "), text));
        }
        rows.push((
            "result".into(),
            if self.clean() { "OK" } else { "FAILED" }.into(),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in rows {
            out.push_str(&format!("{key:<width$}  {value}\n"));
        }
        out
    }

    /// The JSON line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"scenario":"{}","error":"{e}"}}"#, self.scenario))
    }
}

fn latency_cell(summary: Option<Summary>) -> String {
    match summary {
        Some(s) => format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms, s.count
        ),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_one_greppable_line() {
        let mut report = Report::new("fanout", serde_json::json!({"rooms": 1}));
        report.error("first\nsecond line");
        report.extra("replay_msgs_per_sec", 12.5);
        let line = report.json_line();
        assert!(line.starts_with(r#"{"scenario":"fanout""#), "{line}");
        assert!(!line.contains('\n'));
        assert!(!report.clean());
        assert!(report.table().contains("FAILED"));
        let value: Value = serde_json::from_str(&line).expect("the line is JSON");
        assert_eq!(value["errors"], 1);
        assert_eq!(value["extra"]["replay_msgs_per_sec"], 12.5);
    }

    #[test]
    fn any_anomaly_makes_a_run_unclean() {
        let mut report = Report::new("throughput", Value::Null);
        assert!(report.clean());
        report.out_of_order = 1;
        assert!(!report.clean());
    }
}
