//! The load generator: closed loop (N clients, each sending its next request when the last one
//! answered) or open loop (requests started at a fixed rate whatever the answers, with latency
//! measured from the intended start so a stalled server cannot hide its queueing).
//!
//! What counts: every answer that arrives inside the measured window, whenever its request was
//! sent (so an overloaded server's backlog from the warm-up is not thrown away). At the end of the
//! window the run stops waiting: a request still unanswered then (in flight, or in open loop due
//! and not yet sent) is counted as unanswered, and its wait by then, a lower bound of its
//! latency, can enter the latency percentiles. In open loop every such wait does: a server that
//! falls behind or stalls cannot leave its backlog out of the figures (a healthy run cuts short
//! only the few requests sent in its last moments). In closed loop a healthy run always cuts
//! short --concurrency requests, each partway through, which would pull the percentiles down:
//! there a wait enters only when it is longer than every answer (a stall).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
            Err(error) => format!("reading the answer: {}", error_chain(error)),
        }),
        stages,
        batch_rows,
    }
}

impl Outcome {
    pub fn connection_failed(error: &reqwest::Error) -> Outcome {
        Outcome {
            failure: Some("connection".into()),
            detail: Some(error_chain(error)),
            ..Outcome::default()
        }
    }
}

/// An error followed by its causes: reqwest's own message alone ("error sending request for
/// url ...") does not say whether the connection was refused, reset or timed out.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
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
    /// What one row is, for the report: "inference", or the domain's word ("board", "window").
    fn row_name(&self) -> &'static str {
        "inference"
    }
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
    /// Failed answers' latencies (a 504 after its deadline, a 503 after a wait).
    failed_latency: Option<Histogram<u64>>,
    /// Waits of the requests unanswered at the end (see the module's comment).
    cut_short: Option<Histogram<u64>>,
    /// Open loop: this generator's own lateness per request started (waking after the intended
    /// time, and handing the request to the runtime; not the wait for a free slot).
    send_lag: Option<Histogram<u64>>,
    stages: BTreeMap<&'static str, Histogram<u64>>,
    /// Answers that said the size of the batch they rode in, and the sum of 1 / that size:
    /// requests of equal rows, so their count over this sum is the mean rows per executed batch
    /// (a batch of 8 answers 8 requests and must count once, not 8 times).
    batch_answers: u64,
    batch_shares: f64,
    /// Requests still unanswered at the end of the window.
    unanswered: u64,
}

impl Tally {
    fn add(&mut self, outcome: Outcome, latency: Duration) {
        match outcome.failure {
            Some(reason) => {
                if let Some(detail) = outcome.detail {
                    self.first_errors.entry(reason.clone()).or_insert(detail);
                }
                *self.failures.entry(reason).or_default() += 1;
                record_into(&mut self.failed_latency, latency, 1);
            }
            None => {
                self.ok += 1;
                record_into(&mut self.latency, latency, 1);
                for (stage, time) in outcome.stages {
                    report::record(
                        self.stages
                            .entry(stage)
                            .or_insert_with(report::new_histogram),
                        time,
                    );
                }
                if let Some(rows) = outcome.batch_rows.filter(|rows| *rows > 0) {
                    self.batch_answers += 1;
                    self.batch_shares += 1.0 / rows as f64;
                }
            }
        }
    }

    /// A request given up at the end of the window after waiting `waited`.
    fn give_up(&mut self, waited: Duration) {
        self.give_up_many(waited, 1);
    }

    /// `count` requests given up, each after about `waited`.
    fn give_up_many(&mut self, waited: Duration, count: u64) {
        self.unanswered += count;
        record_into(&mut self.cut_short, waited, count);
    }

    /// The latency histogram of the run: the successful answers and the unanswered requests'
    /// waits (in closed loop only those longer than any answer, successful or failed; see the
    /// module's comment); with how many of the latter it holds.
    fn settled_latency(&self, closed_loop: bool) -> (Option<Histogram<u64>>, u64) {
        let mut latency = self.latency.clone();
        let Some(cut_short) = &self.cut_short else {
            return (latency, 0);
        };
        let longest_answer = if closed_loop {
            [&self.latency, &self.failed_latency]
                .into_iter()
                .flatten()
                .map(|h| h.max())
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        let mut included = 0;
        for value in cut_short.iter_recorded() {
            let waited = value.value_iterated_to();
            if waited > longest_answer {
                let count = value.count_at_value();
                record_into(&mut latency, Duration::from_micros(waited), count);
                included += count;
            }
        }
        (latency, included)
    }

    fn mean_batch_rows(&self) -> Option<f64> {
        (self.batch_answers > 0).then(|| self.batch_answers as f64 / self.batch_shares)
    }
}

fn record_into(histogram: &mut Option<Histogram<u64>>, value: Duration, count: u64) {
    report::record_many(
        histogram.get_or_insert_with(report::new_histogram),
        value,
        count,
    );
}

fn percentiles(histogram: &Option<Histogram<u64>>) -> Option<Percentiles> {
    histogram.as_ref().map(Percentiles::of)
}

/// The measured part of a run: answers arriving in `[from, end]` count.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    end: Instant,
}

impl Window {
    fn holds(&self, at: Instant) -> bool {
        at >= self.from && at <= self.end
    }
}

pub async fn run(
    workload: Arc<dyn Workload>,
    plan: &LoadPlan,
    client: reqwest::Client,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let window = Window {
        from: started + plan.warmup,
        end: started + plan.warmup + plan.duration,
    };
    let cpu_sampler = {
        let client = client.clone();
        let server = workload.server().map(str::to_owned);
        tokio::spawn(async move {
            let sample = async || match &server {
                Some(server) => CpuSample::with_server(&client, server).await,
                None => CpuSample::own(),
            };
            tokio::time::sleep_until(window.from.into()).await;
            let first = sample().await;
            tokio::time::sleep_until(window.end.into()).await;
            first.until(&sample().await)
        })
    };
    let tally = match plan.rate {
        None => closed_loop(&workload, &client, plan.concurrency, window).await?,
        Some(rate) => {
            open_loop(&workload, &client, plan.concurrency, rate, started, window).await?
        }
    };
    let cpu = cpu_sampler.await?;
    let elapsed = plan.duration.as_secs_f64();
    let inferences_per_s = (tally.ok * workload.rows() as u64) as f64 / elapsed;
    let failed: u64 = tally.failures.values().sum();
    let (latency, unanswered_in_latency) = tally.settled_latency(plan.rate.is_none());
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
        requests_unanswered: tally.unanswered,
        unanswered_in_latency,
        unanswered_wait: percentiles(&tally.cut_short),
        requests_per_s: tally.ok as f64 / elapsed,
        inferences_per_s,
        row_name: workload.row_name().into(),
        inferences_per_cpu_s: cpu::inferences_per_cpu_second(
            inferences_per_s,
            cpu.inference_cores(workload.server().is_some()),
        ),
        cpu,
        latency: percentiles(&latency),
        failed_latency: percentiles(&tally.failed_latency),
        send_lag: percentiles(&tally.send_lag),
        stages: tally
            .stages
            .iter()
            .map(|(stage, h)| (stage.to_string(), Percentiles::of(h)))
            .collect(),
        mean_batch_rows: tally.mean_batch_rows(),
        failures: tally.failures,
        first_errors: tally.first_errors,
        machine: report::machine_description(),
    })
}

async fn closed_loop(
    workload: &Arc<dyn Workload>,
    client: &reqwest::Client,
    concurrency: usize,
    window: Window,
) -> anyhow::Result<Tally> {
    let (sender, collector) = collector();
    let clients: Vec<_> = (0..concurrency.max(1))
        .map(|client_index| {
            let workload = workload.clone();
            let client = client.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut sequence = client_index as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= window.end {
                        break;
                    }
                    let fate = send_within(&*workload, &client, sequence, sent, window).await;
                    let given_up = matches!(fate, Some(Fate::GivenUp(_)));
                    if let Some(fate) = fate {
                        let _ = sender.send(fate);
                    }
                    if given_up {
                        break;
                    }
                    sequence += concurrency as u64;
                }
            })
        })
        .collect();
    drop(sender);
    for client in clients {
        client.await?;
    }
    Ok(collector.await?)
}

/// What became of one request.
enum Fate {
    /// Answered inside the window, this long after its start.
    Answered(Outcome, Duration),
    /// Unanswered at the end of the window, after waiting this long.
    GivenUp(Duration),
    /// Open loop: this generator's own lateness in starting a request.
    Late(Duration),
}

/// Sends request `sequence`, which started (open loop: was due) at `start`, waiting no later
/// than the end of the window; None when it was answered before the window opened.
async fn send_within(
    workload: &dyn Workload,
    client: &reqwest::Client,
    sequence: u64,
    start: Instant,
    window: Window,
) -> Option<Fate> {
    // A task that first runs after the end sends nothing (tokio's timeout polls the request,
    // which would open a connection, before it looks at the deadline).
    if Instant::now() >= window.end {
        return Some(Fate::GivenUp(window.end - start));
    }
    let send = workload.send(client, sequence);
    match tokio::time::timeout_at(window.end.into(), send).await {
        // Also answered while the timer that ends the window was firing: too late.
        Ok(_) if Instant::now() > window.end => Some(Fate::GivenUp(window.end - start)),
        Ok(outcome) => {
            let answered = Instant::now();
            window
                .holds(answered)
                .then(|| Fate::Answered(outcome, answered - start))
        }
        Err(_) => Some(Fate::GivenUp(window.end - start)),
    }
}

/// One tally for the whole run, fed by every client (a tally per client would hold three
/// histograms each, about 0.4 MB, at thousands of clients).
fn collector() -> (
    tokio::sync::mpsc::UnboundedSender<Fate>,
    tokio::task::JoinHandle<Tally>,
) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Fate>();
    let collector = tokio::spawn(async move {
        let mut tally = Tally::default();
        while let Some(fate) = receiver.recv().await {
            match fate {
                Fate::Answered(outcome, latency) => tally.add(outcome, latency),
                Fate::GivenUp(waited) => tally.give_up(waited),
                Fate::Late(lag) => record_into(&mut tally.send_lag, lag, 1),
            }
        }
        tally
    });
    (sender, collector)
}

async fn open_loop(
    workload: &Arc<dyn Workload>,
    client: &reqwest::Client,
    max_in_flight: usize,
    rate: f64,
    start: Instant,
    window: Window,
) -> anyhow::Result<Tally> {
    // From the rate itself, not a whole-nanosecond interval whose error would add up.
    let intended = move |sequence: u64| start + Duration::from_secs_f64(sequence as f64 / rate);
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let (sender, collector) = collector();
    // Requests are started from a thread of their own that sleeps to each start time: tokio's
    // timers round up to whole milliseconds, and latency counts from the intended start, so
    // that lateness would be charged to the server. It never blocks on the runtime, and stops
    // at the end of the window or as soon as the run is dropped (Ctrl-C).
    let runtime = tokio::runtime::Handle::current();
    let workload = workload.clone();
    let client = client.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_when_dropped = StopWhenDropped(stop.clone());
    let first_unsent = tokio::task::spawn_blocking(move || {
        set_fine_timer_slack();
        let stopped = || stop.load(Ordering::Relaxed);
        let mut sequence = 0u64;
        // When the scheduler was last free to start a request (a slot wait makes the next ones
        // due before it is).
        let mut free_since = start;
        loop {
            let due = intended(sequence);
            if due >= window.end || !sleep_until(due, &stopped) {
                break;
            }
            let woke = Instant::now();
            let Some(permit) = free_slot(&permits, window.end, &stopped) else {
                break;
            };
            // This generator's own lateness: waking after `due` (or after it was free again),
            // and the hand-over to the runtime; not the wait for a free slot, which the
            // server's pace decides.
            let slotted = Instant::now();
            let woke_late = woke.saturating_duration_since(due.max(free_since));
            let workload = workload.clone();
            let client = client.clone();
            let sender = sender.clone();
            runtime.spawn(async move {
                if due >= window.from {
                    let _ = sender.send(Fate::Late(woke_late + slotted.elapsed()));
                }
                let fate = send_within(&*workload, &client, sequence, due, window).await;
                drop(permit);
                if let Some(fate) = fate {
                    let _ = sender.send(fate);
                }
            });
            sequence += 1;
            free_since = Instant::now();
        }
        sequence
    })
    .await?;
    // Every request in flight gives up at the end of the window, so the collector ends then.
    let mut tally = collector.await?;
    // Behind the rate: what was due before the end and never started, each with its wait. A
    // generator far behind leaves millions, so they are recorded in at most 100,000 steps of
    // equal waits (a step spans 1/100,000 of the schedule's tail).
    let mut due = ((window.end - start).as_secs_f64() * rate).ceil() as u64;
    while due > 0 && intended(due - 1) >= window.end {
        due -= 1;
    }
    while intended(due) < window.end {
        due += 1;
    }
    let step = (due.saturating_sub(first_unsent) / 100_000).max(1);
    let mut sequence = first_unsent;
    while sequence < due {
        let count = step.min(due - sequence);
        tally.give_up_many(window.end - intended(sequence), count);
        sequence += count;
    }
    Ok(tally)
}

/// Sets its flag when dropped: a run dropped halfway (Ctrl-C) stops its scheduler thread.
struct StopWhenDropped(Arc<AtomicBool>);

impl Drop for StopWhenDropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Lets this thread's sleeps end within a microsecond or so of their time instead of Linux's
/// default 50 µs slack, which the latencies (counted from the intended start) would include.
fn set_fine_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer and changes only this thread's timers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// The longest the scheduler sleeps or waits before it looks at its stop flag again.
const STOP_CHECK: Duration = Duration::from_millis(10);
/// How often the scheduler looks for a free slot when all are taken.
const SLOT_POLL: Duration = Duration::from_micros(100);

/// Sleeps this thread until `at`; false when stopped first.
fn sleep_until(at: Instant, stopped: &impl Fn() -> bool) -> bool {
    loop {
        if stopped() {
            return false;
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(STOP_CHECK));
    }
}

/// One of the --concurrency slots, waiting for one to free; None at `end` or when stopped.
fn free_slot(
    permits: &Arc<Semaphore>,
    end: Instant,
    stopped: &impl Fn() -> bool,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        if Instant::now() >= end || stopped() {
            return None;
        }
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        std::thread::sleep(SLOT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that never answers: every request hangs until the run gives up on it.
    struct Silent;

    impl Workload for Silent {
        fn send<'a>(&'a self, _: &'a reqwest::Client, _: u64) -> BoxFuture<'a, Outcome> {
            Box::pin(std::future::pending())
        }
        fn rows(&self) -> usize {
            1
        }
        fn describe(&self) -> (String, String) {
            ("nowhere".into(), "none".into())
        }
        fn server(&self) -> Option<&str> {
            None
        }
    }

    fn plan(rate: Option<f64>) -> LoadPlan {
        LoadPlan {
            concurrency: 3,
            rate,
            duration: Duration::from_millis(200),
            warmup: Duration::from_millis(50),
        }
    }

    async fn run_silent(rate: Option<f64>) -> Report {
        run(Arc::new(Silent), &plan(rate), reqwest::Client::new())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_shows_in_the_latency_in_closed_loop() {
        let report = run_silent(None).await;
        assert_eq!(report.requests_ok, 0);
        assert_eq!(report.requests_unanswered, 3, "{report:?}");
        // Each client waited from its start (the run's, give or take scheduling) to the end of
        // the window, 250 ms later, and that wait is its latency.
        let latency = report.latency.unwrap();
        assert_eq!(latency.count, 3);
        assert!(latency.p50_ms >= 150.0, "{latency:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_shows_in_the_latency_in_open_loop() {
        // 100 requests/s over 250 ms: 25 due, 3 started (the cap), 22 never started.
        let report = run_silent(Some(100.0)).await;
        assert_eq!(report.requests_ok, 0);
        assert_eq!(report.requests_unanswered, 25, "{report:?}");
        let latency = report.latency.unwrap();
        assert_eq!(latency.count, 25);
        // The first request, due at the start, waited the whole 250 ms.
        assert!(latency.max_ms >= 240.0, "{latency:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_generator_far_behind_counts_every_request_it_owed() {
        // 1,000,000 requests/s over 250 ms: 250,000 due, recorded in steps of 2.
        let report = run_silent(Some(1e6)).await;
        assert_eq!(report.requests_unanswered, 250_000, "{report:?}");
        assert_eq!(report.latency.unwrap().count, 250_000);
    }

    #[test]
    fn mean_batch_rows_counts_each_batch_once() {
        let mut tally = Tally::default();
        let answer = |rows| Outcome {
            batch_rows: Some(rows),
            ..Outcome::default()
        };
        // One batch of 8 requests (8 answers) and one of a single request.
        for _ in 0..8 {
            tally.add(answer(8), Duration::from_millis(1));
        }
        tally.add(answer(1), Duration::from_millis(1));
        assert_eq!(tally.mean_batch_rows(), Some(4.5));
    }

    #[test]
    fn closed_loop_latency_takes_only_waits_longer_than_every_answer() {
        let mut tally = Tally::default();
        let failed = Outcome {
            failure: Some("504".into()),
            ..Outcome::default()
        };
        tally.add(Outcome::default(), Duration::from_millis(1));
        tally.add(Outcome::default(), Duration::from_millis(5));
        tally.add(failed, Duration::from_millis(9));
        // Cut short by the end of a healthy run, then one request the server sat on.
        tally.give_up_many(Duration::from_millis(2), 3);
        tally.give_up(Duration::from_millis(50));
        let (latency, included) = tally.settled_latency(true);
        let latency = Percentiles::of(&latency.unwrap());
        assert_eq!((latency.count, included, tally.unanswered), (3, 1, 4));
        assert!((latency.max_ms - 50.0).abs() < 0.1, "{latency:?}");
        assert!((latency.p50_ms - 5.0).abs() < 0.01, "{latency:?}");
        // In open loop every wait is backlog: a server falling behind keeps it all.
        let (latency, included) = tally.settled_latency(false);
        assert_eq!((latency.unwrap().len(), included), (6, 4));
        let failed = Percentiles::of(tally.failed_latency.as_ref().unwrap());
        assert_eq!(failed.count, 1);
        assert!((failed.max_ms - 9.0).abs() < 0.01, "{failed:?}");
    }

    #[test]
    fn an_error_is_told_with_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending failed")]
        struct Sending(#[source] std::io::Error);
        let error = Sending(std::io::Error::other("connection reset"));
        assert_eq!(error_chain(&error), "sending failed: connection reset");
    }
}
