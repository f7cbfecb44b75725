//! Per-pixel and per-row preprocessing behind one trait with three backends: `cpu` (the
//! reference, bit-packed and SIMD), `cuda` (cudarc, CUDA C in `kernels/` compiled with NVRTC)
//! and `wgpu` (WGSL in `shaders/`, any Vulkan/Metal/DX12 GPU, Mesa's lavapipe on a CPU).
//!
//! The GPU kernels compute exactly what the CPU stages compute: integer stages (histogram,
//! threshold, comparison, morphology) are bit-exact, crop averages are exact (a count divided
//! by a power of two), and sensor scaling differs only by f32-versus-f64 rounding (see
//! [`scaling_tolerance`]); window stacking is a copy, exact. Stages that do not pay on a GPU (the sub-pixel alignment search and
//! connected components over a sparse mask) stay on the CPU with every backend.

pub mod cpu;
pub mod cuda;
pub mod gpu;
mod launch;
mod nvrtc;
pub mod wgpu_backend;

use std::sync::Arc;

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::crops::window_origin;
use crate::aoi::params::PipelineParams;
use crate::runtime::device::DeviceBytes;
use crate::sensors::channels::ChannelMap;
use crate::sensors::window::{NonFinite, Scaler, WindowSpan};

pub use gpu::{GpuKernels, KernelRunner};
pub use launch::{CropPlane, LaunchParams};

/// `--preprocess` values: a backend, or `auto` (CUDA, then wgpu, then CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Cpu,
    Cuda,
    Wgpu,
    Auto,
}

/// The `--preprocess` flag of `serve` and the CLI pipelines.
#[derive(Debug, Clone, Copy, clap::Args, serde::Serialize)]
pub struct PreprocessArgs {
    /// Backend of the per-pixel and per-row stages: cpu, cuda, wgpu (any Vulkan adapter,
    /// software ones included), or auto (CUDA, then a hardware wgpu adapter, then the CPU).
    #[arg(long, env = "LINESCAN_PREPROCESS", value_enum, default_value = "auto")]
    pub preprocess: BackendChoice,
}

impl PreprocessArgs {
    pub fn select(&self) -> Result<Arc<dyn Preprocess>, PreprocessError> {
        select(self.preprocess)
    }
}

/// The backend a preprocessor runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
    Wgpu,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{backend} preprocessing is not available: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("{backend} kernel {kernel} failed: {message}")]
    Kernel {
        backend: &'static str,
        kernel: &'static str,
        message: String,
    },
}

/// What the test-vs-template comparison produces for one board.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The template shifted onto the test image.
    pub aligned: BitImage,
    /// `(test XOR aligned)` where the shifted template has a source pixel.
    pub difference: BitImage,
    /// The difference opened with the `open_size` square (edge noise removed).
    pub opened: BitImage,
    /// The opened difference dilated with the `merge_size` square (fragments joined).
    pub merged: BitImage,
}

/// The hot per-pixel and per-row stages of the AOI and sensor pipelines.
pub trait Preprocess: Send + Sync {
    fn backend(&self) -> Backend;

    /// The device the backend runs on, for logs and `/metrics`.
    fn device(&self) -> &str;

    /// Pixels per grey level (Otsu's threshold is computed from it on the host).
    fn histogram(&self, gray: &[u8]) -> Result<[u32; 256], PreprocessError>;

    /// Foreground bits where `pixel > threshold`.
    fn threshold(
        &self,
        gray: &[u8],
        width: usize,
        height: usize,
        threshold: u8,
    ) -> Result<BitImage, PreprocessError>;

    /// Shift, difference, opening and merging dilation (see [`Comparison`]).
    fn compare(
        &self,
        test: &BitImage,
        template: &BitImage,
        shift: (isize, isize),
        open_size: usize,
        merge_size: usize,
    ) -> Result<Comparison, PreprocessError>;

    /// Appends the classifier input of every candidate (`[n, C', S, S]`, see
    /// [`crate::aoi::crops::make_crops`]) to `out`.
    fn crops(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError>;

    /// The CUDA device whose memory this backend's results can stay in for ONNX Runtime
    /// ([`Preprocess::crops_on_device`], [`Preprocess::stack_windows_on_device`]), if any.
    fn hands_off_on(&self) -> Option<i32> {
        None
    }

    /// [`Preprocess::crops`] left in memory of CUDA device `device`, where ONNX Runtime reads
    /// them in place; None where this backend's memory is not that (the CPU, wgpu, another
    /// device) or there are no candidates.
    fn crops_on_device(
        &self,
        _channels: &[&BitImage],
        _candidates: &[Component],
        _params: &PipelineParams,
        _device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        Ok(None)
    }

    /// Sensor rows in the source's column layout to scaled model-order rows appended to `out`;
    /// the inner error names the first non-finite value the model would use. On any error,
    /// what was appended to `out` is unspecified (the CPU appends the rows before the bad one,
    /// a GPU nothing).
    fn scale_rows(
        &self,
        scaler: &Scaler,
        source: &[f64],
        map: &ChannelMap,
        out: &mut Vec<f32>,
    ) -> Result<Result<(), NonFinite>, PreprocessError>;

    /// Appends the window of every span over scaled `rows` (`width` values per row) to `out`,
    /// `[spans, window, width]` (see [`crate::sensors::window::stack_windows`]).
    fn stack_windows(
        &self,
        rows: &[f32],
        width: usize,
        window: usize,
        spans: &[WindowSpan],
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError>;

    /// [`Preprocess::stack_windows`] left in memory of CUDA device `device`, where ONNX Runtime
    /// reads them in place; None where this backend's memory is not that or there are no spans.
    fn stack_windows_on_device(
        &self,
        _rows: &[f32],
        _width: usize,
        _window: usize,
        _spans: &[WindowSpan],
        _device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        Ok(None)
    }
}

/// The backend for a choice; `auto` takes CUDA, then wgpu, then the CPU, logging what it
/// skipped and why. An explicit GPU choice that cannot start is an error, never a silent
/// fallback.
pub fn select(choice: BackendChoice) -> Result<Arc<dyn Preprocess>, PreprocessError> {
    let chosen: Arc<dyn Preprocess> = match choice {
        BackendChoice::Cpu => Arc::new(cpu::CpuPreprocessor),
        BackendChoice::Cuda => Arc::new(GpuKernels(cuda::CudaPreprocessor::new()?)),
        BackendChoice::Wgpu => Arc::new(GpuKernels(wgpu_backend::WgpuPreprocessor::new()?)),
        BackendChoice::Auto => match cuda::CudaPreprocessor::new() {
            Ok(cuda) => Arc::new(GpuKernels(cuda)),
            Err(cuda_error) => {
                tracing::info!("preprocess auto: {cuda_error}");
                match wgpu_backend::WgpuPreprocessor::new() {
                    // A software adapter (lavapipe) is slower than the CPU backend it emulates.
                    Ok(wgpu) if !wgpu.is_software() => Arc::new(GpuKernels(wgpu)),
                    Ok(wgpu) => {
                        tracing::info!(
                            "preprocess auto: skipping the software wgpu adapter {}",
                            wgpu.device()
                        );
                        Arc::new(cpu::CpuPreprocessor)
                    }
                    Err(wgpu_error) => {
                        tracing::info!("preprocess auto: {wgpu_error}");
                        Arc::new(cpu::CpuPreprocessor)
                    }
                }
            }
        },
    };
    tracing::info!(
        backend = chosen.backend().as_str(),
        device = chosen.device(),
        "preprocessing backend"
    );
    Ok(chosen)
}

impl std::fmt::Debug for dyn Preprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.backend().as_str(), self.device())
    }
}

/// The CUDA device where `preprocess` can leave its results for sessions that read the memory
/// of `sessions` in place: both must be the same device.
pub fn handoff_device(preprocess: &dyn Preprocess, sessions: Option<i32>) -> Option<i32> {
    preprocess
        .hands_off_on()
        .filter(|device| Some(*device) == sessions)
}

/// The crop planes of [`Preprocess::crops`] in output order: per candidate, the coarse window's
/// channels, then (with a fine window) the same channels at full resolution.
pub fn crop_planes(
    candidates: &[Component],
    params: &PipelineParams,
    channels: usize,
) -> Vec<CropPlane> {
    let mut windows = vec![(params.crop_window, params.crop_scale)];
    if params.fine_window > 0 {
        windows.push((params.fine_window, 1));
    }
    let mut planes = Vec::with_capacity(candidates.len() * windows.len() * channels);
    for candidate in candidates {
        for &(window, scale) in &windows {
            let (x, y) = window_origin(candidate, window);
            planes.extend((0..channels).map(|image| CropPlane {
                x: x as i32,
                y: y as i32,
                scale: scale as u32,
                image: image as u32,
            }));
        }
    }
    planes
}

/// Largest difference allowed between a GPU-scaled sensor value and the CPU's: the GPU reads
/// the value as f32 (relative error 2^-24) and computes in f32, so the bound is a few units in
/// the last place of `|x| * |scale|` and of the result.
pub fn scaling_tolerance(value: f64, offset: f64, scale: f64) -> f64 {
    let ulp = f32::EPSILON as f64;
    4.0 * ulp * ((value.abs() + offset.abs()) * scale.abs() + 1.0)
}

#[cfg(test)]
pub(crate) mod parity;
