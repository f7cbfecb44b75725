"""Write reference_outputs.json: parity cases for the Rust port (scaling, padding, both ONNX models).

  python make_reference.py [--data PATH]

Reads models/rul_fd001/{config.toml,1/model.onnx} and models/anomaly_fd001/{config.toml,1/model.onnx}
exactly as shipped (scaling parameters from the config, not from training), so the numbers are what
a correct server must reproduce.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as D  # noqa: E402
import export_util as X  # noqa: E402

# (unit, cut cycle): the unit is observed for cycles 1..cut; the window is cycles cut-29..cut.
CASES = [(7, 100), (1, 132), (69, 350)]     # true RUL 159 (healthy), 60, 12 (near failure)
PADDED_CASE = (24, 12)         # observed for only 12 cycles -> 18 front rows repeat cycle 1


def r4(a):
    return [round(float(v), 4) for v in np.ravel(a)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=D.DEFAULT_DATA)
    ap.add_argument("--models", default=os.path.join(D.REPO_ROOT, "models"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_outputs.json"))
    args = ap.parse_args()

    units = D.load_units(args.data)
    rul_cfg = tomllib.load(open(os.path.join(args.models, "rul_fd001", "config.toml"), "rb"))
    an_cfg = tomllib.load(open(os.path.join(args.models, "anomaly_fd001", "config.toml"), "rb"))
    pre = rul_cfg["preprocessing"]
    assert pre["channels"] == D.CHANNELS
    assert an_cfg["preprocessing"]["offset"] == pre["offset"] and an_cfg["preprocessing"]["scale"] == pre["scale"]
    offset = np.array(pre["offset"], dtype=np.float64)
    scale = np.array(pre["scale"], dtype=np.float64)
    cal = an_cfg["calibration"]
    rul_s = X.session(os.path.join(args.models, "rul_fd001", "1", "model.onnx"))
    an_s = X.session(os.path.join(args.models, "anomaly_fd001", "1", "model.onnx"))

    cases = []
    for (uid, cut), padded in [(c, False) for c in CASES] + [(PADDED_CASE, True)]:
        u = units[uid]
        assert 1 <= cut <= u.life
        raw = D.window_at(u, cut)                                     # [30, 14] raw
        x = ((raw - offset) * scale).astype(np.float32)[None]         # [1, 30, 14] scaled
        rul, std = rul_s.run(["rul", "rul_std"], {"window": x})
        (err,) = an_s.run(["score"], {"window": x})
        e = float(err[0, 0])
        le = np.log(e)
        if le < np.log(cal["p99"]):
            s01 = 0.5 * (le - np.log(cal["p50"])) / (np.log(cal["p99"]) - np.log(cal["p50"]))
        else:
            s01 = 0.5 + 0.5 * (le - np.log(cal["p99"])) / (np.log(cal["fail_p50"]) - np.log(cal["p99"]))
        s01 = float(np.clip(s01, 0.0, 1.0))
        first = max(1, cut - D.WINDOW + 1)
        cases.append({
            "unit": uid,
            "cut_cycle": cut,
            "unit_life": u.life,
            "true_rul": u.life - cut,
            "true_rul_capped": min(u.life - cut, int(D.RUL_CAP)),
            "window_source": (f"train_FD001.txt unit {uid}, cycles {first}..{cut}" +
                              (f", front-padded with {D.WINDOW - cut} copies of cycle 1" if padded else "")),
            "window_cycles": [max(1, c) for c in range(cut - D.WINDOW + 1, cut + 1)],
            "padded": padded,
            "raw_first_row": [float(v) for v in raw[0]],
            "raw_last_row": [float(v) for v in raw[-1]],
            "scaled_first_row": r4(x[0, 0]),
            "scaled_last_row": r4(x[0, -1]),
            "scaled_window_sum": round(float(x.astype(np.float64).sum()), 4),
            "rul": round(float(rul[0, 0]), 4),
            "rul_std": round(float(std[0, 0]), 4),
            "anomaly_raw": float(f"{e:.6e}"),
            "anomaly_score": round(s01, 4),
        })
    out = {
        "description": "Parity cases for the Rust port. Window = the 30 cycles ending at cut_cycle (oldest first), "
                       "channels in config order, scaled = (x - offset) * scale with the config's float64 values, "
                       "then cast to f32. Expected agreement: 1e-3 on rul/rul_std, 1e-5 relative on anomaly_raw, "
                       "1e-4 on scaled rows and anomaly_score.",
        "channels": D.CHANNELS,
        "anomaly_score_formula": "raw < p99: 0.5*ln(raw/p50)/ln(p99/p50); else 0.5 + 0.5*ln(raw/p99)/ln(fail_p50/p99); "
                                 "clamped to [0, 1]",
        "calibration": {"p50": cal["p50"], "p99": cal["p99"], "fail_p50": cal["fail_p50"]},
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for c in cases:
        print(c["unit"], c["cut_cycle"], c["true_rul"], c["rul"], c["rul_std"], c["anomaly_raw"], c["anomaly_score"])


if __name__ == "__main__":
    main()
