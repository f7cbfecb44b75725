"""Time the shipped ONNX models in onnxruntime (CPU EP, 1 intra-op thread).

  python time_onnx.py [--rounds 3]

Prints microseconds per window at batch 256 and 1024, on real FD001 windows (scaled with the
shipped rul_fd001 config): cpu_us (process CPU time, the cost on a
free core) and wall_us (wall clock; larger when the machine is shared), plus the load average.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as D  # noqa: E402
import export_util as X  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--models", default=os.path.join(D.REPO_ROOT, "models"))
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--data", default=D.DEFAULT_DATA)
args = ap.parse_args()
units = D.load_units(args.data)
scaler = D.Scaler.fit(list(units.values()))
x, _, _ = D.train_windows(list(units.values()), scaler)
for name in ("rul_fd001", "anomaly_fd001"):
    path = os.path.join(args.models, name, "1", "model.onnx")
    for _ in range(args.rounds):
        print(name, json.dumps(X.timing(path, real=x)))
