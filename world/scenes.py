"""Scenes of the procedural world: one coloured shape moving on a plain background.

Everything is deterministic: a scene is a frozen value, ``render`` is a pure function of it, and
``sample_scene`` / ``dataset`` draw scenes from a seeded numpy generator. Geometry is kept in frame
fractions (0..1, x to the right, y downwards) so the same scene renders at any resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated colours, far from each other (>= 114 apart in RGB) and from every background (>= 100),
# so a probe can name them by nearest colour even after noise, blur or a model's colour drift.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 220),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "growing", "shrinking", "circling")
LINEAR_MOTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# How each motion is said in a caption; every phrase contains the motion's own name, so a caption
# can be checked (and a text encoder conditioned) on the vocabulary word itself.
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "staying still",
    "growing": "growing",
    "shrinking": "shrinking",
    "circling": "circling",
}

# Every template names colour, shape, motion and background exactly once.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {motion} on a {background} background",
    "a {colour} {shape} {motion} against a {background} background",
    "a {background} background with a {colour} {shape} {motion}",
    "{colour} {shape} {motion}, {background} background",
)

# Growing scales the shape from GROW_RANGE[0] to GROW_RANGE[1] times its size (shrinking the reverse):
# an area ratio of 6.25 over the clip, far above anything a probe would call noise.
GROW_RANGE: tuple[float, float] = (0.6, 1.5)
# Margin (frame fraction) kept between the object's bounding box and the frame edge at every frame.
MARGIN = 0.03

# Ranges sample_scene draws from (frame fractions).
SIZE_RANGE: tuple[float, float] = (0.18, 0.28)
LINEAR_TRAVEL_RANGE: tuple[float, float] = (0.35, 0.5)  # centroid travel over the clip
CIRCLE_DIAMETER_RANGE: tuple[float, float] = (0.3, 0.4)


@dataclass(frozen=True)
class Scene:
    """One clip of the world.

    ``size`` is the side of the shape's bounding box (frame fraction, at scale 1). ``x``, ``y`` is the
    centre of the path: the midpoint of a linear move, the centre of a circle, or the fixed position of a
    still, growing or shrinking shape. ``travel`` is the distance covered by a linear move or the diameter
    of the circle (ignored otherwise). ``template`` picks the caption wording.
    """

    shape: str
    colour: str
    background: str
    motion: str
    size: float = 0.24
    x: float = 0.5
    y: float = 0.5
    travel: float = 0.45
    template: int = 0

    def __post_init__(self) -> None:
        for name, value, vocab in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("background", self.background, BACKGROUNDS),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; expected one of {vocab}")
        if not 0 <= self.template < len(TEMPLATES):
            raise ValueError(f"template {self.template} out of range 0..{len(TEMPLATES) - 1}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        # The object must be whole in every frame; 65 samples include the circle's extreme points.
        cx, cy, side = trajectory(self, np.linspace(0.0, 1.0, 65))
        lo = min((cx - side / 2).min(), (cy - side / 2).min())
        hi = max((cx + side / 2).max(), (cy + side / 2).max())
        if lo < 0 or hi > 1:
            raise ValueError(f"scene leaves the frame (extent {lo:.3f}..{hi:.3f}): {self}")


def trajectory(scene: Scene, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and bounding-box side (frame fractions) of the shape at clip times t in [0, 1]."""
    t = np.asarray(t, dtype=np.float64)
    cx = np.full_like(t, scene.x)
    cy = np.full_like(t, scene.y)
    side = np.full_like(t, scene.size)
    if scene.motion in LINEAR_MOTIONS:
        dx, dy = LINEAR_MOTIONS[scene.motion]
        cx = cx + dx * scene.travel * (t - 0.5)
        cy = cy + dy * scene.travel * (t - 0.5)
    elif scene.motion == "circling":
        # One full anticlockwise turn (on screen), starting at the circle's rightmost point.
        r = scene.travel / 2
        cx = cx + r * np.cos(2 * math.pi * t)
        cy = cy - r * np.sin(2 * math.pi * t)
    elif scene.motion in ("growing", "shrinking"):
        a, b = GROW_RANGE if scene.motion == "growing" else GROW_RANGE[::-1]
        side = scene.size * (a + (b - a) * t)
    return cx, cy, side


def shape_mask(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of a shape whose bounding box is centred at (cx, cy), side ``side`` (fractions).

    Pixels are sampled at their centres; no anti-aliasing (a model's blur is the probe's problem).
    """
    px = ((np.arange(width) + 0.5) / width)[None, :]
    py = ((np.arange(height) + 0.5) / height)[:, None]
    h = side / 2
    if shape == "square":
        return (np.abs(px - cx) <= h) & (np.abs(py - cy) <= h)
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= h * h
    if shape == "triangle":
        # Isosceles, apex up: half-width grows from 0 at the top to h at the base.
        top = cy - h
        return (py >= top) & (py <= cy + h) & (np.abs(px - cx) <= (py - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, frames: int = 17, size: int = 128) -> np.ndarray:
    """The clip of ``scene``: uint8 [frames, size, size, 3]."""
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got {frames}, {size}")
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    cx, cy, side = trajectory(scene, t)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.uint8)
    colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.uint8)
    for i in range(frames):
        video[i][shape_mask(scene.shape, cx[i], cy[i], side[i], size, size)] = colour
    return video


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a red circle moving left on a white background"."""
    motion = MOTION_PHRASES[scene.motion]
    template = TEMPLATES[scene.template]
    return template.format(colour=scene.colour, shape=scene.shape, motion=motion, background=scene.background)


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_scene(rng: np.random.Generator | int) -> Scene:
    """A random scene: every attribute uniform, position uniform over the places where it stays whole."""
    g = _rng(rng)
    shape = SHAPES[g.integers(len(SHAPES))]
    colour = COLOURS[g.integers(len(COLOURS))]
    background = BACKGROUNDS[g.integers(len(BACKGROUNDS))]
    motion = MOTIONS[g.integers(len(MOTIONS))]
    size = float(g.uniform(*SIZE_RANGE))
    travel = 0.0
    # Half extent of the path around (x, y) on each axis, plus the largest half side of the shape.
    half_x = half_y = size / 2
    if motion in LINEAR_MOTIONS:
        travel = float(g.uniform(*LINEAR_TRAVEL_RANGE))
        if LINEAR_MOTIONS[motion][0]:
            half_x += travel / 2
        else:
            half_y += travel / 2
    elif motion == "circling":
        travel = float(g.uniform(*CIRCLE_DIAMETER_RANGE))
        half_x += travel / 2
        half_y += travel / 2
    elif motion in ("growing", "shrinking"):
        half_x = half_y = size * max(GROW_RANGE) / 2
    x = float(g.uniform(MARGIN + half_x, 1 - MARGIN - half_x))
    y = float(g.uniform(MARGIN + half_y, 1 - MARGIN - half_y))
    template = int(g.integers(len(TEMPLATES)))
    return Scene(shape, colour, background, motion, size=size, x=x, y=y, travel=travel, template=template)


def dataset(
    seed: int, count: int, frames: int = 17, size: int = 128
) -> Iterator[tuple[str, np.ndarray, Scene]]:
    """``count`` (caption, video, scene) triples, deterministic from ``seed``.

    Item i depends only on (seed, i), so a longer dataset extends a shorter one and items can be
    regenerated one by one.
    """
    for i in range(count):
        yield clip(seed, i, frames, size)


def clip(seed: int, index: int, frames: int = 17, size: int = 128) -> tuple[str, np.ndarray, Scene]:
    """Item ``index`` of the dataset of ``seed``: (caption, video, scene)."""
    scene = sample_scene(np.random.default_rng([seed, index]))
    return caption(scene), render(scene, frames=frames, size=size), scene


def prompt_set() -> list[Scene]:
    """The fixed evaluation prompt set: 48 scenes.

    Scene i has motion MOTIONS[i % 8] and shape SHAPES[i % 3]; as 8 and 3 are coprime each half (24
    scenes) holds every (motion, shape) pair once. Backgrounds cycle every 8 scenes so that every motion
    meets every background once per half; the second half shifts colour and background by one, shrinks
    the shape (0.2 vs 0.26) and moves its path off centre, so no prompt is repeated. Colours cycle
    every 6. Captions rotate through the templates. Linear moves travel 0.45 of the frame; circles are
    0.34 across.
    """
    scenes = []
    for i in range(48):
        half = i // 24
        motion = MOTIONS[i % len(MOTIONS)]
        travel = 0.45 if motion in LINEAR_MOTIONS else 0.34 if motion == "circling" else 0.0
        scenes.append(
            Scene(
                shape=SHAPES[i % len(SHAPES)],
                colour=COLOURS[(i + half) % len(COLOURS)],
                background=BACKGROUNDS[(i // 8 + half) % len(BACKGROUNDS)],
                motion=motion,
                size=0.26 if half == 0 else 0.2,
                x=0.5 if half == 0 else 0.46,
                y=0.5 if half == 0 else 0.54,
                travel=travel,
                template=i % len(TEMPLATES),
            )
        )
    return scenes


def vocabulary() -> list[str]:
    """Every word a caption can hold, in a fixed order: what the world model's tokenizer knows."""
    words: list[str] = []
    texts = [*TEMPLATES, *SHAPES, *COLOURS, *BACKGROUNDS, *MOTION_PHRASES.values()]
    for text in texts:
        for word in text.replace(",", " , ").split():
            if not word.startswith("{") and word not in words:
                words.append(word)
    return words
