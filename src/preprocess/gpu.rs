//! What each stage launches on a GPU, written once for every GPU backend: the kernel
//! arguments, the kernels in order, the buffers read back and how their bytes become results.
//! A backend ([`KernelRunner`]) only knows how to upload, launch and download.

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::params::PipelineParams;
use crate::preprocess::launch::{LaunchParams, ScaleInputs, pack_pixels};
use crate::preprocess::{Backend, Comparison, Preprocess, PreprocessError, crop_planes};
use crate::runtime::device::DeviceBytes;
use crate::sensors::channels::ChannelMap;
use crate::sensors::window::{NonFinite, Scaler, WindowSpan};

/// A kernel argument: bytes to upload, or an output of a given size in bytes.
pub enum Arg<'a> {
    Input(&'a [u8]),
    Output(usize),
}

impl Arg<'_> {
    pub fn byte_len(&self) -> usize {
        match self {
            Arg::Input(bytes) => bytes.len(),
            Arg::Output(size) => *size,
        }
    }
}

/// One launch: the kernel, its parameters, and the indices into the arguments of its buffers
/// (in the kernel's binding order).
pub struct Step {
    pub kernel: &'static str,
    pub params: LaunchParams,
    pub bindings: &'static [usize],
}

/// A GPU backend: runs the steps in order over the arguments, then hands `finish` the bytes
/// of the `read` arguments (exactly their lengths).
pub trait KernelRunner: Send + Sync {
    fn backend(&self) -> Backend;
    fn device(&self) -> &str;
    fn run<T>(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        finish: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<T, PreprocessError>;

    /// The CUDA device [`KernelRunner::run_on_device`] leaves results on, if any.
    fn hands_off_on(&self) -> Option<i32> {
        None
    }

    /// Runs the steps and leaves argument `keep` where it is, in memory of CUDA device `device`
    /// that ONNX Runtime reads in place; None where the backend's memory is not that (wgpu, or
    /// another device).
    fn run_on_device(
        &self,
        _args: &[Arg<'_>],
        _steps: &[Step],
        _keep: usize,
        _device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        Ok(None)
    }
}

/// The preprocessing stages on any [`KernelRunner`].
pub struct GpuKernels<R>(pub R);

fn words(bytes: &[u8]) -> &[u32] {
    bytemuck::cast_slice(bytes)
}

/// Where a gathering kernel's f32 batch goes.
enum GatherInto<'a> {
    /// Appended to a host vector.
    Host(&'a mut Vec<f32>),
    /// Left on CUDA device `.0` if the backend can.
    Device(i32),
}

impl<R: KernelRunner> GpuKernels<R> {
    /// `n` as a kernel's 32-bit count. The kernels index with u32 (what GPUs compute fastest):
    /// a larger launch would wrap and read the wrong data without an error, so it is refused.
    fn count(&self, kernel: &'static str, what: &str, n: usize) -> Result<u32, PreprocessError> {
        u32::try_from(n).map_err(|_| self.too_large(kernel, &format!("{n} {what}")))
    }

    /// The launch over a `width` x `height` binary image, if its words can be indexed.
    fn per_word(
        &self,
        kernel: &'static str,
        width: usize,
        height: usize,
    ) -> Result<LaunchParams, PreprocessError> {
        LaunchParams::per_word(width, height)
            .ok_or_else(|| self.too_large(kernel, &format!("a {width} x {height} image")))
    }

    fn too_large(&self, kernel: &'static str, what: &str) -> PreprocessError {
        PreprocessError::Kernel {
            backend: self.0.backend().as_str(),
            kernel,
            message: format!(
                "{what} is beyond what the GPU kernels' 32-bit indices address ({} at most); \
                 the cpu backend has no such limit",
                u32::MAX
            ),
        }
    }

    /// Every buffer's bytes within 32-bit indices (inputs are indexed by byte, word or value).
    fn check_buffers(&self, kernel: &'static str, args: &[Arg<'_>]) -> Result<(), PreprocessError> {
        match args.iter().map(Arg::byte_len).max() {
            Some(bytes) if u32::try_from(bytes).is_err() => {
                Err(self.too_large(kernel, &format!("a buffer of {bytes} bytes")))
            }
            _ => Ok(()),
        }
    }

    /// [`KernelRunner::run`] of buffers the kernels can index.
    fn run<T>(
        &self,
        args: &[Arg<'_>],
        steps: &[Step],
        read: &[usize],
        finish: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<T, PreprocessError> {
        self.check_buffers(steps[0].kernel, args)?;
        self.0.run(args, steps, read, finish)
    }

    /// One `kernel` that reads two inputs and writes `launch.count` f32 values (the crop batch,
    /// the window batch).
    fn gather(
        &self,
        kernel: &'static str,
        [first, second]: [&[u8]; 2],
        launch: LaunchParams,
        into: GatherInto<'_>,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        let args = [
            Arg::Input(first),
            Arg::Input(second),
            Arg::Output(launch.count as usize * 4),
        ];
        let steps = [Step {
            kernel,
            params: launch,
            bindings: &[0, 1, 2],
        }];
        match into {
            GatherInto::Host(out) => self.run(&args, &steps, &[2], |result| {
                out.extend_from_slice(bytemuck::cast_slice(result[0]));
                None
            }),
            GatherInto::Device(device) => {
                self.check_buffers(kernel, &args)?;
                self.0.run_on_device(&args, &steps, 2, device)
            }
        }
    }

    /// The windows of `spans` over `rows` (see [`Preprocess::stack_windows`]).
    fn stack(
        &self,
        rows: &[f32],
        width: usize,
        window: usize,
        spans: &[WindowSpan],
        into: GatherInto<'_>,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        if spans.is_empty() || width == 0 || window == 0 {
            return Ok(None);
        }
        // The CPU backend panics on these caller errors; pooled device buffers would read
        // another call's data instead.
        let held = rows.len() / width;
        assert!(
            spans
                .iter()
                .all(|s| s.first <= s.last && (s.last as usize) < held),
            "window spans outside the {held} rows"
        );
        let launch = LaunchParams {
            count: self.count("stack_windows", "values", spans.len() * window * width)?,
            c: self.count("stack_windows", "channels", width)?,
            d: self.count("stack_windows", "cycles a window", window)?,
            ..LaunchParams::default()
        };
        self.gather(
            "stack_windows",
            [bytemuck::cast_slice(rows), bytemuck::cast_slice(spans)],
            launch,
            into,
        )
    }

    /// The crop batch of `candidates` (see [`Preprocess::crops`]); nothing when there is
    /// nothing to crop.
    fn crop(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        into: GatherInto<'_>,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        let Some(first) = channels.first() else {
            return Ok(None);
        };
        if candidates.is_empty() {
            return Ok(None);
        }
        assert!(
            channels
                .iter()
                .all(|c| c.width() == first.width() && c.height() == first.height()),
            "crop channels of different sizes"
        );
        let planes = crop_planes(candidates, params, channels.len());
        let size = params.crop_size;
        let images: Vec<u32> = channels
            .iter()
            .flat_map(|c| c.as_u32_words().iter().copied())
            .collect();
        let launch = LaunchParams {
            count: self.count("crops", "crop values", planes.len() * size * size)?,
            c: self.count("crops", "pixels a crop side", size)?,
            ..self.per_word("crops", first.width(), first.height())?
        };
        self.gather(
            "crops",
            [bytemuck::cast_slice(&images), bytemuck::cast_slice(&planes)],
            launch,
            into,
        )
    }
}

impl<R: KernelRunner> Preprocess for GpuKernels<R> {
    fn backend(&self) -> Backend {
        self.0.backend()
    }

    fn device(&self) -> &str {
        self.0.device()
    }

    fn hands_off_on(&self) -> Option<i32> {
        self.0.hands_off_on()
    }

    fn histogram(&self, gray: &[u8]) -> Result<[u32; 256], PreprocessError> {
        let packed = pack_pixels(gray);
        let params = LaunchParams {
            count: self.count("histogram", "words", packed.len())?,
            c: self.count("histogram", "pixels", gray.len())?,
            ..LaunchParams::default()
        };
        let zeros = [0u32; 256];
        self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&packed)),
                Arg::Input(bytemuck::cast_slice(&zeros)),
            ],
            &[Step {
                kernel: "histogram",
                params,
                bindings: &[0, 1],
            }],
            &[1],
            |out| {
                let mut bins = [0u32; 256];
                bins.copy_from_slice(words(out[0]));
                bins
            },
        )
    }

    fn threshold(
        &self,
        gray: &[u8],
        width: usize,
        height: usize,
        threshold: u8,
    ) -> Result<BitImage, PreprocessError> {
        assert_eq!(gray.len(), width * height, "gray buffer size");
        let params = LaunchParams {
            c: threshold as u32,
            ..self.per_word("threshold", width, height)?
        };
        let packed = pack_pixels(gray);
        self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&packed)),
                Arg::Output(params.count as usize * 4),
            ],
            &[Step {
                kernel: "threshold",
                params,
                bindings: &[0, 1],
            }],
            &[1],
            |out| BitImage::from_u32_words(width, height, words(out[0])),
        )
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
        assert_eq!(
            (template.width(), template.height()),
            (width, height),
            "template size"
        );
        let image = self.per_word("compare", width, height)?;
        let bytes = image.count as usize * 4;
        let with_size = |k: usize| LaunchParams {
            c: k as u32,
            ..image
        };
        // Buffers: 0 test, 1 template, 2 aligned, 3 difference, 4 eroded, 5 opened, 6 merged.
        let mut steps = vec![Step {
            kernel: "compare",
            params: LaunchParams {
                a: dx as i32,
                b: dy as i32,
                ..image
            },
            bindings: &[0, 1, 2, 3],
        }];
        let opened = if open_size > 1 {
            steps.push(Step {
                kernel: "erode",
                params: with_size(open_size),
                bindings: &[3, 4],
            });
            steps.push(Step {
                kernel: "dilate",
                params: with_size(open_size),
                bindings: &[4, 5],
            });
            5
        } else {
            3
        };
        let merged = if merge_size > 1 {
            steps.push(Step {
                kernel: "dilate",
                params: with_size(merge_size),
                bindings: if opened == 5 { &[5, 6] } else { &[3, 6] },
            });
            6
        } else {
            opened
        };
        self.run(
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
            |out| {
                let image_at = |i: usize| BitImage::from_u32_words(width, height, words(out[i]));
                Comparison {
                    aligned: image_at(0),
                    difference: image_at(1),
                    opened: image_at(2),
                    merged: image_at(3),
                }
            },
        )
    }

    fn crops(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError> {
        self.crop(channels, candidates, params, GatherInto::Host(out))
            .map(drop)
    }

    fn crops_on_device(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        self.crop(channels, candidates, params, GatherInto::Device(device))
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
            count: self.count("scale_rows", "values", rows * inputs.columns.len())?,
            c: self.count("scale_rows", "channels", inputs.columns.len())?,
            d: self.count("scale_rows", "source columns", map.source_width)?,
            ..LaunchParams::default()
        };
        let none = [u32::MAX];
        self.run(
            &[
                Arg::Input(bytemuck::cast_slice(&inputs.source)),
                Arg::Input(bytemuck::cast_slice(&inputs.columns)),
                Arg::Input(bytemuck::cast_slice(&inputs.affine)),
                Arg::Output(launch.count as usize * 4),
                Arg::Input(bytemuck::cast_slice(&none)),
            ],
            &[Step {
                kernel: "scale_rows",
                params: launch,
                bindings: &[0, 1, 2, 3, 4],
            }],
            &[3, 4],
            |result| {
                inputs
                    .non_finite(words(result[1])[0], source, map)
                    .map(|()| out.extend_from_slice(bytemuck::cast_slice(result[0])))
            },
        )
    }

    fn stack_windows(
        &self,
        rows: &[f32],
        width: usize,
        window: usize,
        spans: &[WindowSpan],
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError> {
        self.stack(rows, width, window, spans, GatherInto::Host(out))
            .map(drop)
    }

    fn stack_windows_on_device(
        &self,
        rows: &[f32],
        width: usize,
        window: usize,
        spans: &[WindowSpan],
        device: i32,
    ) -> Result<Option<DeviceBytes>, PreprocessError> {
        self.stack(rows, width, window, spans, GatherInto::Device(device))
    }
}
