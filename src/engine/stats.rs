//! Per model version counters in the shape of Triton's statistics extension
//! (`GET /v2/models/{model}/stats`), so `tritonclient`'s `get_inference_statistics` and
//! dashboards built on it read linescan as they read Triton. Prometheus keeps its histograms in
//! `/metrics`; these are running totals (count and nanoseconds), cheap to bump per request.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How many times something happened and how long it took in all.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    fn add(&self, times: u64, took: Duration) {
        self.count.fetch_add(times, Ordering::Relaxed);
        self.ns
            .fetch_add(took.as_nanos() as u64 * times, Ordering::Relaxed);
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count.load(Ordering::Relaxed),
            "ns": self.ns.load(Ordering::Relaxed),
        })
    }
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
pub struct ModelStats {
    success: Tally,
    fail: Tally,
    queue: Tally,
    compute_input: Tally,
    compute_infer: Tally,
    compute_output: Tally,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last request answered, 0 before the first.
    last_inference_ms: AtomicU64,
    by_batch_size: Mutex<BTreeMap<usize, BatchTotals>>,
}

impl ModelStats {
    /// A request answered, from its arrival at the batcher to its answer.
    pub fn request(&self, succeeded: bool, took: Duration) {
        if succeeded {
            self.success.add(1, took);
        } else {
            self.fail.add(1, took);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_inference_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// A batch of `requests` requests and `rows` rows run; each request counts the batch's
    /// stage times, as Triton's per-request compute figures do.
    pub fn batch(&self, requests: usize, rows: usize, queued: Duration, times: BatchTimes) {
        let requests = requests as u64;
        // `queued` is the requests' summed wait: added once, counted per request.
        self.queue.count.fetch_add(requests, Ordering::Relaxed);
        self.queue
            .ns
            .fetch_add(queued.as_nanos() as u64, Ordering::Relaxed);
        self.compute_input.add(requests, times.input);
        self.compute_infer.add(requests, times.infer);
        self.compute_output.add(requests, times.output);
        self.inference_count
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let mut sizes = self.by_batch_size.lock().expect("batch stats lock");
        let totals = sizes.entry(rows).or_default();
        totals.count += 1;
        totals.input_ns += times.input.as_nanos() as u64;
        totals.infer_ns += times.infer.as_nanos() as u64;
        totals.output_ns += times.output.as_nanos() as u64;
    }

    /// One entry of Triton's `model_stats` list.
    pub fn json(&self, name: &str, version: &str) -> Value {
        let batch_stats: Vec<Value> = self
            .by_batch_size
            .lock()
            .expect("batch stats lock")
            .iter()
            .map(|(size, totals)| {
                let stage = |ns: u64| json!({"count": totals.count, "ns": ns});
                json!({
                    "batch_size": size,
                    "compute_input": stage(totals.input_ns),
                    "compute_infer": stage(totals.infer_ns),
                    "compute_output": stage(totals.output_ns),
                })
            })
            .collect();
        let none = json!({"count": 0, "ns": 0});
        json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms.load(Ordering::Relaxed),
            "inference_count": self.inference_count.load(Ordering::Relaxed),
            "execution_count": self.execution_count.load(Ordering::Relaxed),
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
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
        let times = BatchTimes {
            input: ms(1),
            infer: ms(4),
            output: ms(2),
        };
        stats.batch(3, 5, ms(9), times);
        stats.batch(1, 5, ms(1), times);
        stats.batch(1, 1, ms(2), times);
        for _ in 0..4 {
            stats.request(true, ms(10));
        }
        stats.request(false, ms(3));
        let json = stats.json("m", "1");
        let inference = &json["inference_stats"];
        assert_eq!(inference["success"], json!({"count": 4, "ns": 40_000_000}));
        assert_eq!(inference["fail"], json!({"count": 1, "ns": 3_000_000}));
        assert_eq!(inference["queue"], json!({"count": 5, "ns": 12_000_000}));
        assert_eq!(
            inference["compute_infer"],
            json!({"count": 5, "ns": 20_000_000})
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
}
