//! Parameters of the non-learned stages, read from the defect model's `[preprocessing]` table so
//! the server always runs the pipeline the model was trained with.

use serde::{Deserialize, Serialize};

use crate::runtime::model_config::read_table;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineParams {
    /// Threshold used when an image has a single grey level.
    pub otsu_fallback_threshold: u8,
    /// Template shift search range in pixels, both axes.
    pub align_radius: usize,
    /// XOR counted on every `align_step`-th row and column.
    pub align_step: usize,
    /// Opening of the difference with an `open_size` square (drops edge noise).
    pub open_size: usize,
    /// Dilation with a `merge_size` square (joins fragments of one defect).
    pub merge_size: usize,
    /// Smallest candidate, in opened difference pixels.
    pub min_area: u64,
    /// Components with a side longer than this are cut into cells of this side, so a long
    /// difference (an open along a trace) gives crops the classifier can see whole (0: never cut).
    pub split_size: usize,
    /// Safety cap on candidates per board (largest first).
    pub max_candidates: usize,
    /// Crop window side in full-resolution pixels.
    pub crop_window: usize,
    /// Block size averaged into one crop pixel; a power of two, so averages are exact.
    pub crop_scale: usize,
    /// Crop side fed to the classifier (`crop_window / crop_scale`).
    pub crop_size: usize,
    /// Side of a second, full-resolution window with the same centre (0: none); equals crop_size.
    pub fine_window: usize,
    /// Crop channels, in order: "test", "template", "xor".
    pub channels: Vec<String>,
    /// Detections below this confidence are dropped.
    pub score_threshold: f32,
    /// A board whose share of differing pixels after alignment is above this does not match its
    /// template (another board, an inverted or blank image): REJECT whatever its defects.
    pub max_mismatch: f32,
    /// NMS across classes: suppress when IoU > this.
    pub nms_iou: f64,
    /// NMS within a class: suppress when the intersection exceeds this share of the smaller box.
    pub nms_iomin: f64,
    /// After NMS, union-merge overlapping same-class detections (fragments of one defect).
    pub merge_same_class: bool,
}

impl Default for PipelineParams {
    fn default() -> Self {
        PipelineParams {
            otsu_fallback_threshold: 127,
            align_radius: 12,
            align_step: 1,
            open_size: 2,
            merge_size: 5,
            min_area: 6,
            split_size: 0,
            max_candidates: 512,
            crop_window: 128,
            crop_scale: 2,
            crop_size: 64,
            fine_window: 64,
            channels: vec!["test".into(), "template".into(), "xor".into()],
            score_threshold: 0.5,
            max_mismatch: 0.2,
            nms_iou: 0.3,
            nms_iomin: 0.5,
            merge_same_class: false,
        }
    }
}

impl PipelineParams {
    /// Classifier input channels: the crop channels, twice with a fine window.
    pub fn input_channels(&self) -> usize {
        self.channels.len() * if self.fine_window > 0 { 2 } else { 1 }
    }

    /// Values of one candidate's crop: `[C', S, S]`.
    pub fn crop_values(&self) -> usize {
        self.input_channels() * self.crop_size * self.crop_size
    }

    /// The defect model's `[preprocessing]`: every key this server reads, the keys that state
    /// what it implements (each must hold exactly that), and notes. Keys left out take their
    /// defaults; an unknown key is an error.
    pub fn from_table(table: Option<&toml::Table>) -> Result<PipelineParams, String> {
        let table = table.ok_or(
            "[preprocessing]: missing (the defect model's config names the pipeline it was \
             trained with; see models/train/aoi/PIPELINE.md)",
        )?;
        for (key, implemented) in FIXED {
            if let Some(value) = table.get(key)
                && *value != implemented.into_value()
            {
                return Err(format!(
                    "[preprocessing]: {key} = {value} is not what this server implements ({key} \
                     = {})",
                    implemented.into_value()
                ));
            }
        }
        let notes: Vec<&str> = FIXED.iter().map(|(key, _)| *key).chain(NOTES).collect();
        let params: PipelineParams =
            read_table(table, &notes).map_err(|e| format!("[preprocessing]: {e}"))?;
        params.validate()?;
        Ok(params)
    }

    fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("score_threshold", self.score_threshold as f64),
            ("max_mismatch", self.max_mismatch as f64),
            ("nms_iou", self.nms_iou),
            ("nms_iomin", self.nms_iomin),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("[preprocessing]: {name} {value} is outside [0, 1]"));
            }
        }
        if self.max_candidates == 0 || self.crop_size == 0 || self.crop_scale == 0 {
            return Err(
                "[preprocessing]: max_candidates, crop_size and crop_scale must be at least 1"
                    .into(),
            );
        }
        // Crops are small next to a board: a window this large is a mistake in the config.
        if self.crop_window > MAX_CROP_WINDOW {
            return Err(format!(
                "[preprocessing]: crop_window {} is above {MAX_CROP_WINDOW} pixels",
                self.crop_window
            ));
        }
        // A block average is then a count over a power of two, which every backend computes
        // exactly (WGSL's division may be approximate for other divisors).
        if !self.crop_scale.is_power_of_two() {
            return Err(format!(
                "[preprocessing]: crop_scale {} must be a power of two (1, 2, 4, ...)",
                self.crop_scale
            ));
        }
        if Some(self.crop_window) != self.crop_scale.checked_mul(self.crop_size) {
            return Err(format!(
                "[preprocessing]: crop_window {} must equal crop_scale {} x crop_size {}",
                self.crop_window, self.crop_scale, self.crop_size
            ));
        }
        if self.fine_window != 0 && self.fine_window != self.crop_size {
            return Err(format!(
                "[preprocessing]: fine_window {} must be 0 or equal crop_size {}",
                self.fine_window, self.crop_size
            ));
        }
        if let Some(bad) = self
            .channels
            .iter()
            .find(|c| !["test", "template", "xor"].contains(&c.as_str()))
        {
            return Err(format!(
                "[preprocessing]: channel \"{bad}\" is unknown (allowed: test, template, xor)"
            ));
        }
        if self.channels.is_empty() || self.merge_size == 0 || self.align_step == 0 {
            return Err("[preprocessing]: channels, merge_size and align_step must be set".into());
        }
        Ok(())
    }
}

/// The largest crop window side accepted, in pixels.
const MAX_CROP_WINDOW: usize = 4096;

/// A value a fixed key of `[preprocessing]` must hold.
#[derive(Clone, Copy)]
enum Fixed {
    Text(&'static str),
    Integer(i64),
    Flag(bool),
}

impl Fixed {
    fn into_value(self) -> toml::Value {
        match self {
            Fixed::Text(text) => toml::Value::String(text.into()),
            Fixed::Integer(n) => toml::Value::Integer(n),
            Fixed::Flag(b) => toml::Value::Boolean(b),
        }
    }
}

/// Keys that state what the pipeline does (models/train/aoi/PIPELINE.md): this server implements
/// exactly these, so a config asking for anything else is refused rather than run differently.
const FIXED: [(&str, Fixed); 10] = [
    ("binarize", Fixed::Text("otsu")),
    ("align_order", Fixed::Text("r2,dy,dx")),
    ("shift_fill", Fixed::Integer(0)),
    ("xor_mask_invalid", Fixed::Flag(true)),
    ("connectivity", Fixed::Integer(8)),
    (
        "box_convention",
        Fixed::Text("x1,y1 inclusive; x2,y2 exclusive"),
    ),
    ("crop_padding", Fixed::Text("zero")),
    ("box_units", Fixed::Text("window")),
    ("box_rounding", Fixed::Text("floor(v + 0.5)")),
    ("nms", Fixed::Text("greedy")),
];

/// Keys kept for people, with any value.
const NOTES: [&str; 1] = ["channel_values"];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineParams, String> {
        PipelineParams::from_table(Some(&text.parse::<toml::Table>().unwrap()))
    }

    #[test]
    fn configs_without_the_split_and_merge_keys_keep_the_old_pipeline() {
        let params = parse("min_area = 6\nbinarize = \"otsu\"").unwrap();
        assert_eq!((params.split_size, params.merge_same_class), (0, false));
    }

    #[test]
    fn the_shipped_table_reads_and_mistakes_in_it_are_refused() {
        let config: toml::Table = toml::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/aoi_defect/config.toml"
            ))
            .unwrap(),
        )
        .unwrap();
        let shipped = config["preprocessing"].as_table().unwrap().clone();
        assert_eq!(
            PipelineParams::from_table(Some(&shipped))
                .unwrap()
                .split_size,
            64
        );
        let with = |key: &str, value: toml::Value| {
            let mut table = shipped.clone();
            table.insert(key.into(), value);
            PipelineParams::from_table(Some(&table)).unwrap_err()
        };
        for (key, value, expected) in [
            ("score_treshold", toml::Value::Float(0.9), "score_treshold"),
            ("binarize", toml::Value::String("adaptive".into()), "otsu"),
            ("connectivity", toml::Value::Integer(4), "connectivity = 8"),
            ("score_threshold", toml::Value::Float(7.5), "outside [0, 1]"),
            (
                "max_mismatch",
                toml::Value::Float(1.5),
                "max_mismatch 1.5 is outside [0, 1]",
            ),
            ("nms_iou", toml::Value::Float(-3.0), "outside [0, 1]"),
            ("max_candidates", toml::Value::Integer(0), "at least 1"),
            ("crop_scale", toml::Value::Integer(0), "at least 1"),
            (
                "crop_scale",
                toml::Value::Integer(3),
                "crop_scale 3 must be a power of two",
            ),
            (
                "crop_scale",
                toml::Value::Integer(288230376151711744),
                "must equal crop_scale",
            ),
        ] {
            let error = with(key, value);
            assert!(error.contains(expected), "{key}: {error}");
        }
        assert!(
            PipelineParams::from_table(None)
                .unwrap_err()
                .contains("missing")
        );
    }

    #[test]
    fn split_and_merge_keys_are_typed() {
        let params = parse("split_size = 64\nmerge_same_class = true").unwrap();
        assert_eq!((params.split_size, params.merge_same_class), (64, true));
        assert!(parse("split_size = \"64\"").is_err());
        assert!(parse("merge_same_class = 1").is_err());
    }
}
