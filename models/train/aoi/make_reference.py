#!/usr/bin/env python3
"""Write reference_outputs.json: intermediate and final outputs of the pipeline on a
few DeepPCB pairs, for testing a port (e.g. the Rust server) against pipeline.py.

    .venv/bin/python models/train/aoi/make_reference.py \
        [--model models/aoi_defect/1/model.onnx] [--pairs group00041/00041/00041000 ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pipeline as P  # noqa: E402
import evaluate as E  # noqa: E402

# 44000081: two same-class fragments that merge_same_class joins
DEFAULT_PAIRS = ("group00041/00041/00041000", "group13000/13000/13000015", "group92000/92000/92000019",
                 "group44000/44000/44000081")


def packed_sha256(mask: np.ndarray) -> str:
    """sha256 of the mask as row-major bytes, one byte (0 or 1) per pixel."""
    return hashlib.sha256(np.ascontiguousarray(mask, dtype=np.uint8).tobytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=E.DEFAULT_ROOT)
    ap.add_argument("--model", default=os.path.join(E.REPO, "models", "aoi_defect", "1", "model.onnx"))
    ap.add_argument("--pairs", nargs="*", default=list(DEFAULT_PAIRS))
    ap.add_argument("--out", default=os.path.join(HERE, "reference_outputs.json"))
    args = ap.parse_args()
    p = P.DEFAULT
    sess = E.make_session(args.model)
    with open(args.model, "rb") as f:
        model_sha = hashlib.sha256(f.read()).hexdigest()
    out = {"model_sha256": model_sha, "params": p.to_dict(),
           "notes": ["boxes are [x1, y1, x2, y2] with exclusive x2/y2",
                     "candidates are listed in pipeline order (y1, x1, y2, x2, area desc)",
                     "crop_checks: sum over each channel of the float32 crop of candidate 0 (exact)",
                     "*_sha256: sha256 of the HxW mask, row-major, one byte 0/1 per pixel",
                     "score/probabilities rounded to 3 decimals; compare with a 2e-3 tolerance",
                     "images decoded with Pillow (libjpeg-turbo); see PIPELINE.md section 1"],
           "pairs": []}
    for stem in args.pairs:
        test, temp = E.load_pair(args.data_root, stem)
        pr, dets = P.detect(sess, test, temp, p)
        probs, offs = P.run_model(sess, pr.crops)
        O = P.open_square(pr.D, p.open_size)
        all_dets = P.decode_detections(pr.cands, probs, offs, test.shape[1], test.shape[0], p, 0.0)
        rec = {
            "pair": stem,
            "test": stem + "_test.jpg", "template": stem + "_temp.jpg",
            "size": [int(test.shape[1]), int(test.shape[0])],
            "otsu_test": pr.t_test, "otsu_template": pr.t_temp,
            "foreground_test": int(pr.A.sum()), "foreground_template": int((temp > pr.t_temp).sum()),
            "shift_dx": pr.dx, "shift_dy": pr.dy, "xor_count_at_shift": pr.xor_min,
            "xor_count_at_zero": P.xor_count(pr.A, P.binarize(temp, pr.t_temp), 0, 0, 1, p.align_radius),
            "xor_pixels": int(pr.D.sum()), "opened_pixels": int(O.sum()),
            "xor_sha256": packed_sha256(pr.D), "opened_sha256": packed_sha256(O),
            "num_candidates": int(len(pr.cands)),
            "candidates": [{"box": [int(v) for v in c[:4]], "area": int(c[4])} for c in pr.cands],
            "crop_checks": ([float(np.float64(pr.crops[0, ch].astype(np.float64).sum()))
                             for ch in range(pr.crops.shape[1])] if len(pr.cands) else []),
            "candidate_outputs": [{"cand": k, "probs": [round(float(v), 3) for v in probs[k]],
                                   "boxes": [round(float(v), 4) for v in offs[k]]}
                                  for k in range(len(pr.cands))],
            "detections_all_nms": [{"box": d["box"], "class": d["cls"], "label": d["label"],
                                    "score": round(d["score"], 3), "cand": d["cand"]} for d in all_dets],
            "detections": [{"box": d["box"], "class": d["cls"], "label": d["label"],
                            "score": round(d["score"], 3), "cand": d["cand"]} for d in dets],
            "ground_truth": E.load_annotations(os.path.join(args.data_root, stem.split("/")[0],
                                                            stem.split("/")[1] + "_not",
                                                            stem.split("/")[2] + ".txt")).tolist(),
        }
        out["pairs"].append(rec)
        print(f"{stem}: t=({pr.t_test},{pr.t_temp}) shift=({pr.dx},{pr.dy}) cands={len(pr.cands)} "
              f"dets={len(dets)} gt={len(rec['ground_truth'])}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
