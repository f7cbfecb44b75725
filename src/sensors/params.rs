//! What the sensor pipeline needs from a model's config.toml: the window, the channel order and
//! the scaling (`[preprocessing]`), the RUL cap, the padding policy for short units, and the
//! anomaly model's `[calibration]`. Read once at start so the server always feeds a model the
//! windows it was trained on.

use serde::{Deserialize, Serialize};

use crate::runtime::model_config::read_table;
use crate::sensors::SensorError;

/// How a window is completed when a unit has fewer observed cycles than the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Repeat the unit's first observed row at the front (what the models were trained with).
    RepeatFirst,
}

impl Padding {
    pub fn name(self) -> &'static str {
        match self {
            Padding::RepeatFirst => "repeat_first",
        }
    }
}

/// `[preprocessing]` of a sensor model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorParams {
    /// Cycles per window, oldest first; the last row is the current cycle.
    pub window: usize,
    /// The model's input channels, in input order.
    pub channels: Vec<String>,
    /// Name of the scaling recipe (documentation; the numbers are `offset` and `scale`).
    #[serde(default = "default_scaling")]
    pub scaling: String,
    /// scaled = (x - offset) * scale, per channel, computed in f64 then cast to f32.
    pub offset: Vec<f64>,
    pub scale: Vec<f64>,
    /// RUL targets were capped here; health is RUL relative to it.
    pub rul_cap: f64,
    #[serde(default = "default_padding")]
    pub padding: Padding,
}

fn default_scaling() -> String {
    "minmax".into()
}

fn default_padding() -> Padding {
    Padding::RepeatFirst
}

impl SensorParams {
    pub fn from_table(
        model: &str,
        table: Option<&toml::Table>,
    ) -> Result<SensorParams, SensorError> {
        let setup = |problem: String| {
            SensorError::Setup(format!("{model}/config.toml [preprocessing]: {problem}"))
        };
        let table = table.ok_or_else(|| {
            setup(
                "missing (models named rul_* or anomaly_* are sensor models, which need window, \
                 channels, offset, scale and rul_cap)"
                    .into(),
            )
        })?;
        let params: SensorParams = read_table(table, &[]).map_err(setup)?;
        params.validate().map_err(setup)?;
        Ok(params)
    }

    fn validate(&self) -> Result<(), String> {
        let c = self.channels.len();
        if self.window == 0 || c == 0 {
            return Err("window and channels must not be empty".into());
        }
        // Results store a window's padded rows as u16.
        if self.window > usize::from(u16::MAX) {
            return Err(format!(
                "window is {} cycles; at most {} are supported",
                self.window,
                u16::MAX
            ));
        }
        if self.offset.len() != c || self.scale.len() != c {
            return Err(format!(
                "offset ({}) and scale ({}) need one value per channel ({c})",
                self.offset.len(),
                self.scale.len()
            ));
        }
        if let Some(bad) = self
            .offset
            .iter()
            .chain(&self.scale)
            .find(|v| !v.is_finite())
        {
            return Err(format!("offset and scale must be finite (found {bad})"));
        }
        let mut names: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("channel \"{}\" is listed twice", pair[0]));
        }
        if !(self.rul_cap.is_finite() && self.rul_cap > 0.0) {
            return Err(format!("rul_cap must be positive (found {})", self.rul_cap));
        }
        Ok(())
    }

    /// Values per window (window × channels).
    pub fn window_len(&self) -> usize {
        self.window * self.channels.len()
    }

    /// Whether two models can share one scaled window.
    pub fn same_input(&self, other: &SensorParams) -> bool {
        self.window == other.window
            && self.channels == other.channels
            && self.offset == other.offset
            && self.scale == other.scale
    }
}

/// Keys of an anomaly model's `[calibration]` kept for people: the RUL above which training
/// windows counted as healthy.
const ANOMALY_CALIBRATION_NOTES: [&str; 1] = ["healthy_min_rul"];

/// `[calibration]` of an anomaly model: maps the raw reconstruction error to 0..1.
///
/// Formulas (`formula`):
/// - `log_ratio`: clamp(0.5 · ln(raw / p50) / ln(p99 / p50), 0, 1);
/// - `log_piecewise_linear`: 0 up to p50, then linear in ln(raw) to 0.5 at p99 and to 1 at
///   `fail_p50` (the median error of windows just before failure), 1 beyond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    #[serde(default = "default_formula")]
    pub formula: String,
    /// Median raw error of healthy training windows (maps to 0).
    pub p50: f64,
    /// 99th percentile of healthy training windows (maps to 0.5, the alarm threshold).
    pub p99: f64,
    /// Median raw error of windows close to failure (maps to 1; `log_piecewise_linear` only).
    #[serde(default)]
    pub fail_p50: Option<f64>,
    /// Scores at or above this raise an anomaly alarm.
    #[serde(default = "default_alarm")]
    pub alarm_threshold: f64,
}

fn default_formula() -> String {
    "log_ratio".into()
}

fn default_alarm() -> f64 {
    0.5
}

impl Calibration {
    pub fn from_table(
        model: &str,
        table: Option<&toml::Table>,
    ) -> Result<Calibration, SensorError> {
        let setup = |problem: String| {
            SensorError::Setup(format!("{model}/config.toml [calibration]: {problem}"))
        };
        let table =
            table.ok_or_else(|| setup("missing (an anomaly model needs p50 and p99)".into()))?;
        let calibration: Calibration =
            read_table(table, &ANOMALY_CALIBRATION_NOTES).map_err(setup)?;
        if !(calibration.p50 > 0.0
            && calibration.p99 > calibration.p50
            && calibration.p99.is_finite())
        {
            return Err(setup(format!(
                "need 0 < p50 < p99 (found p50 {}, p99 {})",
                calibration.p50, calibration.p99
            )));
        }
        match (calibration.formula.as_str(), calibration.fail_p50) {
            ("log_ratio", _) => {}
            ("log_piecewise_linear", Some(fail)) if fail > calibration.p99 && fail.is_finite() => {}
            ("log_piecewise_linear", _) => {
                return Err(setup("log_piecewise_linear needs fail_p50 > p99".into()));
            }
            (other, _) => {
                return Err(setup(format!(
                    "formula \"{other}\" is not supported (supported: log_ratio, log_piecewise_linear)"
                )));
            }
        }
        if !(0.0..1.0).contains(&calibration.alarm_threshold) {
            return Err(setup(format!(
                "alarm_threshold {} must be within [0, 1)",
                calibration.alarm_threshold
            )));
        }
        Ok(calibration)
    }

    /// The 0..1 anomaly score of a raw reconstruction error.
    pub fn score(&self, raw: f32) -> f32 {
        let raw = (raw as f64).max(1e-12);
        let low = 0.5 * (raw / self.p50).ln() / (self.p99 / self.p50).ln();
        let z = match self.fail_p50 {
            Some(fail) if self.formula == "log_piecewise_linear" && raw >= self.p99 => {
                0.5 + 0.5 * (raw / self.p99).ln() / (fail / self.p99).ln()
            }
            _ => low,
        };
        z.clamp(0.0, 1.0) as f32
    }
}

/// Keys of a RUL model's `[calibration]` kept for people: the formula in words, the windows
/// behind each knot and the coverage reached.
const RUL_CALIBRATION_NOTES: [&str; 4] = [
    "formula",
    "sigma_count",
    "cv_coverage_1sigma",
    "cv_coverage_2sigma",
];

/// `[calibration]` of a RUL model: the out-of-fold RMS error by predicted RUL, so the error bar
/// is `rul_sigma = sqrt(rul_std² + sigma(rul)²)` (the ensemble spread alone is too narrow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulCalibration {
    /// Predicted RUL at each knot, increasing.
    pub sigma_knots: Vec<f64>,
    /// RMS error at each knot; linear in between, constant outside.
    pub sigma: Vec<f64>,
}

impl RulCalibration {
    /// None without a table, or one of notes only (the spread is then the only uncertainty).
    pub fn from_table(
        model: &str,
        table: Option<&toml::Table>,
    ) -> Result<Option<RulCalibration>, SensorError> {
        let Some(table) = table.filter(|t| {
            t.keys()
                .any(|k| !RUL_CALIBRATION_NOTES.contains(&k.as_str()))
        }) else {
            return Ok(None);
        };
        let setup = |problem: String| {
            SensorError::Setup(format!("{model}/config.toml [calibration]: {problem}"))
        };
        let calibration: RulCalibration =
            read_table(table, &RUL_CALIBRATION_NOTES).map_err(setup)?;
        let (knots, sigma) = (&calibration.sigma_knots, &calibration.sigma);
        if knots.is_empty() || knots.len() != sigma.len() {
            return Err(setup(format!(
                "sigma_knots ({}) and sigma ({}) need the same, non-zero length",
                knots.len(),
                sigma.len()
            )));
        }
        if knots.windows(2).any(|w| w[1] <= w[0])
            || sigma.iter().any(|s| !(s.is_finite() && *s >= 0.0))
        {
            return Err(setup(
                "sigma_knots must increase and sigma be finite and non-negative".into(),
            ));
        }
        Ok(Some(calibration))
    }

    /// The RMS error expected at a predicted RUL.
    pub fn sigma_at(&self, rul: f64) -> f64 {
        let (knots, sigma) = (&self.sigma_knots, &self.sigma);
        if rul.is_nan() {
            return f64::NAN;
        }
        let last = knots.len() - 1;
        if rul <= knots[0] {
            return sigma[0];
        }
        if rul >= knots[last] {
            return sigma[last];
        }
        let i = knots.partition_point(|k| *k <= rul);
        let t = (rul - knots[i - 1]) / (knots[i] - knots[i - 1]);
        sigma[i - 1] + t * (sigma[i] - sigma[i - 1])
    }

    /// The calibrated 1-sigma error bar of a prediction.
    pub fn total(&self, rul: f32, rul_std: f32) -> f32 {
        let s = self.sigma_at(rul as f64);
        ((rul_std as f64).powi(2) + s * s).sqrt() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn reads_preprocessing_and_rejects_inconsistent_tables() {
        let good = table(
            "window = 3\nchannels = [\"a\", \"b\"]\nscaling = \"minmax\"\noffset = [1.0, 2.0]\nscale = [0.5, 2.0]\nrul_cap = 125\npadding = \"repeat_first\"\n",
        );
        let params = SensorParams::from_table("m", Some(&good)).unwrap();
        let mut typo = good.clone();
        typo.insert("paddng".into(), toml::Value::String("repeat_first".into()));
        let error = SensorParams::from_table("m", Some(&typo))
            .unwrap_err()
            .to_string();
        assert!(error.contains("paddng"), "{error}");
        assert_eq!(params.window_len(), 6);
        assert_eq!(params.padding, Padding::RepeatFirst);
        let short = table(
            "window = 3\nchannels = [\"a\", \"b\"]\noffset = [1.0]\nscale = [0.5, 2.0]\nrul_cap = 125\n",
        );
        let error = SensorParams::from_table("m", Some(&short))
            .unwrap_err()
            .to_string();
        assert!(error.contains("one value per channel"), "{error}");
        let padding = table(
            "window = 3\nchannels = [\"a\"]\noffset = [1.0]\nscale = [0.5]\nrul_cap = 125\npadding = \"zeros\"\n",
        );
        let error = SensorParams::from_table("m", Some(&padding))
            .unwrap_err()
            .to_string();
        assert!(error.contains("zeros"), "{error}");
        let mut long = good.clone();
        long.insert("window".into(), toml::Value::Integer(70_000));
        let error = SensorParams::from_table("m", Some(&long))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("window is 70000 cycles; at most 65535"),
            "{error}"
        );
        assert!(SensorParams::from_table("m", None).is_err());
    }

    #[test]
    fn rul_sigma_interpolates_between_knots() {
        let c = RulCalibration::from_table(
            "r",
            Some(&table(
                "formula = \"x\"\nsigma_knots = [10.0, 20.0]\nsigma = [2.0, 4.0]\n",
            )),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.sigma_at(0.0), 2.0);
        assert_eq!(c.sigma_at(15.0), 3.0);
        assert_eq!(c.sigma_at(99.0), 4.0);
        assert!(
            c.sigma_at(f64::NAN).is_nan(),
            "a NaN prediction has no error bar"
        );
        assert!((c.total(15.0, 4.0) - 5.0).abs() < 1e-6);
        assert!(
            RulCalibration::from_table("r", Some(&table("formula = \"x\"\n")))
                .unwrap()
                .is_none(),
            "notes alone are no calibration"
        );
        let error = RulCalibration::from_table("r", Some(&table("p50 = 1.0\n")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("p50"), "{error}");
        assert!(
            RulCalibration::from_table(
                "r",
                Some(&table("sigma_knots = [2.0, 1.0]\nsigma = [1.0, 1.0]\n"))
            )
            .is_err()
        );
    }

    #[test]
    fn calibration_maps_p50_to_zero_and_p99_to_half() {
        let c = Calibration::from_table(
            "a",
            Some(&table("formula = \"log_ratio\"\np50 = 0.01\np99 = 0.04\n")),
        )
        .unwrap();
        assert!(c.score(0.01).abs() < 1e-6);
        assert!((c.score(0.04) - 0.5).abs() < 1e-6);
        assert!((c.score(0.16) - 1.0).abs() < 1e-6);
        assert_eq!(c.score(0.0), 0.0);
        assert_eq!(c.score(10.0), 1.0);
        assert!(Calibration::from_table("a", Some(&table("p50 = 0.04\np99 = 0.01\n"))).is_err());
        let typo = table("formla = \"log_piecewise_linear\"\np50 = 0.01\np99 = 0.04\n");
        let error = Calibration::from_table("a", Some(&typo))
            .unwrap_err()
            .to_string();
        assert!(error.contains("formla"), "{error}");
        let piecewise = Calibration::from_table(
            "a",
            Some(&table(
                "formula = \"log_piecewise_linear\"\np50 = 0.01\np99 = 0.04\nfail_p50 = 0.4\n",
            )),
        )
        .unwrap();
        assert!((piecewise.score(0.02) - c.score(0.02)).abs() < 1e-6);
        assert!((piecewise.score(0.04) - 0.5).abs() < 1e-6);
        assert!((piecewise.score(0.4) - 1.0).abs() < 1e-6);
        assert!(piecewise.score((0.04f64 * 0.4).sqrt() as f32) - 0.75 < 1e-5);
        assert_eq!(piecewise.score(0.001), 0.0);
        assert!(
            Calibration::from_table(
                "a",
                Some(&table(
                    "formula = \"log_piecewise_linear\"\np50 = 0.01\np99 = 0.04\n"
                ))
            )
            .is_err()
        );
    }
}
