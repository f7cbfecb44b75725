//! Classifier input: for each candidate a `crop_window`² window centred on the candidate,
//! averaged over `crop_scale`² blocks into `crop_size`² pixels, one channel per binary image
//! (test, aligned template, difference); pixels outside the board count as 0.

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::params::PipelineParams;

/// Top-left corner of a candidate's crop window (may lie outside the image).
pub fn crop_origin(candidate: &Component, params: &PipelineParams) -> (isize, isize) {
    let cx = ((candidate.x1 + candidate.x2) / 2) as isize;
    let cy = ((candidate.y1 + candidate.y2) / 2) as isize;
    let half = (params.crop_window / 2) as isize;
    (cx - half, cy - half)
}

/// Appends `[C, S, S]` float crops of every candidate to `out` (NCHW, row-major).
pub fn make_crops(
    channels: &[&BitImage],
    candidates: &[Component],
    params: &PipelineParams,
    out: &mut Vec<f32>,
) {
    let size = params.crop_size;
    let scale = params.crop_scale as isize;
    let norm = (params.crop_scale * params.crop_scale) as f32;
    let (width, height) = (channels[0].width() as isize, channels[0].height() as isize);
    out.reserve(candidates.len() * channels.len() * size * size);
    for candidate in candidates {
        let (x0, y0) = crop_origin(candidate, params);
        for image in channels {
            for i in 0..size as isize {
                for j in 0..size as isize {
                    let mut sum = 0u32;
                    for by in 0..scale {
                        let y = y0 + scale * i + by;
                        if y < 0 || y >= height {
                            continue;
                        }
                        for bx in 0..scale {
                            let x = x0 + scale * j + bx;
                            if x >= 0 && x < width && image.get(x as usize, y as usize) {
                                sum += 1;
                            }
                        }
                    }
                    out.push(sum as f32 / norm);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_centred_averaged_and_zero_padded() {
        let params = PipelineParams {
            crop_window: 4,
            crop_scale: 2,
            crop_size: 2,
            ..PipelineParams::default()
        };
        let mut image = BitImage::new(4, 4);
        image.set(0, 0);
        image.set(1, 0);
        image.set(1, 1);
        // Candidate at the top-left corner: window [-2, 2) x [-2, 2), top/left blocks outside.
        let candidate = Component {
            x1: 0,
            y1: 0,
            x2: 1,
            y2: 1,
            area: 1,
        };
        assert_eq!(crop_origin(&candidate, &params), (-2, -2));
        let mut out = Vec::new();
        make_crops(&[&image, &image], &[candidate], &params, &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.75, 0.0, 0.0, 0.0, 0.75]);
    }
}
