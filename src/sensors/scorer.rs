//! A RUL model and its paired anomaly model, run through their batchers on the same scaled
//! windows (both models at once, each on its own batcher worker).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::engine::{InferError, ModelRegistry, Priority, ServedModel};
use crate::runtime::device::PlacedBytes;
use crate::sensors::assess::{AssessSettings, Risk};
use crate::sensors::params::{Calibration, RulCalibration, SensorParams};
use crate::sensors::window::Scaler;
use crate::sensors::{ANOMALY_PREFIX, RUL_PREFIX, SensorError};
use crate::tensor::{DataType, Tensor};

/// Model outputs for a batch of windows.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub rul: Vec<f32>,
    pub rul_std: Vec<f32>,
    /// Raw reconstruction error; None without an anomaly model.
    pub anomaly_raw: Option<Vec<f32>>,
    /// The longer wait in a batcher queue and the longer model run of the two models.
    pub queue_time: std::time::Duration,
    pub compute_time: std::time::Duration,
    /// Rows of the RUL model's batch this ran in.
    pub batch_rows: usize,
}

impl Scores {
    /// Why window `index` cannot be scored, when a model output for it is NaN or infinite:
    /// finite inputs far outside the training range can still overflow the network.
    pub fn non_finite_at(&self, index: usize) -> Option<String> {
        let anomaly = self
            .anomaly_raw
            .as_ref()
            .map(|raw| ("anomaly score", raw[index]));
        [("rul", self.rul[index]), ("rul_std", self.rul_std[index])]
            .into_iter()
            .chain(anomaly)
            .find(|(_, value)| !value.is_finite())
            .map(|(output, value)| {
                format!(
                    "the model's {output} output is {value}: the window's values lie far outside \
                     the range the model was trained on"
                )
            })
    }
}

/// What one window comes to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Assessment {
    pub rul: f32,
    /// Ensemble spread (the model's `rul_std` output).
    pub rul_std: f32,
    /// Calibrated 1-sigma error bar (`sqrt(rul_std² + sigma(rul)²)`); the spread without a
    /// RUL `[calibration]`.
    pub rul_sigma: f32,
    pub risk: Risk,
    /// 0..1, None without an anomaly model.
    pub anomaly: Option<f32>,
    pub anomaly_raw: Option<f32>,
    pub health: f32,
}

pub struct SensorModel {
    pub rul: Arc<ServedModel>,
    pub anomaly: Option<Arc<ServedModel>>,
    pub params: SensorParams,
    pub calibration: Option<Calibration>,
    pub rul_calibration: Option<RulCalibration>,
    pub scaler: Scaler,
    rul_outputs: [usize; 2],
    anomaly_output: usize,
}

/// Index of an FP32 `[1]` output by name, or a setup error naming the model.
fn output_index(model: &ServedModel, name: &str) -> Result<usize, SensorError> {
    let config = &model.spec.config;
    config
        .outputs
        .iter()
        .position(|o| o.name == name && o.datatype == DataType::Fp32 && o.shape == [1])
        .ok_or_else(|| {
            SensorError::Setup(format!(
                "model {} needs an FP32 output \"{name}\" of shape [1] (has: {})",
                config.name,
                config
                    .outputs
                    .iter()
                    .map(|o| format!("{} {} {:?}", o.name, o.datatype, o.shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// The model must take one FP32 input `[window, channels]` and batch.
fn check_input(model: &ServedModel, params: &SensorParams) -> Result<(), SensorError> {
    let config = &model.spec.config;
    let expected = [params.window as i64, params.channels.len() as i64];
    let fits = config.inputs.len() == 1
        && config.inputs[0].datatype == DataType::Fp32
        && config.inputs[0].shape == expected
        && config.max_batch_size > 0;
    if fits {
        Ok(())
    } else {
        Err(SensorError::Setup(format!(
            "model {} must take one FP32 input of shape {expected:?} (window x channels from \
             [preprocessing]) with max_batch_size > 0",
            config.name
        )))
    }
}

impl SensorModel {
    /// Opens `rul_name` and its anomaly twin when the registry has one.
    pub fn open(registry: &ModelRegistry, rul_name: &str) -> Result<SensorModel, SensorError> {
        let rul = registry
            .get(rul_name, None)
            .ok_or_else(|| SensorError::Setup(format!("model {rul_name} is not loaded")))?;
        let config = &rul.spec.config;
        let params = SensorParams::from_table(rul_name, config.preprocessing.as_ref())?;
        check_input(&rul, &params)?;
        let rul_outputs = [output_index(&rul, "rul")?, output_index(&rul, "rul_std")?];
        let rul_calibration = RulCalibration::from_table(rul_name, config.calibration.as_ref())?;
        let suffix = rul_name.strip_prefix(RUL_PREFIX).unwrap_or(rul_name);
        let anomaly_name = format!("{ANOMALY_PREFIX}{suffix}");
        let (anomaly, calibration, anomaly_output) = match registry.get(&anomaly_name, None) {
            None => (None, None, 0),
            Some(anomaly) => {
                let anomaly_config = &anomaly.spec.config;
                let anomaly_params =
                    SensorParams::from_table(&anomaly_name, anomaly_config.preprocessing.as_ref())?;
                if !anomaly_params.same_input(&params) {
                    return Err(SensorError::Setup(format!(
                        "{anomaly_name} and {rul_name} disagree on [preprocessing] window, \
                         channels, offset or scale; paired models must share their input"
                    )));
                }
                check_input(&anomaly, &params)?;
                let calibration =
                    Calibration::from_table(&anomaly_name, anomaly_config.calibration.as_ref())?;
                let index = output_index(&anomaly, "score")?;
                (Some(anomaly), Some(calibration), index)
            }
        };
        Ok(SensorModel {
            scaler: Scaler::new(&params),
            rul,
            anomaly,
            params,
            calibration,
            rul_calibration,
            rul_outputs,
            anomaly_output,
        })
    }

    pub fn name(&self) -> &str {
        self.rul.name()
    }

    /// Windows per batch: the smaller max_batch_size of the two models.
    pub fn batch_rows(&self) -> usize {
        let rul = self.rul.spec.config.max_batch_size;
        match &self.anomaly {
            Some(anomaly) => rul.min(anomaly.spec.config.max_batch_size),
            None => rul,
        }
        .max(1)
    }

    /// Deadline for a request that sets none (the RUL model's default timeout).
    pub fn default_deadline(&self) -> Instant {
        Instant::now()
            + std::time::Duration::from_millis(
                self.rul.spec.config.dynamic_batching.default_timeout_ms,
            )
    }

    /// The CUDA device whose memory both models read in place, if they both run there.
    pub fn device(&self) -> Option<i32> {
        let rul = self.rul.batcher.device();
        match &self.anomaly {
            Some(anomaly) if anomaly.batcher.device() != rul => None,
            _ => rul,
        }
    }

    /// Runs both models on `rows` scaled windows (`rows × window × channels` values, at most
    /// [`Self::batch_rows`] rows), in the batchers' `priority` lane.
    pub async fn score(
        &self,
        windows: PlacedBytes,
        rows: usize,
        deadline: Instant,
        priority: Priority,
    ) -> Result<Scores, InferError> {
        let shape = vec![rows, self.params.window, self.params.channels.len()];
        let rul_call = self.rul.batcher.infer_single(
            DataType::Fp32,
            shape.clone(),
            windows.clone(),
            rows,
            deadline,
            priority,
        );
        let (rul, anomaly) = match &self.anomaly {
            Some(anomaly) => {
                let anomaly_call = anomaly.batcher.infer_single(
                    DataType::Fp32,
                    shape,
                    windows,
                    rows,
                    deadline,
                    priority,
                );
                let (rul, anomaly) = futures_util::future::join(rul_call, anomaly_call).await;
                (rul?, Some(anomaly?))
            }
            None => (rul_call.await?, None),
        };
        let column = |tensor: &Tensor, name: &str| {
            tensor
                .to_f32_vec()
                .filter(|v| v.len() == rows)
                .ok_or_else(|| InferError::Inference(format!("output {name} has the wrong size")))
        };
        let (mut queue_time, mut compute_time) = (rul.queue_time, rul.compute_time);
        if let Some(response) = &anomaly {
            queue_time = queue_time.max(response.queue_time);
            compute_time = compute_time.max(response.compute_time);
        }
        Ok(Scores {
            queue_time,
            compute_time,
            batch_rows: rul.batch_rows,
            rul: column(&rul.outputs[self.rul_outputs[0]], "rul")?,
            rul_std: column(&rul.outputs[self.rul_outputs[1]], "rul_std")?,
            anomaly_raw: match anomaly {
                Some(response) => Some(column(&response.outputs[self.anomaly_output], "score")?),
                None => None,
            },
        })
    }

    /// Risk, anomaly score and health of window `index` of `scores`.
    pub fn assess(&self, scores: &Scores, index: usize, settings: &AssessSettings) -> Assessment {
        let rul = scores.rul[index];
        let anomaly_raw = scores.anomaly_raw.as_ref().map(|raw| raw[index]);
        let (anomaly, alarm) = match (&self.calibration, anomaly_raw) {
            (Some(calibration), Some(raw)) => {
                (Some(calibration.score(raw)), calibration.alarm_threshold)
            }
            _ => (None, 1.0),
        };
        let rul_std = scores.rul_std[index];
        Assessment {
            rul,
            rul_std,
            rul_sigma: self
                .rul_calibration
                .as_ref()
                .map_or(rul_std, |c| c.total(rul, rul_std)),
            risk: settings.risk(rul),
            anomaly,
            anomaly_raw,
            health: settings.health(rul, self.params.rul_cap, anomaly, alarm),
        }
    }

    /// The alarm threshold of the anomaly score (None without an anomaly model).
    pub fn alarm_threshold(&self) -> Option<f64> {
        self.calibration.as_ref().map(|c| c.alarm_threshold)
    }
}
