"""Train, cross-validate and export the FD001 RUL ensemble.

  python train_rul.py cv     [--data PATH] [--out cv_rul.json] [--arch gbm --members 4 --trees 200]
  python train_rul.py final  [--data PATH] [--cv-json cv_rul.json] [same recipe flags]
                             # train on all 100 units, export models/rul_fd001/{1/model.onnx,config.toml}

The defaults are the shipped recipe: 4 gradient-boosted tree ensembles on window summaries, each
fitted on a bootstrap sample of the training units (gbm.py). `--arch pcnn --epochs 30 --noise 0.1
--pad-aug 0` is the earlier PoolCNN ensemble; cnn, gru and mlp are the other nets studied (README).

CV: 5 folds over unit ids (data.folds, seed data.FOLD_SEED). For each fold an ensemble of --members
members (seeds 1000*fold + 0..M-1) is trained on the 80 training units' windows (scaler fitted on those units only)
and evaluated on the 20 held-out units, each truncated at 10 random cut points
(data.truncation_points, seed data.TRUNC_SEED).
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
import gbm  # noqa: E402
import nets  # noqa: E402

torch.set_num_threads(1)


def set_seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_member(x, y, arch, seed, epochs, lr=2e-3, batch=256, wd=1e-4, arch_kw=None, log=None, noise=0.0):
    set_seed(seed)
    model = nets.make(arch, **(arch_kw or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y / D.RUL_CAP).unsqueeze(1)
    n = len(xt)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            xb = xt[idx]
            if noise > 0:
                xb = xb + noise * torch.randn(xb.shape, generator=g)
            loss = torch.nn.functional.mse_loss(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if log and (ep + 1) % 10 == 0:
            log(f"    seed {seed} epoch {ep + 1}: train rmse {math.sqrt(tot / n) * D.RUL_CAP:.2f}")
    model.eval()
    return model


def ensemble(members, arch: str):
    return gbm.Ensemble(members) if arch == "gbm" else nets.Ensemble(members)


@torch.no_grad()
def predict(ens, x):
    """(mean, std) of the ensemble's clipped member predictions, cycles."""
    if isinstance(ens, gbm.Ensemble):
        return ens.predict(x)
    ens.eval()
    m, s = ens(torch.from_numpy(x))
    return m.numpy()[:, 0], s.numpy()[:, 0]


@torch.no_grad()
def raw_predict(models, x, batch=4096):
    """Mean of the members' raw outputs (in cycles, unclipped)."""
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        out.append(torch.stack([m(xb)[:, 0] for m in models]).mean(0).numpy() * D.RUL_CAP)
    return np.concatenate(out)


def fit_ensemble(x, y, unit_ids, args, seed_base, log=print):
    """Train args.members members (seeds seed_base + 0..M-1) on windows x with capped targets y.

    gbm: tree ensembles, each on a bootstrap sample of the units in unit_ids (gbm.fit_members).

    With --teacher ARCH: first train --teacher-members nets of that architecture (seeds
    seed_base + 100 + i) on (x, y); the students are then trained on the teacher-ensemble
    prediction blended with the label, target = a * teacher + (1 - a) * label (a = --distill-alpha),
    over x plus --distill-copies noisy copies of x (Gaussian, sigma --distill-noise, labelled by
    the teacher and the original label)."""
    verbose = log if args.verbose else None
    if args.arch == "gbm":
        return gbm.fit_members(x, y, unit_ids, args.members, seed_base, trees=args.trees, lr=args.tree_lr,
                               leaves=args.leaves, min_leaf=args.min_leaf, log=verbose)
    if args.teacher:
        teachers = [train_member(x, y, args.teacher, seed=seed_base + 100 + i, epochs=args.teacher_epochs,
                                 lr=args.lr, arch_kw=json.loads(args.teacher_kw), log=verbose)
                    for i in range(args.teacher_members)]
        rng = np.random.default_rng(seed_base + 7)
        xs, ys = [x], [y]
        for _ in range(args.distill_copies):
            xs.append((x + args.distill_noise * rng.standard_normal(x.shape)).astype(np.float32))
            ys.append(y)
        xd = np.concatenate(xs)
        t = np.clip(raw_predict(teachers, xd), 0.0, D.RUL_CAP)
        yd = (args.distill_alpha * t + (1 - args.distill_alpha) * np.concatenate(ys)).astype(np.float32)
        x, y = xd, yd
        epochs = max(1, round(args.epochs / (1 + args.distill_copies)))
    else:
        epochs = args.epochs
    return [train_member(x, y, args.arch, seed=seed_base + s, epochs=epochs, lr=args.lr,
                         arch_kw=json.loads(args.arch_kw), log=verbose, noise=args.noise, batch=args.batch)
            for s in range(args.members)]


def fold_metrics(pred, true):
    capped = np.minimum(true, D.RUL_CAP)
    return {
        "n": int(len(true)),
        "rmse_capped": D.rmse(pred, capped),
        "rmse_uncapped": D.rmse(pred, true),
        "nasa_capped": D.nasa_score(pred, capped),
        "nasa_uncapped": D.nasa_score(pred, true),
    }


def short_unit_eval(ens, units, scaler, ends=(10, 15, 20, 25, 29)):
    """Units observed for fewer than WINDOW cycles: front-padded windows (repeat first row)."""
    out = {}
    for e in ends:
        x = np.stack([scaler(D.window_at(u, e)) for u in units])
        true = np.array([min(u.life - e, D.RUL_CAP) for u in units])
        p, s = predict(ens, x)
        out[str(e)] = {"rmse_capped": D.rmse(p, true), "mean_pred": float(p.mean()),
                       "mean_true": float(true.mean()), "mean_std": float(s.mean())}
    # reference: the full (unpadded) window ending at cycle 30
    x = np.stack([scaler(D.window_at(u, 30)) for u in units])
    true = np.array([min(u.life - 30, D.RUL_CAP) for u in units])
    p, s = predict(ens, x)
    out["30"] = {"rmse_capped": D.rmse(p, true), "mean_pred": float(p.mean()),
                 "mean_true": float(true.mean()), "mean_std": float(s.mean())}
    return out


SIGMA_EDGES = [0, 15, 30, 45, 60, 75, 90, 105, 115, 125.01]


def residual_sigma(pred, true_capped):
    """Out-of-fold RMS error by predicted-RUL bin: knots (mean prediction in the bin) and sigma.
    The server interpolates sigma(rul) linearly between knots (constant outside) and can report
    a calibrated predictive std sqrt(rul_std^2 + sigma(rul)^2)."""
    knots, sig, n = [], [], []
    for a, b in zip(SIGMA_EDGES[:-1], SIGMA_EDGES[1:]):
        m = (pred >= a) & (pred < b)
        if m.sum() < 10:
            continue
        knots.append(round(float(pred[m].mean()), 2))
        sig.append(round(float(np.sqrt(np.mean((pred[m] - true_capped[m]) ** 2))), 2))
        n.append(int(m.sum()))
    return {"knots": knots, "sigma": sig, "count": n}


def interp_sigma(rs, pred):
    return np.interp(pred, rs["knots"], rs["sigma"])


def summarize(per_fold, key):
    v = np.array([f[key] for f in per_fold])
    return {"mean": float(v.mean()), "std": float(v.std(ddof=0)), "per_fold": [round(float(a), 3) for a in v]}


def cmd_cv(args):
    units = D.load_units(args.data)
    fl = D.folds(units.keys())
    per_fold, member_fold, short = [], [], []
    log = print
    t0 = time.time()
    folds_to_run = range(D.N_FOLDS) if args.folds is None else [int(f) for f in args.folds.split(",")]
    all_pred, all_true, all_std = [], [], []
    oof = []
    for k in folds_to_run:
        test_u = [units[i] for i in fl[k]]
        train_u = [units[i] for i in units if i not in fl[k]]
        scaler = D.Scaler.fit(train_u)
        x, y, uids = D.train_windows(train_u, scaler, pad_aug_min=args.pad_aug, max_rul=args.max_rul)
        xe, ye, meta = D.truncated_eval_set(test_u, scaler)
        members = fit_ensemble(x, y, uids, args, seed_base=1000 * k, log=log)
        for m in members:
            pm, _ = predict(ensemble([m], args.arch), xe)
            member_fold.append(D.rmse(pm, np.minimum(ye, D.RUL_CAP)))
        ens = ensemble(members, args.arch)
        p, sd = predict(ens, xe)
        fm = fold_metrics(p, ye)
        fm["mean_std"] = float(sd.mean())
        per_fold.append(fm)
        all_pred.append(p); all_true.append(ye); all_std.append(sd)
        oof += [[int(a), int(c), int(t), round(float(pp), 3), round(float(ss), 3)]
                for (a, c), t, pp, ss in zip(meta, ye, p, sd)]
        short.append(short_unit_eval(ens, test_u, scaler))
        log(f"fold {k}: n_train_windows {len(x)}  " + "  ".join(f"{a} {b:.3f}" for a, b in fm.items() if a != "n")
            + f"  members {np.round(member_fold[-args.members:], 2).tolist()}  ({time.time() - t0:.0f}s)")
    res = {
        "arch": args.arch, "arch_kw": json.loads(args.arch_kw), "members": args.members, "epochs": args.epochs,
        "trees": args.trees, "tree_lr": args.tree_lr, "leaves": args.leaves, "min_leaf": args.min_leaf,
        "lr": args.lr, "pad_aug": args.pad_aug, "noise": args.noise, "max_rul": args.max_rul,
        "teacher": args.teacher, "teacher_kw": json.loads(args.teacher_kw), "teacher_members": args.teacher_members,
        "teacher_epochs": args.teacher_epochs, "distill_alpha": args.distill_alpha,
        "distill_copies": args.distill_copies, "distill_noise": args.distill_noise, "batch": args.batch,
        "fold_seed": D.FOLD_SEED, "trunc_seed": D.TRUNC_SEED, "cuts_per_unit": D.CUTS_PER_UNIT,
        "folds": [fl[k] for k in folds_to_run],
        "per_fold": per_fold,
        "rmse_capped": summarize(per_fold, "rmse_capped"),
        "rmse_uncapped": summarize(per_fold, "rmse_uncapped"),
        "nasa_capped": summarize(per_fold, "nasa_capped"),
        "nasa_uncapped": summarize(per_fold, "nasa_uncapped"),
        "nasa_capped_per100": {k2: v * 100 / per_fold[0]["n"] for k2, v in summarize(per_fold, "nasa_capped").items()
                               if k2 != "per_fold"},
        "single_member_rmse_capped": {"mean": float(np.mean(member_fold)), "std": float(np.std(member_fold))},
        "short_units_padded": {e: {"rmse_capped_mean": float(np.mean([s[e]["rmse_capped"] for s in short])),
                                   "mean_pred": float(np.mean([s[e]["mean_pred"] for s in short])),
                                   "mean_true": float(np.mean([s[e]["mean_true"] for s in short])),
                                   "mean_std": float(np.mean([s[e]["mean_std"] for s in short]))}
                               for e in short[0]},
        "seconds": time.time() - t0,
    }
    # calibration of rul_std: fraction of |err| within 1 and 2 std, pooled over folds
    P, T, S = np.concatenate(all_pred), np.minimum(np.concatenate(all_true), D.RUL_CAP), np.concatenate(all_std)
    res["std_calibration"] = {"corr_abs_err_std": float(np.corrcoef(np.abs(P - T), S)[0, 1]),
                              "mean_std": float(S.mean()),
                              "frac_err_within_1std": float(np.mean(np.abs(P - T) <= S)),
                              "frac_err_within_2std": float(np.mean(np.abs(P - T) <= 2 * S))}
    res["residual_sigma"] = residual_sigma(P, T)
    res["oof"] = {"columns": ["unit", "cut_cycle", "true_rul", "pred_rul", "pred_rul_std"], "rows": oof}
    print(json.dumps(res["residual_sigma"]))
    print(json.dumps({k2: res[k2] for k2 in ("rmse_capped", "rmse_uncapped", "nasa_capped", "nasa_uncapped",
                                             "single_member_rmse_capped", "std_calibration")}, indent=1))
    print(json.dumps(res["short_units_padded"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def cmd_final(args):
    """Train the shipped ensemble on all units, export ONNX, verify it, time it, write config.toml."""
    import export_util as X
    units = D.load_units(args.data)
    all_u = [units[i] for i in sorted(units)]
    scaler = D.Scaler.fit(all_u)
    x, y, uids = D.train_windows(all_u, scaler, pad_aug_min=args.pad_aug, max_rul=args.max_rul)
    t0 = time.time()
    members = fit_ensemble(x, y, uids, args, seed_base=FINAL_SEED_BASE, log=print)
    print(f"trained {len(members)} members on {len(x)} windows in {time.time() - t0:.0f}s")
    ens = ensemble(members, args.arch)
    out_dir = args.out
    onnx_path = os.path.join(out_dir, "1", "model.onnx")
    os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
    if args.arch == "gbm":
        gbm.export(members, onnx_path)
    else:
        # PoolCNN members are fused into wide layers for onnxruntime (same function; parity checked
        # against the unfused torch ensemble below).
        ens.eval()
        graph = nets.FusedPoolCNN(members).eval() if args.arch == "pcnn" else ens
        X.export(graph, onnx_path, ["rul", "rul_std"])
    check = X.verify(lambda xb: predict(ens, xb), onnx_path, ["rul", "rul_std"], real=x)
    timing = X.timing(onnx_path, real=x)
    check["fused"] = args.arch == "pcnn"
    print("verify", check, "\ntiming us/window", timing)
    cv = json.load(open(args.cv_json)) if args.cv_json else None
    X.write_rul_config(os.path.join(out_dir, "config.toml"), scaler, args, cv, check, timing,
                       n_windows=len(x), onnx_bytes=os.path.getsize(onnx_path))
    if args.arch != "gbm":     # the trees live in the ONNX file; the nets' weights are kept for study
        torch.save({"state_dicts": [m.state_dict() for m in members], "arch": args.arch,
                    "arch_kw": json.loads(args.arch_kw), "offset": scaler.offset.tolist(),
                    "scale": scaler.scale.tolist()}, os.path.join(args.work_dir, "rul_members.pt"))


FINAL_SEED_BASE = 90000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cv", "final"])
    ap.add_argument("--data", default=D.DEFAULT_DATA)
    ap.add_argument("--arch", default="gbm", choices=sorted(nets.ARCHS) + ["gbm"])
    ap.add_argument("--arch-kw", default="{}")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30, help="nets: training epochs")
    ap.add_argument("--trees", type=int, default=200, help="gbm: boosting iterations per member")
    ap.add_argument("--tree-lr", type=float, default=0.05, help="gbm: learning rate")
    ap.add_argument("--leaves", type=int, default=15, help="gbm: max leaves per tree")
    ap.add_argument("--min-leaf", type=int, default=40, help="gbm: min training windows per leaf")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--teacher", default=None, help="distil from an ensemble of this arch")
    ap.add_argument("--teacher-kw", default="{}")
    ap.add_argument("--teacher-members", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--distill-alpha", type=float, default=1.0)
    ap.add_argument("--distill-copies", type=int, default=2)
    ap.add_argument("--distill-noise", type=float, default=0.1)
    ap.add_argument("--max-rul", type=float, default=None)
    ap.add_argument("--noise", type=float, default=0.1, help="std of Gaussian input noise in training")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--pad-aug", type=int, default=5,
                    help="also train on front-padded windows ending at cycles PAD_AUG..29 (0: none)")
    ap.add_argument("--folds", default=None, help="comma-separated subset of folds (exploration)")
    ap.add_argument("--out", default=None,
                    help="cv: metrics json to write; final: model directory (default <repo>/models/rul_fd001)")
    ap.add_argument("--cv-json", default=None, help="final: CV metrics json to quote in config.toml")
    ap.add_argument("--work-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs"),
                    help="where checkpoints and CV json go (not shipped)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.arch == "gbm" and (args.teacher or json.loads(args.arch_kw)):
        ap.error("--teacher and --arch-kw apply to the nets, not to --arch gbm")
    os.makedirs(args.work_dir, exist_ok=True)
    if args.mode == "cv":
        cmd_cv(args)
    else:
        args.out = args.out or os.path.join(D.REPO_ROOT, "models", "rul_fd001")
        cmd_final(args)


if __name__ == "__main__":
    main()
