//! Automated optical inspection of PCBs: each test image is compared with the golden template of
//! its board; candidate differences are classified by a small CNN into the DeepPCB defect classes.
//! Stages are separate functions (bit-exact ports of models/train/aoi/pipeline.py) so each can be
//! benchmarked and, later, replaced by a GPU kernel.

pub mod align;
pub mod binarize;
pub mod bitimage;
pub mod candidates;
pub mod components;
pub mod crops;
pub mod decode_budget;
pub mod deeppcb;
pub mod detections;
pub mod evaluation;
pub mod image_io;
pub mod params;
pub mod pipeline;
pub mod synthetic;
pub mod templates;

use std::path::Path;
use std::sync::Arc;

use crate::disk_reserve::DiskReserve;

pub use pipeline::{AoiError, Inspection, Inspector};
pub use templates::TemplateStore;

/// What the server's AOI routes need: the inspector and the boards' templates.
pub struct AoiService {
    pub inspector: Arc<Inspector>,
    pub templates: TemplateStore,
}

impl AoiService {
    pub fn open(
        inspector: Inspector,
        template_dir: &Path,
        max_template_bytes: u64,
        reserve: DiskReserve,
    ) -> anyhow::Result<AoiService> {
        let templates = TemplateStore::open(template_dir, &inspector, max_template_bytes, reserve)?;
        Ok(AoiService {
            inspector: Arc::new(inspector),
            templates,
        })
    }

    /// The confidence at which a defect rejects a board: its own reject threshold, or the
    /// model's operating threshold.
    pub fn reject_threshold(&self, board_threshold: Option<f32>) -> f32 {
        board_threshold.unwrap_or(self.inspector.params.score_threshold)
    }

    /// The confidence from which a board's defects are listed: the model's operating threshold,
    /// or the board's reject threshold where that is lower, so every defect that rejects a
    /// board is also listed.
    pub fn listing_threshold(&self, board_threshold: Option<f32>) -> f32 {
        self.reject_threshold(board_threshold)
            .min(self.inspector.params.score_threshold)
    }

    /// PASS unless the image does not match its template, some of its candidates were not
    /// classified (beyond `max_candidates`), or a defect reaches the board's reject threshold.
    pub fn verdict(&self, inspection: &Inspection, reject_threshold: Option<f32>) -> &'static str {
        let threshold = self.reject_threshold(reject_threshold);
        if !inspection.alignment.matches_template
            || inspection.unclassified_candidates > 0
            || inspection.defects.iter().any(|d| d.confidence >= threshold)
        {
            "REJECT"
        } else {
            "PASS"
        }
    }
}
