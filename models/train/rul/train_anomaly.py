"""Train, cross-validate and export the FD001 anomaly autoencoder.

  python train_anomaly.py cv     [--data PATH] [--epochs 100] [--pad-aug 1] [--out-json cv_anomaly.json]
  python train_anomaly.py final  [--data PATH] [--pad-aug 1] [--cv-json cv_anomaly.json]   # -> models/anomaly_fd001/

Healthy windows: 30-cycle windows whose last cycle has (uncapped) RUL >= 125, i.e. the flat
part of the piecewise-linear target: every full window, plus (--pad-aug N, default 1) the
front-padded windows ending at cycles N..29 (data.window_at's policy), which the server scores
for young units; --pad-aug 0 is the earlier full-windows-only recipe. The AE (dense
420-64-8-64-420) is trained, and p50/p99 calibrated, on the healthy windows of the training units
only; the exported graph outputs the mean squared reconstruction error.
Failure windows for evaluation: full windows whose last cycle is within the last 20 cycles before
failure (RUL 0..19). CV: the same 5 folds over unit ids as train_rul.py (data.folds); held-out
metrics on full windows as before, plus the false-alarm rate of held-out healthy windows by number
of padded rows (all padded windows ending at cycles 1..29 are scored, whatever --pad-aug).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as D  # noqa: E402
import nets  # noqa: E402

torch.set_num_threads(1)

HEALTHY_MIN_RUL = 125
FAIL_MAX_RUL = 19


PAD_BINS = [(0, 0), (1, 9), (10, 19), (20, 29)]   # padded rows, for the false-alarm breakdown


def all_windows(units, scaler, pad_min=0):
    """All full windows, plus (pad_min > 0) the front-padded windows ending at cycles pad_min..29,
    with their end-cycle uncapped RUL, unit id and number of padded rows (0 for full windows)."""
    xs, rs, us, ps = [], [], [], []
    for u in units:
        xu = scaler(u.x)
        n = u.life - D.WINDOW + 1
        idx = np.arange(D.WINDOW)[None, :] + np.arange(n)[:, None]
        xs.append(xu[idx])
        rs.append(u.rul(capped=False)[D.WINDOW - 1:])
        us.append(np.full(n, u.uid))
        ps.append(np.zeros(n, int))
        if pad_min:
            # the server scores young units on padded windows: without these in the healthy set
            # the AE reconstructs them badly and they alarm (up to 25 % at 29 padded rows)
            ends = np.arange(pad_min, D.WINDOW)
            xs.append(np.stack([scaler(D.window_at(u, e)) for e in ends]))
            rs.append((u.life - ends).astype(np.float64))
            us.append(np.full(len(ends), u.uid))
            ps.append(D.WINDOW - ends)
    return (np.concatenate(xs).astype(np.float32), np.concatenate(rs), np.concatenate(us),
            np.concatenate(ps))


def false_alarm_by_pad(s01_healthy, pad_healthy):
    """Share of healthy windows with score01 >= 0.5, by number of padded rows."""
    return {(f"{a}" if a == b else f"{a}-{b}"): float(np.mean(s01_healthy[(pad_healthy >= a) & (pad_healthy <= b)] >= 0.5))
            for a, b in PAD_BINS}


def train_ae(x, seed, epochs, lr=2e-3, batch=128, ae_kw=None):
    torch.manual_seed(seed)
    ae = nets.AE(**(ae_kw or {}))
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=1e-4)
    xt = torch.from_numpy(x)
    n = len(xt)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            xb = xt[perm[i:i + batch]]
            loss = torch.nn.functional.mse_loss(ae(xb), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    ae.eval()
    return ae


@torch.no_grad()
def errors(ae, x):
    return nets.AEScore(ae)(torch.from_numpy(x)).numpy()[:, 0].astype(np.float64)


def calibrate(err_healthy, err_fail=None):
    """Anchors of the 0..1 mapping: healthy-error quantiles p50/p99 and the median error of
    failure windows (last 20 cycles) of the training units."""
    cal = {"p50": float(np.quantile(err_healthy, 0.5)), "p99": float(np.quantile(err_healthy, 0.99))}
    if err_fail is not None:
        cal["fail_p50"] = float(np.median(err_fail))
    return cal


def score01(err, cal):
    """0..1 anomaly score, piecewise linear in ln(err) through three anchors:
    err <= p50 -> 0;  p50..p99 -> 0..0.5;  p99..fail_p50 -> 0.5..1;  err >= fail_p50 -> 1.
    score >= 0.5 <=> err >= healthy p99 (the alarm threshold)."""
    le = np.log(np.maximum(err, 1e-12))
    l50, l99, lf = np.log(cal["p50"]), np.log(cal["p99"]), np.log(cal["fail_p50"])
    lo = 0.5 * (le - l50) / (l99 - l50)
    hi = 0.5 + 0.5 * (le - l99) / (lf - l99)
    return np.clip(np.where(le < l99, lo, hi), 0.0, 1.0)


def cmd_cv(args):
    units = D.load_units(args.data)
    fl = D.folds(units.keys())
    res = []
    t0 = time.time()
    bins = [(0, 20), (20, 50), (50, 80), (80, 110), (110, 125), (125, 1000)]
    for k in range(D.N_FOLDS):
        test_u = [units[i] for i in fl[k]]
        train_u = [units[i] for i in units if i not in fl[k]]
        scaler = D.Scaler.fit(train_u)
        xtr, rtr, _, ptr = all_windows(train_u, scaler, args.pad_aug)
        xte_all, rte_all, _, pte_all = all_windows(test_u, scaler, pad_min=1)
        htr = rtr >= HEALTHY_MIN_RUL
        ae = train_ae(xtr[htr], seed=k, epochs=args.epochs, lr=args.lr, ae_kw=json.loads(args.ae_kw))
        cal = calibrate(errors(ae, xtr[htr]), errors(ae, xtr[(rtr <= FAIL_MAX_RUL) & (ptr == 0)]))
        e_all = errors(ae, xte_all)
        hte = rte_all >= HEALTHY_MIN_RUL
        fa_pad = false_alarm_by_pad(score01(e_all[hte], cal), pte_all[hte])
        full = pte_all == 0     # the metrics below are on full windows, as before padding was studied
        e, rte = e_all[full], rte_all[full]
        h, f = e[rte >= HEALTHY_MIN_RUL], e[rte <= FAIL_MAX_RUL]
        sc = score01(e, cal)
        r = {"fold": k, "auc": D.auc(h, f), "train_cal": cal, "heldout_healthy_cal": calibrate(h),
             "heldout_false_alarm_by_padded_rows": fa_pad,
             "auc_vs_healthy_by_rul": {f"{a}-{b - 1}": D.auc(h, e[(rte >= a) & (rte < b)])
                                       for a, b in bins if b <= HEALTHY_MIN_RUL},
             "heldout_false_alarm_at_p99": float(np.mean(score01(h, cal) >= 0.5)),
             "heldout_fail_detect_at_p99": float(np.mean(score01(f, cal) >= 0.5)),
             "fail_err_median": float(np.median(f)),
             "mean_score_by_rul": {f"{a}-{b - 1}": float(sc[(rte >= a) & (rte < b)].mean()) for a, b in bins}}
        res.append(r)
        print(f"fold {k}: auc {r['auc']:.4f}  train p50/p99 {cal['p50']:.5f}/{cal['p99']:.5f}  heldout "
              f"p50/p99 {r['heldout_healthy_cal']['p50']:.5f}/{r['heldout_healthy_cal']['p99']:.5f}  "
              f"fail median {r['fail_err_median']:.5f}  FA {r['heldout_false_alarm_at_p99']:.3f}  "
              f"detect {r['heldout_fail_detect_at_p99']:.3f}  FA by padded rows "
              f"{' '.join(f'{b}:{v:.3f}' for b, v in fa_pad.items())}  ({time.time() - t0:.0f}s)")
    aucs = np.array([r["auc"] for r in res])
    summary = {
        "auc": {"mean": float(aucs.mean()), "std": float(aucs.std()), "per_fold": aucs.round(4).tolist()},
        "heldout_false_alarm_at_p99": float(np.mean([r["heldout_false_alarm_at_p99"] for r in res])),
        "heldout_fail_detect_at_p99": float(np.mean([r["heldout_fail_detect_at_p99"] for r in res])),
        "heldout_false_alarm_by_padded_rows": {b: float(np.mean([r["heldout_false_alarm_by_padded_rows"][b] for r in res]))
                                               for b in res[0]["heldout_false_alarm_by_padded_rows"]},
        "mean_score_by_rul": {b: float(np.mean([r["mean_score_by_rul"][b] for r in res]))
                              for b in res[0]["mean_score_by_rul"]},
        "auc_vs_healthy_by_rul": {b: float(np.mean([r["auc_vs_healthy_by_rul"][b] for r in res]))
                                  for b in res[0]["auc_vs_healthy_by_rul"]},
        "epochs": args.epochs, "lr": args.lr, "pad_aug": args.pad_aug, "ae_kw": json.loads(args.ae_kw),
        "per_fold": res,
        "seconds": time.time() - t0,
    }
    print(json.dumps({k2: v for k2, v in summary.items() if k2 != "per_fold"}, indent=1))
    if args.out_json:
        with open(args.out_json, "w") as fo:
            json.dump(summary, fo, indent=1)


def cmd_final(args):
    import export_util as X
    units = D.load_units(args.data)
    all_u = [units[i] for i in sorted(units)]
    scaler = D.Scaler.fit(all_u)
    x, r, _, pad = all_windows(all_u, scaler, args.pad_aug)
    healthy = r >= HEALTHY_MIN_RUL
    xh, n_padded = x[healthy], int(np.sum(pad[healthy] > 0))
    t0 = time.time()
    ae = train_ae(xh, seed=FINAL_SEED, epochs=args.epochs, lr=args.lr, ae_kw=json.loads(args.ae_kw))
    print(f"trained AE on {len(xh)} healthy windows ({n_padded} padded) in {time.time() - t0:.0f}s")
    eh = errors(ae, xh)
    cal = calibrate(eh, errors(ae, x[(r <= FAIL_MAX_RUL) & (pad == 0)]))
    # in-sample check of the padding fix: every padded window ending at cycles 1..29
    xp, rp, _, pp = all_windows(all_u, scaler, pad_min=1)
    hp = rp >= HEALTHY_MIN_RUL
    print("in-sample false alarms by padded rows", false_alarm_by_pad(score01(errors(ae, xp[hp]), cal), pp[hp]))
    x = x[pad == 0]     # parity check and timing on full windows, as before
    model = nets.AEScore(ae).eval()
    onnx_path = os.path.join(args.out, "1", "model.onnx")
    X.export(model, onnx_path, ["score"])
    with torch.no_grad():
        check = X.verify(lambda xb: model(torch.from_numpy(xb)).numpy(), onnx_path, ["score"], real=x)
    timing = X.timing(onnx_path, real=x)
    print("calibration", cal, "\nverify", check, "\ntiming us/window", timing)
    cv = json.load(open(args.cv_json)) if args.cv_json else None
    write_config(os.path.join(args.out, "config.toml"), scaler, cal, args, cv, check, timing,
                 n_healthy=len(xh), n_padded=n_padded,
                 onnx_bytes=os.path.getsize(onnx_path))
    torch.save({"state_dict": ae.state_dict(), "ae_kw": json.loads(args.ae_kw), "calibration": cal},
               os.path.join(args.work_dir, "anomaly_ae.pt"))


FINAL_SEED = 90000


def write_config(path, scaler, cal, args, cv, check, timing, n_healthy, n_padded, onnx_bytes):
    import export_util as X
    s = X.header("anomaly_fd001", ["score"],
                 "FD001 anomaly model: dense autoencoder (420-64-8-64-420) trained on healthy windows.\n"
                 "Output `score` is the raw reconstruction error: mean over the 30x14 window of\n"
                 "(reconstruction - window)^2, in scaled units. Map it to 0..1 with [calibration].\n"
                 "Generated by models/train/rul/train_anomaly.py; do not edit by hand.")
    s += X.preprocessing(scaler, "same scaling parameters as rul_fd001 (both fitted on all 100 training engines)")
    s += X.table("calibration", [
        ("#", "raw = model output `score` (> 0); anomaly score in 0..1, piecewise linear in ln(raw):"),
        ("#", "  raw <= p50            -> 0"),
        ("#", "  p50 < raw < p99       -> 0.5 * ln(raw / p50) / ln(p99 / p50)"),
        ("#", "  p99 <= raw < fail_p50 -> 0.5 + 0.5 * ln(raw / p99) / ln(fail_p50 / p99)"),
        ("#", "  raw >= fail_p50       -> 1"),
        ("#", f"p50/p99: quantiles of the raw error over the {n_healthy} healthy training windows"),
        ("#", f"(window end RUL >= {HEALTHY_MIN_RUL} cycles; {n_padded} of them front-padded, ending at cycles "
              f"{args.pad_aug}..{D.WINDOW - 1})" if n_padded else
              f"(window end RUL >= {HEALTHY_MIN_RUL} cycles)"),
        ("#", "fail_p50: median raw error of the full training windows"),
        ("#", f"ending in the last 20 cycles before failure (RUL <= {FAIL_MAX_RUL}); all from the shipped model."),
        ("formula", "log_piecewise_linear"),
        ("p50", cal["p50"]),
        ("p99", cal["p99"]),
        ("fail_p50", cal["fail_p50"]),
        ("alarm_threshold", 0.5, "score01 >= this (raw >= p99) raises an anomaly"),
        ("healthy_min_rul", HEALTHY_MIN_RUL),
    ]) + "\n"
    items = [
        ("#", f"{D.N_FOLDS}-fold CV over unit ids (data.folds, seed {D.FOLD_SEED}); AE trained per fold on the"),
        ("#", "training units' healthy windows, calibrated on them, evaluated on ALL full windows of the held-out units"),
        ("#", "(and, for the false alarms by padded rows, on their padded windows ending at cycles 1..29)."),
        ("#", f"AUC: healthy windows (end RUL >= {HEALTHY_MIN_RUL}) vs last 20 cycles before failure (end RUL <= {FAIL_MAX_RUL})."),
        ("date", X.today()),
        ("train_seed", FINAL_SEED),
        ("epochs", args.epochs),
        ("healthy_train_windows", n_healthy),
        ("healthy_train_windows_padded", n_padded),
        ("onnx_opset", X.OPSET),
        ("onnx_bytes", onnx_bytes),
        ("ort_parity_max_abs_diff", check["max_abs_diff"], "torch vs onnxruntime, batches 1/7/256"),
        ("#", "onnxruntime CPU EP, 1 intra-op thread, best of 7: cpu = process CPU time per window, wall = wall clock"),
        ("#", "on the shared 2-core training machine at the given load average."),
        ("ort_cpu_us_per_window_b256", timing[256]["cpu_us"]),
        ("ort_cpu_us_per_window_b1024", timing[1024]["cpu_us"]),
        ("ort_wall_us_per_window_b256", timing[256]["wall_us"]),
        ("ort_wall_us_per_window_b1024", timing[1024]["wall_us"]),
        ("timing_load_avg", timing["load_avg_1min"]),
    ]
    if cv:
        items += [
            ("cv_auc_mean", round(cv["auc"]["mean"], 6)),
            ("cv_auc_std", round(cv["auc"]["std"], 6)),
            ("cv_auc_per_fold", [round(r["auc"], 6) for r in cv["per_fold"]]),
            ("cv_heldout_false_alarm_rate", round(cv["heldout_false_alarm_at_p99"], 4),
             "held-out healthy windows with score01 >= 0.5"),
            ("cv_heldout_detection_rate", round(cv["heldout_fail_detect_at_p99"], 4),
             "held-out last-20-cycle windows with score01 >= 0.5"),
            ("#", "held-out healthy windows with score01 >= 0.5, by number of front-padded rows:"),
        ] + [(f"cv_heldout_false_alarm_rate_pad_{k.replace('-', '_')}", round(v, 4))
             for k, v in cv["heldout_false_alarm_by_padded_rows"].items()] + [
            ("#", "mean score01 on held-out windows by end-of-window RUL (cycles):"),
        ] + [(f"cv_mean_score_rul_{k.replace('-', '_')}", round(v, 4)) for k, v in cv["mean_score_by_rul"].items()]
        items += [("#", "AUC of held-out healthy windows vs held-out windows ending at these RULs (earlier detection):")]
        items += [(f"cv_auc_rul_{k.replace('-', '_')}", round(v, 4)) for k, v in cv["auc_vs_healthy_by_rul"].items()]
    s += X.table("metrics", items)
    X.write(path, s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cv", "final"])
    ap.add_argument("--data", default=D.DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ae-kw", default="{}")
    ap.add_argument("--pad-aug", type=int, default=1, choices=range(0, D.WINDOW), metavar="0..29",
                    help="also train and calibrate on healthy front-padded windows ending at cycles PAD_AUG..29 (0: none)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out", default=os.path.join(D.REPO_ROOT, "models", "anomaly_fd001"))
    ap.add_argument("--cv-json", default=None, help="final: CV metrics json (from cv --out-json) to quote")
    ap.add_argument("--work-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs"))
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if args.mode == "cv":
        cmd_cv(args)
    else:
        cmd_final(args)


if __name__ == "__main__":
    main()
