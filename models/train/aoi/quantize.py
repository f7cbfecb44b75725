#!/usr/bin/env python3
"""Static INT8 quantisation of the AOI defect classifier, calibrated on real crops.

The calibration crops come from the reference pipeline (pipeline.prepare) on DeepPCB
training pairs; the held-out groups (evaluate.VAL_GROUPS) are never used for
calibration. The quantised model keeps the FP32 interface: input `crops` FP32
[N,6,64,64], outputs `class_probs` FP32 [N,7] and `boxes` FP32 [N,4].

    # quantise (QDQ, per-channel weights, 150 calibration pairs; the output heads and each
    # trunk's first conv stay FP32)
    .venv/bin/python models/train/aoi/quantize.py --model /tmp/aoi_full/model.onnx \
        --out /tmp/aoi_int8/model.onnx
    # QOperator format instead of QDQ
    .venv/bin/python models/train/aoi/quantize.py --model M --out O --format qoperator
    # time FP32 vs INT8 on real (held-out) crops, 1 intra-op thread, batch 32 and 64
    .venv/bin/python models/train/aoi/quantize.py --bench M_fp32.onnx M_int8.onnx
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pipeline as P  # noqa: E402
import evaluate as E  # noqa: E402


def calibration_items(root, list_file, n_pairs, seed):
    """n_pairs training pairs (never a held-out group), a fixed random sample."""
    items = E.split_items(E.read_list(root, list_file), E.VAL_GROUPS, "train")
    assert not any(it[2] in E.VAL_GROUPS for it in items)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items), size=min(n_pairs, len(items)), replace=False))
    return [items[i] for i in idx]


def crops_for_items(root, items, p=P.DEFAULT, log=True):
    """Real classifier inputs: the crops pipeline.prepare makes for every pair."""
    out = []
    for k, (stem, _ann, _grp) in enumerate(items):
        test, temp = E.load_pair(root, stem)
        out.append(P.prepare(test, temp, p).crops)
        if log and (k + 1) % 25 == 0:
            print(f"  crops: {k + 1}/{len(items)} pairs", file=sys.stderr, flush=True)
    crops = np.concatenate(out).astype(np.float32)
    return crops


class CropReader:
    """onnxruntime.quantization.CalibrationDataReader over an array of crops."""

    def __init__(self, crops, batch=64):
        self.crops, self.batch, self.i = crops, batch, 0

    def get_next(self):
        if self.i >= len(self.crops):
            return None
        b = self.crops[self.i:self.i + self.batch]
        self.i += self.batch
        return {"crops": b}

    def rewind(self):
        self.i = 0


def head_nodes(m):
    """The output heads: Softmax and the two small Gemms (128->7 logits, 128->4 box) that feed
    the graph outputs. Kept FP32: quantising them would put the scores and box offsets on a
    1/256 grid and saves nothing measurable (they are <1% of the MACs)."""
    outs = {o.name for o in m.graph.output}
    prod = {o: n for n in m.graph.node for o in n.output}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Softmax" or any(o in outs for o in n.output):
            keep.append(n)
    for n in list(keep):  # the Gemm that feeds the Softmax
        for i in n.input:
            if i in prod and prod[i].op_type == "Gemm":
                keep.append(prod[i])
    return sorted({n.name for n in keep})


def first_convs(m):
    """The first convolution of each trunk (3 input channels, 64x64 -> 32x32), fed by a Slice
    of the graph input. Kept FP32: in INT8 they took 42% of ONNX Runtime's time (a K=27
    im2col suits the int8 kernels badly, and the input needs a QuantizeLinear pass), while
    FP32 runs them 1.24x faster end to end and moves the model closer to the FP32 one."""
    inputs = {i.name for i in m.graph.input}
    sliced = {n.output[0] for n in m.graph.node if n.op_type == "Slice" and n.input[0] in inputs}
    return sorted(n.name for n in m.graph.node
                  if n.op_type == "Conv" and (n.input[0] in inputs or n.input[0] in sliced))


def quantize(model, out, crops, fmt="qdq", per_channel=True, method="minmax",
             reduce_range=False, fp32_heads=True, fp32_first=True):
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmpdir = tempfile.mkdtemp(prefix="aoi_quant_")
    pre = os.path.join(tmpdir, "pre.onnx")
    # ORT recommends symbolic shape inference + graph optimisation before static quantisation
    quant_pre_process(model, pre, skip_symbolic_shape=False)
    m = onnx.load(pre)
    excl = head_nodes(m) if fp32_heads else [n.name for n in m.graph.node if n.op_type == "Softmax"]
    if fp32_first:
        excl += first_convs(m)
    print(f"kept FP32: {excl}", file=sys.stderr)
    meth = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    quantize_static(pre, out, CropReader(crops),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=meth, nodes_to_exclude=excl,
                    extra_options={"CalibTensorRangeSymmetric": False})
    q = onnx.load(out)
    q.doc_string = (f"linescan AOI defect classifier, INT8 static {fmt.upper()} "
                    f"{'per-channel' if per_channel else 'per-tensor'} ({method} calibration on "
                    f"{len(crops)} crops from DeepPCB training pairs); see models/train/aoi/quantize.py")
    onnx.save(q, out)
    check_interface(model, out)
    return out


def check_interface(a, b):
    """Input/output names, element types and shapes of b must equal a's."""
    import onnx

    def sig(path):
        g = onnx.load(path).graph
        f = lambda vs: [(v.name, v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vs]
        return f(g.input), f(g.output)
    sa, sb = sig(a), sig(b)
    if sa != sb:
        raise SystemExit(f"interface changed: {sa} vs {sb}")


def session(path, threads=1):
    return E.make_session(path, threads)


def compare(fp32, int8, crops):
    p0, b0 = P.run_model(session(fp32), crops)
    p1, b1 = P.run_model(session(int8), crops)
    agree = float(np.mean(p0.argmax(1) == p1.argmax(1)))
    s0, s1 = p0[:, 1:].max(1), p1[:, 1:].max(1)
    return {"n": len(crops), "argmax_agree": agree,
            "max_abs_dprob": float(np.abs(p0 - p1).max()),
            "mean_abs_dscore": float(np.abs(s0 - s1).mean()),
            "max_abs_dbox": float(np.abs(b0 - b1).max()),
            "decision_flips_at_0.5": int(np.sum((s0 >= 0.5) != (s1 >= 0.5)))}


def bench(models, crops, batches=(32, 64), repeats=7, threads=1):
    """ms per crop, median (and min) over `repeats` passes over all crops in chunks of the
    batch size. Passes of the different models are interleaved so that background load on a
    shared machine hits them alike."""
    sess = {m: session(m, threads) for m in models}
    times = {(m, b): [] for m in models for b in batches}
    for b in batches:
        n = (len(crops) // b) * b
        chunks = [crops[i:i + b] for i in range(0, n, b)]
        for m in models:
            sess[m].run(None, {"crops": chunks[0]})  # warm-up
        for _ in range(repeats):
            for m in models:
                t0 = time.perf_counter()
                for c in chunks:
                    sess[m].run(None, {"crops": c})
                times[(m, b)].append((time.perf_counter() - t0) * 1e3 / n)
    res = {}
    for (m, b), t in times.items():
        res[(m, b)] = (statistics.median(t), min(t))
        print(f"{m} batch {b}: median {statistics.median(t):.4f} ms/crop, min {min(t):.4f} "
              f"({repeats} passes over {(len(crops) // b) * b} crops)", flush=True)
    base = models[0]
    for m in models[1:]:
        for b in batches:
            print(f"speed-up {m} vs {base}, batch {b}: median {res[(base, b)][0] / res[(m, b)][0]:.2f}x, "
                  f"min {res[(base, b)][1] / res[(m, b)][1]:.2f}x")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="FP32 model to quantise (e.g. train.py's /tmp/aoi_full/model.onnx)")
    ap.add_argument("--out", help="quantised model path")
    ap.add_argument("--data-root", default=E.DEFAULT_ROOT)
    ap.add_argument("--list", default="trainval.txt")
    ap.add_argument("--calib-pairs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("qdq", "qoperator"), default="qdq")
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    ap.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    ap.add_argument("--reduce-range", action="store_true")
    ap.add_argument("--quantize-heads", action="store_true",
                    help="also quantise the two output Gemms (default: kept FP32; Softmax always FP32)")
    ap.add_argument("--int8-first-conv", action="store_true",
                    help="also quantise each trunk's first conv (default: kept FP32, see first_convs)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "linescan_aoi_quant"),
                    help="folder for the crop arrays (calibration and benchmark)")
    ap.add_argument("--bench", nargs="+", metavar="MODEL", help="time these models instead of quantising")
    ap.add_argument("--bench-pairs", type=int, default=40,
                    help="held-out pairs whose crops are used for timing")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)

    if args.bench:
        f = os.path.join(args.cache, f"bench_{args.bench_pairs}.npy")
        if not os.path.exists(f):
            items = E.split_items(E.read_list(args.data_root, args.list), E.VAL_GROUPS, "val")
            items = items[::max(1, len(items) // args.bench_pairs)][:args.bench_pairs]
            np.save(f, crops_for_items(args.data_root, items))
        crops = np.load(f)
        print(f"timing on {len(crops)} real crops, {args.threads} intra-op thread(s)")
        bench(args.bench, crops, repeats=args.repeats, threads=args.threads)
        return

    if not args.out or not args.model:
        ap.error("--model and --out are required unless --bench")
    import onnx
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv")
           for n in onnx.load(args.model).graph.node):
        raise SystemExit(f"{args.model} is already quantised; give the FP32 model")
    f = os.path.join(args.cache, f"calib_{args.calib_pairs}_{args.seed}.npy")
    if not os.path.exists(f):
        items = calibration_items(args.data_root, args.list, args.calib_pairs, args.seed)
        print(f"calibration: {len(items)} training pairs from groups "
              f"{sorted(set(it[2] for it in items))}", file=sys.stderr)
        np.save(f, crops_for_items(args.data_root, items))
    crops = np.load(f)
    print(f"calibration crops: {len(crops)}", file=sys.stderr)
    quantize(args.model, args.out, crops, args.format, not args.per_tensor, args.method,
             args.reduce_range, not args.quantize_heads, not args.int8_first_conv)
    print(f"wrote {args.out}")
    print("FP32 vs INT8 on the calibration crops:", compare(args.model, args.out, crops))


if __name__ == "__main__":
    main()
