//! Per model version counters in the shape of Triton's statistics extension
//! (`GET /v2/models/{model}/stats`), so `tritonclient`'s `get_inference_statistics` and
//! dashboards built on it read linescan as they read Triton. Prometheus keeps its histograms in
//! `/metrics`; these are running totals (count and nanoseconds), bumped once per batch.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How many times something happened and how long it took in all.
#[derive(Default, Clone, Copy)]
struct Tally {
    count: u64,
    ns: u64,
}

impl Tally {
    fn add(&mut self, times: u64, ns: u64) {
        self.count += times;
        self.ns += ns;
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "ns": self.ns})
    }
}

fn nanos(duration: Duration) -> u64 {
    duration.as_nanos() as u64
}

/// The three stages of running a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchTimes {
    /// Gathering the requests' inputs into the batch (on the host or the device).
    pub input: Duration,
    /// ONNX Runtime's run.
    pub infer: Duration,
    /// Cutting the outputs into each request's rows and answering.
    pub output: Duration,
}

#[derive(Default, Clone, Copy)]
struct BatchTotals {
    count: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
}

#[derive(Default)]
struct Totals {
    success: Tally,
    fail: Tally,
    queue: Tally,
    compute_input: Tally,
    compute_infer: Tally,
    compute_output: Tally,
    inference_count: u64,
    execution_count: u64,
    /// Milliseconds since the Unix epoch of the last batch run, 0 before the first.
    last_inference_ms: u64,
    by_batch_size: BTreeMap<usize, BatchTotals>,
}

/// One lock for all of it (taken once per batch and per failed request), so a snapshot always
/// adds up: successes equal queue and compute counts, executions equal the batch sizes' counts.
#[derive(Default)]
pub struct ModelStats {
    totals: Mutex<Totals>,
}

impl ModelStats {
    /// A request that failed (refused, timed out, its batch failed), from its arrival at the
    /// batcher to its answer.
    pub fn failed(&self, took: Duration) {
        self.totals().fail.add(1, nanos(took));
    }

    /// A batch of `rows` rows run, with the arrival-to-answer time of each request answered
    /// with outputs and the requests' summed queue wait; each such request counts the batch's
    /// stage times, as Triton's per-request compute figures do.
    pub fn batch(&self, succeeded: &[Duration], rows: usize, queued: Duration, times: BatchTimes) {
        let requests = succeeded.len() as u64;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut totals = self.totals();
        totals
            .success
            .add(requests, succeeded.iter().copied().map(nanos).sum());
        totals.queue.add(requests, nanos(queued));
        totals
            .compute_input
            .add(requests, requests * nanos(times.input));
        totals
            .compute_infer
            .add(requests, requests * nanos(times.infer));
        totals
            .compute_output
            .add(requests, requests * nanos(times.output));
        totals.inference_count += rows as u64;
        totals.execution_count += 1;
        totals.last_inference_ms = now.as_millis() as u64;
        let size = totals.by_batch_size.entry(rows).or_default();
        size.count += 1;
        size.input_ns += nanos(times.input);
        size.infer_ns += nanos(times.infer);
        size.output_ns += nanos(times.output);
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().expect("model stats lock")
    }

    /// One entry of Triton's `model_stats` list.
    pub fn json(&self, name: &str, version: &str) -> Value {
        let totals = self.totals();
        let batch_stats: Vec<Value> = totals
            .by_batch_size
            .iter()
            .map(|(size, batches)| {
                let stage = |ns: u64| json!({"count": batches.count, "ns": ns});
                json!({
                    "batch_size": size,
                    "compute_input": stage(batches.input_ns),
                    "compute_infer": stage(batches.infer_ns),
                    "compute_output": stage(batches.output_ns),
                })
            })
            .collect();
        let none = Tally::default().json();
        json!({
            "name": name,
            "version": version,
            "last_inference": totals.last_inference_ms,
            "inference_count": totals.inference_count,
            "execution_count": totals.execution_count,
            "inference_stats": {
                "success": totals.success.json(),
                "fail": totals.fail.json(),
                "queue": totals.queue.json(),
                "compute_input": totals.compute_input.json(),
                "compute_infer": totals.compute_infer.json(),
                "compute_output": totals.compute_output.json(),
                // No response cache.
                "cache_hit": none,
                "cache_miss": none,
            },
            "batch_stats": batch_stats,
            "memory_usage": [],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_batches_add_up_per_request_and_per_batch_size() {
        let stats = ModelStats::default();
        let ms = Duration::from_millis;
        assert_eq!(stats.json("m", "1")["last_inference"], 0);
        let times = BatchTimes {
            input: ms(1),
            infer: ms(4),
            output: ms(2),
        };
        stats.batch(&[ms(10), ms(10), ms(10)], 5, ms(9), times);
        stats.batch(&[ms(10)], 5, ms(1), times);
        stats.batch(&[], 1, ms(2), times); // its one request's rows failed to split
        stats.failed(ms(3));
        stats.failed(ms(3));
        let json = stats.json("m", "1");
        let inference = &json["inference_stats"];
        assert_eq!(inference["success"], json!({"count": 4, "ns": 40_000_000}));
        assert_eq!(inference["fail"], json!({"count": 2, "ns": 6_000_000}));
        assert_eq!(inference["queue"], json!({"count": 4, "ns": 12_000_000}));
        assert_eq!(
            inference["compute_infer"],
            json!({"count": 4, "ns": 16_000_000})
        );
        assert_eq!(json["inference_count"], 11);
        assert_eq!(json["execution_count"], 3);
        assert!(json["last_inference"].as_u64().unwrap() > 1_700_000_000_000);
        let sizes = json["batch_stats"].as_array().unwrap();
        assert_eq!(sizes.len(), 2);
        assert_eq!(sizes[0]["batch_size"], 1);
        assert_eq!(sizes[1]["batch_size"], 5);
        assert_eq!(
            sizes[1]["compute_infer"],
            json!({"count": 2, "ns": 8_000_000})
        );
        assert_eq!(
            sizes[1]["compute_output"],
            json!({"count": 2, "ns": 4_000_000})
        );
    }

    #[test]
    fn failures_alone_leave_no_last_inference() {
        let stats = ModelStats::default();
        stats.failed(Duration::from_millis(1));
        assert_eq!(stats.json("m", "1")["last_inference"], 0);
    }
}
