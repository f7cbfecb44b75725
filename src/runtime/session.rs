//! One ONNX Runtime session of one model version, owned by one batcher worker.

use std::borrow::Cow;

use bytes::Bytes;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::{TensorElementType, TensorRef, TensorRefMut, ValueType};

use crate::runtime::providers::{self, ProviderKind, ProviderPlan, ProviderSettings};
use crate::runtime::{ModelConfig, ModelVersionSpec, RuntimeError, library};
use crate::tensor::{DataType, Tensor};

/// A batched input handed to [`ModelSession::run`]: bytes of `shape` in the config's datatype.
pub struct BatchInput<'a> {
    pub dtype: DataType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// A batched input in CUDA device memory, for [`ModelSession::run_on_device`].
pub struct DeviceBatchInput<'a> {
    pub dtype: DataType,
    pub shape: &'a [usize],
    pub address: u64,
}

pub struct ModelSession {
    session: Session,
    spec: ModelVersionSpec,
    providers: Vec<ProviderKind>,
}

impl ModelSession {
    /// Creates the session with the planned providers and checks the graph against the config.
    pub fn load(
        spec: &ModelVersionSpec,
        plan: &ProviderPlan,
        threads: usize,
    ) -> Result<ModelSession, RuntimeError> {
        let environment = library::environment()?;
        let settings = ProviderSettings {
            config: &spec.config,
            engine_cache: spec.engine_cache_dir(),
            max_batch: spec.config.max_batch_size.max(1),
        };
        let attempts = plan.attempts();
        let last = attempts.len().saturating_sub(1);
        for (index, attempt) in attempts.into_iter().enumerate() {
            let built = Self::build(spec, &environment, &attempt, &settings, threads);
            match (built, plan) {
                (Ok(session), _) => {
                    let session = ModelSession {
                        session,
                        spec: spec.clone(),
                        providers: attempt,
                    };
                    session.check_signature()?;
                    return Ok(session);
                }
                (Err(error), ProviderPlan::Auto) if index < last => {
                    tracing::warn!(model = %spec.config.name, providers = ?attempt, %error,
                        "provider unavailable, trying the next");
                }
                // The last one (CPU) failing is the model's problem, not a provider's.
                (Err(error), _) => return Err(error),
            }
        }
        // Only when there was nothing to try: the last attempt returns either way.
        Err(spec.error("no execution provider could be loaded"))
    }

    fn build(
        spec: &ModelVersionSpec,
        environment: &ort::environment::Environment,
        providers: &[ProviderKind],
        settings: &ProviderSettings<'_>,
        threads: usize,
    ) -> Result<Session, RuntimeError> {
        let mut dispatches = Vec::new();
        for kind in providers {
            dispatches.extend(providers::dispatch(*kind, settings)?);
        }
        let ort_error = |e: ort::Error| spec.error(e.to_string());
        let builder = Session::builder(environment)
            .map_err(ort_error)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| spec.error(e.to_string()))?
            .with_intra_threads(threads)
            .map_err(|e| spec.error(e.to_string()))?
            // Spinning threads would burn the cores the HTTP side and other models need.
            .with_intra_op_spinning(false)
            .map_err(|e| spec.error(e.to_string()))?
            .with_execution_providers(dispatches)
            .map_err(|e| RuntimeError::Provider {
                provider: ProviderKind::label(providers),
                problem: e.to_string(),
            })?;
        let mut builder = builder;
        builder
            .commit_from_file(&spec.model_path)
            .map_err(|e| spec.error(format!("{}: {e}", spec.model_path.display())))
    }

    pub fn providers(&self) -> &[ProviderKind] {
        &self.providers
    }

    /// The rows every batch is padded to, when this session pads (`gpu_pad_to_max_batch` on a
    /// CUDA or TensorRT session of a batching model).
    pub fn padded_batch(&self) -> Option<usize> {
        padded_rows(&self.spec.config, self.on_gpu())
    }

    /// The rows the graph runs for a batch of `rows`: more where the session pads batches.
    pub fn run_rows(&self, rows: usize) -> usize {
        self.padded_batch().map_or(rows, |padded| padded.max(rows))
    }

    /// Whether the session runs on a CUDA device (the CUDA or TensorRT provider loaded).
    pub fn on_gpu(&self) -> bool {
        matches!(
            self.providers.first(),
            Some(ProviderKind::Cuda | ProviderKind::TensorRt)
        )
    }

    /// Every configured tensor must exist in the graph with the same type and a compatible shape,
    /// and the graph must not need inputs the config does not declare.
    fn check_signature(&self) -> Result<(), RuntimeError> {
        let config = &self.spec.config;
        let batching = config.batching();
        // Named by both files: either may be the one to fix.
        let mismatch = |problem: String| {
            self.spec.error(format!(
                "{} does not match {}: {problem}",
                self.spec.model_path.display(),
                self.spec.model_dir.join("config.toml").display()
            ))
        };
        for graph_input in self.session.inputs() {
            if !config.inputs.iter().any(|i| i.name == graph_input.name()) {
                return Err(mismatch(format!(
                    "the graph needs input \"{}\" that config.toml does not declare",
                    graph_input.name()
                )));
            }
        }
        let graph_tensors = self
            .session
            .inputs()
            .iter()
            .chain(self.session.outputs())
            .map(|o| (o.name().to_string(), o.dtype().clone()))
            .collect::<Vec<_>>();
        for spec in config.inputs.iter().chain(&config.outputs) {
            let Some((_, value_type)) = graph_tensors.iter().find(|(n, _)| *n == spec.name) else {
                return Err(mismatch(format!(
                    "config.toml declares \"{}\" but the graph has no such input or output",
                    spec.name
                )));
            };
            let ValueType::Tensor { ty, shape, .. } = value_type else {
                return Err(mismatch(format!("\"{}\" is not a tensor", spec.name)));
            };
            if element_type(spec.datatype) != *ty {
                // The graph's type by the config's names where it has one.
                let graph_type = DataType::ALL
                    .iter()
                    .find(|d| element_type(**d) == *ty)
                    .map_or_else(|| format!("{ty:?}"), |d| d.name().to_string());
                return Err(mismatch(format!(
                    "\"{}\" is {} in config.toml but {graph_type} in the graph",
                    spec.name, spec.datatype
                )));
            }
            // A size the graph fixes must be declared as that size (a -1 there would be fed
            // batches of another size at warm-up).
            let declared = spec.full_shape(batching);
            let compatible = declared.len() == shape.len()
                && declared
                    .iter()
                    .zip(shape.iter())
                    .all(|(d, g)| *g < 0 || *d == *g);
            if !compatible {
                return Err(mismatch(format!(
                    "\"{}\" has shape {:?} in the graph, config.toml declares {:?}{}",
                    spec.name,
                    shape.iter().collect::<Vec<_>>(),
                    declared,
                    if batching {
                        " (batch dimension first, -1)"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    }

    /// Runs the batch sizes of `warmup_batch_sizes` once with zeros (every size up to 64, powers
    /// of two and the maximum above; only the maximum when batches are padded to it), so
    /// allocations, kernels and TensorRT engines are ready before the first request.
    pub fn warm_up(&mut self) -> Result<(), RuntimeError> {
        let config = self.spec.config.clone();
        let sizes = match self.padded_batch() {
            Some(rows) => vec![rows],
            None => warmup_batch_sizes(config.max_batch_size),
        };
        for batch in sizes {
            let shapes: Vec<Vec<usize>> = config
                .inputs
                .iter()
                .map(|input| input.concrete_shape(config.batching(), batch))
                .collect();
            let buffers: Vec<Vec<u64>> = config
                .inputs
                .iter()
                .zip(&shapes)
                .map(|(input, shape)| {
                    vec![0u64; Tensor::byte_len(input.datatype, shape).div_ceil(8)]
                })
                .collect();
            let inputs: Vec<BatchInput<'_>> = config
                .inputs
                .iter()
                .zip(&shapes)
                .zip(&buffers)
                .map(|((input, shape), buffer)| BatchInput {
                    dtype: input.datatype,
                    shape,
                    data: &bytemuck::cast_slice(buffer)[..Tensor::byte_len(input.datatype, shape)],
                })
                .collect();
            self.run(&inputs).map_err(|e| {
                self.spec
                    .error(format!("warm-up at batch size {batch} failed: {e}"))
            })?;
        }
        Ok(())
    }

    /// Runs one batch; returns the configured outputs in config order.
    pub fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<Tensor>, RuntimeError> {
        let config = &self.spec.config;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        let mut bools: Vec<Vec<bool>> = Vec::new();
        for input in inputs.iter().filter(|i| i.dtype == DataType::Bool) {
            bools.push(input.data.iter().map(|b| *b != 0).collect());
        }
        let mut bools = bools.iter();
        for (spec, input) in config.inputs.iter().zip(inputs) {
            let value = match input.dtype {
                DataType::Bool => tensor_ref(input.shape, bools.next().expect("bool buffer"))?,
                DataType::Uint8 => tensor_ref(input.shape, input.data)?,
                DataType::Uint16 => tensor_ref::<u16>(input.shape, cast(input.data)?)?,
                DataType::Uint32 => tensor_ref::<u32>(input.shape, cast(input.data)?)?,
                DataType::Uint64 => tensor_ref::<u64>(input.shape, cast(input.data)?)?,
                DataType::Int8 => tensor_ref::<i8>(input.shape, cast(input.data)?)?,
                DataType::Int16 => tensor_ref::<i16>(input.shape, cast(input.data)?)?,
                DataType::Int32 => tensor_ref::<i32>(input.shape, cast(input.data)?)?,
                DataType::Int64 => tensor_ref::<i64>(input.shape, cast(input.data)?)?,
                DataType::Fp16 => tensor_ref::<half::f16>(input.shape, cast(input.data)?)?,
                DataType::Bf16 => tensor_ref::<half::bf16>(input.shape, cast(input.data)?)?,
                DataType::Fp32 => tensor_ref::<f32>(input.shape, cast(input.data)?)?,
                DataType::Fp64 => tensor_ref::<f64>(input.shape, cast(input.data)?)?,
            };
            values.push((Cow::Borrowed(spec.name.as_str()), value));
        }
        Self::run_values(&mut self.session, &self.spec.config, values)
    }

    /// Runs one batch whose inputs are in CUDA device memory, read in place by the session's
    /// CUDA or TensorRT provider; outputs come back to the host, in config order.
    ///
    /// # Safety
    /// Every input's address must hold its shape's bytes on device `device_id`, finished (no
    /// write pending) and alive until this returns.
    pub unsafe fn run_on_device(
        &mut self,
        device_id: i32,
        inputs: &[DeviceBatchInput<'_>],
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let memory = MemoryInfo::new(
            AllocationDevice::CUDA,
            device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| RuntimeError::Inference(e.to_string()))?;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (spec, input) in self.spec.config.inputs.iter().zip(inputs) {
            let (memory, shape) = (memory.clone(), input.shape);
            // SAFETY: the caller's contract.
            let value = unsafe {
                match input.dtype {
                    DataType::Bool => device_ref::<bool>(memory, input.address, shape),
                    DataType::Uint8 => device_ref::<u8>(memory, input.address, shape),
                    DataType::Uint16 => device_ref::<u16>(memory, input.address, shape),
                    DataType::Uint32 => device_ref::<u32>(memory, input.address, shape),
                    DataType::Uint64 => device_ref::<u64>(memory, input.address, shape),
                    DataType::Int8 => device_ref::<i8>(memory, input.address, shape),
                    DataType::Int16 => device_ref::<i16>(memory, input.address, shape),
                    DataType::Int32 => device_ref::<i32>(memory, input.address, shape),
                    DataType::Int64 => device_ref::<i64>(memory, input.address, shape),
                    DataType::Fp16 => device_ref::<half::f16>(memory, input.address, shape),
                    DataType::Bf16 => device_ref::<half::bf16>(memory, input.address, shape),
                    DataType::Fp32 => device_ref::<f32>(memory, input.address, shape),
                    DataType::Fp64 => device_ref::<f64>(memory, input.address, shape),
                }
            }?;
            values.push((Cow::Borrowed(spec.name.as_str()), value));
        }
        Self::run_values(&mut self.session, &self.spec.config, values)
    }

    /// Runs the graph on named inputs (wherever they live; ONNX Runtime returns outputs that
    /// were not bound elsewhere on the host) and copies the configured outputs out.
    fn run_values(
        session: &mut Session,
        config: &ModelConfig,
        values: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let outputs = session
            .run(values)
            .map_err(|e| RuntimeError::Inference(e.to_string()))?;
        config
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| {
                    RuntimeError::Inference(format!("the graph produced no \"{}\"", spec.name))
                })?;
                let extract_error = |e: ort::Error| RuntimeError::Inference(e.to_string());
                let (shape, data) = match spec.datatype {
                    DataType::Bool => {
                        let (shape, v) =
                            value.try_extract_tensor::<bool>().map_err(extract_error)?;
                        (
                            shape.clone(),
                            Bytes::from(v.iter().map(|b| *b as u8).collect::<Vec<u8>>()),
                        )
                    }
                    DataType::Uint8 => owned::<u8>(value)?,
                    DataType::Uint16 => owned::<u16>(value)?,
                    DataType::Uint32 => owned::<u32>(value)?,
                    DataType::Uint64 => owned::<u64>(value)?,
                    DataType::Int8 => owned::<i8>(value)?,
                    DataType::Int16 => owned::<i16>(value)?,
                    DataType::Int32 => owned::<i32>(value)?,
                    DataType::Int64 => owned::<i64>(value)?,
                    DataType::Fp16 => owned::<half::f16>(value)?,
                    DataType::Bf16 => owned::<half::bf16>(value)?,
                    DataType::Fp32 => owned::<f32>(value)?,
                    DataType::Fp64 => owned::<f64>(value)?,
                };
                Ok(Tensor {
                    dtype: spec.datatype,
                    shape: shape.iter().map(|d| *d as usize).collect(),
                    data,
                })
            })
            .collect()
    }
}

fn tensor_ref<'a, T>(shape: &[usize], data: &'a [T]) -> Result<SessionInputValue<'a>, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
{
    TensorRef::from_array_view((shape.to_vec(), data))
        .map(SessionInputValue::from)
        .map_err(|e| RuntimeError::Inference(e.to_string()))
}

/// A view of device memory as an ONNX Runtime tensor.
///
/// # Safety
/// `address` must hold `shape`'s elements of `T` in the memory `memory` describes, alive for
/// `'a`.
unsafe fn device_ref<'a, T>(
    memory: MemoryInfo,
    address: u64,
    shape: &[usize],
) -> Result<SessionInputValue<'a>, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
{
    // SAFETY: the caller's contract.
    unsafe { TensorRefMut::<T>::from_raw(memory, address as usize as *mut _, shape.into()) }
        .map(SessionInputValue::from)
        .map_err(|e| RuntimeError::Inference(e.to_string()))
}

fn cast<T: bytemuck::Pod>(data: &[u8]) -> Result<&[T], RuntimeError> {
    bytemuck::try_cast_slice(data)
        .map_err(|e| RuntimeError::Inference(format!("input buffer misaligned: {e}")))
}

fn owned<T>(value: &ort::value::DynValue) -> Result<(ort::value::Shape, Bytes), RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + bytemuck::Pod,
{
    let (shape, data) = value
        .try_extract_tensor::<T>()
        .map_err(|e| RuntimeError::Inference(e.to_string()))?;
    Ok((
        shape.clone(),
        Bytes::copy_from_slice(bytemuck::cast_slice(data)),
    ))
}

pub fn element_type(dtype: DataType) -> TensorElementType {
    match dtype {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
    }
}

/// The rows a session of `config` pads every batch to, if it pads.
fn padded_rows(config: &ModelConfig, on_gpu: bool) -> Option<usize> {
    (config.runtime.gpu_pad_to_max_batch && config.batching() && on_gpu)
        .then_some(config.max_batch_size)
}

/// Every batch size up to 64; beyond that powers of two and the maximum (what the batcher tends
/// to form under load), so warm-up stays short for very large limits.
pub fn warmup_batch_sizes(max_batch_size: usize) -> Vec<usize> {
    if max_batch_size == 0 {
        return vec![1];
    }
    if max_batch_size <= 64 {
        return (1..=max_batch_size).collect();
    }
    let mut sizes: Vec<usize> = (0..)
        .map(|p| 1usize << p)
        .take_while(|s| *s < max_batch_size)
        .collect();
    sizes.push(max_batch_size);
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gpu_sessions_of_batching_models_that_ask_pad_their_batches() {
        let config = |pad: bool, max_batch_size: usize| -> ModelConfig {
            toml::from_str(&format!(
                "name = \"m\"\nmax_batch_size = {max_batch_size}\n[[input]]\nname = \"x\"\n\
                 datatype = \"FP32\"\nshape = [2]\n[[output]]\nname = \"y\"\n\
                 datatype = \"FP32\"\nshape = [2]\n[runtime]\ngpu_pad_to_max_batch = {pad}\n"
            ))
            .unwrap()
        };
        assert_eq!(padded_rows(&config(true, 64), true), Some(64));
        assert_eq!(padded_rows(&config(true, 64), false), None, "CPU sessions");
        assert_eq!(padded_rows(&config(false, 64), true), None, "not asked");
        assert_eq!(padded_rows(&config(true, 0), true), None, "no batching");
    }

    #[test]
    fn warmup_covers_small_limits_fully_and_large_ones_by_powers() {
        assert_eq!(warmup_batch_sizes(3), vec![1, 2, 3]);
        assert_eq!(warmup_batch_sizes(0), vec![1]);
        let large = warmup_batch_sizes(1000);
        assert_eq!(large.first(), Some(&1));
        assert_eq!(large.last(), Some(&1000));
        assert!(large.contains(&512));
    }
}
