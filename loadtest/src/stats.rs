//! Measurements: latency histograms and their summaries, CPU time of processes and of the
//! machine, and resident memory, all read from `/proc`.
//!
//! On a 2-core machine the load generator competes with the server, Postgres and Redis for the
//! same cores, so every report says how much CPU the load generator itself used.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond latencies from 1 µs to 10 minutes, 2 significant digits (1 %).
///
/// Every subscriber keeps one, so it must stay small: about 20 KiB at 2 digits, against 300 KiB
/// at 3 (1.5 GiB for 5,000 subscribers).
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            // Valid bounds: 1 <= low, high >= 2 * low, 0 <= digits <= 5.
            histogram: Histogram::new_with_bounds(1, 600_000_000, 2)
                .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}")),
        }
    }

    /// Records one latency in microseconds (values past the bounds are clamped).
    pub fn record_micros(&mut self, micros: u64) {
        self.histogram.saturating_record(micros.max(1));
    }

    pub fn record(&mut self, elapsed: Duration) {
        self.record_micros(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        if let Err(e) = self.histogram.add(&other.histogram) {
            unreachable!("histograms with equal bounds add up: {e}");
        }
    }

    /// `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Summary> {
        if self.histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Summary {
            count: self.histogram.len(),
            p50_ms: ms(self.histogram.value_at_quantile(0.50)),
            p95_ms: ms(self.histogram.value_at_quantile(0.95)),
            p99_ms: ms(self.histogram.value_at_quantile(0.99)),
            max_ms: ms(self.histogram.max()),
            mean_ms: self.histogram.mean() / 1000.0,
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Clock ticks per second of the times in `/proc/*/stat` (USER_HZ, 100 on every Linux
/// architecture that matters; reading it exactly would need `sysconf`, i.e. unsafe code).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) used so far by process `pid`, or by this process for `None`.
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// CPU seconds used so far by process `pid` and all its descendants: its own time, the time of
/// its children it has waited for (`cutime`, `cstime`: exited Postgres backends land there),
/// and the time of its living descendants.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(parent) = stat_fields(Some(child)).and_then(|f| f.get(1)?.parse().ok()) {
            children.entry(parent).or_default().push(child);
        }
    }
    let own = stat_fields(Some(pid))?;
    let waited: f64 = [13, 14]
        .iter()
        .filter_map(|&i| own.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / TICKS_PER_SECOND;
    let mut total = waited;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        total += process_cpu_seconds(Some(p)).unwrap_or(0.0);
        stack.extend(children.get(&p).into_iter().flatten());
    }
    Some(total)
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, ...
fn stat_fields(pid: Option<u32>) -> Option<Vec<String>> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // `pid (comm) state ppid ...`: comm may contain spaces, so split after the last ')'.
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Busy and total jiffies of all CPUs together, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = values.iter().take(8).sum();
        let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
        Some(MachineCpu {
            busy: total - idle,
            total,
        })
    }

    /// Share of all CPUs busy since `earlier`, in percent.
    pub fn busy_percent_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| 100.0 * busy as f64 / total as f64)
    }
}

/// `VmRSS` of process `pid` (this process for `None`), in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Number of CPUs, for "percent of the machine".
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU use of this process and of the servers over a run.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    start: std::time::Instant,
    own: Option<f64>,
    servers: Vec<(u32, Option<f64>)>,
    watched: Vec<(String, u32, Option<f64>)>,
    machine: Option<MachineCpu>,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub wall_secs: f64,
    /// CPU seconds of the load generator.
    pub loadgen_cpu_secs: f64,
    /// Load generator CPU as a share of one core (100 = one core busy all along).
    pub loadgen_core_percent: f64,
    /// Load generator CPU as a share of the whole machine.
    pub loadgen_machine_percent: f64,
    /// CPU seconds of the `--server-pid` processes together.
    pub servers_cpu_secs: Option<f64>,
    /// CPU seconds of each watched process tree (`--watch-pid`).
    pub watched_cpu_secs: std::collections::BTreeMap<String, f64>,
    /// Busy share of all CPUs (everything on the machine).
    pub machine_busy_percent: Option<f64>,
    pub cpus: usize,
}

impl CpuMeter {
    pub fn start(servers: &[u32], watched: &[(String, u32)]) -> CpuMeter {
        CpuMeter {
            watched: watched
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, tree_cpu_seconds(*pid)))
                .collect(),
            start: std::time::Instant::now(),
            own: process_cpu_seconds(None),
            servers: servers
                .iter()
                .map(|&pid| (pid, process_cpu_seconds(Some(pid))))
                .collect(),
            machine: MachineCpu::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let own = match (self.own, process_cpu_seconds(None)) {
            (Some(before), Some(after)) => after - before,
            _ => 0.0,
        };
        let servers = if self.servers.is_empty() {
            None
        } else {
            self.servers
                .iter()
                .map(|&(pid, before)| Some(process_cpu_seconds(Some(pid))? - before?))
                .sum::<Option<f64>>()
        };
        let machine = match (self.machine, MachineCpu::now()) {
            (Some(before), Some(after)) => after.busy_percent_since(&before),
            _ => None,
        };
        let watched = self
            .watched
            .iter()
            .filter_map(|(name, pid, before)| {
                Some((name.clone(), tree_cpu_seconds(*pid)? - (*before)?))
            })
            .collect();
        let cpus = cpu_count();
        CpuUse {
            watched_cpu_secs: watched,
            wall_secs: wall,
            loadgen_cpu_secs: own,
            loadgen_core_percent: 100.0 * own / wall,
            loadgen_machine_percent: 100.0 * own / wall / cpus as f64,
            servers_cpu_secs: servers,
            machine_busy_percent: machine,
            cpus,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        let mut latency = Latency::new();
        assert_eq!(latency.summary(), None);
        for ms in 1..=100u64 {
            latency.record_micros(ms * 1000);
        }
        let s = latency.summary().expect("values were recorded");
        assert_eq!(s.count, 100);
        // 2 significant digits: within 1 %.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.01 + 1e-9;
        assert!(close(s.p50_ms, 50.0), "p50 {}", s.p50_ms);
        assert!(close(s.p95_ms, 95.0), "p95 {}", s.p95_ms);
        assert!(close(s.p99_ms, 99.0), "p99 {}", s.p99_ms);
        assert!(close(s.max_ms, 100.0), "max {}", s.max_ms);
        assert!(close(s.mean_ms, 50.5), "mean {}", s.mean_ms);
    }

    #[test]
    fn merged_histograms_add_up() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for _ in 0..99 {
            a.record(Duration::from_micros(500));
        }
        b.record(Duration::from_secs(2));
        a.merge(&b);
        let s = a.summary().expect("values were recorded");
        assert_eq!(s.count, 100);
        assert!((s.p99_ms - 0.5).abs() < 0.005, "p99 {}", s.p99_ms);
        assert!((s.max_ms - 2000.0).abs() < 20.0, "max {}", s.max_ms);
        // Zero and huge values are clamped, not dropped.
        a.record_micros(0);
        a.record_micros(u64::MAX);
        assert_eq!(a.summary().map(|s| s.count), Some(102));
    }

    #[test]
    fn proc_readings() {
        assert!(process_cpu_seconds(None).is_some_and(|s| s >= 0.0));
        assert!(rss_kib(None).is_some_and(|kib| kib > 0));
        let own = process_cpu_seconds(None).expect("own CPU time");
        let tree = tree_cpu_seconds(std::process::id()).expect("own tree CPU time");
        assert!(tree >= own, "tree {tree} < own {own}");
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n"), Some(1234));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        let before = MachineCpu::now().expect("/proc/stat is readable");
        let after = MachineCpu::now().expect("/proc/stat is readable");
        assert!(after
            .busy_percent_since(&before)
            .is_none_or(|p| (0.0..=100.0).contains(&p)));
    }
}
