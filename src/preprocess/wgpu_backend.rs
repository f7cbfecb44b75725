//! The wgpu backend: the WGSL kernels in `shaders/` on any Vulkan, Metal or DX12 device (Mesa's
//! lavapipe runs them on a CPU, which is how CI tests them).
//!
//! Buffers come from a pool keyed by size class (powers of two) and usage, so traffic of
//! varying board sizes and candidate counts allocates nothing after the first few requests;
//! the pool holds at most `POOL_BYTES`, and a buffer the device cannot bind is an error, not a
//! panic.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::preprocess::gpu::{Arg, KernelRunner, Step};
use crate::preprocess::launch::LaunchParams;
use crate::preprocess::{Backend, PreprocessError};

const BACKEND: &str = "wgpu";

/// The longest a submission may take (lavapipe needs seconds for the largest images).
const POLL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most bytes the buffer pool keeps for reuse; buffers beyond it are freed.
const POOL_BYTES: u64 = 512 << 20;

/// `bytes` as a buffer holds them: at least one 4-byte word, in whole words.
fn word_aligned(bytes: u64) -> u64 {
    bytes.max(4).next_multiple_of(4)
}

/// The kernels, each a shader file with `common.wgsl` prepended.
const SHADERS: [(&str, &str, &str); 8] = [
    (
        "histogram",
        "histogram",
        include_str!("../../shaders/histogram.wgsl"),
    ),
    (
        "threshold",
        "threshold",
        include_str!("../../shaders/threshold.wgsl"),
    ),
    (
        "compare",
        "compare",
        include_str!("../../shaders/compare.wgsl"),
    ),
    (
        "erode",
        "erode",
        include_str!("../../shaders/morphology.wgsl"),
    ),
    (
        "dilate",
        "dilate",
        include_str!("../../shaders/morphology.wgsl"),
    ),
    ("crops", "crops", include_str!("../../shaders/crops.wgsl")),
    (
        "scale_rows",
        "scale_rows",
        include_str!("../../shaders/scale_rows.wgsl"),
    ),
    (
        "stack_windows",
        "stack_windows",
        include_str!("../../shaders/stack_windows.wgsl"),
    ),
];
const COMMON: &str = include_str!("../../shaders/common.wgsl");

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

pub struct WgpuPreprocessor {
    device: wgpu::Device,
    queue: wgpu::Queue,
    name: String,
    software: bool,
    pipelines: HashMap<&'static str, wgpu::ComputePipeline>,
    pool: Mutex<BufferPool>,
    /// The largest buffer a kernel can bind on this device.
    max_binding: u64,
}

/// Free buffers by (size class, usage), and their bytes in all.
#[derive(Default)]
struct BufferPool {
    free: HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>,
    bytes: u64,
}

impl WgpuPreprocessor {
    /// The first adapter the platform offers (a real GPU before a software one).
    pub fn new() -> Result<WgpuPreprocessor, PreprocessError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| {
            unavailable(format!(
                "{e} (install a Vulkan driver: a GPU's, or Mesa's lavapipe with \
                 `apt-get install mesa-vulkan-drivers libvulkan1`)"
            ))
        })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let max_binding =
            (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("linescan preprocess"),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(unavailable)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipelines = SHADERS
            .iter()
            .map(|(kernel, entry, source)| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel),
                    source: wgpu::ShaderSource::Wgsl(format!("{COMMON}\n{source}").into()),
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                (*kernel, pipeline)
            })
            .collect();
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(unavailable(format!("the shaders did not compile: {error}")));
        }
        Ok(WgpuPreprocessor {
            device,
            queue,
            name: format!("{} ({:?}, {})", info.name, info.backend, info.driver),
            software: info.device_type == wgpu::DeviceType::Cpu,
            pipelines,
            pool: Mutex::new(BufferPool::default()),
            max_binding,
        })
    }

    /// True for a CPU-emulated adapter such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.software
    }

    /// The size a buffer of `bytes` is made with: the next power of two, or the bytes rounded to
    /// 4 where that power would pass the device's binding limit.
    fn size_class(&self, bytes: u64) -> u64 {
        let exact = word_aligned(bytes);
        let class = exact.next_power_of_two();
        if class <= self.max_binding {
            class
        } else {
            exact
        }
    }

    fn buffer(&self, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let size = self.size_class(size);
        let pooled = {
            let mut pool = self.pool.lock().expect("buffer pool lock");
            let found = pool.free.get_mut(&(size, usage)).and_then(Vec::pop);
            if found.is_some() {
                pool.bytes -= size;
            }
            found
        };
        pooled.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    /// Keeps buffers for reuse while the pool has room; the others are freed.
    fn recycle(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let mut pool = self.pool.lock().expect("buffer pool lock");
        for buffer in buffers {
            if pool.bytes + buffer.size() > POOL_BYTES {
                buffer.destroy();
                continue;
            }
            pool.bytes += buffer.size();
            pool.free
                .entry((buffer.size(), buffer.usage()))
                .or_default()
                .push(buffer);
        }
    }

    fn storage(&self, arg: &Arg<'_>) -> wgpu::Buffer {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        match arg {
            Arg::Input(bytes) => {
                let buffer = self.buffer(bytes.len() as u64, usage);
                self.queue.write_buffer(&buffer, 0, bytes);
                buffer
            }
            Arg::Output(size) => self.buffer(*size as u64, usage),
        }
    }
}

impl KernelRunner for WgpuPreprocessor {
    fn backend(&self) -> Backend {
        Backend::Wgpu
    }

    fn device(&self) -> &str {
        &self.name
    }

    /// Runs the steps on one submission; `finish` reads the results from the mapped buffers.
    fn run<T>(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        finish: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<T, PreprocessError> {
        if let Some(too_large) = args.iter().find(|a| a.byte_len() as u64 > self.max_binding) {
            return Err(kernel_error(
                steps[0].kernel,
                format!(
                    "the input needs a buffer of {} bytes, above this device's limit of {} bytes \
                     per buffer; use --preprocess cpu for inputs this large (or smaller images \
                     or job chunks)",
                    too_large.byte_len(),
                    self.max_binding
                ),
            ));
        }
        // Validation errors come back here instead of reaching wgpu's default handler, which
        // panics.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers: Vec<wgpu::Buffer> = args.iter().map(|a| self.storage(a)).collect();
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let mut uniforms = Vec::with_capacity(steps.len());
        for Step {
            kernel,
            params,
            bindings,
        } in steps
        {
            let pipeline = &self.pipelines[kernel];
            let uniform = self.buffer(
                std::mem::size_of::<LaunchParams>() as u64,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            );
            self.queue
                .write_buffer(&uniform, 0, bytemuck::bytes_of(params));
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: uniform.as_entire_binding(),
            }];
            entries.extend(
                bindings
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry {
                        binding: i as u32 + 1,
                        resource: buffers[*b].as_entire_binding(),
                    }),
            );
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            let (x, y) = params.grid();
            pass.dispatch_workgroups(x, y, 1);
            drop(pass);
            uniforms.push(uniform);
        }
        let readbacks: Vec<wgpu::Buffer> = read
            .iter()
            .map(|i| {
                let size = word_aligned(args[*i].byte_len() as u64);
                let staging = self.buffer(
                    size,
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                );
                encoder.copy_buffer_to_buffer(&buffers[*i], 0, &staging, 0, size);
                staging
            })
            .collect();
        self.queue.submit([encoder.finish()]);
        for staging in &readbacks {
            staging.map_async(wgpu::MapMode::Read, .., |_| {});
        }
        // A device that never finishes (lost, hung) fails the request instead of holding it.
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(POLL_TIMEOUT),
            })
            .map_err(|e| kernel_error(steps[0].kernel, e))?;
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(kernel_error(steps[0].kernel, error));
        }
        let views = readbacks
            .iter()
            .map(|staging| staging.get_mapped_range(..))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| kernel_error(steps[0].kernel, e))?;
        let results: Vec<&[u8]> = views
            .iter()
            .zip(read)
            .map(|(view, i)| &view[..args[*i].byte_len()])
            .collect();
        let output = finish(&results);
        drop(results);
        drop(views);
        for staging in &readbacks {
            staging.unmap();
        }
        self.recycle(buffers.into_iter().chain(readbacks).chain(uniforms));
        Ok(output)
    }
}
