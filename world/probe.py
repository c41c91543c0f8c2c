"""Read a clip back: which background, which colour and shape, which motion.

Plain image processing on uint8 [F, H, W, 3] clips, numpy only, so it scores generated videos with no
model in the loop:

1. background: the median of the border pixels over the clip, named by nearest background colour;
2. object mask: each pixel projected on the background -> object colour axis (0 = background,
   1 = object) and cut at 0.5, so blur neither fattens nor thins the shape and noise across the axis is
   ignored; then the largest connected blob per frame, which drops speckles. The object colour for the
   axis comes from a loose first pass (distance > 40 from the background, cleaned by a 3x3 opening);
3. colour: the median of the mask's interior pixels, named by nearest colour;
4. shape: the mask's IoU with each shape template stretched over the mask's bounding box, averaged over
   frames (a circle fills ~0.785 of its box, a triangle ~0.5, a square 1.0; IoU also uses where it fills);
5. motion: from the centroid and area tracks, by the thresholds below.

Motion thresholds (frame fractions; the world's own motions are far from every one of them):

- growing / shrinking: the mean area of the last quarter of the frames over that of the first quarter
  is >= GROW_MIN_RATIO (1.6) or <= 1 / GROW_MIN_RATIO. The world grows by 6.25x in area.
- circling: the centroid track is not a line: RMS distance from its least-squares line >=
  CIRCLE_MIN_RESIDUAL (0.04), and it spans >= CIRCLE_MIN_SPAN (0.1) on both axes. A world circle of
  diameter 0.3 leaves a residual of ~0.11; a straight move leaves ~0.
- still vs moving: the travel of the least-squares line through the centroid track over the clip is
  < STILL_MAX_TRAVEL (0.08): still; otherwise left/right/up/down by its dominant axis. The world's moves
  travel 0.35-0.5; a drifting but "still" generated object may wander up to 0.08.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from smartdiff.world.scenes import BACKGROUND_RGB, COLOUR_RGB, SHAPES, Scene

UNKNOWN = "unknown"

GROW_MIN_RATIO = 1.6
CIRCLE_MIN_RESIDUAL = 0.04
CIRCLE_MIN_SPAN = 0.1
STILL_MAX_TRAVEL = 0.08

# Distances are Euclidean in RGB (0..255 per channel). Within MIN_THRESHOLD of the background a pixel is
# background in both passes: Gaussian noise of sigma 10 per channel exceeds 40 for ~1e-3 of pixels,
# and those isolated pixels are dropped by the opening (loose pass) or the largest-blob rule (final).
MIN_THRESHOLD = 40.0
# A frame's blob must cover this fraction of the frame to count (the world's smallest is ~0.5%).
MIN_AREA = 0.001


@dataclass
class Reading:
    """What the probe saw in one clip.

    ``centroid`` is [F, 2] (x, y as frame fractions, NaN where no object was found), ``area`` is [F]
    (fraction of the frame), ``confidence`` is in [0, 1]: the smallest of the per-attribute margins in
    ``details`` (0 = on a decision boundary). ``details`` also holds the raw measurements.
    """

    colour: str
    shape: str
    motion: str
    background: str
    centroid: np.ndarray
    area: np.ndarray
    confidence: float
    details: dict[str, float] = field(default_factory=dict)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> tuple[str, float, float]:
    """Nearest named colour, its distance, and a margin in [0, 1] (1 - nearest / second nearest)."""
    names = list(table)
    d = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float64) - rgb, axis=1)
    order = np.argsort(d)
    d1, d2 = d[order[0]], d[order[1]]
    return names[order[0]], float(d1), float(1 - d1 / d2) if d2 > 0 else 0.0


def _shift_all(mask: np.ndarray, op) -> np.ndarray:
    """Reduce a [F, H, W] boolean mask with ``op`` over its 3x3 neighbourhood (outside = False)."""
    f, h, w = mask.shape
    padded = np.zeros((f, h + 2, w + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = mask
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out = op(out, padded[:, dy : dy + h, dx : dx + w])
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return _shift_all(mask, np.logical_and)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_all(mask, np.logical_or)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of a [H, W] mask, by min-label propagation inside its bounding box."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    big = crop.size + 1
    labels = np.where(crop, np.arange(crop.size).reshape(crop.shape), big)
    while True:
        pad = np.full((labels.shape[0] + 2, labels.shape[1] + 2), big)
        pad[1:-1, 1:-1] = labels
        nxt = np.minimum.reduce([labels, pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]])
        nxt = np.where(crop, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    ids, counts = np.unique(labels[crop], return_counts=True)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = labels == ids[np.argmax(counts)]
    return out


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """A shape stretched over an h x w box, sampled like the world draws it."""
    px = ((np.arange(w) + 0.5) / w)[None, :]
    py = ((np.arange(h) + 0.5) / h)[:, None]
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return (px - 0.5) ** 2 + (py - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return np.broadcast_to(np.abs(px - 0.5) <= py / 2, (h, w))
    raise ValueError(f"unknown shape {shape!r}")


def _shape_scores(mask: np.ndarray) -> np.ndarray:
    """IoU of one [H, W] mask with each of SHAPES, fitted to the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scores = []
    for shape in SHAPES:
        t = _template(shape, *crop.shape)
        scores.append((crop & t).sum() / (crop | t).sum())
    return np.asarray(scores)


def _classify_motion(centroid: np.ndarray, area: np.ndarray) -> tuple[str, float, dict[str, float]]:
    """Motion name, a margin in [0, 1], and the raw numbers it was decided from."""
    valid = ~np.isnan(centroid[:, 0])
    n = len(area)
    if valid.sum() < 2:
        return UNKNOWN, 0.0, {}
    t = np.linspace(0.0, 1.0, n)[valid]
    xy = centroid[valid]
    a = area[valid]
    k = max(1, len(a) // 4)
    ratio = float(a[-k:].mean() / a[:k].mean())
    # Least-squares line through the track: its slope is the travel over the whole clip (t spans 0..1).
    coef = np.polyfit(t, xy, 1)
    travel_x, travel_y = float(coef[0, 0]), float(coef[0, 1])
    residual = xy - (coef[0] * t[:, None] + coef[1])
    rms = float(np.sqrt((residual**2).sum(axis=1).mean()))
    span_x, span_y = (xy.max(axis=0) - xy.min(axis=0)).tolist()
    travel = math.hypot(travel_x, travel_y)
    raw = {
        "area_ratio": ratio,
        "travel_x": travel_x,
        "travel_y": travel_y,
        "travel": travel,
        "path_residual": rms,
        "span_x": span_x,
        "span_y": span_y,
    }

    log_ratio = math.log(ratio) if ratio > 0 else -math.inf
    grow_margin = abs(log_ratio) / math.log(GROW_MIN_RATIO) - 1  # > 0: beyond the growth threshold
    if grow_margin >= 0:
        return ("growing" if log_ratio > 0 else "shrinking"), min(1.0, grow_margin), raw
    circle_margin = min(rms / CIRCLE_MIN_RESIDUAL, span_x / CIRCLE_MIN_SPAN, span_y / CIRCLE_MIN_SPAN) - 1
    if circle_margin >= 0:
        return "circling", min(1.0, circle_margin, -grow_margin), raw
    # Not growing and not circling; how clearly not, caps the confidence of what follows.
    cap = min(-grow_margin, -circle_margin)
    if travel < STILL_MAX_TRAVEL:
        return "still", min(cap, 1 - travel / STILL_MAX_TRAVEL), raw
    along, across = sorted((abs(travel_x), abs(travel_y)), reverse=True)
    margin = min(cap, travel / STILL_MAX_TRAVEL - 1, 1 - across / along)
    if abs(travel_x) >= abs(travel_y):
        return ("right" if travel_x > 0 else "left"), min(1.0, margin), raw
    return ("down" if travel_y > 0 else "up"), min(1.0, margin), raw


def probe(video: np.ndarray) -> Reading:
    """Read background, object colour, shape and motion from a uint8 [F, H, W, 3] clip."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected [F, H, W, 3], got {video.shape}")
    frames, h, w, _ = video.shape
    pix = video.astype(np.float32)

    # 1. Background: the border is almost all background even when the object touches it.
    edges = (pix[:, 0], pix[:, -1], pix[:, :, 0], pix[:, :, -1])
    border = np.concatenate([e.reshape(-1, 3) for e in edges])
    bg_rgb = np.median(border, axis=0)
    background, _, bg_margin = _nearest(bg_rgb, BACKGROUND_RGB)

    # 2. Mask, twice: a loose pass for the object's colour, then a cut halfway between it and the background.
    dist = np.linalg.norm(pix - bg_rgb, axis=-1)
    loose = _dilate(_erode(dist > MIN_THRESHOLD))
    details: dict[str, float] = {f"background_{c}": float(v) for c, v in zip("rgb", bg_rgb)}
    empty = Reading(
        UNKNOWN, UNKNOWN, UNKNOWN, background, np.full((frames, 2), np.nan), np.zeros(frames), 0.0, details
    )
    if not loose.any():
        return empty
    rough = np.median(pix[loose], axis=0)
    contrast = float(np.linalg.norm(rough - bg_rgb))
    # Coverage: each pixel projected on the background -> object colour axis (0 = background, 1 = object).
    # Unlike the distance, noise across that axis does not push it up, so blurred edges split evenly.
    coverage = (pix - bg_rgb) @ ((rough - bg_rgb) / contrast**2)
    threshold = max(MIN_THRESHOLD / contrast, 0.5)
    # No opening here: it would blunt small triangles. Speckles are separate blobs, dropped by keeping
    # the largest one per frame.
    mask = np.stack([_largest_component(m) for m in coverage > threshold])
    area = mask.sum(axis=(1, 2)) / (h * w)
    mask[area < MIN_AREA] = False
    area = np.where(area < MIN_AREA, 0.0, area)
    if not mask.any():
        return empty

    # 3. Colour from the interior: blurred edges are a mix of object and background.
    interior = _erode(mask)
    obj_rgb = np.median(pix[interior if interior.sum() >= 20 else mask], axis=0)
    colour, _, colour_margin = _nearest(obj_rgb, COLOUR_RGB)
    details.update({f"colour_{c}": float(v) for c, v in zip("rgb", obj_rgb)})
    details["contrast"] = contrast

    # 4. Shape, scored on every frame that has an object.
    present = area > 0
    scores = np.mean([_shape_scores(m) for m in mask[present]], axis=0)
    order = np.argsort(scores)[::-1]
    shape = SHAPES[order[0]]
    shape_margin = float(1 - scores[order[1]] / scores[order[0]])
    details.update({f"iou_{s}": float(v) for s, v in zip(SHAPES, scores)})

    # 5. Motion from the centroid and area tracks.
    centroid = np.full((frames, 2), np.nan)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in np.nonzero(present)[0]:
        centroid[i] = ((xs[mask[i]].mean() + 0.5) / w, (ys[mask[i]].mean() + 0.5) / h)
    motion, motion_margin, raw = _classify_motion(centroid, area)
    details.update(raw)

    margins = {
        "background": bg_margin,
        "colour": colour_margin,
        "shape": shape_margin,
        "motion": motion_margin,
    }
    details.update({f"margin_{k}": float(v) for k, v in margins.items()})
    confidence = float(np.clip(min(margins.values()), 0.0, 1.0))
    return Reading(colour, shape, motion, background, centroid, area, confidence, details)


def adherence(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Per attribute, whether the clip read back matches the scene it was meant to show."""
    return {
        "colour": reading.colour == scene.colour,
        "shape": reading.shape == scene.shape,
        "motion": reading.motion == scene.motion,
        "background": reading.background == scene.background,
    }


def degrade(video: np.ndarray, seed: int, noise_sigma: float = 10.0, blur: int = 3) -> np.ndarray:
    """A clip made imperfect like a generated one: a blur x blur box blur, then Gaussian noise (levels)."""
    out = video.astype(np.float32)
    if blur > 1:
        # Box blur with edge padding, so the border (the probe's background sample) keeps its colour.
        pad = blur // 2
        padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        h, w = out.shape[1:3]
        out = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(blur) for dx in range(blur)) / blur**2
    if noise_sigma > 0:
        out = out + np.random.default_rng(seed).normal(0.0, noise_sigma, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
