//! Dynamic batching for one model version.
//!
//! Requests go into a bounded crossbeam channel (lock-free array queue); a full queue is refused
//! at once so callers can answer 503 instead of piling up latency. Each worker thread owns one
//! session and forms batches: it takes the first waiting request, then keeps taking requests
//! until the batch holds `max_batch_size` rows, `max_queue_delay` has passed, (when set) no
//! request has arrived for `max_arrival_gap`, or another session of the model is idle (waiting
//! for company never pays while a session could run the next request at once). Requests whose
//! caller went away or whose deadline passed are dropped before inference.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::metrics::{FailureReason, Metrics};
use crate::runtime::model_config::ModelConfig;
use crate::runtime::session::{BatchInput, ModelSession};
use crate::tensor::{AlignedBytes, Tensor};

/// How often an idle worker looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What closed a forming batch: the `reason` label of `linescan_batch_close_total`.
#[derive(Debug, Clone, Copy)]
enum BatchClose {
    /// `max_batch_size` rows, or the next request would not fit.
    Full,
    /// The next request differs on a variable dimension.
    Shape,
    /// `max_queue_delay_us` passed.
    Delay,
    /// No request arrived for `max_arrival_gap_us`.
    Gap,
    /// Another session of the model was idle.
    Idle,
    /// The model does not batch (`max_batch_size = 0`).
    Unbatched,
    /// The queue was closed at shutdown.
    Stopped,
}

impl BatchClose {
    fn label(self) -> &'static str {
        match self {
            BatchClose::Full => "full",
            BatchClose::Shape => "shape",
            BatchClose::Delay => "delay",
            BatchClose::Gap => "gap",
            BatchClose::Idle => "idle",
            BatchClose::Unbatched => "unbatched",
            BatchClose::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    #[error("the queue of model {0} is full; retry later")]
    QueueFull(String),
    #[error("the request passed its deadline before it completed")]
    Timeout,
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

struct QueuedRequest {
    inputs: Vec<Tensor>,
    rows: usize,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<InferResponse, InferError>>,
}

impl QueuedRequest {
    /// Requests can share a batch when every input agrees on all but the batch dimension.
    fn batches_with(&self, other: &QueuedRequest) -> bool {
        self.inputs
            .iter()
            .zip(&other.inputs)
            .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

pub struct Batcher {
    model: String,
    version: String,
    config: Arc<ModelConfig>,
    sessions: usize,
    sender: Sender<QueuedRequest>,
    stop: Arc<AtomicBool>,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts one worker thread per session.
    pub fn start(
        config: Arc<ModelConfig>,
        version: u64,
        sessions: Vec<ModelSession>,
        metrics: Arc<Metrics>,
    ) -> Batcher {
        let (sender, receiver) = crossbeam_channel::bounded(config.dynamic_batching.max_queue_size);
        let stop = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicUsize::new(0));
        let version = version.to_string();
        let workers: Vec<JoinHandle<()>> = sessions
            .into_iter()
            .enumerate()
            .map(|(index, session)| {
                let worker = Worker {
                    config: config.clone(),
                    labels: [config.name.clone(), version.clone()],
                    receiver: receiver.clone(),
                    stop: stop.clone(),
                    idle: idle.clone(),
                    metrics: metrics.clone(),
                    session,
                    pending: VecDeque::new(),
                    scratch: Vec::new(),
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
            stop,
            workers: std::sync::Mutex::new(workers),
            metrics,
        }
    }

    /// Sessions (worker threads) taking batches from the queue.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn queue_depth(&self) -> usize {
        self.sender.len()
    }

    /// Queues the request and waits for its outputs or its deadline. `inputs` are in config
    /// order and already validated against the config; `rows` is their batch dimension.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Instant,
    ) -> Result<InferResponse, InferError> {
        let outcome = self.submit_and_wait(inputs, rows, deadline).await;
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
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Instant,
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
        let (reply, response) = oneshot::channel();
        let request = QueuedRequest {
            inputs,
            rows,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        match self.sender.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InferError::QueueFull(self.model.clone())),
            Err(TrySendError::Disconnected(_)) => return Err(InferError::ShuttingDown),
        }
        self.metrics
            .queue_depth
            .with_label_values(&[self.model.as_str(), self.version.as_str()])
            .set(self.sender.len() as i64);
        match tokio::time::timeout_at(deadline.into(), response).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(InferError::ShuttingDown),
            Err(_) => Err(InferError::Timeout),
        }
    }

    /// Stops taking requests, lets the workers finish everything already queued, and joins them.
    pub fn shutdown(&self) {
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
    receiver: Receiver<QueuedRequest>,
    stop: Arc<AtomicBool>,
    /// Workers of this model waiting for a first request.
    idle: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    session: ModelSession,
    /// Requests taken from the queue that did not fit the batch being formed.
    pending: VecDeque<QueuedRequest>,
    /// Batch assembly buffers, one per input, reused across batches.
    scratch: Vec<AlignedBytes>,
}

impl Worker {
    fn run(mut self) {
        while let Some(first) = self.next_request() {
            let batch = self.form_batch(first);
            self.execute(batch);
        }
    }

    /// The next live request, or None once stopped with nothing left to drain.
    fn next_request(&mut self) -> Option<QueuedRequest> {
        loop {
            let request = match self.pending.pop_front() {
                Some(request) => request,
                None => match self.wait_idle() {
                    Ok(request) => request,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.stop.load(Ordering::Acquire) && self.receiver.is_empty() {
                            return None;
                        }
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

    /// Waits for a request while counted as idle, so forming batches know a session is free.
    fn wait_idle(&self) -> Result<QueuedRequest, RecvTimeoutError> {
        self.idle.fetch_add(1, Ordering::AcqRel);
        let received = self.receiver.recv_timeout(IDLE_POLL);
        self.idle.fetch_sub(1, Ordering::AcqRel);
        received
    }

    fn form_batch(&mut self, first: QueuedRequest) -> Vec<QueuedRequest> {
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
            // next request runs there at once instead of queueing behind this batch.
            if self.idle.load(Ordering::Acquire) > 0 {
                break BatchClose::Idle;
            }
            let next = match self.pending.pop_front() {
                Some(request) => request,
                None => {
                    let now = Instant::now();
                    let (wait_until, on_timeout) = match gap {
                        Some(gap) if now + gap < close_at => (now + gap, BatchClose::Gap),
                        _ => (close_at, BatchClose::Delay),
                    };
                    match self.receiver.recv_deadline(wait_until) {
                        Ok(request) => request,
                        Err(RecvTimeoutError::Timeout) => break on_timeout,
                        Err(RecvTimeoutError::Disconnected) => break BatchClose::Stopped,
                    }
                }
            };
            if !self.admit(&next) {
                continue;
            }
            let closed_by = if rows + next.rows > max_rows {
                BatchClose::Full
            } else if !batch[0].batches_with(&next) {
                BatchClose::Shape
            } else {
                rows += next.rows;
                batch.push(next);
                continue;
            };
            // Keeps arrival order: it leads the next batch.
            self.pending.push_front(next);
            break closed_by;
        };
        let [model, version] = self.label_refs();
        self.metrics
            .batch_close
            .with_label_values(&[model, version, closed_by.label()])
            .inc();
        batch
    }

    /// Drops requests nobody waits for any more; answers those past their deadline.
    fn admit(&self, request: &QueuedRequest) -> bool {
        self.metrics
            .queue_depth
            .with_label_values(&self.label_refs())
            .set(self.receiver.len() as i64);
        if request.reply.is_closed() {
            // The caller went away (client disconnect, or its own deadline already answered 504).
            if Instant::now() < request.deadline {
                let [model, version] = self.label_refs();
                self.metrics
                    .failure(model, version, FailureReason::Cancelled);
            }
            return false;
        }
        true
    }

    fn label_refs(&self) -> [&str; 2] {
        [self.labels[0].as_str(), self.labels[1].as_str()]
    }

    fn execute(&mut self, mut batch: Vec<QueuedRequest>) {
        let started = Instant::now();
        let labels = self.label_refs();
        // Expired requests are answered here, not run.
        batch.retain_mut(|request| {
            if started >= request.deadline {
                let (closed_reply, _) = oneshot::channel();
                let reply = std::mem::replace(&mut request.reply, closed_reply);
                let _ = reply.send(Err(InferError::Timeout));
                return false;
            }
            true
        });
        if batch.is_empty() {
            return;
        }
        for request in &batch {
            self.metrics
                .queue_duration
                .with_label_values(&labels)
                .observe((started - request.enqueued).as_secs_f64());
        }
        let rows: usize = batch.iter().map(|r| r.rows).sum();
        let result = self.run_batch(&batch, rows);
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
        self.metrics
            .execution_count
            .with_label_values(&labels)
            .inc();
        self.metrics
            .inference_count
            .with_label_values(&labels)
            .inc_by(rows as u64);
        match result {
            Ok(outputs) => {
                let mut offset = 0;
                for request in batch {
                    let own = split_rows(&outputs, offset, request.rows, rows, &self.config);
                    offset += request.rows;
                    let _ = request.reply.send(own.map(|outputs| InferResponse {
                        outputs,
                        queue_time: started - request.enqueued,
                        compute_time,
                        batch_rows: rows,
                    }));
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

    fn run_batch(&mut self, batch: &[QueuedRequest], rows: usize) -> Result<Vec<Tensor>, String> {
        let input_count = self.config.inputs.len();
        self.scratch.resize_with(input_count, AlignedBytes::default);
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(input_count);
        // A batch of one request whose buffer is aligned for its type (crops made in process,
        // say) is handed over as it is; anything else is gathered into the scratch buffers.
        let mut direct: Vec<Option<&[u8]>> = Vec::with_capacity(input_count);
        for (index, spec) in self.config.inputs.iter().enumerate() {
            let first = &batch[0].inputs[index];
            let mut shape = first.shape.clone();
            if self.config.batching() {
                shape[0] = rows;
            }
            shapes.push(shape);
            let aligned = (first.data.as_ptr() as usize).is_multiple_of(spec.datatype.size());
            if batch.len() == 1 && aligned {
                direct.push(Some(&first.data));
                continue;
            }
            direct.push(None);
            let buffer = &mut self.scratch[index];
            buffer.clear();
            for request in batch {
                buffer.extend_from_slice(&request.inputs[index].data);
            }
        }
        let inputs: Vec<BatchInput<'_>> = self
            .config
            .inputs
            .iter()
            .zip(&shapes)
            .zip(direct.iter().zip(&self.scratch))
            .map(|((spec, shape), (direct, buffer))| BatchInput {
                dtype: spec.datatype,
                shape,
                data: direct.unwrap_or(buffer.as_bytes()),
            })
            .collect();
        self.session.run(&inputs).map_err(|e| e.to_string())
    }
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
    fn split_rows_rejects_outputs_without_batch_dimension() {
        let output = Tensor::from_f32(vec![2], &[1.0, 2.0]);
        assert!(split_rows(&[output], 0, 1, 3, &config(8)).is_err());
    }
}
