//! The load generator: closed loop (N clients, each sending its next request when the last one
//! answered) or open loop (requests started at a fixed rate whatever the answers, with latency
//! measured from the intended start so a stalled server cannot hide its queueing).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use crate::bench::cpu::{self, CpuSample};
use crate::bench::report::{self, Percentiles, Report};

/// What one request produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// None on success, else the HTTP status or "connection".
    pub failure: Option<String>,
    /// What went wrong, as the server or the pipeline said it.
    pub detail: Option<String>,
    /// Server-reported stage times (e.g. queue, compute).
    pub stages: Vec<(&'static str, Duration)>,
    pub batch_rows: Option<usize>,
}

/// Sends one request to a linescan server and reads its whole answer, with the stage times and
/// batch size the server reports in `X-Linescan-*` headers.
pub async fn send_timed(request: reqwest::RequestBuilder) -> Outcome {
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::connection_failed(&error),
    };
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)?
            .to_str()
            .ok()?
            .parse::<u64>()
            .ok()
    };
    let stages = [
        ("queue", "X-Linescan-Queue-Us"),
        ("compute", "X-Linescan-Compute-Us"),
    ]
    .into_iter()
    .filter_map(|(stage, name)| Some((stage, Duration::from_micros(header(name)?))))
    .collect();
    let batch_rows = header("X-Linescan-Batch-Rows").map(|rows| rows as usize);
    // The body is read in full so the timing covers the whole response.
    let body = response.bytes().await;
    let failed = !status.is_success() || body.is_err();
    Outcome {
        failure: failed.then(|| status.as_u16().to_string()),
        detail: failed.then(|| match &body {
            Ok(body) => error_text(body),
            Err(error) => format!("reading the answer: {error}"),
        }),
        stages,
        batch_rows,
    }
}

impl Outcome {
    pub fn connection_failed(error: &reqwest::Error) -> Outcome {
        Outcome {
            failure: Some("connection".into()),
            detail: Some(error.to_string()),
            ..Outcome::default()
        }
    }
}

/// The `error` of a JSON error body, else the body's start as text.
pub fn error_text(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match parsed.as_ref().and_then(|v| v["error"].as_str()) {
        Some(error) => error.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

/// A kind of request to send repeatedly.
pub trait Workload: Send + Sync + 'static {
    fn send<'a>(&'a self, client: &'a reqwest::Client, sequence: u64) -> BoxFuture<'a, Outcome>;
    /// Inferences (rows) each request carries.
    fn rows(&self) -> usize;
    fn describe(&self) -> (String, String);
    /// Base URL of the server that runs the model, whose `/metrics` give its CPU time; None
    /// when this process runs it.
    fn server(&self) -> Option<&str>;
}

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub concurrency: usize,
    /// Requests per second for the open loop; None runs the closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failures: BTreeMap<String, u64>,
    first_errors: BTreeMap<String, String>,
    latency: Option<Histogram<u64>>,
    stages: BTreeMap<&'static str, Histogram<u64>>,
    batch_rows_sum: u64,
    batch_rows_count: u64,
    /// Open loop: requests due within the measured window.
    scheduled: Option<u64>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome, latency: Duration) {
        match outcome.failure {
            Some(reason) => {
                if let Some(detail) = outcome.detail {
                    self.first_errors.entry(reason.clone()).or_insert(detail);
                }
                *self.failures.entry(reason).or_default() += 1;
            }
            None => {
                self.ok += 1;
                report::record(
                    self.latency.get_or_insert_with(report::new_histogram),
                    latency,
                );
                for (stage, time) in outcome.stages {
                    report::record(
                        self.stages
                            .entry(stage)
                            .or_insert_with(report::new_histogram),
                        time,
                    );
                }
                if let Some(rows) = outcome.batch_rows {
                    self.batch_rows_sum += rows as u64;
                    self.batch_rows_count += 1;
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (reason, count) in other.failures {
            *self.failures.entry(reason).or_default() += count;
        }
        for (reason, detail) in other.first_errors {
            self.first_errors.entry(reason).or_insert(detail);
        }
        if let Some(latency) = other.latency {
            let mine = self.latency.get_or_insert_with(report::new_histogram);
            mine.add(latency).expect("same histogram bounds");
        }
        for (stage, histogram) in other.stages {
            self.stages
                .entry(stage)
                .or_insert_with(report::new_histogram)
                .add(histogram)
                .expect("same histogram bounds");
        }
        self.batch_rows_sum += other.batch_rows_sum;
        self.batch_rows_count += other.batch_rows_count;
    }
}

pub async fn run(
    workload: Arc<dyn Workload>,
    plan: &LoadPlan,
    client: reqwest::Client,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let end = measure_from + plan.duration;
    let cpu_sampler = {
        let client = client.clone();
        let server = workload.server().map(str::to_owned);
        tokio::spawn(async move {
            let sample = async || match &server {
                Some(server) => CpuSample::with_server(&client, server).await,
                None => CpuSample::own(),
            };
            tokio::time::sleep_until(measure_from.into()).await;
            let first = sample().await;
            tokio::time::sleep_until(end.into()).await;
            first.until(&sample().await)
        })
    };
    let tally = match plan.rate {
        None => closed_loop(&workload, &client, plan.concurrency, measure_from, end).await,
        Some(rate) => {
            open_loop(
                &workload,
                &client,
                plan.concurrency,
                rate,
                measure_from,
                end,
            )
            .await
        }
    };
    let cpu = cpu_sampler.await?;
    let elapsed = plan.duration.as_secs_f64();
    let inferences_per_s = (tally.ok * workload.rows() as u64) as f64 / elapsed;
    let failed: u64 = tally.failures.values().sum();
    let (target, model) = workload.describe();
    Ok(Report {
        mode: if plan.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        }
        .into(),
        target,
        model,
        concurrency: plan.concurrency,
        target_rate: plan.rate,
        batch: workload.rows(),
        duration_s: elapsed,
        requests_ok: tally.ok,
        requests_failed: failed,
        requests_unanswered: tally
            .scheduled
            .map(|scheduled| scheduled.saturating_sub(tally.ok + failed)),
        failures: tally.failures,
        first_errors: tally.first_errors,
        requests_per_s: tally.ok as f64 / elapsed,
        inferences_per_s,
        inferences_per_cpu_s: cpu::inferences_per_cpu_second(
            inferences_per_s,
            cpu.inference_cores(workload.server().is_some()),
        ),
        cpu,
        latency: tally
            .latency
            .as_ref()
            .map(Percentiles::of)
            .unwrap_or_else(|| Percentiles::of(&report::new_histogram())),
        stages: tally
            .stages
            .iter()
            .map(|(stage, h)| (stage.to_string(), Percentiles::of(h)))
            .collect(),
        mean_batch_rows: (tally.batch_rows_count > 0)
            .then(|| tally.batch_rows_sum as f64 / tally.batch_rows_count as f64),
        machine: report::machine_description(),
    })
}

async fn closed_loop(
    workload: &Arc<dyn Workload>,
    client: &reqwest::Client,
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|client_index| {
            let workload = workload.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut sequence = client_index as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let outcome = workload.send(&client, sequence).await;
                    sequence += concurrency as u64;
                    if sent >= measure_from && Instant::now() <= end {
                        tally.add(outcome, sent.elapsed());
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        if let Ok(tally) = task.await {
            total.merge(tally);
        }
    }
    total
}

async fn open_loop(
    workload: &Arc<dyn Workload>,
    client: &reqwest::Client,
    max_in_flight: usize,
    rate: f64,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Outcome, Duration)>();
    let start = Instant::now();
    let collector = tokio::spawn(async move {
        let mut tally = Tally::default();
        while let Some((outcome, latency)) = receiver.recv().await {
            tally.add(outcome, latency);
        }
        tally
    });
    // Requests due in the measured window: sequence numbers from the first due at or after
    // `measure_from` to the first due at or after `end`.
    let due_from = |at: Instant| {
        (at.saturating_duration_since(start).as_secs_f64() / interval.as_secs_f64()).ceil() as u64
    };
    let scheduled = due_from(end) - due_from(measure_from);
    let mut sequence = 0u64;
    loop {
        let intended = start + interval.mul_f64(sequence as f64);
        if intended >= end {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Behind the rate: what is still due once the run is over stays unsent (and counted).
        if Instant::now() >= end {
            break;
        }
        let workload = workload.clone();
        let client = client.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            let outcome = workload.send(&client, sequence).await;
            drop(permit);
            if intended >= measure_from && Instant::now() <= end {
                let _ = sender.send((outcome, intended.elapsed()));
            }
        });
        sequence += 1;
    }
    drop(sender);
    // Requests still in flight at the end report until the collector closes.
    let _ = permits.acquire_many(max_in_flight.max(1) as u32).await;
    let mut tally = collector.await.unwrap_or_default();
    tally.scheduled = Some(scheduled);
    tally
}
