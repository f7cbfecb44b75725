//! The wgpu backend: the WGSL kernels in `shaders/` on any Vulkan, Metal or DX12 device (Mesa's
//! lavapipe runs them on a CPU, which is how CI tests them).
//!
//! Buffers come from a pool keyed by size and usage, so steady traffic of same-size boards
//! allocates nothing after the first few requests.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::params::PipelineParams;
use crate::preprocess::launch::{LaunchParams, ScaleInputs, pack_pixels};
use crate::preprocess::{Backend, Comparison, Preprocess, PreprocessError, crop_planes};
use crate::sensors::channels::ChannelMap;
use crate::sensors::window::{NonFinite, Scaler};

const BACKEND: &str = "wgpu";

/// The kernels, each a shader file with `common.wgsl` prepended.
const SHADERS: [(&str, &str, &str); 7] = [
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
    pool: Mutex<HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>>,
}

/// A kernel argument: data to upload, or an output of a given size.
enum Arg<'a> {
    Input(&'a [u8]),
    Output(u64),
    /// An output that starts as these bytes (atomic accumulators).
    InOut(&'a [u8]),
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
            pool: Mutex::new(HashMap::new()),
        })
    }

    /// True for a CPU-emulated adapter such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.software
    }

    fn buffer(&self, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let size = size.max(4).next_multiple_of(4);
        let pooled = self
            .pool
            .lock()
            .expect("buffer pool lock")
            .get_mut(&(size, usage))
            .and_then(Vec::pop);
        pooled.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    fn recycle(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let mut pool = self.pool.lock().expect("buffer pool lock");
        for buffer in buffers {
            pool.entry((buffer.size(), buffer.usage()))
                .or_default()
                .push(buffer);
        }
    }

    fn storage(&self, arg: &Arg<'_>) -> wgpu::Buffer {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        match arg {
            Arg::Input(bytes) | Arg::InOut(bytes) => {
                let buffer = self.buffer(bytes.len() as u64, usage);
                self.queue.write_buffer(&buffer, 0, bytes);
                buffer
            }
            Arg::Output(size) => self.buffer(*size, usage),
        }
    }

    /// Runs kernels in order on one submission: each step is (kernel, params, buffer indices
    /// into `args`, binding 1.. in order). Returns the bytes of the `read` buffers.
    fn run(
        &self,
        args: &[Arg<'_>],
        steps: &[(&'static str, LaunchParams, Vec<usize>)],
        read: &[usize],
    ) -> Result<Vec<Vec<u8>>, PreprocessError> {
        let buffers: Vec<wgpu::Buffer> = args.iter().map(|a| self.storage(a)).collect();
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let mut uniforms = Vec::with_capacity(steps.len());
        for (kernel, params, bindings) in steps {
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
                let size = buffers[*i].size();
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
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| kernel_error(steps[0].0, e))?;
        let mut results = Vec::with_capacity(readbacks.len());
        for (staging, i) in readbacks.iter().zip(read) {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| kernel_error(steps[0].0, e))?;
            let wanted = match &args[*i] {
                Arg::Input(b) | Arg::InOut(b) => b.len(),
                Arg::Output(size) => *size as usize,
            };
            results.push(view[..wanted].to_vec());
            drop(view);
            staging.unmap();
        }
        self.recycle(buffers.into_iter().chain(readbacks).chain(uniforms));
        Ok(results)
    }
}

fn words(bytes: &[u8]) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(bytes)
}

impl Preprocess for WgpuPreprocessor {
    fn backend(&self) -> Backend {
        Backend::Wgpu
    }

    fn device(&self) -> &str {
        &self.name
    }

    fn histogram(&self, gray: &[u8]) -> Result<[u32; 256], PreprocessError> {
        let packed = pack_pixels(gray);
        let params = LaunchParams {
            count: packed.len() as u32,
            c: gray.len() as u32,
            ..LaunchParams::default()
        };
        let zeros = [0u32; 256];
        let out = self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&packed)),
                Arg::InOut(bytemuck::cast_slice(&zeros)),
            ],
            &[("histogram", params, vec![0, 1])],
            &[1],
        )?;
        let mut bins = [0u32; 256];
        bins.copy_from_slice(&words(&out[0]));
        Ok(bins)
    }

    fn threshold(
        &self,
        gray: &[u8],
        width: usize,
        height: usize,
        threshold: u8,
    ) -> Result<BitImage, PreprocessError> {
        let params = LaunchParams {
            c: threshold as u32,
            ..LaunchParams::per_word(width, height)
        };
        let packed = pack_pixels(gray);
        let out = self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&packed)),
                Arg::Output(params.count as u64 * 4),
            ],
            &[("threshold", params, vec![0, 1])],
            &[1],
        )?;
        Ok(BitImage::from_u32_words(width, height, &words(&out[0])))
    }

    fn compare(
        &self,
        test: &BitImage,
        template: &BitImage,
        (dx, dy): (isize, isize),
        open_size: usize,
        merge_size: usize,
    ) -> Result<Comparison, PreprocessError> {
        let (width, height) = (test.width(), test.height());
        let image = LaunchParams::per_word(width, height);
        let bytes = image.count as u64 * 4;
        // Buffers: 0 test, 1 template, 2 aligned, 3 difference, 4 eroded, 5 opened, 6 merged.
        let mut steps = vec![(
            "compare",
            LaunchParams {
                a: dx as i32,
                b: dy as i32,
                ..image
            },
            vec![0, 1, 2, 3],
        )];
        let with_size = |k: usize| LaunchParams {
            c: k as u32,
            ..image
        };
        let opened = if open_size > 1 {
            steps.push(("erode", with_size(open_size), vec![3, 4]));
            steps.push(("dilate", with_size(open_size), vec![4, 5]));
            5
        } else {
            3
        };
        let merged = if merge_size > 1 {
            steps.push(("dilate", with_size(merge_size), vec![opened, 6]));
            6
        } else {
            opened
        };
        let out = self.run(
            &[
                Arg::Input(bytemuck::cast_slice(test.as_u32_words())),
                Arg::Input(bytemuck::cast_slice(template.as_u32_words())),
                Arg::Output(bytes),
                Arg::Output(bytes),
                Arg::Output(bytes),
                Arg::Output(bytes),
                Arg::Output(bytes),
            ],
            &steps,
            &[2, 3, opened, merged],
        )?;
        let image_at = |i: usize| BitImage::from_u32_words(width, height, &words(&out[i]));
        Ok(Comparison {
            aligned: image_at(0),
            difference: image_at(1),
            opened: image_at(2),
            merged: image_at(3),
        })
    }

    fn crops(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError> {
        let Some(first) = channels.first() else {
            return Ok(());
        };
        if candidates.is_empty() {
            return Ok(());
        }
        let planes = crop_planes(candidates, params, channels.len());
        let size = params.crop_size;
        let images: Vec<u32> = channels
            .iter()
            .flat_map(|c| c.as_u32_words().iter().copied())
            .collect();
        let launch = LaunchParams {
            count: (planes.len() * size * size) as u32,
            c: size as u32,
            ..LaunchParams::per_word(first.width(), first.height())
        };
        let result = self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&images)),
                Arg::Input(bytemuck::cast_slice(&planes)),
                Arg::Output(launch.count as u64 * 4),
            ],
            &[("crops", launch, vec![0, 1, 2])],
            &[2],
        )?;
        out.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&result[0]));
        Ok(())
    }

    fn scale_rows(
        &self,
        scaler: &Scaler,
        source: &[f64],
        map: &ChannelMap,
        out: &mut Vec<f32>,
    ) -> Result<Result<(), NonFinite>, PreprocessError> {
        if map.source_width == 0 || source.is_empty() {
            return Ok(Ok(()));
        }
        let inputs = ScaleInputs::new(scaler, source, map);
        let rows = source.len() / map.source_width;
        let launch = LaunchParams {
            count: (rows * inputs.columns.len()) as u32,
            c: inputs.columns.len() as u32,
            d: map.source_width as u32,
            ..LaunchParams::default()
        };
        let none = [u32::MAX];
        let result = self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&inputs.source)),
                Arg::Input(bytemuck::cast_slice(&inputs.columns)),
                Arg::Input(bytemuck::cast_slice(&inputs.affine)),
                Arg::Output(launch.count as u64 * 4),
                Arg::InOut(bytemuck::cast_slice(&none)),
            ],
            &[("scale_rows", launch, vec![0, 1, 2, 3, 4])],
            &[3, 4],
        )?;
        let first_bad = words(&result[1])[0];
        if let Err(bad) = inputs.non_finite(first_bad, source, map) {
            return Ok(Err(bad));
        }
        out.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&result[0]));
        Ok(Ok(()))
    }
}
