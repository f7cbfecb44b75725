//! Prometheus metrics. Histograms (not summaries) so percentiles aggregate across replicas.
//! Counter semantics follow Triton: a *request* is one client call, an *inference* is one batch
//! row, an *execution* is one model run over a formed batch.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 10 µs to 10 s, dense where inference lives (a small model's
/// compute and the cheap AOI stages take tens of microseconds).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Why a request failed; one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    QueueFull,
    Timeout,
    Cancelled,
    InvalidInput,
    Inference,
    ShuttingDown,
}

impl FailureReason {
    pub const ALL: [FailureReason; 6] = [
        FailureReason::QueueFull,
        FailureReason::Timeout,
        FailureReason::Cancelled,
        FailureReason::InvalidInput,
        FailureReason::Inference,
        FailureReason::ShuttingDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureReason::QueueFull => "queue_full",
            FailureReason::Timeout => "timeout",
            FailureReason::Cancelled => "cancelled",
            FailureReason::InvalidInput => "invalid_input",
            FailureReason::Inference => "inference",
            FailureReason::ShuttingDown => "shutting_down",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub compute_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub batch_close: IntCounterVec,
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub inference_count: IntCounterVec,
    pub execution_count: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub pending_requests: IntGaugeVec,
    pub stage_duration: HistogramVec,
    pub model_info: IntGaugeVec,
    pub preprocess_info: IntGaugeVec,
    pub http_responses: IntCounterVec,
    pub http_duration: HistogramVec,
    pub jobs_ended: IntCounterVec,
    pub job_rows: IntCounterVec,
    pub aoi_inspections: IntCounterVec,
    pub aoi_defects: IntCounterVec,
    pub aoi_images_failed: IntCounterVec,
    pub aoi_templates: IntGaugeVec,
    pub aoi_template_memory: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let model = &["model", "version"];
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        // Prometheus' standard `process_*` series (CPU seconds, resident memory), so a load test
        // on the same machine can tell the server's CPU from its own.
        registry
            .register(Box::new(crate::process_stats::ProcessCollector::new()))
            .expect("unique metric");
        Metrics {
            request_duration: histogram(
                "linescan_request_duration_seconds",
                "End-to-end latency of inference requests inside the server",
                model,
                LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "linescan_queue_duration_seconds",
                "Time requests wait in the batcher queue",
                model,
                LATENCY_BUCKETS,
            ),
            compute_duration: histogram(
                "linescan_compute_duration_seconds",
                "Model execution time per formed batch",
                model,
                LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "linescan_batch_size",
                "Rows per executed batch",
                model,
                BATCH_BUCKETS,
            ),
            batch_close: counter(
                "linescan_batch_close_total",
                "Formed batches by what closed them: full, shape, placement, priority, delay, gap, idle, shutdown, unbatched",
                &["model", "version", "reason"],
            ),
            request_success: counter(
                "linescan_inference_request_success_total",
                "Inference requests that succeeded",
                model,
            ),
            request_failure: counter(
                "linescan_inference_request_failure_total",
                "Inference requests that failed, by reason",
                &["model", "version", "reason"],
            ),
            inference_count: counter(
                "linescan_inference_count_total",
                "Inferences performed: the batch rows of successful executions",
                model,
            ),
            execution_count: counter(
                "linescan_inference_exec_count_total",
                "Successful model executions (formed batches)",
                model,
            ),
            queue_depth: gauge(
                "linescan_queue_depth",
                "Requests waiting in the batcher queue, by lane (live requests, bulk job work)",
                &["model", "version", "lane"],
            ),
            pending_requests: gauge(
                "linescan_inference_pending_requests",
                "Requests the batcher holds that have not started running: queued, or in a batch still forming (Triton's nv_inference_pending_request_count)",
                model,
            ),
            stage_duration: histogram(
                "linescan_stage_duration_seconds",
                "Time per pipeline stage and backend",
                &["pipeline", "stage", "backend"],
                LATENCY_BUCKETS,
            ),
            model_info: gauge(
                "linescan_model_info",
                "Loaded model versions (1) with their execution provider",
                &["model", "version", "provider"],
            ),
            preprocess_info: gauge(
                "linescan_preprocess_backend_info",
                "The preprocessing backend in use (1) and its device",
                &["backend", "device"],
            ),
            http_responses: counter(
                "linescan_http_responses_total",
                "HTTP responses by route (its pattern, or \"unmatched\") and status",
                &["route", "status"],
            ),
            http_duration: histogram(
                "linescan_http_request_duration_seconds",
                "Time from a request's arrival to its response, by route (every route and status)",
                &["route"],
                LATENCY_BUCKETS,
            ),
            jobs_ended: counter(
                "linescan_jobs_ended_total",
                "Fleet jobs that ended since the server started, by model and state (done, failed, \
                 cancelled while queued or running)",
                &["model", "state"],
            ),
            job_rows: counter(
                "linescan_job_rows_total",
                "Archive rows scored by fleet jobs that finished (done)",
                &["model"],
            ),
            aoi_inspections: counter(
                "linescan_aoi_inspections_total",
                "Inspected boards by verdict",
                &["verdict"],
            ),
            aoi_defects: counter(
                "linescan_aoi_defects_total",
                "Defects reported on inspected boards, by class",
                &["class"],
            ),
            aoi_images_failed: counter(
                "linescan_aoi_images_failed_total",
                "Board images whose inspection failed, by the status they were given (alone or as \
                 one image of a batch, whose own answer is 200)",
                &["status"],
            ),
            aoi_templates: gauge(
                "linescan_aoi_templates",
                "Registered templates: served (loaded) and found on disk but not loadable",
                &["state"],
            ),
            aoi_template_memory: gauge(
                "linescan_aoi_template_memory_bytes",
                "Memory the served templates take (used), and what --max-template-bytes allows \
                 (limit)",
                &["of"],
            ),
            registry,
        }
    }

    pub fn record_preprocess_backend(&self, preprocess: &dyn crate::preprocess::Preprocess) {
        self.preprocess_info
            .with_label_values(&[preprocess.backend().as_str(), preprocess.device()])
            .set(1);
    }

    pub fn failure(&self, model: &str, version: &str, reason: FailureReason) {
        self.request_failure
            .with_label_values(&[model, version, reason.label()])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_and_labelled_failures() {
        let metrics = Metrics::new();
        metrics
            .batch_size
            .with_label_values(&["m", "1"])
            .observe(4.0);
        metrics.failure("m", "1", FailureReason::QueueFull);
        let text = metrics.render();
        assert!(text.contains("linescan_batch_size_bucket{model=\"m\",version=\"1\",le=\"4\"} 1"));
        assert!(text.contains("reason=\"queue_full\""));
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }
}
