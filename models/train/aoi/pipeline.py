"""Reference implementation of the non-learned stages of the linescan AOI pipeline.

This module is the *specification by code* that the Rust server must match
bit-for-bit (see PIPELINE.md for the prose version).  Only numpy (and Pillow for
JPEG/PNG decoding) is used; every operation is integer/boolean except the
Otsu criterion (IEEE-754 binary64, fixed operation order) and the output
decoding (binary64 on the float32 network outputs).

Stages
  1. decode            load_gray()
  2. binarise          otsu_threshold(), binarize()
  3. misregistration   estimate_shift(), shift_template()
  4. candidates        difference(), open2x2(), dilate_square(), label8(), candidates()
  5. crops             make_crops()
  7. detections        decode_detections(), nms()
(stage 6 is the ONNX classifier, run by run_model()).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict, field

import numpy as np

LABELS = ["background", "open", "short", "mousebite", "spur", "copper", "pin-hole"]


@dataclass(frozen=True)
class Params:
    # stage 2
    otsu_fallback_threshold: int = 127   # used when the image has a single grey level
    # stage 3
    align_radius: int = 12               # search dx, dy in [-R, R]
    align_step: int = 1                  # XOR counted on every pixel (no subsampling)
    # stage 4
    open_size: int = 2                   # binary opening of the XOR with a 2x2 square
    merge_size: int = 5                  # dilation with a 5x5 square (centred) to merge fragments
    min_area: int = 6                    # min number of *opened* XOR pixels in a component
    split_size: int = 64                 # components wider/taller than this are cut into cells
    max_candidates: int = 512            # safety cap (largest-area first), never reached on DeepPCB
    # stage 5
    crop_window: int = 128               # window side in full-resolution pixels
    crop_scale: int = 2                  # mean over scale x scale blocks -> crop_size
    crop_size: int = 64
    fine_window: int = 64                # second, full-resolution window (0 = none), same centre
    channels: tuple = ("test", "template", "xor")
    # stage 7
    score_threshold: float = 0.5         # operating threshold on the detection confidence
    nms_iou: float = 0.3                 # greedy NMS, any class: suppress if IoU > nms_iou
    nms_iomin: float = 0.5               # same class: suppress if inter > nms_iomin * min(areas)
    merge_same_class: bool = True        # after NMS: union-merge overlapping same-class detections

    def to_dict(self):
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


DEFAULT = Params()


# --------------------------------------------------------------------------- stage 1
def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma in 16.16 fixed point (identical to Pillow's 'L' conversion)."""
    r = rgb[..., 0].astype(np.uint32)
    g = rgb[..., 1].astype(np.uint32)
    b = rgb[..., 2].astype(np.uint32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def depth_shift(max_sample: int) -> int:
    """Right shift from 16 to 8 bits by the depth the image uses (10- and 12-bit camera data
    stored in 16-bit files keeps its full range): the bits of its largest sample, less 8."""
    return max(0, int(max_sample).bit_length() - 8)


def load_gray(path) -> np.ndarray:
    """Decode an image file to an HxW uint8 array.

    Grayscale files are used as decoded; RGB(A) files are converted with
    rgb_to_gray (alpha ignored); 16-bit grey files are reduced with >> depth_shift.
    """
    from PIL import Image

    im = Image.open(path)
    im.load()
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.int64)
        return np.clip(a >> depth_shift(int(a.max(initial=0))), 0, 255).astype(np.uint8)
    if im.mode == "1":
        return (np.asarray(im, dtype=np.uint8) * 255).astype(np.uint8)
    return rgb_to_gray(np.asarray(im.convert("RGB")))


# --------------------------------------------------------------------------- stage 2
def otsu_threshold(gray: np.ndarray, fallback: int = DEFAULT.otsu_fallback_threshold) -> int:
    """Otsu threshold t in [0, 254]; foreground = pixel > t.

    For t = 0..254 with 0 < n(t) < N:
        n(t) = #pixels <= t, s(t) = sum of values of pixels <= t   (exact integers)
        d(t) = N*s(t) - S*n(t)                                      (exact integer, S = total sum)
        v(t) = (f64(d) * f64(d)) / f64(n(t) * (N - n(t)))           (IEEE binary64, this order)
    m = max v(t);  T = {t : v(t) == m}  (exact equality);  t* = (min T + max T) // 2.
    The plateau rule puts the threshold in the middle of an empty histogram gap
    (binarised inputs), which makes it insensitive to +-1 JPEG decoder differences.
    If no t has 0 < n(t) < N (constant image) t* = fallback.
    """
    h = np.bincount(gray.ravel(), minlength=256).astype(np.int64)
    N = int(h.sum())
    n = np.cumsum(h)
    s = np.cumsum(h * np.arange(256, dtype=np.int64))
    S = int(s[-1])
    best = None
    ties = []
    for t in range(255):
        nt = int(n[t])
        if nt <= 0 or nt >= N:
            continue
        d = N * int(s[t]) - S * nt
        v = (float(d) * float(d)) / float(nt * (N - nt))
        if best is None or v > best:
            best = v
            ties = [t]
        elif v == best:
            ties.append(t)
    if not ties:
        return int(fallback)
    return (ties[0] + ties[-1]) // 2


def binarize(gray: np.ndarray, t: int) -> np.ndarray:
    return gray > t


# --------------------------------------------------------------------------- stage 3
def shift_order(R: int):
    """Evaluation order of the candidate shifts: by dx^2+dy^2, then dy, then dx."""
    return sorted(((dx, dy) for dy in range(-R, R + 1) for dx in range(-R, R + 1)),
                  key=lambda s: (s[0] * s[0] + s[1] * s[1], s[1], s[0]))


def window_margins(H: int, W: int, R: int):
    """Margins (mx, my) left out of the comparison: R, or less where the image is too small
    to keep a row or column inside them."""
    return min(R, (W - 1) // 2), min(R, (H - 1) // 2)


def xor_count(A: np.ndarray, B: np.ndarray, dx: int, dy: int, step: int = 1,
              R: int = DEFAULT.align_radius) -> int:
    """#{(y, x) in the compared window, on the sampling grid : A[y, x] != Bs[y, x]} where
    Bs[y, x] = B[y - dy, x - dx] if that pixel is inside B, else False (background).
    Compared window: my <= y < H - my, mx <= x < W - mx (window_margins), the same pixels for
    every shift, which a template shifted by up to R covers. Sampling grid: y % step == 0 and
    x % step == 0 (step 1 = every pixel)."""
    H, W = A.shape
    mx, my = window_margins(H, W, R)
    if step == 1 and abs(dx) <= mx and abs(dy) <= my:
        # the window lies inside the shifted template: compare the two slices directly
        a = A[my:H - my, mx:W - mx]
        b = B[my - dy:H - my - dy, mx - dx:W - mx - dx]
        return int(np.count_nonzero(a != b))
    Bs, _ = shift_template(B, dx, dy)
    ys = np.arange(my, H - my)
    xs = np.arange(mx, W - mx)
    grid = np.ix_(ys[ys % step == 0], xs[xs % step == 0])
    return int(np.count_nonzero(A[grid] != Bs[grid]))


def estimate_shift(A: np.ndarray, B: np.ndarray, R: int = DEFAULT.align_radius,
                   step: int = DEFAULT.align_step):
    """Integer (dx, dy) minimising xor_count; first minimum in shift_order wins."""
    best = None
    for dx, dy in shift_order(R):
        c = xor_count(A, B, dx, dy, step, R)
        if best is None or c < best[0]:
            best = (c, dx, dy)
    return best[1], best[2], best[0]


def shift_template(B: np.ndarray, dx: int, dy: int):
    """Bs[y, x] = B[y - dy, x - dx] (background where the source is outside), and
    the validity mask (True where the source pixel was inside the image)."""
    H, W = B.shape
    Bs = np.zeros_like(B)
    valid = np.zeros((H, W), dtype=bool)
    y0, y1 = max(dy, 0), H + min(dy, 0)
    x0, x1 = max(dx, 0), W + min(dx, 0)
    if y0 < y1 and x0 < x1:
        Bs[y0:y1, x0:x1] = B[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
        valid[y0:y1, x0:x1] = True
    return Bs, valid


# --------------------------------------------------------------------------- stage 4
def difference(A: np.ndarray, Bs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return (A ^ Bs) & valid


def _sh(X: np.ndarray, oy: int, ox: int) -> np.ndarray:
    """Y[y, x] = X[y + oy, x + ox], False outside the image."""
    H, W = X.shape
    Y = np.zeros_like(X)
    ys, ye = max(0, -oy), min(H, H - oy)
    xs, xe = max(0, -ox), min(W, W - ox)
    if ys < ye and xs < xe:
        Y[ys:ye, xs:xe] = X[ys + oy:ye + oy, xs + ox:xe + ox]
    return Y


def erode_square(X: np.ndarray, k: int) -> np.ndarray:
    """Erosion with a k x k square whose top-left offset is -(k-1)//2 (centred for odd k;
    for k=2 the window of (y, x) is rows y..y+1, cols x..x+1).  Outside = background."""
    lo = -((k - 1) // 2)
    R = np.ones_like(X)
    for oy in range(lo, lo + k):           # separable: rows then columns, same result
        R &= _sh(X, oy, 0)
    C = np.ones_like(X)
    for ox in range(lo, lo + k):
        C &= _sh(R, 0, ox)
    return C


def dilate_square(X: np.ndarray, k: int) -> np.ndarray:
    """Dilation with the reflected k x k square: Y[y, x] = OR of X[y - o, x - p] for o, p in
    lo..lo+k-1, lo = -((k-1)//2).  Outside = background.  For odd k it is centred."""
    lo = -((k - 1) // 2)
    R = np.zeros_like(X)
    for oy in range(lo, lo + k):
        R |= _sh(X, -oy, 0)
    C = np.zeros_like(X)
    for ox in range(lo, lo + k):
        C |= _sh(R, 0, -ox)
    return C


def open_square(X: np.ndarray, k: int) -> np.ndarray:
    """Opening = union of all k x k squares lying completely inside X (anchor-free)."""
    if k <= 1:
        return X.copy()
    return dilate_square(erode_square(X, k), k)


def label8(M: np.ndarray):
    """8-connected components.  Returns (labels int32, n).  Label numbers are the order
    in which a raster scan (row-major) first meets each component."""
    from scipy import ndimage as ndi

    L, n = ndi.label(M, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return L.astype(np.int32), 0
    # renumber by raster order of first pixel so the numbering is implementation-free
    flat = L.ravel()
    idx = np.flatnonzero(flat)
    first = {}
    labs = flat[idx]
    _, first_pos = np.unique(labs, return_index=True)
    order = np.argsort(idx[first_pos], kind="stable")
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return remap[L], n


def candidates(D: np.ndarray, p: Params = DEFAULT):
    """Candidate boxes from the XOR difference D.

    O = open(D, open_size); M = dilate(O, merge_size); components of M (8-conn).
    A component whose bounding box is wider or taller than split_size is cut into
    cells: pixel (x, y) of a component with top-left (X1, Y1) goes to cell
    ((x - X1) // split_size, (y - Y1) // split_size); small components are one cell.
    Each non-empty cell is a unit with box = bbox of its M pixels and
    area = #pixels of O in it; units with area >= min_area are the candidates.
    Box = (x1, y1, x2, y2) with x1 = min col, y1 = min row, x2 = max col + 1, y2 = max row + 1
    (exclusive right/bottom).  Sorted by (y1, x1, y2, x2, area desc).  If more than
    max_candidates remain, the max_candidates with the largest area are kept (ties: earlier
    in that order) and the sort order is preserved.
    Returns int64 array [n, 5]: x1, y1, x2, y2, area.
    """
    O = open_square(D, p.open_size)
    M = dilate_square(O, p.merge_size) if p.merge_size > 1 else O
    L, n = label8(M)
    if n == 0:
        return np.zeros((0, 5), dtype=np.int64)
    ys, xs = np.nonzero(L)
    lab = L[ys, xs]
    x1 = np.full(n + 1, 1 << 30); y1 = np.full(n + 1, 1 << 30)
    x2 = np.full(n + 1, -1); y2 = np.full(n + 1, -1)
    np.minimum.at(x1, lab, xs); np.minimum.at(y1, lab, ys)
    np.maximum.at(x2, lab, xs); np.maximum.at(y2, lab, ys)
    # cell index of every pixel: (0, 0) for small components; grid anchored at the
    # component's top-left for components with a side > split_size
    G = p.split_size
    big = ((x2 - x1 + 1) > G) | ((y2 - y1 + 1) > G)
    big[0] = False
    bp = big[lab]
    cx = np.where(bp, (xs - x1[lab]) // G, 0)
    cy = np.where(bp, (ys - y1[lab]) // G, 0)
    key = (lab.astype(np.int64) * 4096 + cy) * 4096 + cx
    uk, inv = np.unique(key, return_inverse=True)
    m = len(uk)
    bx1 = np.full(m, 1 << 30); by1 = np.full(m, 1 << 30)
    bx2 = np.full(m, -1); by2 = np.full(m, -1)
    np.minimum.at(bx1, inv, xs); np.minimum.at(by1, inv, ys)
    np.maximum.at(bx2, inv, xs); np.maximum.at(by2, inv, ys)
    area = np.bincount(inv, weights=O[ys, xs].astype(np.int64), minlength=m).astype(np.int64)
    out = [(int(bx1[i]), int(by1[i]), int(bx2[i]) + 1, int(by2[i]) + 1, int(area[i]))
           for i in range(m) if area[i] >= p.min_area]
    out.sort(key=lambda b: (b[1], b[0], b[3], b[2], -b[4]))
    if len(out) > p.max_candidates:
        keep = sorted(range(len(out)), key=lambda i: (-out[i][4], i))[:p.max_candidates]
        out = [out[i] for i in sorted(keep)]
    return np.array(out, dtype=np.int64).reshape(-1, 5)


# --------------------------------------------------------------------------- stage 5
def crop_origin(box, p: Params = DEFAULT):
    """Top-left (wx0, wy0) of the crop window for a candidate box."""
    cx = (int(box[0]) + int(box[2])) // 2
    cy = (int(box[1]) + int(box[3])) // 2
    h = p.crop_window // 2
    return cx - h, cy - h


def channel_images(A, Bs, D, p: Params = DEFAULT):
    m = {"test": A, "template": Bs, "xor": D}
    return [m[c] for c in p.channels]


def n_input_channels(p: Params = DEFAULT) -> int:
    return len(p.channels) * (2 if p.fine_window else 1)


def make_crops(chans, boxes, p: Params = DEFAULT) -> np.ndarray:
    """[n, C', S, S] float32 crops, C' = n_input_channels(p).

    Coarse part (channels 0..C-1): window [wx0, wx0+W) x [wy0, wy0+W) full-res pixels
    (W = crop_window, (wx0, wy0) = crop_origin), pixels outside the image = 0;
    crop[c, i, j] = (sum of the s x s block rows wy0+s*i .. +s-1, cols wx0+s*j .. +s-1) / (s*s)
    (exact in float32).
    Fine part (channels C..2C-1, only if fine_window): the fine_window x fine_window
    full-resolution pixels with top-left (cx - fine_window//2, cy - fine_window//2),
    copied 1:1 (fine_window must equal crop_size)."""
    coarse = _crops_one(chans, boxes, p.crop_window, p.crop_scale, p.crop_size, p)
    if not p.fine_window:
        return coarse
    assert p.fine_window == p.crop_size
    fine = _crops_one(chans, boxes, p.fine_window, 1, p.crop_size, p)
    return np.concatenate([coarse, fine], axis=1)


def _crops_one(chans, boxes, Wn, s, S, p):
    assert Wn == s * S
    H, W = chans[0].shape
    n = len(boxes)
    C = len(chans)
    pad = Wn  # enough for any centre inside the image
    stack = np.zeros((C, H + 2 * pad, W + 2 * pad), dtype=np.uint8)
    for c, X in enumerate(chans):
        stack[c, pad:pad + H, pad:pad + W] = X
    out = np.zeros((n, C, S, S), dtype=np.float32)
    for k in range(n):
        cx = (int(boxes[k][0]) + int(boxes[k][2])) // 2
        cy = (int(boxes[k][1]) + int(boxes[k][3])) // 2
        wx0, wy0 = cx - Wn // 2, cy - Wn // 2
        win = stack[:, pad + wy0:pad + wy0 + Wn, pad + wx0:pad + wx0 + Wn].astype(np.int32)
        blk = win.reshape(C, S, s, S, s).sum(axis=(2, 4))
        out[k] = blk.astype(np.float32) / np.float32(s * s)
    return out


# --------------------------------------------------------------------------- stage 1-5 driver
@dataclass
class Prepared:
    t_test: int
    t_temp: int
    dx: int
    dy: int
    xor_min: int
    A: np.ndarray
    Bs: np.ndarray
    D: np.ndarray
    cands: np.ndarray
    crops: np.ndarray = field(repr=False)


def prepare(test_gray: np.ndarray, temp_gray: np.ndarray, p: Params = DEFAULT,
            with_crops: bool = True) -> Prepared:
    if test_gray.shape != temp_gray.shape:
        raise ValueError("test and template must have the same size")
    tt = otsu_threshold(test_gray, p.otsu_fallback_threshold)
    tb = otsu_threshold(temp_gray, p.otsu_fallback_threshold)
    A = binarize(test_gray, tt)
    B = binarize(temp_gray, tb)
    dx, dy, c = estimate_shift(A, B, p.align_radius, p.align_step)
    Bs, valid = shift_template(B, dx, dy)
    D = difference(A, Bs, valid)
    cands = candidates(D, p)
    crops = make_crops(channel_images(A, Bs, D, p), cands, p) if with_crops else None
    return Prepared(tt, tb, dx, dy, c, A, Bs, D, cands, crops)


# --------------------------------------------------------------------------- stage 6
def run_model(session, crops: np.ndarray, batch: int = 64):
    """Runs the ONNX classifier in chunks of `batch`; returns (probs [n,7], boxes [n,4])."""
    n = len(crops)
    if n == 0:
        return np.zeros((0, 7), np.float32), np.zeros((0, 4), np.float32)
    P, Bx = [], []
    for i in range(0, n, batch):
        p_, b_ = session.run(["class_probs", "boxes"], {"crops": crops[i:i + batch]})
        P.append(p_); Bx.append(b_)
    return np.concatenate(P), np.concatenate(Bx)


# --------------------------------------------------------------------------- stage 7
def decode_box(off, wx0: int, wy0: int, W: int, H: int, p: Params = DEFAULT):
    """off = float32 (t0, t1, t2, t3); x1 = floor(wx0 + crop_window*t0 + 0.5) in binary64,
    same for y1 (t1, wy0), x2 (t2, wx0), y2 (t3, wy0).  Then
    x1 = clamp(x1, 0, W-1), y1 = clamp(y1, 0, H-1), x2 = clamp(x2, x1+1, W), y2 = clamp(y2, y1+1, H)."""
    win = float(p.crop_window)
    v = [math.floor(float(o0) + 0.5) for o0 in
         (wx0 + win * float(off[0]), wy0 + win * float(off[1]),
          wx0 + win * float(off[2]), wy0 + win * float(off[3]))]
    x1 = min(max(v[0], 0), W - 1)
    y1 = min(max(v[1], 0), H - 1)
    x2 = min(max(v[2], x1 + 1), W)
    y2 = min(max(v[3], y1 + 1), H)
    return x1, y1, x2, y2


def box_iou_int(a, b):
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0, 1
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter, union


def decode_detections(cands, probs, offs, W: int, H: int, p: Params = DEFAULT,
                      min_score: float | None = None):
    """One detection per candidate: cls = argmax over classes 1..6 (first max wins),
    score = probs[cls] (float32 value); kept when score >= min_score (default
    p.score_threshold).  Then nms(), then merge_same_class() on the detections with
    score >= p.score_threshold.  Returns the merged detections (NMS order) followed by
    the NMS survivors with min_score <= score < p.score_threshold (only present when
    min_score < p.score_threshold, i.e. for AP ranking)."""
    if min_score is None:
        min_score = p.score_threshold
    dets = []
    for k in range(len(cands)):
        pr = probs[k]
        cls = 1 + int(np.argmax(pr[1:]))
        score = float(np.float32(pr[cls]))
        if score < min_score:
            continue
        wx0, wy0 = crop_origin(cands[k], p)
        box = decode_box(offs[k], wx0, wy0, W, H, p)
        dets.append({"box": list(box), "cls": cls, "label": LABELS[cls], "score": score,
                     "cand": k})
    kept = nms(dets, p.nms_iou, p.nms_iomin)
    high = [d for d in kept if d["score"] >= p.score_threshold]
    low = [d for d in kept if d["score"] < p.score_threshold]
    if p.merge_same_class:
        high = merge_same_class(high)
    return high + low


def merge_same_class(dets):
    """Merges fragments of one defect.  Input in NMS order.  One pass: walk the list; a
    detection whose box overlaps (positive-area intersection) the box of an earlier
    *output* detection of the same class is absorbed into the first such one (its box
    becomes the union, class/score/cand stay those of the earlier one); otherwise it is
    appended to the output.  Passes are repeated on the output until one makes no change."""
    out = [dict(d, box=list(d["box"])) for d in dets]
    changed = True
    while changed:
        changed = False
        res = []
        for d in out:
            for r in res:
                if r["cls"] != d["cls"]:
                    continue
                a, b = r["box"], d["box"]
                if min(a[2], b[2]) - max(a[0], b[0]) > 0 and min(a[3], b[3]) - max(a[1], b[1]) > 0:
                    r["box"] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    changed = True
                    break
            else:
                res.append(d)
        out = res
    return out


def nms(dets, thr: float, thr_min: float = DEFAULT.nms_iomin):
    """Greedy NMS.  Order: score descending, ties by candidate index ascending.  A detection
    d is suppressed when, for some already kept detection k (integer inter/union/areas,
    comparisons in binary64):
        inter > thr * union                                  (any classes), or
        d.cls == k.cls and inter > thr_min * min(area_d, area_k)."""
    order = sorted(dets, key=lambda d: (-d["score"], d["cand"]))
    kept = []
    for d in order:
        ok = True
        ad = (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1])
        for k in kept:
            inter, union = box_iou_int(d["box"], k["box"])
            if inter == 0:
                continue
            ak = (k["box"][2] - k["box"][0]) * (k["box"][3] - k["box"][1])
            if inter > thr * union or (d["cls"] == k["cls"] and inter > thr_min * min(ad, ak)):
                ok = False
                break
        if ok:
            kept.append(d)
    return kept


def detect(session, test_gray, temp_gray, p: Params = DEFAULT, min_score=None):
    """Full pipeline on one pair.  Returns (Prepared, detections)."""
    pr = prepare(test_gray, temp_gray, p)
    probs, offs = run_model(session, pr.crops)
    H, W = test_gray.shape
    return pr, decode_detections(pr.cands, probs, offs, W, H, p, min_score)
