"""ONNX export, onnxruntime parity check, timing and config.toml writing (shared by both trainers)."""
from __future__ import annotations

import datetime
import os
import time
import tomllib
import warnings

import numpy as np
import onnx
import onnxruntime as ort

import data as D

OPSET = 17


def export(model, path: str, outputs: list[str]):
    """Exports a torch module (window -> outputs) with a dynamic batch dimension."""
    import torch
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.eval()
    dyn = {n: {0: "batch"} for n in ["window"] + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, D.WINDOW, len(D.CHANNELS)),), path, dynamo=False,
                          opset_version=OPSET, input_names=["window"], output_names=outputs,
                          dynamic_axes=dyn, do_constant_folding=True)
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == OPSET
    return m


def session(path: str, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def verify(reference, path: str, outputs: list[str], real: np.ndarray, batches=(1, 7, 256),
           tol=1e-4, seed=0):
    """Max |reference(x) - onnxruntime| per output at each batch size, on real scaled windows (random
    sample of `real`) and on random windows (uniform in [-1.2, 1.2]). `reference` maps a float32
    batch to a tuple of numpy arrays, one per output (the trained model, outside ONNX)."""
    s = session(path)
    rng = np.random.default_rng(seed)
    res = {}
    for kind in ("real", "random"):
        for b in batches:
            if kind == "real":
                x = real[rng.choice(len(real), size=b, replace=False)]
            else:
                x = rng.uniform(-1.2, 1.2, size=(b, D.WINDOW, len(D.CHANNELS))).astype(np.float32)
            t = reference(x)
            t = t if isinstance(t, tuple) else (t,)
            o = s.run(outputs, {"window": x})
            for name, a, b_ in zip(outputs, t, o):
                assert b_.shape == (b, 1), (name, b_.shape)
                res[f"{name}_{kind}_b{b}"] = float(np.max(np.abs(np.reshape(a, (b, 1)) - b_)))
    worst = max(res.values())
    assert worst <= tol, res
    return {"max_abs_diff": worst, "per_case": res}


def timing(path: str, real: np.ndarray, batches=(256, 1024), reps=30, seed=0):
    """Microseconds per window on real scaled windows (a random sample of `real`; tree models take
    deeper paths on random inputs), 1 intra-op thread, CPU EP; best of 7 rounds of `reps` runs.

    wall_us: wall clock; cpu_us: process CPU time (robust when the machine is shared: a contended
    run shows wall >> cpu, and cpu is what the model costs on an idle core)."""
    s = session(path, threads=1)
    rng = np.random.default_rng(seed)
    out = {}
    for b in batches:
        x = real[rng.choice(len(real), size=b, replace=False)]
        for _ in range(10):
            s.run(None, {"window": x})
        wall, cpu = [], []
        for _ in range(7):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                s.run(None, {"window": x})
            wall.append((time.perf_counter() - t) / reps / b * 1e6)
            cpu.append((time.process_time() - c) / reps / b * 1e6)
        out[b] = {"wall_us": round(min(wall), 2), "cpu_us": round(min(cpu), 2)}
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return out


# ----------------------------------------------------------------------------- TOML
def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(a) for a in v) + "]"
    raise TypeError(type(v))


def table(name: str, items: list, array: bool = False) -> str:
    """items: (key, value) or (key, value, comment) or ("#", comment)."""
    lines = [f"[[{name}]]" if array else f"[{name}]"]
    for it in items:
        if it[0] == "#":
            lines.append(f"# {it[1]}")
            continue
        line = f"{it[0]} = {_fmt(it[1])}"
        if len(it) > 2:
            line += f"   # {it[2]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def header(name: str, outputs: list[str], comment: str) -> str:
    s = "# " + comment.replace("\n", "\n# ") + "\n"
    s += f'name = "{name}"\nplatform = "onnxruntime"\nmax_batch_size = 1024\n\n'
    s += table("input", [("name", "window"), ("datatype", "FP32"),
                         ("shape", [D.WINDOW, len(D.CHANNELS)], "per item, batch dimension excluded")],
               array=True) + "\n"
    for o in outputs:
        s += table("output", [("name", o), ("datatype", "FP32"), ("shape", [1])], array=True) + "\n"
    s += table("dynamic_batching", [("max_queue_delay_us", 500), ("max_arrival_gap_us", 50), ("max_queue_size", 8192)]) + "\n"
    s += table("instance_group", [("count", 2, "sessions; one session runs on one core"), ("threads", 1)]) + "\n"
    return s


def preprocessing(scaler: D.Scaler, padding_note: str) -> str:
    return table("preprocessing", [
        ("window", D.WINDOW, "cycles per window, oldest first; the last row is the current cycle"),
        ("channels", D.CHANNELS, "order of the model's input channels (C-MAPSS sensor columns)"),
        ("scaling", "minmax"),
        ("#", "scaled = (x - offset) * scale, per channel; offset = (min + max) / 2, scale = 2 / (max - min),"),
        ("#", "min/max over every cycle of the 100 FD001 training engines -> training range maps to [-1, 1]."),
        ("#", "Values outside the training range are passed through unclipped."),
        ("offset", [float(a) for a in scaler.offset]),
        ("scale", [float(a) for a in scaler.scale]),
        ("rul_cap", int(D.RUL_CAP)),
        ("padding", "repeat_first", "units observed < window cycles: repeat the first observed row at the front"),
        ("#", padding_note),
    ]) + "\n"


def today() -> str:
    return datetime.date.today().isoformat()


def write(path: str, text: str):
    tomllib.loads(text)          # must parse
    with open(path, "w") as f:
        f.write(text)


def write_rul_config(path, scaler, args, cv, check, timing, n_windows, onnx_bytes):
    import json
    desc = (f"FD001 remaining-useful-life ensemble: {args.members} x {args.arch} {json.loads(args.arch_kw) or ''}"
            .rstrip() + ", trained on all 100 training engines with seeds "
            f"{90000}..{90000 + args.members - 1}.")
    if args.arch == "gbm":
        desc += (f"\nEach member: {args.trees} boosted trees (learning rate {args.tree_lr}, <= {args.leaves} leaves,"
                 f" >= {args.min_leaf} windows per leaf)\non a bootstrap sample of the 100 engines; features per channel:"
                 " window mean, mean of the last 10 cycles,\nleast-squares slope, computed inside the graph"
                 " (one ai.onnx.ml TreeEnsembleRegressor per member).")
    if args.teacher:
        desc += (f"\nStudents distilled from {args.teacher_members} x {args.teacher} "
                 f"{json.loads(args.teacher_kw) or ''} teachers (not shipped).")
    if args.arch == "pcnn":
        desc += ("\nThe ONNX graph fuses the members into wide layers (one conv, one grouped conv, two block-diagonal"
                 "\ndense layers); it computes the same function as the separate members.")
    desc += ("\nOutputs: rul = mean of the members' predictions (each clipped to [0, rul_cap]), cycles;"
             "\nrul_std = population std of those member predictions (ensemble spread), cycles."
             "\nGenerated by models/train/rul/train_rul.py; do not edit by hand.")
    s = header("rul_fd001", ["rul", "rul_std"], desc)
    pad_note = "see [metrics] short_unit_* for the accuracy of padded windows"
    s += preprocessing(scaler, pad_note)
    items = [
        ("#", f"{D.N_FOLDS}-fold cross-validation over unit ids (data.folds: ids permuted with seed {D.FOLD_SEED}, dealt"),
        ("#", "into 5 folds of 20). Per fold: scaler fitted and the same ensemble recipe trained on the 80 training"),
        ("#", f"units; each of the 20 held-out units truncated at {D.CUTS_PER_UNIT} cut points with true RUL r drawn uniformly"),
        ("#", f"from integers [{D.TRUNC_RUL_MIN}, min({D.TRUNC_RUL_MAX}, life - 30)] (rng seed [{D.TRUNC_SEED}, unit id]); the model sees"),
        ("#", "the 30 cycles ending at the cut. 200 windows per fold. mean/std over the 5 folds (std ddof=0)."),
        ("#", "RMSE *_capped: truth min(r, 125) (literature convention); *_uncapped: truth r."),
        ("#", "NASA/PHM08 score: sum over the fold's 200 windows of exp(-d/13)-1 (d<0) or exp(d/10)-1 (d>=0), d = pred - true;"),
        ("#", "nasa_*_per100 rescales the sum to 100 windows (size of the official FD001 test set)."),
        ("date", today()),
        ("train_seeds", [90000 + i for i in range(args.members)]),
        *([("trees_per_member", args.trees), ("tree_learning_rate", args.tree_lr), ("max_leaves", args.leaves),
            ("min_windows_per_leaf", args.min_leaf)] if args.arch == "gbm" else [("epochs", args.epochs)]),
        ("train_windows", n_windows),
        ("onnx_opset", OPSET),
        *([("onnx_ml_opset", 3)] if args.arch == "gbm" else []),
        ("onnx_bytes", onnx_bytes),
        ("ort_parity_max_abs_diff", check["max_abs_diff"],
         ("scikit-learn" if args.arch == "gbm" else "torch") + " vs onnxruntime, batches 1/7/256"),
        ("#", "onnxruntime CPU EP, 1 intra-op thread, best of 7: cpu = process CPU time per window (the model's cost"),
        ("#", "on a free core), wall = wall clock on the (shared, 2-core) training machine at the given load average."),
        ("ort_cpu_us_per_window_b256", timing[256]["cpu_us"]),
        ("ort_cpu_us_per_window_b1024", timing[1024]["cpu_us"]),
        ("ort_wall_us_per_window_b256", timing[256]["wall_us"]),
        ("ort_wall_us_per_window_b1024", timing[1024]["wall_us"]),
        ("timing_load_avg", timing["load_avg_1min"]),
    ]
    if cv:
        n = cv["per_fold"][0]["n"]
        for key in ("rmse_capped", "rmse_uncapped", "nasa_capped", "nasa_uncapped"):
            items += [(f"cv_{key}_mean", round(cv[key]["mean"], 3)), (f"cv_{key}_std", round(cv[key]["std"], 3)),
                      (f"cv_{key}_per_fold", cv[key]["per_fold"])]
        for key in ("nasa_capped", "nasa_uncapped"):
            items += [(f"cv_{key}_per100_mean", round(cv[key]["mean"] * 100 / n, 1)),
                      (f"cv_{key}_per100_std", round(cv[key]["std"] * 100 / n, 1))]
        items += [("cv_single_member_rmse_capped_mean", round(cv["single_member_rmse_capped"]["mean"], 3)),
                  ("cv_rul_std_mean", round(cv["std_calibration"]["mean_std"], 3), "mean ensemble spread, cycles"),
                  ("cv_corr_abs_err_rul_std", round(cv["std_calibration"]["corr_abs_err_std"], 3)),
                  ("#", "padding: held-out units observed for only N < 30 cycles (front-padded by repeating the first"),
                  ("#", "row), RMSE vs capped truth (all ~125 that early), mean over folds; N = 30 is the unpadded reference:")]
        for e, v in cv["short_units_padded"].items():
            items += [(f"short_unit_rmse_{e}_cycles", round(v["rmse_capped_mean"], 2))]
    if cv and "residual_sigma" in cv:
        rs = cv["residual_sigma"]
        rows = np.array(cv["oof"]["rows"], dtype=np.float64)
        t, p_, sd = np.minimum(rows[:, 2], D.RUL_CAP), rows[:, 3], rows[:, 4]
        tot = np.sqrt(sd ** 2 + np.interp(p_, rs["knots"], rs["sigma"]) ** 2)
        # The model learns the capped RUL; the coverage against the true one says how far the
        # error bar holds for engines far from failure.
        err_true, high = np.abs(p_ - rows[:, 2]), p_ > 100
        coverage = lambda e, k, m=slice(None): round(float(np.mean(e[m] <= k * tot[m])), 3)
        s += table("calibration", [
            ("#", "Uncertainty calibration (in [calibration] because the server's config parser accepts no other"),
            ("#", "free-form top-level tables)."),
            ("#", "rul_std is the ensemble spread only (member disagreement); it tracks the error only loosely"),
            ("#", "(see metrics.cv_corr_abs_err_rul_std). For an error bar use the calibrated predictive std"),
            ("#", "  sigma_total = sqrt(rul_std^2 + sigma(rul)^2),"),
            ("#", "sigma(rul) = out-of-fold RMS error of the CV ensembles by predicted RUL: linear interpolation"),
            ("#", "between (sigma_knots[i], sigma[i]), constant outside the first/last knot."),
            ("formula", "sigma_total = sqrt(rul_std^2 + interp(rul, sigma_knots, sigma)^2)"),
            ("sigma_knots", rs["knots"], "predicted RUL, cycles"),
            ("sigma", rs["sigma"], "out-of-fold RMS error at each knot, cycles"),
            ("sigma_count", rs["count"], "CV windows behind each knot"),
            ("cv_coverage_1sigma", round(float(np.mean(np.abs(p_ - t) <= tot)), 3),
             f"fraction of CV windows with |error| <= sigma_total, error against the RUL capped at "
             f"{D.RUL_CAP:g} (fitted on the same windows)"),
            ("cv_coverage_2sigma", round(float(np.mean(np.abs(p_ - t) <= 2 * tot)), 3)),
            ("#", f"Against the uncapped RUL: {coverage(err_true, 1)} / {coverage(err_true, 2)} within "
                  f"1 / 2 sigma_total; {coverage(err_true, 1, high)} / {coverage(err_true, 2, high)} "
                  f"where the predicted RUL is above 100 cycles."),
        ]) + "\n"
    s += table("metrics", items)
    write(path, s)
