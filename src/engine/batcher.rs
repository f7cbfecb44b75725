//! Dynamic batching for one model version.
//!
//! Requests go into bounded crossbeam channels (lock-free array queues), one lane for live
//! requests and one for bulk work that a live request always jumps ([`lanes`]); a full queue is
//! refused at once so callers can answer 503 instead of piling up latency. Each worker thread owns one
//! session and forms batches: it takes the first waiting request, then keeps taking requests
//! until the batch holds `max_batch_size` rows, `max_queue_delay` has passed, (when set) no
//! request has arrived for `max_arrival_gap`, or another session of the model is idle (waiting
//! for company never pays while a session could run the next request at once). Requests whose
//! caller went away or whose deadline passed are dropped before inference.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, TrySendError};
use tokio::sync::oneshot;

use super::lanes::{self, LaneReceivers, LaneSenders, Priority};
use super::stats::{BatchTimes, ModelStats};
use super::withdraw;
use crate::metrics::{FailureReason, Metrics};
use crate::runtime::device::{DeviceBytes, DeviceGather, DeviceTensor, PlacedBytes};
use crate::runtime::model_config::ModelConfig;
use crate::runtime::session::{BatchInput, DeviceBatchInput, ModelSession};
use crate::tensor::{AlignedBytes, DataType, Tensor};

/// How often an idle worker looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What closed a forming batch: the `reason` label of `linescan_batch_close_total`.
#[derive(Debug, Clone, Copy)]
enum BatchClose {
    /// `max_batch_size` rows, or the next request would not fit.
    Full,
    /// The next request differs on a variable dimension.
    Shape,
    /// The batch serves live requests and the next one is bulk work, which waits for a batch
    /// of its own (lanes never share a batch).
    Priority,
    /// The next request's inputs live elsewhere (host memory against device memory).
    Placement,
    /// `max_queue_delay_us` passed.
    Delay,
    /// No request arrived for `max_arrival_gap_us`.
    Gap,
    /// Another session of the model was idle.
    Idle,
    /// The server is shutting down: queued work runs without waiting for company.
    Shutdown,
    /// The model does not batch (`max_batch_size = 0`).
    Unbatched,
}

impl BatchClose {
    const ALL: [BatchClose; 9] = [
        BatchClose::Full,
        BatchClose::Shape,
        BatchClose::Priority,
        BatchClose::Placement,
        BatchClose::Delay,
        BatchClose::Gap,
        BatchClose::Idle,
        BatchClose::Shutdown,
        BatchClose::Unbatched,
    ];

    fn label(self) -> &'static str {
        match self {
            BatchClose::Full => "full",
            BatchClose::Shape => "shape",
            BatchClose::Priority => "priority",
            BatchClose::Placement => "placement",
            BatchClose::Delay => "delay",
            BatchClose::Gap => "gap",
            BatchClose::Idle => "idle",
            BatchClose::Shutdown => "shutdown",
            BatchClose::Unbatched => "unbatched",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    #[error("the queue of model {0} is full; retry later")]
    QueueFull(String),
    #[error("the request waited in the queue past its deadline and was not run")]
    Timeout,
    #[error("the caller withdrew the request before it ran (its client closed the connection)")]
    Cancelled,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

impl InferError {
    pub fn reason(&self) -> FailureReason {
        match self {
            InferError::QueueFull(_) => FailureReason::QueueFull,
            InferError::Timeout => FailureReason::Timeout,
            InferError::Cancelled => FailureReason::Cancelled,
            InferError::ShuttingDown => FailureReason::ShuttingDown,
            InferError::Invalid(_) => FailureReason::InvalidInput,
            InferError::Inference(_) => FailureReason::Inference,
        }
    }
}

/// What a caller gets back: the outputs of its own rows, in config order.
#[derive(Debug)]
pub struct InferResponse {
    pub outputs: Vec<Tensor>,
    pub queue_time: Duration,
    pub compute_time: Duration,
    /// Rows in the batch this request ran in (shows batching at work).
    pub batch_rows: usize,
}

/// A request's inputs in config order: in host memory (HTTP bodies, CPU preprocessing) or in
/// CUDA device memory (GPU preprocessing, for sessions that read it in place).
enum RequestInputs {
    Host(Vec<Tensor>),
    Device(Vec<DeviceTensor>),
}

impl RequestInputs {
    fn shape(&self, index: usize) -> &[usize] {
        match self {
            RequestInputs::Host(tensors) => &tensors[index].shape,
            RequestInputs::Device(tensors) => &tensors[index].shape,
        }
    }

    fn len(&self) -> usize {
        match self {
            RequestInputs::Host(tensors) => tensors.len(),
            RequestInputs::Device(tensors) => tensors.len(),
        }
    }

    /// The bytes of input `index` in host memory.
    fn host_data(&self, index: usize) -> Result<&[u8], String> {
        match self {
            RequestInputs::Host(tensors) => Ok(&tensors[index].data),
            RequestInputs::Device(_) => Err("a batch mixed host and device inputs".to_string()),
        }
    }

    /// The CUDA device holding the inputs; None for host memory.
    fn device(&self) -> Option<i32> {
        match self {
            RequestInputs::Host(_) => None,
            RequestInputs::Device(tensors) => tensors.first().map(|t| t.data.device_id()),
        }
    }
}

struct QueuedRequest {
    inputs: RequestInputs,
    rows: usize,
    enqueued: Instant,
    deadline: Instant,
    priority: Priority,
    reply: oneshot::Sender<Result<InferResponse, InferError>>,
    /// Who has the request: its caller and a session race for it once the deadline is near.
    claim: Arc<AtomicU8>,
    /// Counts the request as pending until its batch starts running (taken then) or it is
    /// dropped unrun.
    pending: Option<PendingMark>,
}

/// One request in the model's `linescan_inference_pending_requests` gauge, for as long as the
/// mark lives.
struct PendingMark(prometheus::IntGauge);

impl PendingMark {
    fn new(gauge: &prometheus::IntGauge) -> PendingMark {
        gauge.inc();
        PendingMark(gauge.clone())
    }
}

impl Drop for PendingMark {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `QueuedRequest::claim`: waiting in the queue, taken by a session (it runs, and its caller
/// waits for the result even past the deadline), or given up by its caller at the deadline (a
/// session drops it unrun). The deadline bounds the wait in the queue, as Triton's does.
const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const GIVEN_UP: u8 = 2;

/// What a forming batch does with the next request.
#[derive(Debug, Clone, Copy)]
enum Company {
    Join,
    /// The batch closes without it; it leads the next one.
    Close(BatchClose),
    /// It is live and the batch so far is bulk work: it leads the batch instead.
    Lead,
}

/// What the batch of `rows` rows that `first` leads does with `next`. Lanes never share a batch:
/// a live request neither waits for a job's rows in its own batch nor rides in a large job batch.
fn company(first: &QueuedRequest, rows: usize, next: &QueuedRequest, max_rows: usize) -> Company {
    if first.priority != next.priority {
        return match next.priority {
            Priority::Live => Company::Lead,
            Priority::Bulk => Company::Close(BatchClose::Priority),
        };
    }
    if rows + next.rows > max_rows {
        Company::Close(BatchClose::Full)
    } else if first.inputs.device() != next.inputs.device() {
        Company::Close(BatchClose::Placement)
    } else if !first.same_shapes(next) {
        Company::Close(BatchClose::Shape)
    } else {
        Company::Join
    }
}

impl QueuedRequest {
    /// Requests can share a batch when every input agrees on all but the batch dimension.
    fn same_shapes(&self, other: &QueuedRequest) -> bool {
        (0..self.inputs.len())
            .all(|i| self.inputs.shape(i).get(1..) == other.inputs.shape(i).get(1..))
    }
}

pub struct Batcher {
    model: String,
    version: String,
    config: Arc<ModelConfig>,
    sessions: usize,
    sender: LaneSenders<QueuedRequest>,
    /// The CUDA device whose memory every session reads in place (CUDA or TensorRT provider).
    device: Option<i32>,
    /// The rows every session pads its batches to, when all of them pad.
    padded_batch: Option<usize>,
    stop: Arc<AtomicBool>,
    /// Set when the server begins to stop: batches close without waiting for company.
    drain: Arc<AtomicBool>,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    stats: Arc<ModelStats>,
    pending: prometheus::IntGauge,
}

impl Batcher {
    /// Starts one worker thread per session.
    pub fn start(
        config: Arc<ModelConfig>,
        version: u64,
        sessions: Vec<ModelSession>,
        metrics: Arc<Metrics>,
    ) -> Batcher {
        let (sender, receiver) = lanes::lanes(config.dynamic_batching.max_queue_size);
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(ModelStats::default());
        let version = version.to_string();
        // Every series of the model exists from the start, at 0: Prometheus takes a series'
        // first sample as its base, so increase() would never count a first failure.
        let labels = [config.name.as_str(), version.as_str()];
        for counter in [
            &metrics.request_success,
            &metrics.inference_count,
            &metrics.execution_count,
        ] {
            counter.with_label_values(&labels);
        }
        let failures = FailureReason::ALL.map(FailureReason::label);
        let closes = BatchClose::ALL.map(BatchClose::label);
        for (counter, reasons) in [
            (&metrics.request_failure, &failures[..]),
            (&metrics.batch_close, &closes[..]),
        ] {
            for reason in reasons {
                counter.with_label_values(&[labels[0], labels[1], reason]);
            }
        }
        record_queue_depth(&metrics, labels, |_| 0);
        let pending = metrics.pending_requests.with_label_values(&labels);
        let device = (!sessions.is_empty() && sessions.iter().all(ModelSession::on_gpu))
            .then_some(config.runtime.cuda_device);
        let padded_batch = sessions
            .iter()
            .map(ModelSession::padded_batch)
            .reduce(|a, b| if a == b { a } else { None })
            .flatten();
        let workers: Vec<JoinHandle<()>> = sessions
            .into_iter()
            .enumerate()
            .map(|(index, session)| {
                let worker = Worker {
                    config: config.clone(),
                    labels: [config.name.clone(), version.clone()],
                    receiver: receiver.clone(),
                    stop: stop.clone(),
                    drain: drain.clone(),
                    idle: idle.clone(),
                    metrics: metrics.clone(),
                    stats: stats.clone(),
                    session,
                    pending: VecDeque::new(),
                    scratch: Vec::new(),
                    gatherers: Vec::new(),
                };
                std::thread::Builder::new()
                    .name(format!("batch-{}-{index}", config.name))
                    .spawn(move || worker.run())
                    .expect("spawn batcher worker")
            })
            .collect();
        Batcher {
            model: config.name.clone(),
            version,
            config,
            sessions: workers.len(),
            sender,
            device,
            padded_batch,
            stop,
            drain,
            workers: std::sync::Mutex::new(workers),
            metrics,
            stats,
            pending,
        }
    }

    /// Running totals in the shape of Triton's statistics extension.
    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Sessions (worker threads) taking batches from the queue.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    /// The CUDA device whose memory the model's sessions read in place, if they run there:
    /// [`Batcher::infer_on_device`] takes inputs from it.
    pub fn device(&self) -> Option<i32> {
        self.device
    }

    /// The rows every batch runs at when the sessions pad their batches: a caller splitting
    /// its rows gains nothing from chunks smaller than this.
    pub fn padded_batch(&self) -> Option<usize> {
        self.padded_batch
    }

    /// Queues a live request and waits for its outputs or its deadline. `inputs` are in config
    /// order and already validated against the config; `rows` is their batch dimension.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Instant,
    ) -> Result<InferResponse, InferError> {
        self.infer_host_with(inputs, rows, deadline, Priority::Live)
            .await
    }

    /// [`Batcher::infer`] for inputs in CUDA device memory, which the sessions read in place;
    /// refused unless they run on that device ([`Batcher::device`]).
    pub async fn infer_on_device(
        &self,
        inputs: Vec<DeviceTensor>,
        rows: usize,
        deadline: Instant,
    ) -> Result<InferResponse, InferError> {
        self.infer_device_with(inputs, rows, deadline, Priority::Live)
            .await
    }

    /// A one-input request in the given lane, its bytes in host or device memory (the latter
    /// as [`Batcher::infer_on_device`]).
    pub async fn infer_single(
        &self,
        dtype: DataType,
        shape: Vec<usize>,
        data: PlacedBytes,
        rows: usize,
        deadline: Instant,
        priority: Priority,
    ) -> Result<InferResponse, InferError> {
        match data {
            PlacedBytes::Host(data) => {
                let tensor = Tensor { dtype, shape, data };
                self.infer_host_with(vec![tensor], rows, deadline, priority)
                    .await
            }
            PlacedBytes::Device(data) => {
                let tensor = DeviceTensor { dtype, shape, data };
                self.infer_device_with(vec![tensor], rows, deadline, priority)
                    .await
            }
        }
    }

    async fn infer_host_with(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Instant,
        priority: Priority,
    ) -> Result<InferResponse, InferError> {
        let arrived = Instant::now();
        let inputs = RequestInputs::Host(inputs);
        let outcome = self.submit_and_wait(inputs, rows, deadline, priority).await;
        self.count(arrived, outcome)
    }

    async fn infer_device_with(
        &self,
        inputs: Vec<DeviceTensor>,
        rows: usize,
        deadline: Instant,
        priority: Priority,
    ) -> Result<InferResponse, InferError> {
        let arrived = Instant::now();
        if let Some(problem) = device_input_problem(&self.config, self.device, &inputs, rows) {
            return self.count(arrived, Err(InferError::Invalid(problem)));
        }
        let inputs = RequestInputs::Device(inputs);
        let outcome = self.submit_and_wait(inputs, rows, deadline, priority).await;
        self.count(arrived, outcome)
    }

    /// Counts a finished request (arrived at `arrived`) in `/metrics` and the statistics.
    fn count(
        &self,
        arrived: Instant,
        outcome: Result<InferResponse, InferError>,
    ) -> Result<InferResponse, InferError> {
        // Successes are counted by the session that answered them, with their batch.
        if outcome.is_err() {
            self.stats.failed(arrived.elapsed());
        }
        let labels = [self.model.as_str(), self.version.as_str()];
        match &outcome {
            Ok(_) => self
                .metrics
                .request_success
                .with_label_values(&labels)
                .inc(),
            Err(error) => self.metrics.failure(labels[0], labels[1], error.reason()),
        }
        outcome
    }

    async fn submit_and_wait(
        &self,
        inputs: RequestInputs,
        rows: usize,
        deadline: Instant,
        priority: Priority,
    ) -> Result<InferResponse, InferError> {
        let limit = self.config.max_batch_size;
        if limit > 0 && (rows == 0 || rows > limit) {
            return Err(InferError::Invalid(format!(
                "batch size {rows} is outside 1..={limit} for model {}",
                self.model
            )));
        }
        if self.stop.load(Ordering::Acquire) {
            return Err(InferError::ShuttingDown);
        }
        let (reply, mut response) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(WAITING));
        let request = QueuedRequest {
            inputs,
            rows,
            enqueued: Instant::now(),
            deadline,
            priority,
            reply,
            claim: claim.clone(),
            pending: Some(PendingMark::new(&self.pending)),
        };
        match self.sender.try_send(request, priority) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InferError::QueueFull(self.model.clone())),
            Err(TrySendError::Disconnected(_)) => return Err(InferError::ShuttingDown),
        }
        record_queue_depth(
            &self.metrics,
            [self.model.as_str(), self.version.as_str()],
            |lane| self.sender.waiting(lane),
        );
        let given_up = async {
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => InferError::Timeout,
                () = withdraw::withdrawn() => InferError::Cancelled,
            }
        };
        let answered = tokio::select! {
            biased;
            answered = &mut response => answered,
            // Past the deadline, or withdrawn: given up unless a session has taken it, then
            // its result.
            why = given_up => {
                match claim.compare_exchange(WAITING, GIVEN_UP, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Err(why),
                    Err(_) => response.await,
                }
            }
        };
        // No answer: the workers stopped, or the batch's worker caught a panic (a bug of ours,
        // logged; not the client's fault, and not a stop).
        answered.unwrap_or_else(|_| {
            Err(if self.stop.load(Ordering::Acquire) {
                InferError::ShuttingDown
            } else {
                InferError::Inference(
                    "the batch holding this request failed inside linescan (the server log has \
                     the panic)"
                        .into(),
                )
            })
        })
    }

    /// From now on batches run as soon as a session is free, without waiting for company: the
    /// server is stopping, and the requests in flight should not sit out `max_queue_delay_us`.
    pub fn begin_drain(&self) {
        self.drain.store(true, Ordering::Release);
    }

    /// Stops taking requests, lets the workers finish everything already queued, and joins them.
    pub fn shutdown(&self) {
        self.begin_drain();
        self.stop.store(true, Ordering::Release);
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    config: Arc<ModelConfig>,
    labels: [String; 2],
    receiver: LaneReceivers<QueuedRequest>,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    /// Workers of this model waiting for a first request.
    idle: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    stats: Arc<ModelStats>,
    session: ModelSession,
    /// Requests taken from the queue that did not fit the batch being formed.
    pending: VecDeque<QueuedRequest>,
    /// Batch assembly buffers, one per input, reused across batches.
    scratch: Vec<AlignedBytes>,
    /// The same on the device, for inputs in device memory (made at the first such batch).
    gatherers: Vec<Box<dyn DeviceGather>>,
}

impl Worker {
    fn run(mut self) {
        while let Some(first) = self.next_request() {
            let (batch, closed_by) = self.form_batch(first);
            // A panic fails its batch (the replies are dropped unanswered: see submit_and_wait),
            // not the model: the worker and its session go on with the next one.
            let executed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.execute(batch, closed_by)
            }));
            if executed.is_err() {
                tracing::error!(
                    model = %self.config.name,
                    "a batch failed with a panic (above); its requests were answered 500"
                );
            }
        }
    }

    /// The next request whose caller still waits, or None once stopped with nothing left to
    /// drain.
    fn next_request(&mut self) -> Option<QueuedRequest> {
        loop {
            let request = match self.next_pending() {
                Some(request) => request,
                None => match self.wait_idle() {
                    Ok(request) => request,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.stop.load(Ordering::Acquire) && self.receiver.is_empty() {
                            return None;
                        }
                        // A caller's depth reading can land after a worker's newer one; an idle
                        // model would then show a stale queue until the next request.
                        record_queue_depth(&self.metrics, self.label_refs(), |lane| {
                            self.receiver.waiting(lane)
                        });
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return None,
                },
            };
            if self.admit(&request) {
                return Some(request);
            }
        }
    }

    /// The request set aside by the last batch, unless it is bulk work and a live request
    /// waits: that one goes first.
    fn next_pending(&mut self) -> Option<QueuedRequest> {
        let bulk_first = self
            .pending
            .front()
            .is_some_and(|request| request.priority == Priority::Bulk);
        if bulk_first && let Some(live) = self.receiver.try_live() {
            return Some(live);
        }
        self.pending.pop_front()
    }

    /// Waits for a request while counted as idle, so forming batches know a session is free.
    fn wait_idle(&self) -> Result<QueuedRequest, RecvTimeoutError> {
        self.idle.fetch_add(1, Ordering::AcqRel);
        let received = self.receiver.recv_deadline(Instant::now() + IDLE_POLL);
        self.idle.fetch_sub(1, Ordering::AcqRel);
        received
    }

    /// A batch led by `first`, and what closed it.
    fn form_batch(&mut self, first: QueuedRequest) -> (Vec<QueuedRequest>, BatchClose) {
        let max_rows = self.config.max_batch_size;
        let mut rows = first.rows;
        let mut batch = vec![first];
        let knobs = &self.config.dynamic_batching;
        let close_at = Instant::now() + Duration::from_micros(knobs.max_queue_delay_us);
        let gap =
            (knobs.max_arrival_gap_us > 0).then(|| Duration::from_micros(knobs.max_arrival_gap_us));
        let closed_by = loop {
            if max_rows == 0 {
                break BatchClose::Unbatched;
            }
            if rows >= max_rows {
                break BatchClose::Full;
            }
            // Waiting for company only pays when every session is busy: with one idle, the
            // next request runs there at once instead of queueing behind this batch. Requests
            // this worker set aside can run nowhere else, so they join first.
            if self.idle.load(Ordering::Acquire) > 0 && self.pending.is_empty() {
                break BatchClose::Idle;
            }
            let next = match self.next_pending() {
                Some(request) => request,
                None => {
                    let now = Instant::now();
                    let (wait_until, on_timeout) = match gap {
                        Some(gap) if now + gap < close_at => (now + gap, BatchClose::Gap),
                        _ => (close_at, BatchClose::Delay),
                    };
                    match self.recv_unless_draining(wait_until) {
                        Some(request) => request,
                        None if self.drain.load(Ordering::Acquire) => break BatchClose::Shutdown,
                        None => break on_timeout,
                    }
                }
            };
            if !self.admit(&next) {
                continue;
            }
            let closed_by = match company(&batch[0], rows, &next, max_rows) {
                Company::Join => {
                    rows += next.rows;
                    batch.push(next);
                    continue;
                }
                Company::Lead => {
                    // Nothing has run yet: the bulk requests step back into pending, in
                    // their order, and the live one leads the batch. This session runs them
                    // next (they are no longer in the lanes for the others, nor in the gauge).
                    for request in batch.drain(..).rev() {
                        self.pending.push_front(request);
                    }
                    rows = next.rows;
                    batch.push(next);
                    continue;
                }
                Company::Close(reason) => reason,
            };
            // Keeps arrival order: it leads the next batch.
            self.pending.push_front(next);
            break closed_by;
        };
        (batch, closed_by)
    }

    /// The next request arriving before `until`; None at `until`. Once the server begins to
    /// stop (seen within IDLE_POLL), only a request already queued: the backlog still forms
    /// full batches, but nothing waits for company.
    fn recv_unless_draining(&self, until: Instant) -> Option<QueuedRequest> {
        loop {
            if self.drain.load(Ordering::Acquire) {
                return self.receiver.try_recv().ok();
            }
            let slice_end = until.min(Instant::now() + IDLE_POLL);
            match self.receiver.recv_deadline(slice_end) {
                Ok(request) => return Some(request),
                // The sender lives as long as the batcher, which joins its workers before
                // dropping it: only the timeout happens here.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    if Instant::now() >= until {
                        return None;
                    }
                }
            }
        }
    }

    /// Drops requests nobody waits for any more; answers those past their deadline.
    fn admit(&self, request: &QueuedRequest) -> bool {
        record_queue_depth(&self.metrics, self.label_refs(), |lane| {
            self.receiver.waiting(lane)
        });
        !self.caller_left(request)
    }

    /// Whether nobody waits for the request any more: a caller that gave it up (its deadline
    /// answered 504, or withdrawn: counted by the caller), a caller dropped without a word (a
    /// connection reset: counted here as cancelled), or a cancelled job (no failure).
    fn caller_left(&self, request: &QueuedRequest) -> bool {
        if !request.reply.is_closed() {
            return false;
        }
        let counted = request.claim.load(Ordering::Acquire) == GIVEN_UP;
        if !counted && request.priority == Priority::Live && Instant::now() < request.deadline {
            let [model, version] = self.label_refs();
            self.metrics
                .failure(model, version, FailureReason::Cancelled);
        }
        true
    }

    fn label_refs(&self) -> [&str; 2] {
        [self.labels[0].as_str(), self.labels[1].as_str()]
    }

    fn execute(&mut self, mut batch: Vec<QueuedRequest>, closed_by: BatchClose) {
        let started = Instant::now();
        let labels = self.label_refs();
        // Expired requests are answered here, not run; the others are taken, unless their
        // caller gave up on them at this very moment.
        batch.retain_mut(|request| {
            // Callers may have left while the batch formed (a cancelled job's batches).
            if self.caller_left(request) {
                return false;
            }
            if started >= request.deadline {
                let (closed_reply, _) = oneshot::channel();
                let reply = std::mem::replace(&mut request.reply, closed_reply);
                let _ = reply.send(Err(InferError::Timeout));
                return false;
            }
            request
                .claim
                .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if batch.is_empty() {
            return;
        }
        for request in &mut batch {
            request.pending = None;
        }
        // Counted for batches that run only, so the reasons add up to the executions.
        self.metrics
            .batch_close
            .with_label_values(&[labels[0], labels[1], closed_by.label()])
            .inc();
        for request in &batch {
            self.metrics
                .queue_duration
                .with_label_values(&labels)
                .observe((started - request.enqueued).as_secs_f64());
        }
        let rows: usize = batch.iter().map(|r| r.rows).sum();
        let run_rows = self.session.run_rows(rows);
        let result = self.run_batch(&batch, run_rows);
        let compute_time = started.elapsed();
        let labels = self.label_refs();
        self.metrics
            .compute_duration
            .with_label_values(&labels)
            .observe(compute_time.as_secs_f64());
        self.metrics
            .batch_size
            .with_label_values(&labels)
            .observe(rows as f64);
        match result {
            Ok((outputs, inputs_ready)) => {
                // Successful executions only, as in Triton and in /stats.
                self.metrics
                    .execution_count
                    .with_label_values(&labels)
                    .inc();
                self.metrics
                    .inference_count
                    .with_label_values(&labels)
                    .inc_by(rows as u64);
                let ran = started + compute_time;
                // Per request answered with outputs: arrival to answer; and their queue waits.
                let mut succeeded = Vec::with_capacity(batch.len());
                let mut queued = Duration::ZERO;
                let mut offset = 0;
                let mut answers = Vec::with_capacity(batch.len());
                for request in batch {
                    let own = split_rows(&outputs, offset, request.rows, run_rows, &self.config);
                    offset += request.rows;
                    if own.is_ok() {
                        succeeded.push(request.enqueued.elapsed());
                        queued += started - request.enqueued;
                    }
                    let answer = own.map(|outputs| InferResponse {
                        outputs,
                        queue_time: started - request.enqueued,
                        compute_time,
                        batch_rows: rows,
                    });
                    answers.push((request.reply, answer));
                }
                let times = BatchTimes {
                    input: inputs_ready - started,
                    infer: ran - inputs_ready,
                    output: ran.elapsed(),
                };
                // Counted before anyone is answered, so a caller that reads the statistics
                // right after its answer finds its request in them.
                self.stats.batch(&succeeded, rows, queued, times);
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                tracing::error!(model = %self.labels[0], %error, "batch failed");
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(InferError::Inference(error.clone())));
                }
            }
        }
    }

    /// The batch's outputs, and when its inputs were ready for ONNX Runtime. `rows` is what the
    /// graph runs: the requests' rows, then zero rows up to it.
    fn run_batch(
        &mut self,
        batch: &[QueuedRequest],
        rows: usize,
    ) -> Result<(Vec<Tensor>, Instant), String> {
        let shapes: Vec<Vec<usize>> = (0..self.config.inputs.len())
            .map(|index| {
                let mut shape = batch[0].inputs.shape(index).to_vec();
                if self.config.batching() {
                    shape[0] = rows;
                }
                shape
            })
            .collect();
        match &batch[0].inputs {
            RequestInputs::Host(_) => self.run_host_batch(batch, &shapes),
            RequestInputs::Device(first) => match first.first() {
                Some(input) => {
                    let device = input.data.device_id();
                    self.run_device_batch(batch, &shapes, device)
                }
                None => Err("a request in device memory without inputs".to_string()),
            },
        }
    }

    fn run_host_batch(
        &mut self,
        batch: &[QueuedRequest],
        shapes: &[Vec<usize>],
    ) -> Result<(Vec<Tensor>, Instant), String> {
        self.scratch
            .resize_with(self.config.inputs.len(), AlignedBytes::default);
        let mut inputs: Vec<BatchInput<'_>> = Vec::with_capacity(shapes.len());
        let specs = self.config.inputs.iter().zip(shapes);
        for (index, ((spec, shape), scratch)) in specs.zip(self.scratch.iter_mut()).enumerate() {
            let parts = batch
                .iter()
                .map(|request| request.inputs.host_data(index))
                .collect::<Result<Vec<_>, _>>()?;
            let run_bytes = Tensor::byte_len(spec.datatype, shape);
            inputs.push(BatchInput {
                dtype: spec.datatype,
                shape,
                data: assemble_input(&parts, run_bytes, spec.datatype.size(), scratch),
            });
        }
        let ready = Instant::now();
        let outputs = self.session.run(&inputs).map_err(|e| e.to_string())?;
        Ok((outputs, ready))
    }

    /// Inputs in device memory: one request's are read where they are, several requests' are
    /// joined on the device first; nothing crosses to the host but the outputs.
    fn run_device_batch(
        &mut self,
        batch: &[QueuedRequest],
        shapes: &[Vec<usize>],
        device: i32,
    ) -> Result<(Vec<Tensor>, Instant), String> {
        let mut parts: Vec<Vec<&DeviceBytes>> = vec![Vec::with_capacity(batch.len()); shapes.len()];
        for request in batch {
            let RequestInputs::Device(tensors) = &request.inputs else {
                return Err("a batch mixed host and device inputs".to_string());
            };
            for (index, tensor) in tensors.iter().enumerate() {
                parts[index].push(&tensor.data);
            }
        }
        let run_bytes: Vec<usize> = self
            .config
            .inputs
            .iter()
            .zip(shapes)
            .map(|(spec, shape)| Tensor::byte_len(spec.datatype, shape))
            .collect();
        let in_place = |parts: &[&DeviceBytes], run_bytes: usize| match parts {
            [only] => only.address().is_multiple_of(DEVICE_ALIGNMENT) && only.len() == run_bytes,
            _ => false,
        };
        if self.gatherers.is_empty()
            && !parts
                .iter()
                .zip(&run_bytes)
                .all(|(p, len)| in_place(p, *len))
        {
            self.gatherers = parts
                .iter()
                .map(|p| p[0].gatherer())
                .collect::<Result<_, _>>()?;
        }
        let mut addresses = Vec::with_capacity(parts.len());
        for (index, (parts, len)) in parts.iter().zip(&run_bytes).enumerate() {
            addresses.push(if in_place(parts, *len) {
                parts[0].address()
            } else {
                self.gatherers[index].gather(parts, *len)?
            });
        }
        let inputs: Vec<DeviceBatchInput<'_>> = self
            .config
            .inputs
            .iter()
            .zip(shapes)
            .zip(addresses)
            .map(|((spec, shape), address)| DeviceBatchInput {
                dtype: spec.datatype,
                shape,
                address,
            })
            .collect();
        let ready = Instant::now();
        // SAFETY: each address is a finished device buffer of that shape (the DeviceMemory
        // contract, or the gather that just completed), kept alive by `batch` and the
        // gatherers until the run returns.
        let outputs =
            unsafe { self.session.run_on_device(device, &inputs) }.map_err(|e| e.to_string())?;
        Ok((outputs, ready))
    }
}

/// One host input of a batch of `run_bytes`: a lone request's own buffer when it is that long
/// and aligned for its type (crops made in process, say), else the requests' bytes gathered
/// into `scratch`, then zero rows up to `run_bytes` (a session that pads its batches).
fn assemble_input<'a>(
    parts: &[&'a [u8]],
    run_bytes: usize,
    align: usize,
    scratch: &'a mut AlignedBytes,
) -> &'a [u8] {
    if let [only] = parts
        && only.len() == run_bytes
        && (only.as_ptr() as usize).is_multiple_of(align)
    {
        return only;
    }
    scratch.clear();
    for part in parts {
        scratch.extend_from_slice(part);
    }
    scratch.zero_extend(run_bytes);
    scratch.as_bytes()
}

/// Device addresses ONNX Runtime is given start on this boundary (what CUDA allocations give,
/// and what TensorRT expects of bound tensors); others are copied to an aligned batch buffer.
const DEVICE_ALIGNMENT: u64 = 256;

/// Why `inputs` in device memory cannot go to sessions on CUDA device `device` (None: they run
/// on the CPU), if they cannot. The sessions read the addresses blindly, so every input is
/// checked against the config here: device, count, type, shape and byte length.
fn device_input_problem(
    config: &ModelConfig,
    device: Option<i32>,
    inputs: &[DeviceTensor],
    rows: usize,
) -> Option<String> {
    if let Some(elsewhere) = inputs.iter().find(|t| Some(t.data.device_id()) != device) {
        return Some(format!(
            "model {} cannot read inputs in memory of CUDA device {}: its sessions run on {}",
            config.name,
            elsewhere.data.device_id(),
            device.map_or("the CPU".to_string(), |d| format!("CUDA device {d}")),
        ));
    }
    if inputs.is_empty() || inputs.len() != config.inputs.len() {
        return Some(format!(
            "{} inputs in device memory for the {} of model {}",
            inputs.len(),
            config.inputs.len(),
            config.name
        ));
    }
    config.inputs.iter().zip(inputs).find_map(|(spec, tensor)| {
        let declared = spec.full_shape(config.batching());
        let shape_fits = tensor.shape.len() == declared.len()
            && tensor
                .shape
                .iter()
                .zip(&declared)
                .enumerate()
                .all(|(i, (d, want))| {
                    if config.batching() && i == 0 {
                        *d == rows
                    } else {
                        *want < 0 || *d as i64 == *want
                    }
                });
        let problem = if spec.datatype != tensor.dtype {
            format!("is {}, the model takes {}", tensor.dtype, spec.datatype)
        } else if !shape_fits {
            format!(
                "has shape {:?}, the model takes {declared:?} with {rows} rows",
                tensor.shape
            )
        } else if tensor.data.len() != Tensor::byte_len(tensor.dtype, &tensor.shape) {
            format!(
                "has {} bytes of device memory for shape {:?}",
                tensor.data.len(),
                tensor.shape
            )
        } else if !tensor
            .data
            .address()
            .is_multiple_of(tensor.dtype.size() as u64)
        {
            format!(
                "starts at {:#x}, not aligned for {}",
                tensor.data.address(),
                tensor.dtype
            )
        } else {
            return None;
        };
        Some(format!("input {} in device memory {problem}", spec.name))
    })
}

/// The rows `[offset, offset + rows)` of every output, sharing the batch's buffers.
fn split_rows(
    outputs: &[Tensor],
    offset: usize,
    rows: usize,
    total_rows: usize,
    config: &ModelConfig,
) -> Result<Vec<Tensor>, InferError> {
    if !config.batching() {
        return Ok(outputs.to_vec());
    }
    outputs
        .iter()
        .map(|output| {
            if output.shape.first() != Some(&total_rows) {
                return Err(InferError::Inference(format!(
                    "output shape {:?} does not start with the batch size {total_rows}",
                    output.shape
                )));
            }
            let row_bytes = output.data.len() / total_rows;
            let mut shape = output.shape.clone();
            shape[0] = rows;
            Ok(Tensor {
                dtype: output.dtype,
                shape,
                data: output
                    .data
                    .slice(offset * row_bytes..(offset + rows) * row_bytes),
            })
        })
        .collect()
}

/// Sets the queue-depth gauge of each lane, so a job's backlog and live requests read apart.
fn record_queue_depth(
    metrics: &Metrics,
    [model, version]: [&str; 2],
    waiting: impl Fn(Priority) -> usize,
) {
    for lane in Priority::ALL {
        metrics
            .queue_depth
            .with_label_values(&[model, version, lane.label()])
            .set(waiting(lane) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_batch_size: usize) -> ModelConfig {
        toml::from_str(&format!(
            "name = \"m\"\nmax_batch_size = {max_batch_size}\n[[input]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [2]\n[[output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [2]\n"
        ))
        .unwrap()
    }

    #[test]
    fn split_rows_hands_each_request_its_rows() {
        let output = Tensor::from_f32(vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let config = config(8);
        let first = split_rows(std::slice::from_ref(&output), 0, 1, 3, &config).unwrap();
        let rest = split_rows(std::slice::from_ref(&output), 1, 2, 3, &config).unwrap();
        assert_eq!(first[0].shape, vec![1, 2]);
        assert_eq!(first[0].to_f32_vec().unwrap(), vec![1.0, 2.0]);
        assert_eq!(rest[0].shape, vec![2, 2]);
        assert_eq!(rest[0].to_f32_vec().unwrap(), vec![3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn batch_inputs_are_handed_over_gathered_or_padded() {
        let mut scratch = AlignedBytes::default();
        let words = [1u32, 2, 3, 4];
        let own: &[u8] = bytemuck::cast_slice(&words);
        // A lone aligned request of the run's length: its own buffer, not a copy.
        let handed = assemble_input(&[own], 16, 4, &mut scratch);
        assert_eq!(handed.as_ptr(), own.as_ptr());
        // Two requests: joined in order.
        let joined = assemble_input(&[&own[..8], &own[8..]], 16, 4, &mut scratch).to_vec();
        assert_eq!(joined, own);
        // A session that pads: the lone request's rows, then zeros up to the run's length.
        let padded = assemble_input(&[&own[..8]], 16, 4, &mut scratch);
        assert_eq!(padded, [&own[..8], &[0u8; 8][..]].concat());
    }

    #[test]
    fn split_rows_leaves_the_padding_rows_out() {
        // Two requests of 1 and 2 rows run as a batch padded to 4 rows.
        let output = Tensor::from_f32(vec![4, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 0.5]);
        let config = config(4);
        let first = split_rows(std::slice::from_ref(&output), 0, 1, 4, &config).unwrap();
        let second = split_rows(std::slice::from_ref(&output), 1, 2, 4, &config).unwrap();
        assert_eq!(first[0].to_f32_vec().unwrap(), vec![1.0, 2.0]);
        assert_eq!(second[0].shape, vec![2, 2]);
        assert_eq!(second[0].to_f32_vec().unwrap(), vec![3.0, 4.0, 5.0, 6.0]);
    }

    fn on_device(device: i32, address: u64, shape: Vec<usize>, len: usize) -> DeviceTensor {
        let memory = crate::runtime::device::AddressesOnly {
            device,
            address,
            len,
        };
        DeviceTensor {
            dtype: DataType::Fp32,
            shape,
            data: DeviceBytes::new(Arc::new(memory)),
        }
    }

    #[test]
    fn device_inputs_are_checked_before_any_session_reads_them() {
        let config = config(8);
        let good = || on_device(0, 0x1000, vec![3, 2], 24);
        assert_eq!(device_input_problem(&config, Some(0), &[good()], 3), None);
        let problem = |inputs: &[DeviceTensor], device| {
            device_input_problem(&config, device, inputs, 3).expect("refused")
        };
        assert!(problem(&[good()], None).contains("run on the CPU"));
        assert!(problem(&[good()], Some(1)).contains("run on CUDA device 1"));
        assert!(problem(&[], Some(0)).contains("0 inputs"));
        assert!(problem(&[good(), good()], Some(0)).contains("2 inputs"));
        let mut wrong_type = good();
        wrong_type.dtype = DataType::Int32;
        assert!(problem(&[wrong_type], Some(0)).contains("is INT32, the model takes FP32"));
        assert!(problem(&[on_device(0, 0x1000, vec![2, 2], 16)], Some(0)).contains("3 rows"));
        assert!(problem(&[on_device(0, 0x1000, vec![3, 4], 48)], Some(0)).contains("[3, 4]"));
        assert!(problem(&[on_device(0, 0x1000, vec![3, 2], 20)], Some(0)).contains("20 bytes"));
        assert!(problem(&[on_device(0, 0x1002, vec![3, 2], 24)], Some(0)).contains("aligned"));
    }

    fn queued(rows: usize, width: usize, priority: Priority) -> QueuedRequest {
        let values = vec![0.0; rows * width];
        QueuedRequest {
            inputs: RequestInputs::Host(vec![Tensor::from_f32(vec![rows, width], &values)]),
            rows,
            enqueued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(1),
            priority,
            reply: oneshot::channel().0,
            claim: Arc::new(AtomicU8::new(WAITING)),
            pending: None,
        }
    }

    #[test]
    fn lanes_never_share_a_batch_and_a_live_request_leads_a_forming_bulk_one() {
        use Priority::{Bulk, Live};
        let decide = |first: &QueuedRequest, next: &QueuedRequest| match company(
            first, first.rows, next, 64,
        ) {
            Company::Join => "join",
            Company::Lead => "lead",
            Company::Close(reason) => reason.label(),
        };
        assert_eq!(decide(&queued(1, 2, Live), &queued(8, 2, Bulk)), "priority");
        assert_eq!(decide(&queued(8, 2, Bulk), &queued(1, 2, Live)), "lead");
        // Even where the live request would not fit or differs in shape: it runs first.
        assert_eq!(decide(&queued(60, 2, Bulk), &queued(8, 3, Live)), "lead");
        assert_eq!(decide(&queued(1, 2, Live), &queued(1, 2, Live)), "join");
        assert_eq!(decide(&queued(8, 2, Bulk), &queued(8, 2, Bulk)), "join");
        assert_eq!(decide(&queued(60, 2, Bulk), &queued(8, 2, Bulk)), "full");
        assert_eq!(decide(&queued(1, 2, Live), &queued(1, 3, Live)), "shape");
    }

    #[test]
    fn split_rows_rejects_outputs_without_batch_dimension() {
        let output = Tensor::from_f32(vec![2], &[1.0, 2.0]);
        assert!(split_rows(&[output], 0, 1, 3, &config(8)).is_err());
    }
}
