//! Latency recording and the printed/JSON report of a benchmark run.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::bench::cpu::CpuUse;

/// Microsecond histogram, 1 µs to two weeks (a week's warm-up and a week's run, the longest a
/// request can wait) at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    const TWO_WEEKS_US: u64 = 14 * 24 * 3600 * 1_000_000;
    Histogram::new_with_bounds(1, TWO_WEEKS_US, 3).expect("valid histogram bounds")
}

pub fn record(histogram: &mut Histogram<u64>, value: Duration) {
    record_many(histogram, value, 1);
}

/// Records `value` `count` times (values above the histogram's bound count as the bound).
pub fn record_many(histogram: &mut Histogram<u64>, value: Duration, count: u64) {
    let micros = (value.as_micros().max(1) as u64).min(histogram.high());
    histogram
        .record_n(micros, count)
        .expect("a value within the histogram's bounds");
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub model: String,
    pub concurrency: usize,
    pub target_rate: Option<f64>,
    pub batch: usize,
    pub duration_s: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Requests with no answer when the measured window ended: in flight then, or in open loop
    /// due and not yet started for want of a free --concurrency slot.
    pub requests_unanswered: u64,
    /// How many of those are in `latency`: all in open loop, in closed loop those that had
    /// waited longer than any answer.
    pub unanswered_in_latency: u64,
    /// The unanswered requests' waits at the end of the window (lower bounds of their latency).
    pub unanswered_wait: Option<Percentiles>,
    /// Failed requests by HTTP status (or "connection").
    pub failures: BTreeMap<String, u64>,
    /// The first error message of each failure kind.
    pub first_errors: BTreeMap<String, String>,
    pub requests_per_s: f64,
    /// Rows per second (requests × batch).
    pub inferences_per_s: f64,
    /// What a row is: "inference", "board" (AOI) or "window" (sensors).
    pub row_name: String,
    /// CPU used while measuring, by this process and by the server.
    pub cpu: CpuUse,
    /// Inferences per CPU second of whatever ran the model (the server, or this process
    /// in-process): what the throughput would be per core with no load generator beside it.
    pub inferences_per_cpu_s: Option<f64>,
    /// Successful requests from their (open loop: intended) start to the end of the answer, and
    /// the unanswered ones counted in `unanswered_in_latency`, with their wait; None when there
    /// were neither.
    pub latency: Option<Percentiles>,
    /// Failed answers, the same way (a deadline's 504 shows here, not in `latency`).
    pub failed_latency: Option<Percentiles>,
    /// Open loop: the load generator's own lateness for each request it started in the window
    /// (waking after the intended time, and handing the request to its runtime; not waiting
    /// for a free --concurrency slot, nor requests never started), part of their latency.
    pub send_lag: Option<Percentiles>,
    /// Per-stage latencies reported by the server (queue, compute), when it reports them.
    pub stages: BTreeMap<String, Percentiles>,
    pub mean_batch_rows: Option<f64>,
    pub machine: String,
}

impl Report {
    fn print(&self) {
        println!(
            "{} {} model={} batch={} concurrency={}{}",
            self.mode,
            self.target,
            self.model,
            self.batch,
            self.concurrency,
            self.target_rate
                .map(|r| format!(" target_rate={r}/s"))
                .unwrap_or_default()
        );
        println!(
            "  {:.1} s: {} ok, {} failed {:?}, {} unanswered at the end{}",
            self.duration_s,
            self.requests_ok,
            self.requests_failed,
            self.failures,
            self.requests_unanswered,
            match (&self.unanswered_wait, self.target_rate) {
                (Some(wait), Some(_)) =>
                    format!(" (waited up to {:.3} ms; all in the latency)", wait.max_ms),
                (Some(wait), None) => format!(
                    " (waited up to {:.3} ms; {} longer than every answer, in the latency)",
                    wait.max_ms, self.unanswered_in_latency
                ),
                (None, _) => String::new(),
            }
        );
        for (reason, error) in &self.first_errors {
            println!("  first {reason} failure: {error}");
        }
        // Up to --concurrency requests can just be in flight when the run ends.
        let behind = self.requests_unanswered;
        if self.target_rate.is_some() && behind > self.concurrency as u64 {
            println!(
                "  behind the rate: {behind} requests due in the run got no answer within it (the \
                 server, the --concurrency {} slots or this load generator could not keep up)",
                self.concurrency
            );
        }
        println!(
            "  throughput: {:.1} requests/s, {:.1} {}s/s",
            self.requests_per_s, self.inferences_per_s, self.row_name
        );
        match self.inferences_per_cpu_s {
            Some(per_cpu) => println!(
                "  cpu: {}; {per_cpu:.1} {}s per CPU second of the model's side",
                self.cpu.describe(),
                self.row_name
            ),
            None => println!(
                "  cpu: {} (no per-CPU figure: {})",
                self.cpu.describe(),
                self.cpu
                    .server_unknown
                    .as_deref()
                    .unwrap_or("too little CPU time was measured")
            ),
        }
        match &self.latency {
            Some(latency) => print_percentiles("latency", latency),
            None => println!("  latency: no request succeeded or waited past every answer"),
        }
        if let Some(failed) = &self.failed_latency {
            print_percentiles("failed", failed);
        }
        if let Some(lag) = &self.send_lag {
            print_percentiles("send lag", lag);
        }
        // In the order requests pass through them, not alphabetically.
        let order = ["queue", "compute"]
            .into_iter()
            .chain(crate::aoi::pipeline::StageTimings::STAGES);
        let rank = |stage: &str| order.clone().position(|s| s == stage);
        let mut stages: Vec<_> = self.stages.iter().collect();
        stages.sort_by_key(|(stage, _)| rank(stage).unwrap_or(usize::MAX));
        for (stage, percentiles) in stages {
            print_percentiles(stage, percentiles);
        }
        if let Some(rows) = self.mean_batch_rows {
            println!("  mean rows per executed batch: {rows:.1}");
        }
        println!("  machine: {}", self.machine);
    }

    /// Writes the JSON report (when asked for) before printing the summary, so that a
    /// reader that stops early (`| head`) cannot cost the file.
    pub fn deliver(&self, json: Option<&std::path::Path>) -> anyhow::Result<()> {
        if let Some(path) = json {
            crate::durable::write(path, &serde_json::to_vec_pretty(self)?)
                .map_err(|e| anyhow::anyhow!("cannot write the report {}: {e}", path.display()))?;
        }
        self.print();
        if let Some(path) = json {
            println!("  report written to {}", path.display());
        }
        Ok(())
    }
}

fn print_percentiles(name: &str, p: &Percentiles) {
    println!(
        "  {name:<10} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  (n={})",
        p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, p.count
    );
}

/// CPU model, family/model numbers and core count, for quoting figures with their machine:
/// virtual machines often name only the vendor line ("AMD EPYC"), and the family tells the
/// generations apart.
pub fn machine_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
    };
    let cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let generation = match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!(" (family {family}, model {model})"),
        _ => String::new(),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}{generation}, {cores} cores")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_recorded_latencies() {
        let mut histogram = new_histogram();
        for ms in 1..=100 {
            record(&mut histogram, Duration::from_millis(ms));
        }
        let p = Percentiles::of(&histogram);
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.1, "{p:?}");
    }
}
