"""Gradient-boosted trees on window summaries: the RUL recipe `train_rul.py --arch gbm`.

Each window [30, 14] (scaled) is summarised per channel by its mean, the mean of its last 10
cycles and its least-squares slope (42 features). The members are scikit-learn
HistGradientBoostingRegressors, each fitted on a bootstrap sample of whole training units, so
their spread reflects which engines the model happened to see.

The features are computed by the same ONNX subgraph that heads the exported model, run by
onnxruntime, both for training and for serving. Many windows share a mathematically equal summary,
and trees fitted on raw summaries split between values one float32 ulp apart, so a window scaled
in f32 on a GPU instead of f64 on the CPU, stored as float32 instead of float64, or summed in
another order (onnxruntime's float32 kernels change order with the batch size) got a prediction up
to ~3 cycles away. So the subgraph sums in float64 and rounds every summary to a fixed grid (a power
of two: 2^-8 for the means of values scaled to [-1, 1], 2^-13 per cycle for the slopes) before the
float32 cast. Every summary the trees see is then a grid point, many windows share each one, and
a summary moves to another grid point only when its float64 value lies within rounding noise of a
boundary between two (half a step from both). Over all
FD001 training windows, rounding the raw sensor values to float32 then changes 3 % of the
predictions by more than 0.01 cycles (mean change 0.006, max 2.0), against 32 % (mean 0.048, max
2.5) on unrounded float64 summaries; the cross-validated RMSE is the same (13.82).

The trees are read from scikit-learn's fitted `_predictors` (as skl2onnx does), a
private structure: the training environment pins scikit-learn 1.7.2 (README).

The exported graph: window -> features -> one ai.onnx.ml TreeEnsembleRegressor per member ->
clip to [0, cap] -> rul (mean) and rul_std (population std), the same outputs as the nets.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import data as D

OPSET = 17
ML_OPSET = 3
LAST = 10          # cycles in the "recent" mean
N_FEATURES = 3 * len(D.CHANNELS)
MEAN_GRID = 2.0 ** -8     # 512 steps over the scaled range [-1, 1]
SLOPE_GRID = 2.0 ** -13   # per cycle; FD001 slopes stay within about +-0.033 (500 steps)


def _slope_weights() -> np.ndarray:
    """w such that sum_t w[t] * x[t] is the least-squares slope over the window (sum t' = 0)."""
    t = np.arange(D.WINDOW, dtype=np.float64) - (D.WINDOW - 1) / 2
    return (t / (t ** 2).sum()).reshape(D.WINDOW, 1)


def _grid() -> np.ndarray:
    c = len(D.CHANNELS)
    return np.array([MEAN_GRID] * (2 * c) + [SLOPE_GRID] * c, dtype=np.float64)


def _feature_nodes():
    """window [B, 30, C] -> features [B, 3C] = (mean, mean of the last 10, slope) per channel,
    summed in float64, rounded to the grid (exact: powers of two), then cast to float32."""
    nodes = [
        helper.make_node("Cast", ["window"], ["f_window64"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceMean", ["f_window64"], ["f_mean"], axes=[1], keepdims=0),
        helper.make_node("Slice", ["f_window64", "f_last_start", "f_last_end", "f_axis1"], ["f_last"]),
        helper.make_node("ReduceMean", ["f_last"], ["f_last_mean"], axes=[1], keepdims=0),
        helper.make_node("Transpose", ["f_window64"], ["f_window_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["f_window_t", "f_slope_w"], ["f_slope3"]),
        helper.make_node("Squeeze", ["f_slope3", "f_axis2"], ["f_slope"]),
        helper.make_node("Concat", ["f_mean", "f_last_mean", "f_slope"], ["f_features64"], axis=1),
        helper.make_node("Mul", ["f_features64", "f_grid_inverse"], ["f_in_steps"]),
        helper.make_node("Round", ["f_in_steps"], ["f_steps"]),
        helper.make_node("Mul", ["f_steps", "f_grid"], ["f_on_grid"]),
        helper.make_node("Cast", ["f_on_grid"], ["features"], to=TensorProto.FLOAT),
    ]
    inits = [
        numpy_helper.from_array(np.array([-LAST], np.int64), "f_last_start"),
        numpy_helper.from_array(np.array([D.WINDOW], np.int64), "f_last_end"),
        numpy_helper.from_array(np.array([1], np.int64), "f_axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "f_axis2"),
        numpy_helper.from_array(_slope_weights(), "f_slope_w"),
        numpy_helper.from_array(1.0 / _grid(), "f_grid_inverse"),
        numpy_helper.from_array(_grid(), "f_grid"),
    ]
    return nodes, inits


def _window_input():
    return helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", D.WINDOW, len(D.CHANNELS)])


def _model(nodes, inits, outputs, ml: bool) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "rul_gbm", [_window_input()], outputs, inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("ai.onnx.ml", ML_OPSET)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="linescan models/train/rul/gbm.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


_feature_session = None


def features(x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Features of scaled windows x [N, 30, C], computed by onnxruntime with the exported subgraph."""
    global _feature_session
    if _feature_session is None:
        nodes, inits = _feature_nodes()
        out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", N_FEATURES])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        _feature_session = ort.InferenceSession(_model(nodes, inits, [out], ml=False).SerializeToString(), so,
                                                providers=["CPUExecutionProvider"])
    return np.concatenate([_feature_session.run(None, {"window": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def fit_members(x, y, unit_ids, members: int, seed_base: int, trees: int, lr: float, leaves: int,
                min_leaf: int, log=None):
    """`members` regressors on x (scaled windows) / y (capped RUL), each on a bootstrap sample of
    whole units (rng seed seed_base + i)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    f = features(x)
    units = np.unique(unit_ids)
    out = []
    for i in range(members):
        pick = np.random.default_rng(seed_base + i).choice(units, size=len(units), replace=True)
        rows = np.concatenate([np.flatnonzero(unit_ids == u) for u in pick])
        m = HistGradientBoostingRegressor(max_iter=trees, learning_rate=lr, max_leaf_nodes=leaves,
                                          min_samples_leaf=min_leaf, early_stopping=False,
                                          random_state=seed_base + i)
        out.append(m.fit(f[rows], y[rows]))
        if log:
            log(f"    member {i}: {len(rows)} windows from {len(np.unique(pick))} distinct units")
    return out


class Ensemble:
    """Mean and population std of the members' predictions, each clipped to [0, cap]."""

    def __init__(self, members, cap: float = D.RUL_CAP):
        self.members = members
        self.cap = cap

    def predict(self, x: np.ndarray):
        f = features(x)
        p = np.clip(np.stack([m.predict(f) for m in self.members], axis=1), 0.0, self.cap)
        return p.mean(axis=1), p.std(axis=1)


def _tree_ensemble_node(m, name: str, out: str):
    """One fitted HistGradientBoostingRegressor as a TreeEnsembleRegressor (sum of trees + baseline).

    Thresholds become the largest float32 <= the float64 threshold, so for every float32 feature
    `x <= threshold` decides as scikit-learn does."""
    a = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
                         "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
                         "target_treeids", "target_nodeids", "target_ids", "target_weights")}
    for t, (predictor,) in enumerate(m._predictors):
        for i, nd in enumerate(predictor.nodes):
            a["nodes_treeids"].append(t)
            a["nodes_nodeids"].append(i)
            if nd["is_leaf"]:
                a["nodes_modes"].append("LEAF")
                a["nodes_featureids"].append(0)
                a["nodes_values"].append(0.0)
                a["nodes_truenodeids"].append(0)
                a["nodes_falsenodeids"].append(0)
                a["nodes_missing_value_tracks_true"].append(0)
                a["target_treeids"].append(t)
                a["target_nodeids"].append(i)
                a["target_ids"].append(0)
                a["target_weights"].append(float(nd["value"]))
                continue
            thr = np.float32(nd["num_threshold"])
            if float(thr) > float(nd["num_threshold"]):
                thr = np.nextafter(thr, np.float32(-np.inf))
            a["nodes_modes"].append("BRANCH_LEQ")
            a["nodes_featureids"].append(int(nd["feature_idx"]))
            a["nodes_values"].append(float(thr))
            a["nodes_truenodeids"].append(int(nd["left"]))
            a["nodes_falsenodeids"].append(int(nd["right"]))
            a["nodes_missing_value_tracks_true"].append(int(nd["missing_go_to_left"]))
    return helper.make_node("TreeEnsembleRegressor", ["features"], [out], name=name, domain="ai.onnx.ml",
                            n_targets=1, aggregate_function="SUM", post_transform="NONE",
                            base_values=[float(np.ravel(m._baseline_prediction)[0])], **a)


def export(members, path: str, cap: float = D.RUL_CAP) -> onnx.ModelProto:
    nodes, inits = _feature_nodes()
    # One operator per member: onnxruntime 1.31 runs four single-target ensembles faster than one
    # ensemble with four targets (a 1M-row job took 4.8-5.0 s against 5.7-5.8 s, measured with the
    # float32 summaries of the first export).
    preds = [f"member_{i}" for i in range(len(members))]
    nodes += [_tree_ensemble_node(m, f"tree_ensemble_{i}", p) for i, (m, p) in enumerate(zip(members, preds))]
    nodes += [
        helper.make_node("Concat", preds, ["members"], axis=1),
        helper.make_node("Clip", ["members", "zero", "cap"], ["clipped"]),
        helper.make_node("ReduceMean", ["clipped"], ["rul"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["clipped", "rul"], ["deviation"]),
        helper.make_node("Mul", ["deviation", "deviation"], ["deviation2"]),
        helper.make_node("ReduceMean", ["deviation2"], ["variance"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["variance"], ["rul_std"]),
    ]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(cap, np.float32), "cap")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1]) for n in ("rul", "rul_std")]
    model = _model(nodes, inits, outputs, ml=True)
    onnx.save(model, path)
    return model
