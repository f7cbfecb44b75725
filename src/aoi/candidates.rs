//! Candidate defects from the test/template difference: open (drop edge noise), dilate (join
//! fragments), 8-connected components cut into cells when long, minimum area, a stable order and
//! a safety cap.

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::{Component, components};
use crate::aoi::params::PipelineParams;

/// A board's candidate boxes (exclusive right/bottom), sorted by (y1, x1, y2, x2, area
/// descending), and how many more the `max_candidates` cap left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub kept: Vec<Component>,
    /// Candidates beyond the cap, never classified: a defect among them goes unreported, so
    /// the board cannot pass.
    pub left_out: usize,
}

/// Candidates of a test/template difference.
pub fn candidates(difference: &BitImage, params: &PipelineParams) -> Candidates {
    let (opened, merged) = open_and_merge(difference, params.open_size, params.merge_size);
    candidates_in_masks(&opened, &merged, params)
}

/// The difference opened with the `open_size` square, and that dilated with the `merge_size`
/// square.
pub fn open_and_merge(
    difference: &BitImage,
    open_size: usize,
    merge_size: usize,
) -> (BitImage, BitImage) {
    let opened = difference.open_square(open_size);
    let merged = if merge_size > 1 {
        opened.dilate_square(merge_size)
    } else {
        opened.clone()
    };
    (opened, merged)
}

/// Candidates from the opened difference and its merging dilation (made by any backend).
pub fn candidates_in_masks(
    opened: &BitImage,
    merged: &BitImage,
    params: &PipelineParams,
) -> Candidates {
    let mut found: Vec<Component> = components(merged, opened, params.split_size)
        .into_iter()
        .filter(|c| c.area >= params.min_area)
        .collect();
    found.sort_by_key(|c| (c.y1, c.x1, c.y2, c.x2, std::cmp::Reverse(c.area)));
    let left_out = found.len().saturating_sub(params.max_candidates);
    if left_out > 0 {
        let mut by_area: Vec<usize> = (0..found.len()).collect();
        by_area.sort_by_key(|i| (std::cmp::Reverse(found[*i].area), *i));
        let mut keep: Vec<usize> = by_area[..params.max_candidates].to_vec();
        keep.sort_unstable();
        found = keep.into_iter().map(|i| found[i]).collect();
    }
    Candidates {
        kept: found,
        left_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_survive_and_edge_noise_does_not() {
        let mut difference = BitImage::new(64, 64);
        // A 6x6 defect and a nearby 3x3 fragment that the 5x5 dilation joins to it.
        for y in 10..16 {
            for x in 10..16 {
                difference.set(x, y);
            }
        }
        for y in 17..20 {
            for x in 17..20 {
                difference.set(x, y);
            }
        }
        // One-pixel-wide edge noise: removed by the 2x2 opening.
        for y in 30..60 {
            difference.set(40, y);
        }
        let params = PipelineParams::default();
        let found = candidates(&difference, &params);
        assert_eq!(found.kept.len(), 1, "{found:?}");
        assert_eq!(found.left_out, 0);
        let c = found.kept[0];
        assert_eq!((c.area, c.x1, c.y1, c.x2, c.y2), (45, 8, 8, 22, 22));
    }

    #[test]
    fn cap_keeps_the_largest_in_raster_order() {
        let mut difference = BitImage::new(200, 20);
        for (i, size) in [2usize, 5, 3, 4].iter().enumerate() {
            for y in 2..2 + size {
                for x in i * 40..i * 40 + size {
                    difference.set(x, y);
                }
            }
        }
        let params = PipelineParams {
            max_candidates: 2,
            min_area: 1,
            ..PipelineParams::default()
        };
        let found = candidates(&difference, &params);
        let areas: Vec<u64> = found.kept.iter().map(|c| c.area).collect();
        assert_eq!(areas, vec![25, 16]);
        assert_eq!(found.left_out, 2);
    }

    #[test]
    fn a_long_difference_is_split_into_cells_with_areas_on_the_opened_image() {
        // 150 x 4 difference: the 5x5 dilation widens the component to x 18..172 (154 > 64), so
        // it is cut at x = 82 and 146; areas count opened pixels only (62, 64, 24 columns x 4).
        let mut difference = BitImage::new(200, 50);
        for y in 20..24 {
            for x in 20..170 {
                difference.set(x, y);
            }
        }
        let split = PipelineParams {
            split_size: 64,
            ..PipelineParams::default()
        };
        let found: Vec<_> = candidates(&difference, &split)
            .kept
            .iter()
            .map(|c| (c.x1, c.y1, c.x2, c.y2, c.area))
            .collect();
        assert_eq!(
            found,
            vec![
                (18, 18, 82, 26, 248),
                (82, 18, 146, 26, 256),
                (146, 18, 172, 26, 96)
            ]
        );
        assert_eq!(
            candidates(&difference, &PipelineParams::default())
                .kept
                .len(),
            1
        );
    }
}
