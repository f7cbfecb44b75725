//! The DeepPCB protocol: a detection is correct when its IoU with a not yet matched ground-truth
//! box of the same class is above 0.33 (detections in descending confidence; each takes the
//! unmatched same-class box it overlaps most, as models/train/aoi/evaluate.py does). AP is the
//! VOC all-point interpolated area under the precision/recall curve of detections ranked by
//! confidence; mean AP averages the classes that have ground truth; precision, recall and
//! F-score are taken at an operating threshold.

use serde::Serialize;

use crate::aoi::deeppcb::LabeledBox;
use crate::aoi::detections::DEFECT_CLASSES;

pub const IOU_THRESHOLD: f64 = 0.33;

/// Detections and ground truth of one image.
pub struct ImageResult {
    pub detections: Vec<LabeledBox>,
    pub truth: Vec<LabeledBox>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub images: usize,
    pub ground_truth: usize,
    /// AP of all detections ranked together (matching still needs the same class).
    pub ap: f64,
    pub per_class: Vec<ClassAp>,
    /// Mean of the classes' AP, over the classes with ground truth.
    pub mean_ap: f64,
    pub score_threshold: f64,
    pub precision: f64,
    pub recall: f64,
    pub f_score: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassAp {
    pub class: &'static str,
    pub ground_truth: usize,
    /// None without ground truth of the class (its detections are all false positives).
    pub ap: Option<f64>,
}

pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = a[2].min(b[2]) - a[0].max(b[0]);
    let ih = a[3].min(b[3]) - a[1].max(b[1]);
    if iw <= 0.0 || ih <= 0.0 {
        return 0.0;
    }
    let inter = iw * ih;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

/// Ranks the selected detections by confidence and marks each true or false positive.
fn match_ranked(
    results: &[ImageResult],
    class: Option<usize>,
    min_score: f64,
) -> (Vec<bool>, usize) {
    let keep = |b: &LabeledBox| class.is_none_or(|c| b.class_index == c);
    let mut ranked: Vec<(f64, usize, usize)> = results
        .iter()
        .enumerate()
        .flat_map(|(image, r)| {
            r.detections
                .iter()
                .enumerate()
                .filter(|(_, d)| keep(d) && d.confidence >= min_score)
                .map(move |(i, d)| (d.confidence, image, i))
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut matched: Vec<Vec<bool>> = results.iter().map(|r| vec![false; r.truth.len()]).collect();
    let truth_count = results
        .iter()
        .map(|r| r.truth.iter().filter(|t| keep(t)).count())
        .sum();
    let hits = ranked
        .iter()
        .map(|&(_, image, index)| {
            let detection = &results[image].detections[index];
            let best = results[image]
                .truth
                .iter()
                .enumerate()
                .filter(|(j, t)| t.class_index == detection.class_index && !matched[image][*j])
                .map(|(j, t)| (j, iou(&detection.bbox, &t.bbox)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((j, overlap)) if overlap > IOU_THRESHOLD => {
                    matched[image][j] = true;
                    true
                }
                _ => false,
            }
        })
        .collect();
    (hits, truth_count)
}

/// VOC all-point interpolated average precision.
fn average_precision(hits: &[bool], truth_count: usize) -> f64 {
    if truth_count == 0 {
        return if hits.is_empty() { 1.0 } else { 0.0 };
    }
    let mut precision = Vec::with_capacity(hits.len());
    let mut recall = Vec::with_capacity(hits.len());
    let mut tp = 0usize;
    for (i, hit) in hits.iter().enumerate() {
        tp += *hit as usize;
        precision.push(tp as f64 / (i + 1) as f64);
        recall.push(tp as f64 / truth_count as f64);
    }
    // Precision envelope from the right, then the area under the step function.
    for i in (0..precision.len().saturating_sub(1)).rev() {
        precision[i] = precision[i].max(precision[i + 1]);
    }
    let mut ap = 0.0;
    let mut previous_recall = 0.0;
    for (p, r) in precision.iter().zip(&recall) {
        ap += (r - previous_recall) * p;
        previous_recall = *r;
    }
    ap
}

pub fn evaluate(results: &[ImageResult], score_threshold: f64) -> Evaluation {
    let (hits, truth_count) = match_ranked(results, None, f64::NEG_INFINITY);
    let ap = average_precision(&hits, truth_count);
    let per_class: Vec<ClassAp> = DEFECT_CLASSES
        .iter()
        .enumerate()
        .map(|(i, class)| {
            let (hits, ground_truth) = match_ranked(results, Some(i + 1), f64::NEG_INFINITY);
            ClassAp {
                class,
                ground_truth,
                ap: (ground_truth > 0).then(|| average_precision(&hits, ground_truth)),
            }
        })
        .collect();
    let class_aps: Vec<f64> = per_class.iter().filter_map(|c| c.ap).collect();
    let mean_ap = if class_aps.is_empty() {
        0.0
    } else {
        class_aps.iter().sum::<f64>() / class_aps.len() as f64
    };
    let (hits, _) = match_ranked(results, None, score_threshold);
    let tp = hits.iter().filter(|h| **h).count();
    let fp = hits.len() - tp;
    let precision = if hits.is_empty() {
        1.0
    } else {
        tp as f64 / hits.len() as f64
    };
    let recall = if truth_count == 0 {
        1.0
    } else {
        tp as f64 / truth_count as f64
    };
    let f_score = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Evaluation {
        images: results.len(),
        ground_truth: truth_count,
        ap,
        per_class,
        mean_ap,
        score_threshold,
        precision,
        recall,
        f_score,
        true_positives: tp,
        false_positives: fp,
        false_negatives: truth_count - tp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labeled(b: [f64; 4], class_index: usize, confidence: f64) -> LabeledBox {
        LabeledBox {
            bbox: b,
            class_index,
            confidence,
        }
    }

    #[test]
    fn iou_of_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let truth = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 1.0),
            labeled([20.0, 20.0, 30.0, 30.0], 2, 1.0),
        ];
        let results = [ImageResult {
            detections: truth.clone(),
            truth,
        }];
        let e = evaluate(&results, 0.5);
        assert_eq!(
            (e.ap, e.f_score, e.precision, e.recall),
            (1.0, 1.0, 1.0, 1.0)
        );
    }

    #[test]
    fn wrong_class_low_iou_and_duplicates_are_false_positives() {
        let truth = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 1.0),
            labeled([50.0, 50.0, 60.0, 60.0], 1, 1.0),
        ];
        let detections = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 0.9),   // TP
            labeled([1.0, 0.0, 11.0, 10.0], 1, 0.8),   // duplicate of a matched box: FP
            labeled([50.0, 50.0, 60.0, 60.0], 2, 0.7), // wrong class: FP
            labeled([55.0, 50.0, 65.0, 60.0], 1, 0.6), // IoU 1/3 > 0.33: TP (below the threshold)
        ];
        let results = [ImageResult { detections, truth }];
        let e = evaluate(&results, 0.75);
        assert_eq!(
            (e.true_positives, e.false_positives, e.false_negatives),
            (1, 1, 1)
        );
        assert!((e.precision - 0.5).abs() < 1e-12 && (e.recall - 0.5).abs() < 1e-12);
        // Ranked: TP, FP, FP, TP -> precision envelope 1.0 to recall 0.5, 0.5 to recall 1.0.
        assert!((e.ap - 0.75).abs() < 1e-12, "{}", e.ap);
    }

    #[test]
    fn a_detection_takes_the_unmatched_box_it_overlaps_most() {
        // The second detection overlaps the matched box more than the free one (IoU 0.67 and
        // 0.43), and still counts: it takes the free one.
        let truth = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 1.0),
            labeled([6.0, 0.0, 16.0, 10.0], 1, 1.0),
        ];
        let detections = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 0.9),
            labeled([2.0, 0.0, 12.0, 10.0], 1, 0.8),
        ];
        let e = evaluate(&[ImageResult { detections, truth }], 0.5);
        assert_eq!((e.true_positives, e.false_positives), (2, 0));
        assert_eq!(e.ap, 1.0);
    }

    #[test]
    fn mean_ap_leaves_out_classes_without_ground_truth() {
        let truth = vec![labeled([0.0, 0.0, 10.0, 10.0], 1, 1.0)];
        let detections = vec![
            labeled([0.0, 0.0, 10.0, 10.0], 1, 0.9),
            labeled([50.0, 50.0, 60.0, 60.0], 2, 0.011),
        ];
        let e = evaluate(&[ImageResult { detections, truth }], 0.5);
        assert_eq!(e.mean_ap, 1.0);
        assert_eq!(e.per_class[0].ap, Some(1.0));
        assert_eq!((e.per_class[1].ground_truth, e.per_class[1].ap), (0, None));
    }
}
