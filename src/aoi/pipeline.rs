//! The inspection of one board: decode → binarise → align → difference → candidates → crops
//! (CPU, timed per stage) → classifier through the model's batcher, so crops of many boards share
//! a batch → detections and verdict.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::aoi::align::{Shift, estimate_shift};
use crate::aoi::binarize::{otsu_from_histogram, otsu_threshold};
use crate::aoi::bitimage::BitImage;
use crate::aoi::candidates::{Candidates, candidates_in_masks};
use crate::aoi::components::Component;
use crate::aoi::decode_budget::Claim;
use crate::aoi::detections::{Detection, decode_detections};
use crate::aoi::image_io::{GrayImage, ImageError, decode_gray, decode_gray_keeping};
use crate::aoi::params::PipelineParams;
use crate::engine::{InferError, ModelRegistry, Priority, ServedModel};
use crate::metrics::Metrics;
use crate::preprocess::{Preprocess, PreprocessError, handoff_device};
use crate::runtime::device::{DeviceBytes, PlacedBytes};
use crate::tensor::{DataType, f32_bytes};

/// The bundled defect classifier.
pub const DEFECT_MODEL: &str = "aoi_defect";

#[derive(Debug, thiserror::Error)]
pub enum AoiError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "test image is {test_width}x{test_height} but the template of this board is {template_width}x{template_height}"
    )]
    SizeMismatch {
        test_width: usize,
        test_height: usize,
        template_width: usize,
        template_height: usize,
    },
    /// Registering it would pass the memory allowed for templates, or the free space kept on
    /// the disk.
    #[error("{0}")]
    TemplatesFull(String),
    #[error(
        "a template of {width}x{height} is too small: at least {MIN_TEMPLATE_SIDE}x{MIN_TEMPLATE_SIDE} \
         pixels (the alignment moves it up to 12 pixels each way)"
    )]
    TemplateTooSmall { width: usize, height: usize },
    #[error(
        "the template is {percent:.3} % one colour once binarised: it has nothing to align a \
         board on, and a blank image would pass against it; register an image of the board's \
         pattern"
    )]
    TemplateUniform { percent: f64 },
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error("{0}")]
    Setup(String),
}

/// The smallest template side: on fewer pixels the ±12-pixel alignment search can slide a board
/// off itself and find no difference at all (a 25x25 board inverted passed).
pub const MIN_TEMPLATE_SIDE: usize = 64;

/// A template binarised once at registration, reused for every test image of its board.
#[derive(Debug, Clone)]
pub struct PreparedTemplate {
    pub width: usize,
    pub height: usize,
    pub threshold: u8,
    pub bits: BitImage,
}

impl PreparedTemplate {
    pub fn new(gray: &GrayImage, params: &PipelineParams) -> PreparedTemplate {
        let threshold = otsu_threshold(&gray.pixels, params.otsu_fallback_threshold);
        PreparedTemplate {
            width: gray.width,
            height: gray.height,
            threshold,
            bits: BitImage::from_threshold(&gray.pixels, gray.width, gray.height, threshold),
        }
    }

    /// Bytes it keeps in memory while its board is registered.
    pub fn memory_bytes(&self) -> u64 {
        self.bits.memory_bytes() as u64
    }
}

/// Milliseconds per stage of one inspection.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct StageTimings {
    pub decode: f64,
    pub binarize: f64,
    pub align: f64,
    pub candidates: f64,
    pub crops: f64,
    pub classify: f64,
    pub detections: f64,
    pub total: f64,
}

impl StageTimings {
    pub const STAGES: [&'static str; 7] = [
        "decode",
        "binarize",
        "align",
        "candidates",
        "crops",
        "classify",
        "detections",
    ];

    pub fn values(&self) -> [f64; 7] {
        [
            self.decode,
            self.binarize,
            self.align,
            self.candidates,
            self.crops,
            self.classify,
            self.detections,
        ]
    }
}

/// Milliseconds to the microsecond, so reports print `0.611`, not float noise.
fn ms(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// Everything the CPU stages produce for one board.
#[derive(Debug)]
pub struct PreparedBoard {
    pub width: usize,
    pub height: usize,
    pub test_threshold: u8,
    pub shift: Shift,
    pub candidates: Vec<Component>,
    /// Candidates beyond `max_candidates`, not classified.
    pub unclassified: usize,
    pub crops: Crops,
    /// The crops' share of the decodes' memory budget, given back with the board (set by
    /// `Inspector::prepare`).
    pub memory: Option<Claim<'static>>,
    pub timings: StageTimings,
}

/// A board's classifier input, `[n, C, S, S]` f32.
#[derive(Debug)]
pub enum Crops {
    Host(Vec<f32>),
    /// In CUDA device memory, read there by the classifier's sessions.
    Device(DeviceBytes),
}

impl Crops {
    /// The values, when they are in host memory.
    pub fn host(&self) -> Option<&[f32]> {
        match self {
            Crops::Host(values) => Some(values),
            Crops::Device(_) => None,
        }
    }
}

/// Stages 2–5 on a decoded test image: the per-pixel work on `preprocess`'s backend, the
/// alignment search and connected components on the CPU. With `crops_device`, the CUDA device
/// whose memory the classifier reads in place, a backend that can leaves the crops there.
pub fn prepare_board(
    test: &GrayImage,
    template: &PreparedTemplate,
    params: &PipelineParams,
    preprocess: &dyn Preprocess,
    crops_device: Option<i32>,
) -> Result<PreparedBoard, AoiError> {
    if (test.width, test.height) != (template.width, template.height) {
        return Err(AoiError::SizeMismatch {
            test_width: test.width,
            test_height: test.height,
            template_width: template.width,
            template_height: template.height,
        });
    }
    let mut timings = StageTimings::default();
    let t = Instant::now();
    let histogram = preprocess.histogram(&test.pixels)?;
    let test_threshold = otsu_from_histogram(&histogram, params.otsu_fallback_threshold);
    let test_bits = preprocess.threshold(&test.pixels, test.width, test.height, test_threshold)?;
    timings.binarize = ms(t.elapsed());

    let t = Instant::now();
    let shift = estimate_shift(
        &test_bits,
        &template.bits,
        params.align_radius,
        params.align_step,
    );
    timings.align = ms(t.elapsed());

    let t = Instant::now();
    let comparison = preprocess.compare(
        &test_bits,
        &template.bits,
        (shift.dx, shift.dy),
        params.open_size,
        params.merge_size,
    )?;
    let Candidates {
        kept: found,
        left_out: unclassified,
    } = candidates_in_masks(&comparison.opened, &comparison.merged, params);
    timings.candidates = ms(t.elapsed());

    let t = Instant::now();
    let channels: Vec<&BitImage> = params
        .channels
        .iter()
        .map(|c| match c.as_str() {
            "test" => &test_bits,
            "template" => &comparison.aligned,
            _ => &comparison.difference,
        })
        .collect();
    let on_device = match crops_device {
        Some(device) => preprocess.crops_on_device(&channels, &found, params, device)?,
        None => None,
    };
    let crops = match on_device {
        Some(on_device) => Crops::Device(on_device),
        None => {
            let mut crops = Vec::new();
            preprocess.crops(&channels, &found, params, &mut crops)?;
            Crops::Host(crops)
        }
    };
    timings.crops = ms(t.elapsed());
    Ok(PreparedBoard {
        width: test.width,
        height: test.height,
        test_threshold,
        shift,
        candidates: found,
        unclassified,
        crops,
        memory: None,
        timings,
    })
}

/// The classifier must take the crops the pipeline makes and return what detections need.
fn check_signature(
    config: &crate::runtime::ModelConfig,
    params: &PipelineParams,
) -> Result<(), AoiError> {
    let expected_input = vec![
        params.input_channels() as i64,
        params.crop_size as i64,
        params.crop_size as i64,
    ];
    let problem = match (config.inputs.as_slice(), config.batching()) {
        ([input], true) if input.shape == expected_input && input.datatype == DataType::Fp32 => {
            [("class_probs", 7i64), ("boxes", 4)]
                .iter()
                .find(|(name, width)| {
                    !config.outputs.iter().any(|o| {
                        o.name == *name && o.shape == [*width] && o.datatype == DataType::Fp32
                    })
                })
                .map(|(name, width)| format!("needs an FP32 output \"{name}\" of shape [{width}]"))
        }
        _ => Some(format!(
            "needs one FP32 input of shape {expected_input:?} (channels, doubled with a fine \
             window, x crop_size x crop_size from [preprocessing]) and max_batch_size > 0"
        )),
    };
    match problem {
        Some(problem) => Err(AoiError::Setup(format!(
            "{DEFECT_MODEL}/config.toml: the model {problem}"
        ))),
        None => Ok(()),
    }
}

/// How the test image was registered to its template.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Alignment {
    /// The template's shift onto the test image, in pixels.
    pub dx: isize,
    pub dy: isize,
    /// The shift reached the edge of the search (`align_radius`): the board may be misplaced
    /// by more than the search covers, and its differences read as defects.
    pub at_search_limit: bool,
    /// Share of the compared pixels that still differ after the shift, 0..1: at most 7.9 %
    /// on the 1,000 DeepPCB pairs (defects included), a median of 48 % for another board's
    /// image, about half for an inverted or noise image.
    pub mismatch: f32,
    /// `mismatch` is within `max_mismatch`: otherwise the image is not of this template's
    /// board (or is inverted, blank, noise), and the board is rejected whatever its defects.
    pub matches_template: bool,
}

impl Alignment {
    fn of(shift: &Shift, params: &PipelineParams) -> Alignment {
        let radius = params.align_radius as isize;
        let mismatch = (shift.xor_count as f64 / shift.compared.max(1) as f64) as f32;
        Alignment {
            dx: shift.dx,
            dy: shift.dy,
            at_search_limit: shift.dx.abs() == radius || shift.dy.abs() == radius,
            mismatch,
            matches_template: mismatch <= params.max_mismatch,
        }
    }
}

/// The result of inspecting one board.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub defects: Vec<Detection>,
    pub alignment: Alignment,
    #[serde(skip)]
    pub candidates: usize,
    /// Candidates beyond `max_candidates` (`[preprocessing]`), never classified: the board is
    /// rejected, since a defect among them would go unreported.
    pub unclassified_candidates: usize,
    pub timings_ms: StageTimings,
}

/// Runs inspections: CPU stages here, the classifier through the batcher.
pub struct Inspector {
    model: Arc<ServedModel>,
    pub params: PipelineParams,
    pub(crate) metrics: Arc<Metrics>,
    pub max_image_pixels: u64,
    preprocess: Arc<dyn Preprocess>,
    /// Where the crops stay for the classifier: the CUDA device of both the preprocessing and
    /// the sessions, if they share one.
    crops_device: Option<i32>,
}

impl Inspector {
    pub fn new(
        registry: &ModelRegistry,
        metrics: Arc<Metrics>,
        max_image_pixels: u64,
        preprocess: Arc<dyn Preprocess>,
    ) -> Result<Inspector, AoiError> {
        let model = registry.get(DEFECT_MODEL, None).ok_or_else(|| {
            AoiError::Setup(format!(
                "model {DEFECT_MODEL} is not in the model repository; AOI needs it"
            ))
        })?;
        let params = PipelineParams::from_table(model.spec.config.preprocessing.as_ref())
            .map_err(|e| AoiError::Setup(format!("{DEFECT_MODEL}/config.toml: {e}")))?;
        check_signature(&model.spec.config, &params)?;
        let crops_device = handoff_device(preprocess.as_ref(), model.batcher.device());
        if let Some(device) = crops_device {
            tracing::info!(
                device,
                "AOI crops stay on the GPU: the classifier's sessions read them in place"
            );
        }
        Ok(Inspector {
            model,
            params,
            metrics,
            max_image_pixels,
            preprocess,
            crops_device,
        })
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<GrayImage, AoiError> {
        Ok(decode_gray(bytes, self.max_image_pixels)?)
    }

    pub fn prepare_template(&self, gray: &GrayImage) -> PreparedTemplate {
        PreparedTemplate::new(gray, &self.params)
    }

    /// Decoding and the CPU stages, timed; meant for a blocking thread.
    pub fn prepare(
        &self,
        test_bytes: &[u8],
        template: &PreparedTemplate,
    ) -> Result<PreparedBoard, AoiError> {
        let t = Instant::now();
        // What a board holds after its decode comes from the decodes' budget too, so many large
        // boards in flight wait for each other instead of adding up: during the stages the grey
        // image and about eight bit planes (two bytes a pixel) and at most `max_candidates`
        // crops, claimed with the decode; from the crops on, only the crops in host memory,
        // until the board is classified.
        let crops_room = (self.params.max_candidates * self.params.crop_values() * 4) as u64;
        let (test, mut claim) = decode_gray_keeping(test_bytes, self.max_image_pixels, |pixels| {
            2 * pixels + crops_room
        })?;
        let decode = ms(t.elapsed());
        let mut board = prepare_board(
            &test,
            template,
            &self.params,
            self.preprocess.as_ref(),
            self.crops_device,
        )?;
        board.timings.decode = decode;
        claim.shrink_to(board.crops.host().map_or(0, |c| 4 * c.len() as u64));
        board.memory = Some(claim);
        Ok(board)
    }

    /// The classifier over a board's crops (in chunks of the model's max batch), then detections
    /// at or above `min_score`.
    pub async fn finish(
        &self,
        mut board: PreparedBoard,
        min_score: f32,
    ) -> Result<Inspection, AoiError> {
        let t = Instant::now();
        let (probabilities, offsets) = self.classify(&mut board).await?;
        let mut timings = board.timings.clone();
        timings.classify = ms(t.elapsed());
        let t = Instant::now();
        let defects = decode_detections(
            &board.candidates,
            &probabilities,
            &offsets,
            board.width,
            board.height,
            &self.params,
            min_score,
        );
        timings.detections = ms(t.elapsed());
        // Whole microseconds like the stages, not the float noise of adding their decimals.
        let total: f64 = timings.values().iter().sum();
        timings.total = (total * 1000.0).round() / 1000.0;
        for (stage, value) in StageTimings::STAGES.iter().zip(timings.values()) {
            self.metrics
                .stage_duration
                .with_label_values(&["aoi", stage, self.preprocess.backend().as_str()])
                .observe(value / 1000.0);
        }
        Ok(Inspection {
            defects,
            alignment: Alignment::of(&board.shift, &self.params),
            candidates: board.candidates.len(),
            unclassified_candidates: board.unclassified,
            timings_ms: timings,
        })
    }

    async fn classify(&self, board: &mut PreparedBoard) -> Result<(Vec<f32>, Vec<f32>), AoiError> {
        let count = board.candidates.len();
        if count == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let config = &self.model.spec.config;
        // The crops are shared, not copied, into the chunks the batcher receives.
        let crops = match std::mem::replace(&mut board.crops, Crops::Host(Vec::new())) {
            Crops::Host(values) => PlacedBytes::Host(f32_bytes(values)),
            Crops::Device(bytes) => PlacedBytes::Device(bytes),
        };
        let row_bytes = crops.len() / count;
        // One chunk per session: a lone board's crops run on every session at once, and under
        // load the batcher merges the chunks of several boards into full batches anyway. Where
        // the sessions pad every batch to the same rows, smaller chunks would only multiply
        // the padded batches.
        let sessions = match self.model.batcher.padded_batch() {
            Some(_) => 1,
            None => self.model.batcher.sessions().max(1),
        };
        let chunk_rows = count
            .div_ceil(sessions)
            .clamp(1, config.max_batch_size.max(1));
        let deadline =
            Instant::now() + Duration::from_millis(config.dynamic_batching.default_timeout_ms);
        let calls = (0..count).step_by(chunk_rows).map(|first| {
            let rows = chunk_rows.min(count - first);
            self.model.batcher.infer_single(
                DataType::Fp32,
                config.inputs[0].concrete_shape(true, rows),
                crops.slice(first * row_bytes..(first + rows) * row_bytes),
                rows,
                deadline,
                Priority::Live,
            )
        });
        let mut probabilities = Vec::with_capacity(count * 7);
        let mut offsets = Vec::with_capacity(count * 4);
        for response in futures_util::future::join_all(calls).await {
            let response = response?;
            let output = |name: &str| {
                config
                    .outputs
                    .iter()
                    .position(|o| o.name == name)
                    .and_then(|i| response.outputs[i].to_f32_vec())
                    .ok_or_else(|| {
                        AoiError::Setup(format!("{DEFECT_MODEL} has no FP32 output {name}"))
                    })
            };
            probabilities.extend(output("class_probs")?);
            offsets.extend(output("boxes")?);
        }
        Ok((probabilities, offsets))
    }
}
