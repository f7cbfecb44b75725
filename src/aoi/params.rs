//! Parameters of the non-learned stages, read from the defect model's `[preprocessing]` table so
//! the server always runs the pipeline the model was trained with.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Block size averaged into one crop pixel.
    pub crop_scale: usize,
    /// Crop side fed to the classifier (`crop_window / crop_scale`).
    pub crop_size: usize,
    /// Side of a second, full-resolution window with the same centre (0: none); equals crop_size.
    pub fine_window: usize,
    /// Crop channels, in order: "test", "template", "xor".
    pub channels: Vec<String>,
    /// Detections below this confidence are dropped.
    pub score_threshold: f32,
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

    pub fn from_table(table: Option<&toml::Table>) -> Result<PipelineParams, String> {
        let params: PipelineParams = match table {
            Some(table) => table
                .clone()
                .try_into()
                .map_err(|e| format!("[preprocessing]: {e}"))?,
            None => PipelineParams::default(),
        };
        params.validate()?;
        Ok(params)
    }

    fn validate(&self) -> Result<(), String> {
        if self.crop_window != self.crop_scale * self.crop_size {
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
    fn split_and_merge_keys_are_typed() {
        let params = parse("split_size = 64\nmerge_same_class = true").unwrap();
        assert_eq!((params.split_size, params.merge_same_class), (64, true));
        assert!(parse("split_size = \"64\"").is_err());
        assert!(parse("merge_same_class = 1").is_err());
    }
}
