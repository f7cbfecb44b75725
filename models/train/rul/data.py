"""Shared data handling for the C-MAPSS FD001 RUL and anomaly models.

Everything the Rust server has to reproduce lives here: column layout, channel order,
piecewise-linear RUL target, windowing, front padding, scaling, and the truncation scheme
used to build held-out evaluation windows the way NASA built the official test set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# Default data path, relative to the repository root (../shared is a sibling of the repo).
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_DATA = os.path.join(REPO_ROOT, "..", "shared", "data", "cmapss", "train_FD001.txt")

COLUMNS = (["unit", "cycle", "setting_1", "setting_2", "setting_3"]
           + [f"s_{i}" for i in range(1, 22)])
# The 14 informative FD001 sensors (the other 7 are constant or nearly so). Model input order.
CHANNELS = ["s_2", "s_3", "s_4", "s_7", "s_8", "s_9", "s_11",
            "s_12", "s_13", "s_14", "s_15", "s_17", "s_20", "s_21"]
CHANNEL_IDX = [COLUMNS.index(c) for c in CHANNELS]

WINDOW = 30
RUL_CAP = 125.0
N_FOLDS = 5
FOLD_SEED = 20240601       # permutation of unit ids into folds
TRUNC_SEED = 7             # truncation cut points of held-out engines
CUTS_PER_UNIT = 10
TRUNC_RUL_MIN, TRUNC_RUL_MAX = 5, 150


@dataclass
class Unit:
    uid: int
    cycles: np.ndarray   # (L,) int, 1..L
    x: np.ndarray        # (L, 14) raw sensor values, CHANNELS order, float64

    @property
    def life(self) -> int:
        return len(self.cycles)

    def rul(self, capped: bool = True) -> np.ndarray:
        """RUL at each cycle: L - cycle (0 at the last, failing cycle); capped at RUL_CAP."""
        r = (self.life - self.cycles).astype(np.float64)
        return np.minimum(r, RUL_CAP) if capped else r


def load_units(path: str = DEFAULT_DATA) -> dict[int, Unit]:
    d = np.loadtxt(path)
    assert d.shape[1] == len(COLUMNS), d.shape
    units = {}
    for uid in np.unique(d[:, 0]).astype(int):
        rows = d[d[:, 0] == uid]
        rows = rows[np.argsort(rows[:, 1])]
        cyc = rows[:, 1].astype(int)
        assert np.array_equal(cyc, np.arange(1, len(cyc) + 1)), f"unit {uid}: gaps in cycles"
        units[uid] = Unit(uid, cyc, rows[:, CHANNEL_IDX].astype(np.float64))
    return units


# ----------------------------------------------------------------------------- scaling
@dataclass
class Scaler:
    """scaled = (x - offset) * scale, per channel.

    minmax: offset = (min + max) / 2, scale = 2 / (max - min)  -> training range maps to [-1, 1].
    min/max are over every cycle of the training engines only.
    """
    offset: np.ndarray
    scale: np.ndarray

    @staticmethod
    def fit(units: list[Unit]) -> "Scaler":
        x = np.concatenate([u.x for u in units])
        lo, hi = x.min(0), x.max(0)
        return Scaler(offset=(lo + hi) / 2.0, scale=2.0 / (hi - lo))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.offset) * self.scale).astype(np.float32)


# ----------------------------------------------------------------------------- windows
def window_at(u: Unit, end_cycle: int, window: int = WINDOW) -> np.ndarray:
    """Raw window of the `window` cycles ending at `end_cycle` (inclusive, 1-based).

    Padding policy for units with fewer than `window` observed cycles: repeat the first
    observed row at the front (the server does the same).
    """
    end = end_cycle            # rows [end-window, end) in 0-based indexing
    start = end - window
    if start >= 0:
        return u.x[start:end]
    obs = u.x[:end]
    pad = np.repeat(obs[:1], -start, axis=0)
    return np.concatenate([pad, obs])


def train_windows(units: list[Unit], scaler: Scaler, pad_aug_min: int | None = None,
                  max_rul: float | None = None):
    """All full windows of each run-to-failure unit, target = capped RUL at the window's last cycle.

    pad_aug_min: if set, also add front-padded windows ending at cycles pad_aug_min..WINDOW-1
    (teaches the model the padding policy for short units).
    max_rul: if set, keep only windows whose last cycle has uncapped RUL <= max_rul.
    Returns x [N, WINDOW, 14] float32 (scaled), y [N] float32 (capped RUL), unit ids [N].
    """
    xs, ys, us = [], [], []
    for u in units:
        xu = scaler(u.x)
        r = u.rul(capped=True)
        n = u.life - WINDOW + 1
        idx = np.arange(WINDOW)[None, :] + np.arange(n)[:, None]
        keep = np.ones(n, bool) if max_rul is None else u.rul(capped=False)[WINDOW - 1:] <= max_rul
        xs.append(xu[idx][keep])
        ys.append(r[WINDOW - 1:][keep])
        us.append(np.full(int(keep.sum()), u.uid))
        if pad_aug_min:
            for end in range(pad_aug_min, WINDOW):
                if max_rul is not None and u.life - end > max_rul:
                    continue
                xs.append(scaler(window_at(u, end))[None])
                ys.append(r[end - 1:end])
                us.append(np.array([u.uid]))
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32),
            np.concatenate(us))


def folds(unit_ids, n_folds: int = N_FOLDS, seed: int = FOLD_SEED) -> list[list[int]]:
    """Unit ids permuted with a fixed seed and dealt into n_folds folds of equal size."""
    ids = np.array(sorted(unit_ids))
    perm = np.random.default_rng(seed).permutation(ids)
    return [sorted(perm[k::n_folds].tolist()) for k in range(n_folds)]


def truncation_points(u: Unit, n: int = CUTS_PER_UNIT, seed: int = TRUNC_SEED):
    """NASA-style truncation of a run-to-failure unit.

    For unit u (life L), draw n true-RUL values r ~ Uniform{TRUNC_RUL_MIN .. min(TRUNC_RUL_MAX, L-WINDOW)}
    (integers, with replacement) from np.random.default_rng([seed, uid]); the unit is observed up to
    cycle c = L - r (so c >= WINDOW and a full window exists) and the model sees cycles c-29..c.
    Returns list of (cut_cycle, true_rul_uncapped).
    """
    rng = np.random.default_rng([seed, u.uid])
    hi = min(TRUNC_RUL_MAX, u.life - WINDOW)
    r = rng.integers(TRUNC_RUL_MIN, hi + 1, size=n)
    return [(int(u.life - ri), int(ri)) for ri in r]


def truncated_eval_set(units: list[Unit], scaler: Scaler, n: int = CUTS_PER_UNIT, seed: int = TRUNC_SEED):
    xs, ys, meta = [], [], []
    for u in units:
        for c, r in truncation_points(u, n, seed):
            xs.append(scaler(window_at(u, c)))
            ys.append(r)
            meta.append((u.uid, c))
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.float64), meta


# ----------------------------------------------------------------------------- metrics
def rmse(pred, true):
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)))


def nasa_score(pred, true):
    """PHM08 score: sum over samples of exp(-d/13)-1 (d<0, early) or exp(d/10)-1 (d>=0, late), d = pred-true."""
    d = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def auc(neg_scores, pos_scores):
    """ROC AUC = P(pos > neg) + 0.5 P(tie) (Mann-Whitney)."""
    neg = np.asarray(neg_scores, dtype=np.float64)
    pos = np.asarray(pos_scores, dtype=np.float64)
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):          # average ranks for ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rp = ranks[len(neg):].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))
