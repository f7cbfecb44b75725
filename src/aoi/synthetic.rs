//! Synthetic boards in the DeepPCB style (white substrate, black copper, binarised), with defects
//! drawn in: the fixtures of the AOI tests and benches, which must not depend on any data set.

use std::io::Cursor;

use crate::aoi::image_io::GrayImage;

pub const SIZE: usize = 640;
const COPPER: u8 = 0;
const SUBSTRATE: u8 = 255;

/// The six DeepPCB defect kinds, drawn the way they look on a real board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefectKind {
    /// A trace cut through.
    Open,
    /// A copper bridge between two neighbouring traces.
    Short,
    /// A bite out of a trace edge.
    Mousebite,
    /// A thin protrusion from a trace edge.
    Spur,
    /// An island of spurious copper.
    Copper,
    /// A small hole in copper.
    PinHole,
}

impl DefectKind {
    pub const ALL: [DefectKind; 6] = [
        DefectKind::Open,
        DefectKind::Short,
        DefectKind::Mousebite,
        DefectKind::Spur,
        DefectKind::Copper,
        DefectKind::PinHole,
    ];

    pub fn class_name(self) -> &'static str {
        match self {
            DefectKind::Open => "open",
            DefectKind::Short => "short",
            DefectKind::Mousebite => "mousebite",
            DefectKind::Spur => "spur",
            DefectKind::Copper => "copper",
            DefectKind::PinHole => "pin-hole",
        }
    }
}

/// A board, its defective copy, and where each defect was drawn (box, exclusive right/bottom).
pub struct SyntheticBoard {
    pub template: GrayImage,
    pub test: GrayImage,
    pub defects: Vec<(DefectKind, [i64; 4])>,
}

struct Canvas(GrayImage);

impl Canvas {
    fn new() -> Canvas {
        Canvas(GrayImage {
            width: SIZE,
            height: SIZE,
            pixels: vec![SUBSTRATE; SIZE * SIZE],
        })
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, value: u8) {
        for y in y0.max(0)..y1.min(SIZE as i64) {
            for x in x0.max(0)..x1.min(SIZE as i64) {
                self.0.pixels[y as usize * SIZE + x as usize] = value;
            }
        }
    }

    fn disc(&mut self, cx: i64, cy: i64, radius: i64, value: u8) {
        for y in (cy - radius).max(0)..(cy + radius + 1).min(SIZE as i64) {
            for x in (cx - radius).max(0)..(cx + radius + 1).min(SIZE as i64) {
                if (x - cx) * (x - cx) + (y - cy) * (y - cy) <= radius * radius {
                    self.0.pixels[y as usize * SIZE + x as usize] = value;
                }
            }
        }
    }
}

/// Horizontal traces (y centre, half width) between pads at x = 70 and x = 570.
const TRACES: [(i64, i64); 4] = [(110, 12), (170, 12), (330, 14), (480, 12)];
const PAD_X: [i64; 2] = [70, 570];

fn draw_layout(canvas: &mut Canvas, offset: (i64, i64)) {
    let (dx, dy) = offset;
    for (y, half) in TRACES {
        canvas.rect(
            PAD_X[0] + dx,
            y - half + dy,
            PAD_X[1] + dx,
            y + half + dy,
            COPPER,
        );
        for x in PAD_X {
            canvas.disc(x + dx, y + dy, 26, COPPER);
            canvas.disc(x + dx, y + dy, 9, SUBSTRATE);
        }
    }
    // A vertical trace and a large copper area for pin-holes.
    canvas.rect(300 + dx, 180 + dy, 326 + dx, 320 + dy, COPPER);
    canvas.rect(380 + dx, 540 + dy, 560 + dx, 610 + dy, COPPER);
}

/// Draws one defect; returns its box.
fn draw_defect(canvas: &mut Canvas, kind: DefectKind) -> [i64; 4] {
    match kind {
        DefectKind::Open => {
            canvas.rect(200, 95, 210, 125, SUBSTRATE);
            [198, 96, 212, 124]
        }
        DefectKind::Short => {
            canvas.rect(450, 120, 458, 160, COPPER);
            [448, 118, 460, 162]
        }
        DefectKind::Mousebite => {
            canvas.disc(250, 318, 7, SUBSTRATE);
            [242, 314, 258, 326]
        }
        DefectKind::Spur => {
            canvas.rect(420, 492, 425, 512, COPPER);
            [418, 490, 427, 514]
        }
        DefectKind::Copper => {
            canvas.disc(160, 400, 9, COPPER);
            [150, 390, 170, 410]
        }
        DefectKind::PinHole => {
            canvas.disc(470, 575, 5, SUBSTRATE);
            [464, 569, 476, 581]
        }
    }
}

/// A board with the given defects; `misregistration` shifts the whole test image.
pub fn board(defects: &[DefectKind], misregistration: (i64, i64)) -> SyntheticBoard {
    let mut template = Canvas::new();
    draw_layout(&mut template, (0, 0));
    let mut test = Canvas::new();
    draw_layout(&mut test, (0, 0));
    let boxes: Vec<(DefectKind, [i64; 4])> = defects
        .iter()
        .map(|kind| (*kind, draw_defect(&mut test, *kind)))
        .collect();
    let test = shift(&test.0, misregistration);
    let (dx, dy) = misregistration;
    SyntheticBoard {
        template: template.0,
        test,
        defects: boxes
            .into_iter()
            .map(|(k, b)| (k, [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy]))
            .collect(),
    }
}

fn shift(image: &GrayImage, (dx, dy): (i64, i64)) -> GrayImage {
    let mut out = vec![SUBSTRATE; image.pixels.len()];
    for y in 0..SIZE as i64 {
        for x in 0..SIZE as i64 {
            let (sx, sy) = (x - dx, y - dy);
            if (0..SIZE as i64).contains(&sx) && (0..SIZE as i64).contains(&sy) {
                out[y as usize * SIZE + x as usize] =
                    image.pixels[sy as usize * SIZE + sx as usize];
            }
        }
    }
    GrayImage {
        pixels: out,
        ..image.clone()
    }
}

/// A grey (not binarised) rendering: copper and substrate at given levels with a soft edge and
/// deterministic noise, as a camera without thresholding would see it.
pub fn grey(image: &GrayImage, seed: u64) -> GrayImage {
    let mut rng = fastrand::Rng::with_seed(seed);
    let pixels = image
        .pixels
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (x, y) = (i % image.width, i / image.width);
            let right = image.pixels[y * image.width + (x + 1).min(image.width - 1)];
            let base = if *p == right {
                *p as f32
            } else {
                (*p as f32 + right as f32) / 2.0
            };
            let level = 60.0 + base * (150.0 / 255.0) + rng.f32() * 12.0 - 6.0;
            level.clamp(0.0, 255.0) as u8
        })
        .collect();
    GrayImage {
        pixels,
        ..image.clone()
    }
}

pub fn encode(image: &GrayImage, format: image::ImageFormat) -> Vec<u8> {
    let buffer = image::GrayImage::from_raw(
        image.width as u32,
        image.height as u32,
        image.pixels.clone(),
    )
    .expect("buffer matches size");
    let mut bytes = Vec::new();
    buffer
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encoding to memory");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aoi::params::PipelineParams;
    use crate::aoi::pipeline::{PreparedTemplate, prepare_board};
    use crate::preprocess::cpu::CpuPreprocessor;

    #[test]
    fn every_drawn_defect_becomes_a_candidate_and_clean_boards_have_none() {
        let params = PipelineParams::default();
        let clean = board(&[], (0, 0));
        let template = PreparedTemplate::new(&clean.template, &params);
        assert!(
            prepare_board(&clean.test, &template, &params, &CpuPreprocessor, None)
                .unwrap()
                .candidates
                .is_empty()
        );

        let defective = board(&DefectKind::ALL, (3, -2));
        let prepared =
            prepare_board(&defective.test, &template, &params, &CpuPreprocessor, None).unwrap();
        assert_eq!((prepared.shift.dx, prepared.shift.dy), (3, -2));
        for (kind, b) in &defective.defects {
            let hit = prepared.candidates.iter().any(|c| {
                (c.x1 as i64) < b[2]
                    && (c.x2 as i64) > b[0]
                    && (c.y1 as i64) < b[3]
                    && (c.y2 as i64) > b[1]
            });
            assert!(hit, "{kind:?} at {b:?} not among {:?}", prepared.candidates);
        }
    }
}
