//! From classifier outputs to defects: class and confidence per candidate, box decoded from the
//! regressed offsets, greedy class-agnostic NMS, then (optionally) fragments of one defect merged.

use serde::Serialize;

use crate::aoi::components::Component;
use crate::aoi::crops::crop_origin;
use crate::aoi::params::PipelineParams;

/// The six DeepPCB classes, by model class index 1..=6 (0 is background).
pub const DEFECT_CLASSES: [&str; 6] = ["open", "short", "mousebite", "spur", "copper", "pin-hole"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`, integer pixels, right/bottom exclusive.
    #[serde(rename = "box")]
    pub bbox: [i64; 4],
    #[serde(rename = "class")]
    pub class_name: &'static str,
    /// 1..=6 in DeepPCB numbering.
    #[serde(skip)]
    pub class_index: usize,
    pub confidence: f32,
    #[serde(skip)]
    candidate: usize,
}

/// `offsets` are (x1, y1, x2, y2) as fractions of the crop window from its top-left corner.
pub fn decode_box(
    offsets: &[f32],
    origin: (isize, isize),
    width: usize,
    height: usize,
    params: &PipelineParams,
) -> [i64; 4] {
    let window = params.crop_window as f64;
    let at = |base: isize, offset: f32| (base as f64 + window * offset as f64 + 0.5).floor() as i64;
    let (w, h) = (width as i64, height as i64);
    let x1 = at(origin.0, offsets[0]).clamp(0, w - 1);
    let y1 = at(origin.1, offsets[1]).clamp(0, h - 1);
    let x2 = at(origin.0, offsets[2]).clamp(x1 + 1, w);
    let y2 = at(origin.1, offsets[3]).clamp(y1 + 1, h);
    [x1, y1, x2, y2]
}

/// One detection per candidate whose best defect class reaches `min_score`, then NMS, then the
/// fragment merge of the survivors at or above the operating threshold; survivors below it (only
/// there when `min_score` is lower, for AP ranking) follow unmerged, as in pipeline.py.
/// `probabilities` is `[n, 7]`, `offsets` is `[n, 4]`.
pub fn decode_detections(
    candidates: &[Component],
    probabilities: &[f32],
    offsets: &[f32],
    width: usize,
    height: usize,
    params: &PipelineParams,
    min_score: f32,
) -> Vec<Detection> {
    let classes = DEFECT_CLASSES.len() + 1;
    let mut detections = Vec::new();
    for (k, candidate) in candidates.iter().enumerate() {
        let row = &probabilities[k * classes..(k + 1) * classes];
        let mut class_index = 1;
        for c in 2..classes {
            if row[c] > row[class_index] {
                class_index = c;
            }
        }
        let confidence = row[class_index];
        if confidence < min_score {
            continue;
        }
        let origin = crop_origin(candidate, params);
        detections.push(Detection {
            bbox: decode_box(&offsets[k * 4..k * 4 + 4], origin, width, height, params),
            class_name: DEFECT_CLASSES[class_index - 1],
            class_index,
            confidence,
            candidate: k,
        });
    }
    let kept = nms(detections, params.nms_iou, params.nms_iomin);
    if !params.merge_same_class {
        return kept;
    }
    // Merging below the threshold would let low-confidence noise grow reported boxes.
    let (high, low): (Vec<Detection>, Vec<Detection>) = kept
        .into_iter()
        .partition(|d| d.confidence >= params.score_threshold);
    let mut merged = merge_same_class(high);
    merged.extend(low);
    merged
}

/// Union-merges same-class detections whose boxes overlap with positive area: each detection is
/// absorbed into the first earlier survivor it overlaps (which keeps its class, confidence and
/// place), and passes repeat until stable because a grown box can reach earlier survivors.
pub fn merge_same_class(detections: Vec<Detection>) -> Vec<Detection> {
    let mut current = detections;
    loop {
        let mut changed = false;
        let mut merged: Vec<Detection> = Vec::with_capacity(current.len());
        for detection in current {
            // Positive-area overlap only: touching boxes stay apart.
            match merged.iter_mut().find(|r| {
                r.class_index == detection.class_index
                    && intersection_union(&r.bbox, &detection.bbox).0 > 0
            }) {
                Some(survivor) => {
                    survivor.bbox = union_box(&survivor.bbox, &detection.bbox);
                    changed = true;
                }
                None => merged.push(detection),
            }
        }
        if !changed {
            return merged;
        }
        current = merged;
    }
}

fn union_box(a: &[i64; 4], b: &[i64; 4]) -> [i64; 4] {
    [
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]
}

fn area(b: &[i64; 4]) -> i64 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Intersection and union areas of two integer boxes.
pub fn intersection_union(a: &[i64; 4], b: &[i64; 4]) -> (i64, i64) {
    let ix = a[2].min(b[2]) - a[0].max(b[0]);
    let iy = a[3].min(b[3]) - a[1].max(b[1]);
    if ix <= 0 || iy <= 0 {
        return (0, 1);
    }
    let inter = ix * iy;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    (inter, union)
}

/// Greedy NMS by confidence (ties: earlier candidate first). A detection is suppressed by a kept
/// one when `inter > iou × union` (any classes), or, for the same class, when
/// `inter > iomin × min(area, kept area)` (one defect boxed twice at different sizes).
fn nms(mut detections: Vec<Detection>, iou: f64, iomin: f64) -> Vec<Detection> {
    detections.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then(a.candidate.cmp(&b.candidate))
    });
    let mut kept: Vec<Detection> = Vec::with_capacity(detections.len());
    for detection in detections {
        let suppressed = kept.iter().any(|k| {
            let (inter, union) = intersection_union(&detection.bbox, &k.bbox);
            let smaller = area(&detection.bbox).min(area(&k.bbox));
            inter as f64 > iou * union as f64
                || (detection.class_index == k.class_index && inter as f64 > iomin * smaller as f64)
        });
        if !suppressed {
            kept.push(detection);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(x: usize, y: usize) -> Component {
        Component {
            x1: x,
            y1: y,
            x2: x + 10,
            y2: y + 10,
            area: 50,
        }
    }

    /// Detections on a 640 x 640 board.
    fn decode(
        candidates: &[Component],
        probabilities: &[f32],
        offsets: &[f32],
        params: &PipelineParams,
        min_score: f32,
    ) -> Vec<Detection> {
        decode_detections(
            candidates,
            probabilities,
            offsets,
            640,
            640,
            params,
            min_score,
        )
    }

    #[test]
    fn boxes_decode_from_window_fractions_and_clamp() {
        let params = PipelineParams::default();
        assert_eq!(
            decode_box(&[0.25, 0.5, 0.5, 0.75], (100, 200), 640, 640, &params),
            [132, 264, 164, 296]
        );
        assert_eq!(
            decode_box(&[-1.0, -1.0, -1.0, 9.0], (0, 0), 640, 640, &params),
            [0, 0, 1, 640]
        );
    }

    fn detection(
        bbox: [i64; 4],
        class_index: usize,
        confidence: f32,
        candidate: usize,
    ) -> Detection {
        Detection {
            bbox,
            class_name: DEFECT_CLASSES[class_index - 1],
            class_index,
            confidence,
            candidate,
        }
    }

    #[test]
    fn same_class_boxes_nested_in_each_other_are_merged() {
        let params = PipelineParams::default();
        // A small box inside a large one: IoU 0.25 (kept across classes), but within a class the
        // intersection is all of the smaller box.
        let big = detection([0, 0, 20, 20], 1, 0.9, 0);
        let inner = [5, 5, 15, 15];
        let kept = nms(
            vec![big.clone(), detection(inner, 1, 0.8, 1)],
            params.nms_iou,
            params.nms_iomin,
        );
        assert_eq!(kept, vec![big.clone()]);
        let kept = nms(
            vec![big, detection(inner, 2, 0.8, 1)],
            params.nms_iou,
            params.nms_iomin,
        );
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn classes_threshold_and_nms() {
        let params = PipelineParams::default();
        let candidates = [
            candidate(100, 100),
            candidate(102, 100),
            candidate(300, 300),
        ];
        #[rustfmt::skip]
        let probabilities = [
            0.1, 0.0, 0.8, 0.1, 0.0, 0.0, 0.0,   // short 0.8
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9,   // pin-hole 0.9, overlaps the first
            0.7, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0,   // best defect 0.3 < 0.5: dropped
        ];
        let offsets = [0.4f32, 0.4, 0.6, 0.6].repeat(3);
        let found = decode(&candidates, &probabilities, &offsets, &params, 0.5);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].class_name, "pin-hole");
        assert_eq!(found[0].class_index, 6);
    }

    #[test]
    fn fragments_merge_until_stable_into_the_first_survivor() {
        // The bridge joins the first box in pass 1; the grown box reaches the second in pass 2.
        let first = detection([0, 0, 10, 10], 1, 0.9, 3);
        let merged = merge_same_class(vec![
            first.clone(),
            detection([20, 0, 30, 10], 1, 0.8, 0),
            detection([8, 2, 22, 12], 1, 0.7, 1),
        ]);
        assert_eq!(
            merged,
            vec![Detection {
                bbox: [0, 0, 30, 12],
                ..first
            }]
        );
    }

    #[test]
    fn other_classes_and_touching_boxes_are_not_merged() {
        let input = vec![
            detection([0, 0, 10, 10], 1, 0.9, 0),
            detection([5, 5, 15, 15], 2, 0.8, 1),
            detection([10, 0, 20, 10], 1, 0.7, 2),
        ];
        assert_eq!(merge_same_class(input.clone()), input);
    }

    #[test]
    fn only_detections_at_the_threshold_merge_and_lower_ones_follow() {
        let params = PipelineParams {
            merge_same_class: true,
            ..PipelineParams::default()
        };
        // Three opens side by side in window units: 0 and 1 overlap (both >= 0.5) and merge;
        // 2 overlaps 1 but scores 0.4, so it stays apart, after them.
        let candidates = [candidate(100, 100); 3];
        #[rustfmt::skip]
        let probabilities = [
            0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.2, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.6, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        #[rustfmt::skip]
        let offsets = [
            0.0, 0.4, 0.25, 0.6,
            0.2, 0.4, 0.45, 0.6,
            0.4, 0.4, 0.65, 0.6,
        ];
        let found = decode(&candidates, &probabilities, &offsets, &params, 0.0);
        let boxes: Vec<_> = found.iter().map(|d| (d.bbox, d.confidence)).collect();
        assert_eq!(
            boxes,
            vec![([41, 92, 99, 118], 0.9), ([92, 92, 124, 118], 0.4)]
        );
        let unmerged = PipelineParams::default();
        let found = decode(&candidates, &probabilities, &offsets, &unmerged, 0.0);
        assert_eq!(found.len(), 3);
    }
}
