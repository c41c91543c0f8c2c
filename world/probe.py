"""Read a clip back: which background; per object, which colour, shape (and whether small) and motion.

Plain image processing on uint8 [F, H, W, 3] clips, numpy only, so it scores generated videos with no
model in the loop:

1. background: the median of the border pixels over the clip, named by nearest background colour;
2. objects: every pixel is named by the nearest colour ray (background -> palette colour: a blurred
   edge, a mix of its object and the background, is named like its object). Pixels at least halfway
   along their ray are counted per colour; a clip holds two objects when two colours each hold more than
   SECOND_MIN_SHARE (3%) of those pixels (the world keeps two objects apart and different in colour; the
   smaller of 150 sampled pairs held >= 9%, clean or degraded) and do not touch in most frames (a colour
   touching a larger one is part of it: a highlight or shading a model drew). Steps 3-7 then read each
   object on the pixels of its colours; otherwise they read the clip as one object;
3. object mask: each pixel projected on the background -> object colour axis (0 = background,
   1 = object) and cut at 0.5, so blur neither fattens nor thins the shape and noise across the axis is
   ignored; then the largest connected blob per frame, which drops speckles. The object colour for the
   axis is the median of a first pass's pixels farther from the background than their median (one
   object: distance > 40 from the background, cleaned by a 3x3 opening; two: the colour's pixels of
   step 2), so the blurred edges of a thin or small object do not pull it to the background;
4. colour: the median of the mask's interior pixels, named by nearest colour;
5. shape: the mask's IoU with each shape template stretched over the mask's bounding box, averaged over
   frames weighted by area (a circle fills ~0.785 of its box, a triangle ~0.5, a square 1.0; IoU also
   uses where it fills). A long box (the median over frames of its long side over its short side
   >= BAR_MIN_ELONGATION, 2, between a square's 1 and a bar's 4) holding a square or a circle is a bar;
6. size: small when the side is < SMALL_MAX_SIDE (0.16 of the frame): the world draws a normal object
   at >= 0.18 (a growing one's median is 1.05x its size), a small one at <= 0.147. The side is the
   square root of the median area over the shape's fill of its box (a bar: the median length of its box);
7. motion: from the centroid and area tracks, by the thresholds below.

Motion thresholds (frame fractions; the world's own motions are far from every one of them):

- growing / shrinking: the mean area of the last quarter of the frames over that of the first quarter
  is >= GROW_MIN_RATIO (1.6) or <= 1 / GROW_MIN_RATIO. The world grows by 6.25x in area.
- circling: the centroid track is not a line: RMS distance from its least-squares line >=
  CIRCLE_MIN_RESIDUAL (0.04), and it spans >= CIRCLE_MIN_SPAN (0.1) on both axes. A world circle of
  diameter 0.3 leaves a residual of ~0.11 (one of two objects, 0.18 across: ~0.06); a straight move
  leaves ~0.
- still vs moving: the travel of the least-squares line through the centroid track over the clip is
  < STILL_MAX_TRAVEL (0.08): still; otherwise left/right/up/down by its dominant axis. The world's moves
  travel 0.35-0.5 (0.21-0.3 for one of two objects); a drifting but "still" generated object may wander
  up to 0.08.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from smartdiff.world.scenes import BACKGROUND_RGB, COLOUR_RGB, SHAPES, Scene, Thing

UNKNOWN = "unknown"

GROW_MIN_RATIO = 1.6
CIRCLE_MIN_RESIDUAL = 0.04
CIRCLE_MIN_SPAN = 0.1
STILL_MAX_TRAVEL = 0.08
BAR_MIN_ELONGATION = 2.0
SMALL_MAX_SIDE = 0.16
SECOND_MIN_SHARE = 0.03
# How much of its bounding box each shape fills.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

# Distances are Euclidean in RGB (0..255 per channel). Within MIN_THRESHOLD of the background a pixel is
# background in both passes: Gaussian noise of sigma 10 per channel exceeds 40 for ~1e-3 of pixels,
# and those isolated pixels are dropped by the opening (loose pass) or the largest-blob rule (final).
MIN_THRESHOLD = 40.0
# A frame's blob must cover this fraction of the frame to count (the world's smallest is ~0.5%).
MIN_AREA = 0.001


@dataclass
class ObjectReading:
    """What the probe saw of one object; the fields mean what Reading's do."""

    colour: str
    shape: str
    motion: str
    small: bool
    centroid: np.ndarray
    area: np.ndarray
    confidence: float
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class Reading:
    """What the probe saw in one clip.

    ``objects`` are the objects found, largest first; colour, shape, motion, small, centroid and area
    are the first one's. ``centroid`` is [F, 2] (x, y as frame fractions, NaN where no object was found),
    ``area`` is [F] (fraction of the frame), ``confidence`` is in [0, 1]: the smallest of the
    per-attribute margins of the background and of every object (0 = on a decision boundary).
    ``details`` holds the first object's margins and raw measurements, the background's and the number
    of objects.
    """

    colour: str
    shape: str
    motion: str
    background: str
    centroid: np.ndarray
    area: np.ndarray
    confidence: float
    details: dict[str, float] = field(default_factory=dict)
    small: bool = False
    objects: tuple[ObjectReading, ...] = ()


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


def _shape_scores(mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """IoU of one [H, W] mask with each of SHAPES, fitted to the mask's bounding box; the box's long side
    and its short side (frame fractions)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scores = []
    for shape in SHAPES:
        t = _template(shape, *crop.shape)
        scores.append((crop & t).sum() / (crop | t).sum())
    height, width = crop.shape[0] / mask.shape[0], crop.shape[1] / mask.shape[1]
    return np.asarray(scores), max(height, width), min(height, width)


def _classify_shape(masks: np.ndarray) -> tuple[str, bool, float, dict[str, float]]:
    """Shape name, whether small, a margin in [0, 1] and the raw numbers, from the [F, H, W] masks of
    the frames that hold the object."""
    per_frame = [_shape_scores(m) for m in masks]
    # Weighted by area: the larger views of a growing or shrinking object show its shape better.
    scores = np.average([p[0] for p in per_frame], axis=0, weights=masks.sum(axis=(1, 2)))
    elongation = float(np.median([long / short for _, long, short in per_frame]))
    named = dict(zip(SHAPES, scores.tolist()))
    if elongation >= BAR_MIN_ELONGATION:
        # The world's only long shape. A box or a disc stretched long: blur rounds the corners of a bar
        # a few pixels thick until it fills its box like an ellipse.
        named = {"bar": max(named.pop("square"), named.pop("circle")), **named}
    (shape, best), (_, second) = sorted(named.items(), key=lambda kv: -kv[1])[:2]
    margin = 1 - second / best
    if shape != "triangle":
        # Square or circle against bar: the margin in halvings of the elongation from the line.
        margin = min(margin, abs(math.log(elongation / BAR_MIN_ELONGATION)) / math.log(2))
    # The side from the area: a few noisy pixels can widen a small object's box by one, not its area. But
    # a bar's area is off by a third when its ~3 px thickness rounds to 2 or 4: its length is the side.
    if shape == "bar":
        side = float(np.median([long for _, long, _ in per_frame]))
    else:
        side = math.sqrt(np.median(masks.mean(axis=(1, 2))) / FILL[shape])
    small = side < SMALL_MAX_SIDE
    margin = min(margin, abs(math.log(side / SMALL_MAX_SIDE)) / math.log(2))
    raw = {f"iou_{s}": float(v) for s, v in zip(SHAPES, scores)}
    return shape, small, margin, raw | {"side": side, "elongation": elongation}


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


def _colour_rays(pix: np.ndarray, bg_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel ([..., 3]), the index (into COLOUR_RGB) of the nearest colour ray from the background, and
    how far along it the pixel lies (0 = background, 1 = the palette colour). A blurred edge lies between its
    object and the background, so it is named like its object."""
    rays = np.asarray(list(COLOUR_RGB.values()), dtype=np.float32) - bg_rgb.astype(np.float32)
    norms = (rays**2).sum(axis=1)
    offset = pix - bg_rgb.astype(np.float32)
    dot = offset @ rays.T  # [..., colours]
    along = np.maximum(dot / norms, 0.0)
    # Squared distance from each ray: |offset - along * ray|^2, expanded.
    gap = (offset**2).sum(axis=-1, keepdims=True) - along * (2 * dot - along * norms)
    names = np.argmin(gap, axis=-1)
    return names, np.take_along_axis(along, names[..., None], axis=-1)[..., 0]


def _read_object(
    pix: np.ndarray, bg_rgb: np.ndarray, loose: np.ndarray, allowed: np.ndarray | None = None
) -> ObjectReading | None:
    """Steps 3-7 for the object of the first pass's ``loose`` pixels, its mask kept to ``allowed`` (all
    if None); None when no frame holds a blob of MIN_AREA."""
    frames, h, w, _ = pix.shape
    # The object's colour, from the loose pixels farther from the background than their median: a thin
    # or small object's loose pixels are mostly its blurred edges.
    candidates = pix[loose]
    dist = np.linalg.norm(candidates - bg_rgb, axis=-1)
    rough = np.median(candidates[dist >= np.median(dist)], axis=0)
    contrast = float(np.linalg.norm(rough - bg_rgb))
    # Coverage: each pixel projected on the background -> object colour axis (0 = background, 1 = object).
    # Unlike the distance, noise across that axis does not push it up, so blurred edges split evenly.
    coverage = (pix - bg_rgb) @ ((rough - bg_rgb) / contrast**2)
    threshold = max(MIN_THRESHOLD / contrast, 0.5)
    cut = coverage > threshold
    if allowed is not None:
        cut &= allowed
    # No opening here: it would blunt small triangles. Speckles are separate blobs, dropped by keeping
    # the largest one per frame.
    mask = np.stack([_largest_component(m) for m in cut])
    area = mask.sum(axis=(1, 2)) / (h * w)
    mask[area < MIN_AREA] = False
    area = np.where(area < MIN_AREA, 0.0, area)
    if not mask.any():
        return None

    # 4. Colour from the interior: blurred edges are a mix of object and background.
    interior = _erode(mask)
    obj_rgb = np.median(pix[interior if interior.sum() >= 20 else mask], axis=0)
    colour, _, colour_margin = _nearest(obj_rgb, COLOUR_RGB)
    details = {f"colour_{c}": float(v) for c, v in zip("rgb", obj_rgb)}
    details["contrast"] = contrast

    # 5-6. Shape and size, from every frame that has an object.
    present = area > 0
    shape, small, shape_margin, raw = _classify_shape(mask[present])
    details.update(raw)

    # 7. Motion from the centroid and area tracks.
    centroid = np.full((frames, 2), np.nan)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in np.nonzero(present)[0]:
        centroid[i] = ((xs[mask[i]].mean() + 0.5) / w, (ys[mask[i]].mean() + 0.5) / h)
    motion, motion_margin, raw = _classify_motion(centroid, area)
    details.update(raw)

    margins = {"colour": colour_margin, "shape": shape_margin, "motion": motion_margin}
    details.update({f"margin_{k}": float(v) for k, v in margins.items()})
    confidence = float(np.clip(min(margins.values()), 0.0, 1.0))
    return ObjectReading(colour, shape, motion, small, centroid, area, confidence, details)


def probe(video: np.ndarray) -> Reading:
    """Read the background and each object's colour, shape, size and motion from a uint8 [F, H, W, 3]
    clip."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected [F, H, W, 3], got {video.shape}")
    frames = video.shape[0]
    pix = video.astype(np.float32)

    # 1. Background: the border is almost all background even when the object touches it.
    edges = (pix[:, 0], pix[:, -1], pix[:, :, 0], pix[:, :, -1])
    border = np.concatenate([e.reshape(-1, 3) for e in edges])
    bg_rgb = np.median(border, axis=0)
    background, _, bg_margin = _nearest(bg_rgb, BACKGROUND_RGB)
    details: dict[str, float] = {f"background_{c}": float(v) for c, v in zip("rgb", bg_rgb)}
    details["margin_background"] = bg_margin

    # 2. Objects by colour. A pixel within MIN_THRESHOLD of the background belongs to no mask (step 3's
    # cut lies beyond it); the others are named by colour ray, and those at least halfway along it
    # (neither noise nor faint edges) are counted per colour.
    far = np.linalg.norm(pix - bg_rgb, axis=-1) > MIN_THRESHOLD
    names = np.full(far.shape, -1)
    along = np.zeros(far.shape, dtype=np.float32)
    names[far], along[far] = _colour_rays(pix[far], bg_rgb)
    strong = along >= 0.5
    counts = np.bincount(names[strong], minlength=len(COLOUR_RGB))
    groups: list[np.ndarray] = []  # per object, which pixels are its colour(s)
    for k in np.argsort(-counts):
        if counts[k] <= SECOND_MIN_SHARE * counts.sum():
            break
        own = names == k
        for group in groups:
            # A colour touching a larger one in most of its frames is part of that object (a highlight
            # or shading a model drew): the world keeps two objects GAP apart.
            touch = (strong & own & _dilate(strong & group)).any(axis=(1, 2))
            if touch.sum() > 0.5 * (strong & own).any(axis=(1, 2)).sum():
                group |= own
                break
        else:
            groups.append(own)
    readings = []
    if len(groups) >= 2:
        readings = [_read_object(pix, bg_rgb, strong & group, group) for group in groups]
    objects = sorted((r for r in readings if r is not None), key=lambda r: -r.area.sum())
    if len(objects) < 2:
        # One object. The opening drops noise; a bar thinner than it is left its strong pixels.
        loose = _dilate(_erode(far))
        loose = loose if loose.any() else strong
        single = _read_object(pix, bg_rgb, loose) if loose.any() else None
        objects = [] if single is None else [single]

    details["objects"] = len(objects)
    if not objects:
        centroid, area = np.full((frames, 2), np.nan), np.zeros(frames)
        return Reading(UNKNOWN, UNKNOWN, UNKNOWN, background, centroid, area, 0.0, details)
    first = objects[0]
    confidence = float(np.clip(min(bg_margin, *(o.confidence for o in objects)), 0.0, 1.0))
    return Reading(
        first.colour,
        first.shape,
        first.motion,
        background,
        first.centroid,
        first.area,
        confidence,
        first.details | details,
        first.small,
        tuple(objects),
    )


def _matches(seen: Reading | ObjectReading | None, thing: Thing) -> dict[str, bool]:
    if seen is None:
        return {"colour": False, "shape": False, "motion": False}
    return {
        "colour": seen.colour == thing.colour,
        # The size word is part of what is drawn: a small circle is not a circle.
        "shape": seen.shape == thing.shape and seen.small == thing.small,
        "motion": seen.motion == thing.motion,
    }


def adherence(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Per attribute, whether the clip read back matches the scene it was meant to show.

    One object: the reading's (its largest object's) colour, shape and size, and motion. Two: each of the
    scene's objects is matched to the object read in its colour, and an attribute is right when it is
    right for both."""
    things = scene.things
    if len(things) == 1:
        per_thing = [_matches(reading, things[0])]
    else:
        by_colour = {o.colour: o for o in reading.objects}
        per_thing = [_matches(by_colour.get(t.colour), t) for t in things]
    return {
        "colour": all(m["colour"] for m in per_thing),
        "shape": all(m["shape"] for m in per_thing),
        "motion": all(m["motion"] for m in per_thing),
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
