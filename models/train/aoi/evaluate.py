#!/usr/bin/env python3
"""DeepPCB-protocol evaluation of the linescan AOI pipeline (stages 1-7).

Protocol: a detection is a true positive when its IoU with a not-yet-matched
ground-truth box of the same class is > 0.33 (detections are processed per
class in descending confidence; a detection takes the unmatched GT of its
class with the largest IoU).  AP per class = VOC all-point interpolated AP
over the ranked detections; mAP = mean over the 6 classes.  Precision, recall
and F-score are computed at the operating threshold, pooled over classes.
IoU uses continuous coordinates: area = (x2 - x1) * (y2 - y1).

Usage (from the repository root):
    .venv/bin/python models/train/aoi/evaluate.py --model models/aoi_defect/1/model.onnx \
        --split val [--perturb none|shift|grey|both]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pipeline as P  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_ROOT = os.path.join(REPO, "..", "shared", "data", "deeppcb")
VAL_GROUPS = ("group44000", "group50600", "group92000")
IOU_THR = 0.33
CLASSES = P.LABELS[1:]


# --------------------------------------------------------------------------- data
def read_list(root, list_file="trainval.txt"):
    """[(stem, annotation_path, group)] where stem + '_test.jpg' / '_temp.jpg' are the images."""
    items = []
    with open(os.path.join(root, list_file)) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            img, ann = parts[0], parts[1]
            stem = os.path.splitext(img)[0]
            items.append((stem, ann, img.split("/")[0]))
    return items


def load_annotations(path):
    """[n, 5] int array x1 y1 x2 y2 cls; separators may be spaces and/or commas."""
    rows = []
    with open(path) as f:
        for line in f:
            v = line.replace(",", " ").split()
            if len(v) >= 5:
                rows.append([int(round(float(a))) for a in v[:5]])
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def find_image(root, stem, kind):
    for ext in (".jpg", ".png", ".bmp", ".tif", ".jpeg"):
        p = os.path.join(root, stem + "_" + kind + ext)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(os.path.join(root, stem + "_" + kind + ".jpg"))


def load_pair(root, stem):
    return (P.load_gray(find_image(root, stem, "test")),
            P.load_gray(find_image(root, stem, "temp")))


def split_items(items, val_groups=VAL_GROUPS, split="val"):
    if split == "all":
        return items
    if split == "val":
        return [it for it in items if it[2] in val_groups]
    return [it for it in items if it[2] not in val_groups]


# --------------------------------------------------------------------------- perturbations
def shift_gray(img, sx, sy, fill=0):
    out = np.full_like(img, fill)
    H, W = img.shape
    y0, y1 = max(sy, 0), H + min(sy, 0)
    x0, x1 = max(sx, 0), W + min(sx, 0)
    out[y0:y1, x0:x1] = img[y0 - sy:y1 - sy, x0 - sx:x1 - sx]
    return out


def greyify(img, rng):
    """Simulate a non-binarised grey scan: Gaussian blur, contrast/offset, noise."""
    from scipy.ndimage import gaussian_filter

    sigma = rng.uniform(0.6, 1.6)
    lo = rng.uniform(25, 95)
    hi = rng.uniform(150, 235)
    noise = rng.uniform(1.5, 8.0)
    g = gaussian_filter(img.astype(np.float32), sigma)
    g = lo + (hi - lo) * g / 255.0
    g = g + rng.normal(0, noise, g.shape).astype(np.float32)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def perturb_pair(test, temp, rng, shift=True, grey=True, max_shift=3):
    if shift:
        sx, sy = 0, 0
        while sx == 0 and sy == 0:
            sx, sy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        temp = shift_gray(temp, sx, sy)
    if grey:
        test = greyify(test, rng)
        temp = greyify(temp, rng)
    return test, temp


def perturb_for_eval(test, temp, mode, index):
    """Deterministic perturbation of image `index` for the perturbed validation copy."""
    if mode == "none":
        return test, temp
    rng = np.random.default_rng(1000003 + index)
    return perturb_pair(test, temp, rng, shift=mode in ("shift", "both"),
                        grey=mode in ("grey", "both"))


# --------------------------------------------------------------------------- metrics
def iou_matrix(a, b):
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    ua = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    ub = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(ua[:, None] + ub[None, :] - inter, 1e-12)


def voc_ap(rec, prec):
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def match_class(dets, gts, iou_thr=IOU_THR):
    """dets: list of (img, score, box) of one class; gts: {img: [n,4]}.
    Returns (scores, tp flags) in processing order (score desc, stable)."""
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])
    used = {k: np.zeros(len(v), bool) for k, v in gts.items()}
    scores, tp = [], []
    for i in order:
        img, s, box = dets[i]
        g = gts.get(img)
        ok = False
        if g is not None and len(g):
            ious = iou_matrix([box], g)[0]
            ious[used[img]] = -1.0
            j = int(np.argmax(ious))
            if ious[j] > iou_thr:
                used[img][j] = True
                ok = True
        scores.append(s)
        tp.append(ok)
    return np.array(scores, dtype=np.float64), np.array(tp, dtype=bool)


def deeppcb_metrics(all_dets, all_gts, threshold, iou_thr=IOU_THR):
    """all_dets: {img: [ {box, cls, score} ]} (all scores, NMS already applied);
    all_gts: {img: [n,5]}.  Returns a dict of metrics."""
    res = {"per_class": {}}
    aps = []
    TP = FP = NGT = 0
    for c in range(1, 7):
        dets = [(k, d["score"], d["box"]) for k, v in all_dets.items() for d in v if d["cls"] == c]
        gts = {k: g[g[:, 4] == c, :4] for k, g in all_gts.items()}
        ngt = int(sum(len(g) for g in gts.values()))
        scores, tp = match_class(dets, gts, iou_thr)
        ctp = np.cumsum(tp)
        cfp = np.cumsum(~tp)
        rec = ctp / max(ngt, 1)
        prec = ctp / np.maximum(ctp + cfp, 1)
        ap = voc_ap(rec, prec) if len(tp) else 0.0
        # operating point: detections with score >= threshold (matching is greedy in score
        # order, so the matches of the kept prefix are unchanged)
        keep = scores >= threshold
        tpc = int(tp[keep].sum())
        fpc = int(keep.sum()) - tpc
        TP += tpc; FP += fpc; NGT += ngt
        p_ = tpc / max(tpc + fpc, 1); r_ = tpc / max(ngt, 1)
        res["per_class"][P.LABELS[c]] = {
            "AP": ap, "gt": ngt, "tp": tpc, "fp": fpc, "fn": ngt - tpc,
            "precision": p_, "recall": r_, "f": 2 * p_ * r_ / max(p_ + r_, 1e-12)}
        aps.append(ap)
    prec = TP / max(TP + FP, 1)
    rec = TP / max(NGT, 1)
    res.update({"mAP": float(np.mean(aps)), "precision": prec, "recall": rec,
                "f": 2 * prec * rec / max(prec + rec, 1e-12), "tp": TP, "fp": FP,
                "fn": NGT - TP, "gt": NGT, "threshold": threshold, "iou": iou_thr})
    return res


def candidate_stats(cands_by_img, all_gts, p=P.DEFAULT):
    """Candidate recall: fraction of GT boxes (a) overlapped by a candidate box,
    (b) with IoU > 0.33 to a raw candidate box, (c) lying completely inside the crop
    window of a candidate that overlaps them; and candidates per image."""
    ng = ov = io = win = 0
    counts = []
    for k, g in all_gts.items():
        c = cands_by_img[k]
        counts.append(len(c))
        ng += len(g)
        if len(c) == 0 or len(g) == 0:
            continue
        U = iou_matrix(g[:, :4], c[:, :4])
        gi = g[:, :4].astype(np.int64)
        ix = np.minimum(gi[:, None, 2], c[None, :, 2]) - np.maximum(gi[:, None, 0], c[None, :, 0])
        iy = np.minimum(gi[:, None, 3], c[None, :, 3]) - np.maximum(gi[:, None, 1], c[None, :, 1])
        overl = (ix > 0) & (iy > 0)
        ov += int(overl.any(1).sum())
        io += int((U > IOU_THR).any(1).sum())
        wx0 = (c[:, 0] + c[:, 2]) // 2 - p.crop_window // 2
        wy0 = (c[:, 1] + c[:, 3]) // 2 - p.crop_window // 2
        inside = ((gi[:, None, 0] >= wx0[None]) & (gi[:, None, 2] <= wx0[None] + p.crop_window) &
                  (gi[:, None, 1] >= wy0[None]) & (gi[:, None, 3] <= wy0[None] + p.crop_window))
        win += int((inside & overl).any(1).sum())
    counts = np.array(counts)
    return {"gt": ng, "recall_overlap": ov / max(ng, 1), "recall_iou033": io / max(ng, 1),
            "recall_in_window": win / max(ng, 1), "missed_overlap": ng - ov,
            "cands_per_image_mean": float(counts.mean()) if len(counts) else 0.0,
            "cands_per_image_median": float(np.median(counts)) if len(counts) else 0.0,
            "cands_per_image_p95": float(np.percentile(counts, 95)) if len(counts) else 0.0,
            "cands_per_image_max": int(counts.max()) if len(counts) else 0}


def error_breakdown(all_dets, all_cands, all_gts, threshold, iou_thr=IOU_THR):
    """For every GT not matched at the operating threshold: was there no overlapping
    candidate (missed_candidate), a same-class detection with too small IoU (box_iou),
    a detection of the wrong class overlapping it (wrong_class), or nothing above
    threshold (rejected)?  For every FP: duplicate (overlaps a GT of its class that is
    matched), wrong class, bad box, or pure background."""
    out = {"fn": {}, "fp": {}}
    for c in range(1, 7):
        out["fn"][P.LABELS[c]] = {"missed_candidate": 0, "box_iou": 0, "wrong_class": 0, "rejected": 0}
        out["fp"][P.LABELS[c]] = {"duplicate": 0, "wrong_class": 0, "box_iou": 0, "background": 0}
    for k, g in all_gts.items():
        dets = [d for d in all_dets.get(k, []) if d["score"] >= threshold]
        dets.sort(key=lambda d: -d["score"])
        matched_gt = np.zeros(len(g), bool)
        det_ok = np.zeros(len(dets), bool)
        for c in range(1, 7):
            gi = np.where(g[:, 4] == c)[0]
            for j, d in enumerate(dets):
                if d["cls"] != c or len(gi) == 0:
                    continue
                ious = iou_matrix([d["box"]], g[gi, :4])[0]
                ious[matched_gt[gi]] = -1
                m = int(np.argmax(ious))
                if ious[m] > iou_thr:
                    matched_gt[gi[m]] = True
                    det_ok[j] = True
        cands = all_cands[k]
        for i in np.where(~matched_gt)[0]:
            name = P.LABELS[g[i, 4]]
            gb = g[i, :4]
            has_c = len(cands) and bool((iou_matrix([gb], cands[:, :4])[0] > 0).any())
            ious = [(iou_matrix([gb], [d["box"]])[0, 0], d["cls"]) for d in dets]
            if not has_c:
                out["fn"][name]["missed_candidate"] += 1
            elif any(cl == g[i, 4] and u > 0 for u, cl in ious):
                out["fn"][name]["box_iou"] += 1
            elif any(cl != g[i, 4] and u > iou_thr for u, cl in ious):
                out["fn"][name]["wrong_class"] += 1
            else:
                out["fn"][name]["rejected"] += 1
        for j in np.where(~det_ok)[0]:
            d = dets[j]
            name = P.LABELS[d["cls"]]
            ious = iou_matrix([d["box"]], g[:, :4])[0] if len(g) else np.zeros(0)
            same = (g[:, 4] == d["cls"]) if len(g) else np.zeros(0, bool)
            if len(g) and (ious[same] > iou_thr).any():
                out["fp"][name]["duplicate"] += 1
            elif len(g) and (ious[~same] > iou_thr).any():
                out["fp"][name]["wrong_class"] += 1
            elif len(g) and (ious > 0).any():
                out["fp"][name]["box_iou"] += 1
            else:
                out["fp"][name]["background"] += 1
    return out


# --------------------------------------------------------------------------- runner
def make_session(model_path, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


def run_split(session, root, items, p=P.DEFAULT, perturb="none", log_every=50, model_fn=None):
    """Runs the full pipeline on every item; returns (dets, cands, gts, timing)."""
    all_dets, all_cands, all_gts = {}, {}, {}
    t_prep = t_model = 0.0
    n_crops = 0
    for idx, (stem, ann, grp) in enumerate(items):
        test, temp = load_pair(root, stem)
        test, temp = perturb_for_eval(test, temp, perturb, idx)
        t0 = time.perf_counter()
        pr = P.prepare(test, temp, p)
        t1 = time.perf_counter()
        if model_fn is not None:
            probs, offs = model_fn(pr.crops)
        else:
            probs, offs = P.run_model(session, pr.crops)
        t2 = time.perf_counter()
        t_prep += t1 - t0
        t_model += t2 - t1
        n_crops += len(pr.crops)
        H, W = test.shape
        all_dets[stem] = P.decode_detections(pr.cands, probs, offs, W, H, p, min_score=0.0)
        all_cands[stem] = pr.cands
        all_gts[stem] = load_annotations(os.path.join(root, ann))
        if log_every and (idx + 1) % log_every == 0:
            print(f"  {idx + 1}/{len(items)}", file=sys.stderr, flush=True)
    timing = {"prep_s_per_image": t_prep / max(len(items), 1),
              "model_s_per_image": t_model / max(len(items), 1),
              "model_ms_per_crop": 1e3 * t_model / max(n_crops, 1)}
    return all_dets, all_cands, all_gts, timing


def full_report(all_dets, all_cands, all_gts, p=P.DEFAULT):
    m = deeppcb_metrics(all_dets, all_gts, p.score_threshold)
    m["candidates"] = candidate_stats(all_cands, all_gts, p)
    m["errors"] = error_breakdown(all_dets, all_cands, all_gts, p.score_threshold)
    return m


def format_report(m, title=""):
    lines = [f"== {title}" if title else "=="]
    c = m["candidates"]
    lines.append(f"candidates: recall(overlap) {c['recall_overlap']:.4f}  recall(IoU>0.33) "
                 f"{c['recall_iou033']:.4f}  recall(GT inside window) {c['recall_in_window']:.4f}  "
                 f"per image mean {c['cands_per_image_mean']:.1f} median {c['cands_per_image_median']:.0f} "
                 f"p95 {c['cands_per_image_p95']:.0f} max {c['cands_per_image_max']}")
    lines.append(f"{'class':10s} {'AP':>7s} {'gt':>5s} {'tp':>5s} {'fp':>4s} {'fn':>4s} {'P':>7s} {'R':>7s} {'F':>7s}")
    for name, v in m["per_class"].items():
        lines.append(f"{name:10s} {v['AP']:7.4f} {v['gt']:5d} {v['tp']:5d} {v['fp']:4d} {v['fn']:4d} "
                     f"{v['precision']:7.4f} {v['recall']:7.4f} {v['f']:7.4f}")
    lines.append(f"mAP {m['mAP']:.4f}  @score>={m['threshold']}: P {m['precision']:.4f} "
                 f"R {m['recall']:.4f} F {m['f']:.4f} (tp {m['tp']} fp {m['fp']} fn {m['fn']})")
    lines.append("errors: " + json.dumps(m["errors"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=DEFAULT_ROOT)
    ap.add_argument("--list", default="trainval.txt")
    ap.add_argument("--model", default=os.path.join(REPO, "models", "aoi_defect", "1", "model.onnx"))
    ap.add_argument("--split", default="val", choices=["val", "train", "all"])
    ap.add_argument("--val-groups", default=",".join(VAL_GROUPS))
    ap.add_argument("--perturb", default="none", choices=["none", "shift", "grey", "both"])
    ap.add_argument("--threshold", type=float, default=None, help="operating score threshold")
    ap.add_argument("--json", default=None, help="write the metrics to this JSON file")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    p = P.DEFAULT
    if args.threshold is not None:
        import dataclasses
        p = dataclasses.replace(p, score_threshold=args.threshold)
    items = split_items(read_list(args.data_root, args.list), tuple(args.val_groups.split(",")), args.split)
    if args.limit:
        items = items[:args.limit]
    sess = make_session(args.model)
    dets, cands, gts, timing = run_split(sess, args.data_root, items, p, args.perturb)
    m = full_report(dets, cands, gts, p)
    m["timing"] = timing
    m["images"] = len(items)
    print(format_report(m, f"{args.split} perturb={args.perturb} images={len(items)}"))
    print("timing:", json.dumps(timing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=1)


if __name__ == "__main__":
    main()
