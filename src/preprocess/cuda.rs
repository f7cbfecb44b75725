//! The CUDA backend: the CUDA C kernels in `kernels/` (twins of `shaders/`), compiled at start-up
//! with NVRTC for the device's architecture and cached as PTX on disk, launched through cudarc.
//!
//! Every concurrent caller gets a lane: a stream with its own pools of device buffers and pinned
//! (page-locked) host staging buffers, so steady traffic allocates nothing after warm-up and
//! concurrent boards overlap their uploads, kernels and downloads on separate streams.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::preprocess::gpu::{Arg, KernelRunner, Step};
use crate::preprocess::launch::{GROUP_SIZE, LaunchParams};
use crate::preprocess::nvrtc;
use crate::preprocess::{Backend, PreprocessError};
use crate::runtime::device::{DeviceBytes, DeviceGather, DeviceMemory};

const BACKEND: &str = "cuda";

/// The kernel files and their entry points; each file is its own module with `common.cuh`
/// prepended.
const KERNELS: [(&str, &str, &[&str]); 7] = [
    (
        "histogram",
        include_str!("../../kernels/histogram.cu"),
        &["histogram"],
    ),
    (
        "threshold",
        include_str!("../../kernels/threshold.cu"),
        &["threshold"],
    ),
    (
        "compare",
        include_str!("../../kernels/compare.cu"),
        &["compare"],
    ),
    (
        "morphology",
        include_str!("../../kernels/morphology.cu"),
        &["erode", "dilate"],
    ),
    ("crops", include_str!("../../kernels/crops.cu"), &["crops"]),
    (
        "scale_rows",
        include_str!("../../kernels/scale_rows.cu"),
        &["scale_rows"],
    ),
    (
        "stack_windows",
        include_str!("../../kernels/stack_windows.cu"),
        &["stack_windows"],
    ),
];
const COMMON: &str = include_str!("../../kernels/common.cuh");

// SAFETY: LaunchParams is #[repr(C)] plain data, laid out as `Params` in kernels/common.cuh.
unsafe impl DeviceRepr for LaunchParams {}

fn kernel_error(kernel: &'static str, message: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Kernel {
        backend: BACKEND,
        kernel,
        message: message.to_string(),
    }
}

fn unavailable(reason: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Unavailable {
        backend: BACKEND,
        reason: reason.to_string(),
    }
}

pub struct CudaPreprocessor {
    context: Arc<CudaContext>,
    name: String,
    functions: HashMap<&'static str, CudaFunction>,
    /// Idle lanes; a caller takes one (or makes one when all are busy) and gives it back.
    lanes: Mutex<Vec<Lane>>,
    /// The most idle lanes kept: a burst of callers makes as many lanes, each holding the
    /// pinned and device buffers its boards needed; past the burst, the ones beyond this are
    /// freed.
    idle_lanes: usize,
    /// Buffers handed to inference ([`KernelRunner::run_on_device`]), back once it is done.
    handed_off: Arc<BufferPool>,
}

/// Device buffers by size class.
type DeviceBuffers = HashMap<usize, Vec<CudaSlice<u8>>>;
type BufferPool = Mutex<DeviceBuffers>;

/// A buffer of at least `bytes` from `pool`, or a new one on `stream`.
fn pooled_buffer(
    pool: &mut DeviceBuffers,
    stream: &Arc<CudaStream>,
    bytes: usize,
) -> Result<CudaSlice<u8>, DriverError> {
    let class = size_class(bytes);
    match pool.get_mut(&class).and_then(Vec::pop) {
        Some(buffer) => Ok(buffer),
        // SAFETY: every byte a kernel or a download reads was uploaded or written first.
        None => unsafe { stream.alloc(class) },
    }
}

fn return_buffer(pool: &mut DeviceBuffers, buffer: CudaSlice<u8>) {
    pool.entry(buffer.len()).or_default().push(buffer);
}

/// A preprocessing result left on the device for ONNX Runtime; its buffer returns to the pool
/// when the last view of it is dropped (after the inference that read it has returned).
struct HandedOff {
    buffer: Option<CudaSlice<u8>>,
    address: u64,
    len: usize,
    context: Arc<CudaContext>,
    pool: Arc<BufferPool>,
}

impl DeviceMemory for HandedOff {
    fn device_id(&self) -> i32 {
        self.context.ordinal() as i32
    }

    fn address(&self) -> u64 {
        self.address
    }

    fn byte_len(&self) -> usize {
        self.len
    }

    fn gatherer(&self) -> Result<Box<dyn DeviceGather>, String> {
        Ok(Box::new(CudaGather {
            stream: self.context.new_stream().map_err(|e| e.to_string())?,
            buffer: None,
        }))
    }
}

impl Drop for HandedOff {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            return_buffer(&mut self.pool.lock().expect("buffer pool lock"), buffer);
        }
    }
}

/// A batcher worker's device-to-device joins: its own stream and one growing batch buffer.
struct CudaGather {
    stream: Arc<CudaStream>,
    buffer: Option<CudaSlice<u8>>,
}

impl DeviceGather for CudaGather {
    fn gather(&mut self, parts: &[&DeviceBytes], len: usize) -> Result<u64, String> {
        let error = |e: DriverError| format!("joining a batch on the device: {e}");
        self.stream.context().bind_to_thread().map_err(error)?;
        let joined: usize = parts.iter().map(|p| p.len()).sum();
        let total = len.max(joined);
        if self.buffer.as_ref().is_none_or(|b| b.len() < total) {
            // SAFETY: every byte read from it below is first written by the copies or zeroed.
            self.buffer = Some(unsafe { self.stream.alloc(size_class(total)) }.map_err(error)?);
        }
        let buffer = self.buffer.as_ref().expect("allocated above");
        let (base, _) = buffer.device_ptr(&self.stream);
        let mut offset = 0;
        for part in parts {
            // SAFETY: the source is a finished device buffer of `part.len()` bytes (the
            // DeviceMemory contract) and the target has room for all parts.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + offset as u64,
                    part.address(),
                    part.len(),
                    self.stream.cu_stream(),
                )
            }
            .map_err(error)?;
            offset += part.len();
        }
        if total > joined {
            // SAFETY: the padding rows lie inside the buffer, after the copied parts.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    base + joined as u64,
                    0,
                    total - joined,
                    self.stream.cu_stream(),
                )
            }
            .map_err(error)?;
        }
        // ONNX Runtime reads on its own stream: the batch must be complete first.
        self.stream.synchronize().map_err(error)?;
        Ok(base)
    }
}

/// Buffers are pooled by power-of-two size, so boards with varying candidate counts reuse them.
fn size_class(bytes: usize) -> usize {
    bytes.max(4).next_power_of_two()
}

/// One caller's stream and the buffers it has used; they are only ever used on this stream.
struct Lane {
    stream: Arc<CudaStream>,
    device: DeviceBuffers,
    pinned: HashMap<usize, Vec<PinnedHostSlice<u8>>>,
}

impl Lane {
    fn pinned_buffer(&mut self, bytes: usize) -> Result<PinnedHostSlice<u8>, DriverError> {
        let class = size_class(bytes);
        match self.pinned.get_mut(&class).and_then(Vec::pop) {
            Some(buffer) => Ok(buffer),
            // Flags 0: cached memory, as results are read on the host (cudarc's default,
            // write-combined, is very slow to read). SAFETY: written before it is read.
            None => unsafe { self.stream.context().alloc_pinned_with_flags(class, 0) },
        }
    }

    fn recycle(&mut self, device: Vec<CudaSlice<u8>>, pinned: Vec<PinnedHostSlice<u8>>) {
        for buffer in device {
            return_buffer(&mut self.device, buffer);
        }
        for buffer in pinned {
            self.pinned.entry(buffer.len()).or_default().push(buffer);
        }
    }

    /// Queues the uploads, the kernels and the downloads (the last `read.len()` of `pinned`).
    /// Buffers are pushed once their copies are queued, so the caller keeps them alive until
    /// the stream is synchronised even when this fails part-way.
    /// The buffer of argument `keep`, if any, comes from `handed_off`, as it leaves the lane.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        functions: &HashMap<&'static str, CudaFunction>,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        keep: Option<(usize, &BufferPool)>,
        device: &mut Vec<CudaSlice<u8>>,
        pinned: &mut Vec<PinnedHostSlice<u8>>,
    ) -> Result<(), PreprocessError> {
        let copy_error = |e: DriverError| kernel_error(steps[0].kernel, e);
        let raw_stream = self.stream.cu_stream();
        for (index, arg) in args.iter().enumerate() {
            let buffer = match keep {
                Some((kept, pool)) if kept == index => pooled_buffer(
                    &mut pool.lock().expect("buffer pool lock"),
                    &self.stream,
                    arg.byte_len(),
                ),
                _ => pooled_buffer(&mut self.device, &self.stream, arg.byte_len()),
            }
            .map_err(copy_error)?;
            if let Arg::Input(bytes) = arg
                && !bytes.is_empty()
            {
                let mut staging = self.pinned_buffer(bytes.len()).map_err(copy_error)?;
                let host = &mut staging.as_mut_slice().map_err(copy_error)?[..bytes.len()];
                host.copy_from_slice(bytes);
                let (target, _) = buffer.device_ptr(&self.stream);
                // SAFETY: both buffers hold at least `bytes.len()` bytes and outlive the copy
                // (the caller synchronises the stream before releasing them).
                unsafe { cudarc::driver::result::memcpy_htod_async(target, host, raw_stream) }
                    .map_err(copy_error)?;
                pinned.push(staging);
            }
            device.push(buffer);
        }
        for Step {
            kernel,
            params,
            bindings,
        } in steps
        {
            let (x, y) = params.grid();
            let config = LaunchConfig {
                grid_dim: (x, y, 1),
                block_dim: (GROUP_SIZE, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = self.stream.launch_builder(&functions[kernel]);
            launch.arg(params);
            for binding in bindings.iter() {
                launch.arg(&device[*binding]);
            }
            // SAFETY: each kernel takes (Params, buffers in binding order), sized as the
            // parameters say (the same contract as the WGSL twins).
            unsafe { launch.launch(config) }.map_err(|e| kernel_error(kernel, e))?;
        }
        for &i in read {
            let bytes = args[i].byte_len();
            let mut staging = self.pinned_buffer(bytes).map_err(copy_error)?;
            let host = &mut staging.as_mut_slice().map_err(copy_error)?[..bytes];
            if bytes > 0 {
                let (source, _) = device[i].device_ptr(&self.stream);
                // SAFETY: as for the uploads.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(host, source, raw_stream) }
                    .map_err(copy_error)?;
            }
            pinned.push(staging);
        }
        Ok(())
    }
}

impl CudaPreprocessor {
    /// Device 0, or `LINESCAN_CUDA_DEVICE`. Fails with the reason where there is no NVIDIA
    /// driver, NVRTC or device.
    pub fn new() -> Result<CudaPreprocessor, PreprocessError> {
        // cudarc panics when a library or symbol it needs is missing: start() checks the
        // libraries first, and a panic it did not foresee still becomes an error.
        std::panic::catch_unwind(Self::start).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(unavailable(format!("the CUDA libraries failed: {message}")))
        })
    }

    fn start() -> Result<CudaPreprocessor, PreprocessError> {
        // SAFETY: these only try to dlopen the library candidates.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable("no NVIDIA driver (libcuda.so.1 not found)"));
        }
        let nvrtc_library = nvrtc::ensure_loaded()
            .map_err(|reason| unavailable(format!("the NVIDIA driver is present but {reason}")))?;
        tracing::debug!(library = %nvrtc_library, "NVRTC found");
        let ordinal = match std::env::var("LINESCAN_CUDA_DEVICE") {
            Ok(value) => value.parse().map_err(|_| {
                unavailable(format!(
                    "LINESCAN_CUDA_DEVICE={value} is not a device number"
                ))
            })?,
            Err(_) => 0,
        };
        let context = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("CUDA device {ordinal}: {e}")))?;
        // SAFETY: a buffer is only ever used by one stream at a time, and every hand-over is
        // synchronised: a lane's stream before its buffers are reused, read, freed or handed
        // to inference; a batcher's gather stream before the session reads the batch; and
        // ONNX Runtime's Run, which returns only once its streams are done, before a handed-off
        // buffer goes back to the pool. cudarc's per-buffer event tracking would only add work.
        unsafe { context.disable_event_tracking() };
        let (major, minor) = context.compute_capability().map_err(unavailable)?;
        let name = format!(
            "{} (sm_{major}{minor})",
            context.name().map_err(unavailable)?
        );
        let nvrtc = nvrtc_version().map_err(unavailable)?;
        let arch = ptx_arch(major * 10 + minor).map_err(unavailable)?;
        let options = compile_options(&format!("compute_{arch}"));
        let mut functions = HashMap::new();
        for (file, source, entries) in KERNELS {
            let module = load_module(&context, file, source, &options, nvrtc)?;
            for &entry in entries {
                let function = module
                    .load_function(entry)
                    .map_err(|e| unavailable(format!("kernel {entry}: {e}")))?;
                functions.insert(entry, function);
            }
        }
        Ok(CudaPreprocessor {
            context,
            name,
            functions,
            lanes: Mutex::new(Vec::new()),
            idle_lanes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            handed_off: Arc::new(Mutex::new(HashMap::new())),
        })
    }
}

/// NVRTC options for `target`: a virtual architecture (`compute_90`, PTX) or a real one
/// (`sm_90`, machine code).
fn compile_options(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        // No contraction, so f32 arithmetic rounds exactly as the WGSL twins spell it.
        "--fmad=false".to_string(),
    ]
}

fn nvrtc_version() -> Result<(i32, i32), cudarc::nvrtc::result::NvrtcError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
    Ok((major, minor))
}

/// The newest virtual architecture NVRTC supports that the device runs: a GPU newer than the
/// NVRTC gets older PTX, which the driver compiles forward.
fn ptx_arch(device: i32) -> Result<i32, String> {
    let mut count = 0;
    // SAFETY: writes one int, then `count` ints.
    unsafe { cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| e.to_string())?;
    let mut archs = vec![0; count.max(0) as usize];
    unsafe { cudarc::nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| e.to_string())?;
    archs
        .into_iter()
        .filter(|arch| *arch <= device)
        .max()
        .ok_or_else(|| format!("NVRTC supports no architecture at or below sm_{device}"))
}

/// `LINESCAN_KERNEL_CACHE`, else `$XDG_CACHE_HOME/linescan/kernels`, else
/// `~/.cache/linescan/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LINESCAN_KERNEL_CACHE") {
        return Some(dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("linescan").join("kernels"))
}

/// The cache file of a compiled kernel: FNV-1a (stable across Rust releases, unlike std's
/// hasher) of everything that changes the PTX.
fn cache_key(source: &str, options: &[String], nvrtc: (i32, i32)) -> String {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let nvrtc = format!("nvrtc {}.{}", nvrtc.0, nvrtc.1);
    for part in [source, &options.join(" "), &nvrtc] {
        // A separator byte no part contains keeps ("ab", "c") and ("a", "bc") apart.
        for byte in part.bytes().chain([0xff]) {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}.ptx")
}

/// The module of one kernel file: cached PTX when it loads, else compiled (and cached; a cache
/// that cannot be written is only a warning).
fn load_module(
    context: &Arc<CudaContext>,
    file: &str,
    source: &str,
    options: &[String],
    nvrtc: (i32, i32),
) -> Result<Arc<CudaModule>, PreprocessError> {
    let source = with_common(source);
    let path = cache_dir().map(|dir| dir.join(cache_key(&source, options, nvrtc)));
    if let Some(path) = &path
        && let Ok(ptx) = std::fs::read_to_string(path)
        // cudarc panics on a NUL byte (a damaged file): recompile instead.
        && !ptx.contains('\0')
    {
        match context.load_module(Ptx::from_src(ptx)) {
            Ok(module) => return Ok(module),
            Err(e) => tracing::warn!(
                "cached PTX {} did not load ({e}): recompiling",
                path.display()
            ),
        }
    }
    let compiled = compile(file, &source, options)?;
    if let Some(path) = &path
        && let Err(e) = write_cache(path, &compiled.to_src())
    {
        tracing::warn!("cannot cache PTX at {}: {e}", path.display());
    }
    context.load_module(compiled).map_err(|e| {
        // Typically CUDA_ERROR_UNSUPPORTED_PTX_VERSION: an NVRTC newer than the driver.
        unavailable(format!("kernels/{file}.cu did not load: {e}"))
    })
}

/// What NVRTC compiles for a kernel file: `common.cuh`, then the file.
fn with_common(source: &str) -> String {
    format!("{COMMON}\n{source}")
}

/// PTX of one kernel file (after [`with_common`]) from NVRTC.
fn compile(file: &str, source: &str, options: &[String]) -> Result<Ptx, PreprocessError> {
    cudarc::nvrtc::compile_ptx_with_opts(
        source,
        CompileOptions {
            options: options.to_vec(),
            name: Some(format!("{file}.cu")),
            ..CompileOptions::default()
        },
    )
    .map_err(|e| match e {
        CompileError::CompileError { log, .. } => unavailable(format!(
            "kernels/{file}.cu did not compile: {}",
            log.to_string_lossy()
        )),
        other => unavailable(format!("kernels/{file}.cu: {other}")),
    })
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a file.
fn write_cache(path: &std::path::Path, ptx: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension(format!("{}.partial", std::process::id()));
    std::fs::write(&partial, ptx)?;
    std::fs::rename(&partial, path)
}

impl KernelRunner for CudaPreprocessor {
    fn backend(&self) -> Backend {
        Backend::Cuda
    }

    fn device(&self) -> &str {
        &self.name
    }

    /// Runs the steps on one lane; `finish` reads the results straight from pinned memory.
    fn run<T>(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        finish: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<T, PreprocessError> {
        self.on_lane(args, steps, read, None, |_, pinned| {
            let results = pinned[pinned.len() - read.len()..]
                .iter()
                .zip(read)
                .map(|(staging, i)| Ok(&staging.as_slice()?[..args[*i].byte_len()]))
                .collect::<Result<Vec<&[u8]>, DriverError>>()
                .map_err(|e| kernel_error(steps[0].kernel, e))?;
            Ok(finish(&results))
        })
    }

    fn hands_off_on(&self) -> Option<i32> {
        Some(self.context.ordinal() as i32)
    }

    /// Runs the steps on one lane and hands argument `keep` over as it is on the device.
    fn run_on_device(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        keep: usize,
        device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        if device != self.context.ordinal() as i32 {
            return Ok(None);
        }
        let kept = self.on_lane(
            args,
            steps,
            &[],
            Some((keep, &self.handed_off)),
            |device, _| Ok(device.remove(keep)),
        )?;
        let (address, _) = kept.device_ptr(kept.stream());
        Ok(Some(DeviceBytes::new(Arc::new(HandedOff {
            address,
            len: args[keep].byte_len(),
            buffer: Some(kept),
            context: self.context.clone(),
            pool: self.handed_off.clone(),
        }))))
    }
}

/// Puts `item` back into `pool` unless the pool already holds `limit`; then returns it, to be
/// dropped.
fn keep_idle<T>(pool: &mut Vec<T>, item: T, limit: usize) -> Option<T> {
    if pool.len() < limit {
        pool.push(item);
        None
    } else {
        Some(item)
    }
}

impl CudaPreprocessor {
    /// Takes an idle lane (or makes one), queues the steps, waits for them, lets `take` use the
    /// buffers, and, when all went well, puts the lane back with what `take` left of them.
    fn on_lane<T>(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        keep: Option<(usize, &BufferPool)>,
        take: impl FnOnce(&mut Vec<CudaSlice<u8>>, &[PinnedHostSlice<u8>]) -> Result<T, PreprocessError>,
    ) -> Result<T, PreprocessError> {
        let error = |e: DriverError| kernel_error(steps[0].kernel, e);
        self.context.bind_to_thread().map_err(error)?;
        let idle = self.lanes.lock().expect("lane pool lock").pop();
        let mut lane = match idle {
            Some(lane) => lane,
            None => Lane {
                stream: self.context.new_stream().map_err(error)?,
                device: HashMap::new(),
                pinned: HashMap::new(),
            },
        };
        let (mut device, mut pinned) = (Vec::new(), Vec::new());
        let queued = lane.enqueue(
            &self.functions,
            args,
            steps,
            read,
            keep,
            &mut device,
            &mut pinned,
        );
        // Whatever was queued must finish before the buffers are read, reused, handed over
        // or freed.
        let outcome = lane
            .stream
            .synchronize()
            .map_err(error)
            .and(queued)
            .and_then(|()| take(&mut device, &pinned));
        // A lane that failed is dropped with its buffers (freeing memory helps when the
        // failure was running out of it); a good one goes back with them.
        if outcome.is_ok() {
            lane.recycle(device, pinned);
            let excess = keep_idle(
                &mut self.lanes.lock().expect("lane pool lock"),
                lane,
                self.idle_lanes,
            );
            // Freed outside the lock: freeing device memory may wait for the device.
            drop(excess);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_lanes_beyond_the_limit_are_let_go() {
        let mut pool = Vec::new();
        assert_eq!(keep_idle(&mut pool, 1, 2), None);
        assert_eq!(keep_idle(&mut pool, 2, 2), None);
        assert_eq!(keep_idle(&mut pool, 3, 2), Some(3));
        assert_eq!(pool, [1, 2]);
    }

    #[test]
    fn cuda_kernels_match_the_cpu() {
        // deploy/test.sh sets LINESCAN_REQUIRE_CUDA where the machine has an NVIDIA device.
        crate::preprocess::parity::check_or_skip(
            CudaPreprocessor::new().map(crate::preprocess::GpuKernels),
            "LINESCAN_REQUIRE_CUDA",
        );
    }

    #[test]
    fn every_kernel_file_defines_the_entry_points_launched() {
        for (file, source, entries) in KERNELS {
            for entry in entries {
                assert!(
                    source.contains(&format!(
                        "extern \"C\" __global__ void {entry}(const Params params,"
                    )),
                    "kernels/{file}.cu lacks entry point {entry}"
                );
            }
        }
        for launched in [
            "histogram",
            "threshold",
            "compare",
            "erode",
            "dilate",
            "crops",
            "scale_rows",
            "stack_windows",
        ] {
            assert!(
                KERNELS
                    .iter()
                    .any(|(_, _, entries)| entries.contains(&launched))
            );
        }
    }

    /// NVRTC needs no GPU: CI installs it from PyPI (deploy/requirements.txt), so the CUDA C
    /// goes through the real compiler on every run. LINESCAN_REQUIRE_NVRTC=1 (deploy/test.sh)
    /// turns its absence into a failure instead of a skip.
    fn nvrtc_present_or_skip() -> bool {
        match nvrtc::ensure_loaded() {
            Ok(_) => true,
            Err(reason) => {
                assert!(
                    std::env::var_os("LINESCAN_REQUIRE_NVRTC").is_none(),
                    "LINESCAN_REQUIRE_NVRTC is set but {reason}"
                );
                eprintln!("skipped: {reason}");
                false
            }
        }
    }

    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !nvrtc_present_or_skip() {
            return;
        }
        // Jetson Orin (sm_87) and H100 (sm_90), as start() would pick for those devices.
        for device in [87, 90] {
            let options = compile_options(&format!("compute_{}", ptx_arch(device).unwrap()));
            for (file, source, entries) in KERNELS {
                let ptx = compile(file, &with_common(source), &options)
                    .unwrap_or_else(|e| panic!("sm_{device}: {e}"))
                    .to_src();
                for entry in entries {
                    assert!(
                        ptx.contains(&format!(".entry {entry}(")),
                        "sm_{device}: the PTX of kernels/{file}.cu has no entry {entry}"
                    );
                }
            }
        }
    }

    /// Compiles `source` to machine code (SASS) for `sm_{arch}`: the CUBIN and NVRTC's log with
    /// ptxas' resource report, or the log of the failure.
    fn assemble(source: &str, arch: i32) -> Result<(Vec<u8>, String), String> {
        use cudarc::nvrtc::{result, sys};
        let source = std::ffi::CString::new(source).expect("no NUL in the kernels");
        let program = result::create_program(&source, None).map_err(|e| e.to_string())?;
        // The options start() compiles with, for a real architecture, plus ptxas' report.
        let mut options = compile_options(&format!("sm_{arch}"));
        options.push("--ptxas-options=-v".to_string());
        // SAFETY: `program` was just created and is destroyed once, below; the CUBIN buffer
        // has the size NVRTC gives for it.
        let compiled = unsafe { result::compile_program(program, &options) };
        let log = unsafe { result::get_program_log(program) }.map_err(|e| e.to_string())?;
        let cubin = compiled.and_then(|()| unsafe {
            let mut size = 0;
            sys::nvrtcGetCUBINSize(program, &mut size).result()?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()).result()?;
            Ok(cubin)
        });
        unsafe { result::destroy_program(program) }.map_err(|e| e.to_string())?;
        let log: Vec<u8> = log.iter().map(|c| *c as u8).filter(|b| *b != 0).collect();
        let log = String::from_utf8_lossy(&log).into_owned();
        cubin
            .map(|cubin| (cubin, log.clone()))
            .map_err(|e| format!("{e}: {log}"))
    }

    #[test]
    fn every_kernel_assembles_for_orin_and_h100_without_spills() {
        // The step the driver would otherwise first take on the GPU machine: PTX to machine
        // code, with register allocation. ptxas' report goes to the test output.
        if !nvrtc_present_or_skip() {
            return;
        }
        for arch in [87, 90] {
            for (file, source, entries) in KERNELS {
                let (cubin, log) = assemble(&with_common(source), arch)
                    .unwrap_or_else(|e| panic!("kernels/{file}.cu for sm_{arch}: {e}"));
                for entry in entries {
                    let section = format!(".text.{entry}\0");
                    assert!(
                        cubin
                            .windows(section.len())
                            .any(|w| w == section.as_bytes()),
                        "sm_{arch}: no machine code for {entry} in kernels/{file}.cu"
                    );
                }
                // NVRTC 13.0 gave an empty log once another test had started the CUDA backend
                // in the same process (seen on an H100 machine). Without a driver, as in CI,
                // the report must be there, so spills are always checked in CI.
                if !log.contains("Function properties for") {
                    // SAFETY: only tries to open the driver library.
                    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
                    assert!(
                        driver,
                        "sm_{arch}: no ptxas report for kernels/{file}.cu:\n{log}"
                    );
                    eprintln!("sm_{arch} {file}: NVRTC gave no ptxas report, spills not checked");
                }
                for line in log.lines().filter(|l| l.contains("spill")) {
                    assert!(
                        line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                        "sm_{arch}, kernels/{file}.cu spills registers: {line}"
                    );
                }
                for line in log.lines().filter(|l| l.contains("Used")) {
                    eprintln!("sm_{arch} {file}: {}", line.trim());
                }
            }
        }
    }

    #[test]
    fn the_ptx_cache_key_changes_with_the_source_arch_and_nvrtc() {
        let options = vec!["--gpu-architecture=compute_90".to_string()];
        let key = cache_key("a", &options, (12, 8));
        assert_eq!(key, cache_key("a", &options, (12, 8)));
        assert_ne!(key, cache_key("b", &options, (12, 8)));
        assert_ne!(
            key,
            cache_key("a", &["--gpu-architecture=compute_80".into()], (12, 8))
        );
        assert_ne!(key, cache_key("a", &options, (12, 9)));
    }
}
