"""Scenes of the procedural world: coloured shapes moving on a plain background.

Everything is deterministic: a scene is a frozen value, ``render`` is a pure function of it, and
``sample_scene`` / ``dataset`` draw scenes from a seeded numpy generator. Geometry is kept in frame
fractions (0..1, x to the right, y downwards) so the same scene renders at any resolution.

The shipped world model was trained on one object per scene (``sample_scene``, ``prompt_set``); those
draws, renders, captions and the vocabulary's order are frozen (tests/test_world.py pins them). Detail
scenes (``sample_detail_scene``, ``detail_prompt_set``) add what stresses a model's detail: thin bars,
small objects and two objects in one clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# sample_scene and prompt_set index SHAPES by its length: appending "bar" there would change the shipped
# model's training data and prompts, so detail scenes draw from their own tuple.
DETAIL_SHAPES: tuple[str, ...] = (*SHAPES, "bar")
# A bar is horizontal, as wide as its side and BAR_ASPECT times thinner.
BAR_ASPECT = 4

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
# Where a template names its object: a detail scene puts each object's phrase there ("small red circle
# moving left"), joined by AND for two ("... and a blue square moving up").
OBJECT_SLOT = "{colour} {shape} {motion}"
AND = " and a "
# The size word; a small object is drawn at SMALL_SCALE times its size.
SMALL = "small"
SMALL_SCALE = 0.5

# Growing scales the shape from GROW_RANGE[0] to GROW_RANGE[1] times its size (shrinking the reverse):
# an area ratio of 6.25 over the clip, far above anything a probe would call noise.
GROW_RANGE: tuple[float, float] = (0.6, 1.5)
# Margin (frame fraction) kept between the object's bounding box and the frame edge at every frame.
MARGIN = 0.03
# Least distance (frame fraction) between the bounding boxes of two objects at every frame: they never
# touch, so blur never mixes their colours and a probe can tell them apart by colour alone.
GAP = 0.06

# Ranges sample_scene draws from (frame fractions).
SIZE_RANGE: tuple[float, float] = (0.18, 0.28)
LINEAR_TRAVEL_RANGE: tuple[float, float] = (0.35, 0.5)  # centroid travel over the clip
CIRCLE_DIAMETER_RANGE: tuple[float, float] = (0.3, 0.4)
# Two objects share the frame: their travel ranges are scaled by this, or a circling one leaves no room
# for the other (still far above the probe's thresholds).
PAIR_TRAVEL_SCALE = 0.6

# Clip times at which a scene is checked (inside the frame, objects apart); they include the circle's
# extreme points and every frame time of a 2, 3, 5, 9, 17, 33 or 65-frame clip.
_CHECK_TIMES = np.linspace(0.0, 1.0, 65)


@dataclass(frozen=True)
class Thing:
    """One object: what it is, how it moves and where (size, x, y and travel mean what Scene's do).

    ``small`` is the size word: the object is drawn at SMALL_SCALE times ``size``.
    """

    shape: str
    colour: str
    motion: str
    size: float = 0.24
    x: float = 0.5
    y: float = 0.5
    travel: float = 0.45
    small: bool = False

    def __post_init__(self) -> None:
        for name, value, vocab in (
            ("shape", self.shape, DETAIL_SHAPES),
            ("colour", self.colour, COLOURS),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; expected one of {vocab}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.small and self.shape == "bar":
            # ~2 px thick at 64x64: under what the model's VAE or the probe can resolve.
            raise ValueError("a bar cannot be small")
        # The object must be whole in every frame.
        cx, cy, side = trajectory(self, _CHECK_TIMES)
        lo = min((cx - side / 2).min(), (cy - side / 2).min())
        hi = max((cx + side / 2).max(), (cy + side / 2).max())
        if lo < 0 or hi > 1:
            raise ValueError(f"scene leaves the frame (extent {lo:.3f}..{hi:.3f}): {self}")


@dataclass(frozen=True)
class Scene:
    """One clip of the world: its first object (the fields shape to travel, and small), an optional
    ``second`` object, the background and the caption's template.

    ``size`` is the side of the shape's bounding box (frame fraction, at scale 1). ``x``, ``y`` is the
    centre of the path: the midpoint of a linear move, the centre of a circle, or the fixed position of a
    still, growing or shrinking shape. ``travel`` is the distance covered by a linear move or the diameter
    of the circle (ignored otherwise). ``template`` picks the caption wording. Two objects differ in
    shape and colour and stay GAP apart.
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
    small: bool = False
    second: Thing | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUNDS}")
        if not 0 <= self.template < len(TEMPLATES):
            raise ValueError(f"template {self.template} out of range 0..{len(TEMPLATES) - 1}")
        first = self.first  # checks the first object
        if self.second is not None:
            if self.second.shape == first.shape or self.second.colour == first.colour:
                raise ValueError(f"two objects must differ in shape and colour: {self}")
            if not _apart(first, self.second):
                raise ValueError(f"objects come closer than {GAP}: {self}")

    @classmethod
    def of(cls, things: tuple[Thing, ...], background: str, template: int = 0) -> Scene:
        """The scene of one or two ``things``."""
        if not 1 <= len(things) <= 2:
            raise ValueError(f"a scene holds one or two things, got {len(things)}")
        a, *second = things
        return cls(
            a.shape, a.colour, background, a.motion, a.size, a.x, a.y, a.travel, template, a.small, *second
        )

    @property
    def first(self) -> Thing:
        return Thing(self.shape, self.colour, self.motion, self.size, self.x, self.y, self.travel, self.small)

    @property
    def things(self) -> tuple[Thing, ...]:
        return (self.first,) if self.second is None else (self.first, self.second)


def trajectory(thing: Thing | Scene, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and bounding-box side (frame fractions) of an object (a scene's first one) at
    clip times t in [0, 1]."""
    t = np.asarray(t, dtype=np.float64)
    cx = np.full_like(t, thing.x)
    cy = np.full_like(t, thing.y)
    size = thing.size * SMALL_SCALE if thing.small else thing.size
    side = np.full_like(t, size)
    if thing.motion in LINEAR_MOTIONS:
        dx, dy = LINEAR_MOTIONS[thing.motion]
        cx = cx + dx * thing.travel * (t - 0.5)
        cy = cy + dy * thing.travel * (t - 0.5)
    elif thing.motion == "circling":
        # One full anticlockwise turn (on screen), starting at the circle's rightmost point.
        r = thing.travel / 2
        cx = cx + r * np.cos(2 * math.pi * t)
        cy = cy - r * np.sin(2 * math.pi * t)
    elif thing.motion in ("growing", "shrinking"):
        a, b = GROW_RANGE if thing.motion == "growing" else GROW_RANGE[::-1]
        side = size * (a + (b - a) * t)
    return cx, cy, side


def _apart(a: Thing, b: Thing) -> bool:
    """Whether the bounding boxes of a and b stay GAP apart (on x or on y) at every checked time."""
    ax, ay, a_side = trajectory(a, _CHECK_TIMES)
    bx, by, b_side = trajectory(b, _CHECK_TIMES)
    reach = (a_side + b_side) / 2 + GAP
    return bool(np.all((np.abs(ax - bx) >= reach) | (np.abs(ay - by) >= reach)))


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
    if shape == "bar":
        return (np.abs(px - cx) <= h) & (np.abs(py - cy) <= h / BAR_ASPECT)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, frames: int = 17, size: int = 128) -> np.ndarray:
    """The clip of ``scene``: uint8 [frames, size, size, 3]."""
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got {frames}, {size}")
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.uint8)
    for thing in scene.things:
        cx, cy, side = trajectory(thing, t)
        colour = np.asarray(COLOUR_RGB[thing.colour], dtype=np.uint8)
        for i in range(frames):
            video[i][shape_mask(thing.shape, cx[i], cy[i], side[i], size, size)] = colour
    return video


def _phrase(thing: Thing) -> str:
    words = [SMALL] if thing.small else []
    return " ".join([*words, thing.colour, thing.shape, MOTION_PHRASES[thing.motion]])


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a red circle moving left on a white background" or
    "a small red circle moving left and a blue bar circling on a white background"."""
    objects = AND.join(_phrase(t) for t in scene.things)
    return TEMPLATES[scene.template].replace(OBJECT_SLOT, objects).format(background=scene.background)


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _place(
    g: np.random.Generator, motion: str, side: float, travel_scale: float = 1.0
) -> tuple[float, float, float]:
    """Travel, x and y of a path for ``motion``: travel drawn from its range times ``travel_scale``, the
    position uniform over the places where a shape of bounding-box side ``side`` stays whole."""
    travel = 0.0
    # Half extent of the path around (x, y) on each axis, plus the largest half side of the shape.
    half_x = half_y = side / 2
    if motion in LINEAR_MOTIONS:
        lo, hi = LINEAR_TRAVEL_RANGE
        travel = float(g.uniform(lo * travel_scale, hi * travel_scale))
        if LINEAR_MOTIONS[motion][0]:
            half_x += travel / 2
        else:
            half_y += travel / 2
    elif motion == "circling":
        lo, hi = CIRCLE_DIAMETER_RANGE
        travel = float(g.uniform(lo * travel_scale, hi * travel_scale))
        half_x += travel / 2
        half_y += travel / 2
    elif motion in ("growing", "shrinking"):
        half_x = half_y = side * max(GROW_RANGE) / 2
    x = float(g.uniform(MARGIN + half_x, 1 - MARGIN - half_x))
    y = float(g.uniform(MARGIN + half_y, 1 - MARGIN - half_y))
    return travel, x, y


def sample_scene(rng: np.random.Generator | int) -> Scene:
    """A random scene: every attribute uniform, position uniform over the places where it stays whole."""
    g = _rng(rng)
    shape = SHAPES[g.integers(len(SHAPES))]
    colour = COLOURS[g.integers(len(COLOURS))]
    background = BACKGROUNDS[g.integers(len(BACKGROUNDS))]
    motion = MOTIONS[g.integers(len(MOTIONS))]
    size = float(g.uniform(*SIZE_RANGE))
    travel, x, y = _place(g, motion, size)
    template = int(g.integers(len(TEMPLATES)))
    return Scene(shape, colour, background, motion, size=size, x=x, y=y, travel=travel, template=template)


def dataset(
    seed: int, count: int, frames: int = 17, size: int = 128, detail_fraction: float = 0.0
) -> Iterator[tuple[str, np.ndarray, Scene]]:
    """``count`` (caption, video, scene) triples, deterministic from ``seed``.

    Item i depends only on (seed, i), so a longer dataset extends a shorter one and items can be
    regenerated one by one. ``detail_fraction``: see ``clip``.
    """
    for i in range(count):
        yield clip(seed, i, frames, size, detail_fraction)


def clip(
    seed: int, index: int, frames: int = 17, size: int = 128, detail_fraction: float = 0.0
) -> tuple[str, np.ndarray, Scene]:
    """Item ``index`` of the dataset of ``seed``: (caption, video, scene).

    With ``detail_fraction`` > 0 that share of the items (drawn from default_rng([seed, index, 1])) are
    detail scenes; the others are the items of the plain dataset.
    """
    g = np.random.default_rng([seed, index])
    detail = detail_fraction > 0 and np.random.default_rng([seed, index, 1]).random() < detail_fraction
    scene = sample_detail_scene(g) if detail else sample_scene(g)
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


# The kinds of detail scene: two objects, one small object, one bar.
DETAIL_KINDS: tuple[str, ...] = ("pair", "small", "bar")


def detail_kind(scene: Scene) -> str:
    """The kind of a detail scene (DETAIL_KINDS): two objects, one small object, or one bar."""
    return "pair" if scene.second is not None else "small" if scene.small else "bar"


def _placed(g: np.random.Generator, specs: list[tuple[str, str, str, float, bool]]) -> tuple[Thing, ...]:
    """Things of (shape, colour, motion, size, small) ``specs`` (one or two), with paths drawn by
    ``_place``; drawn again until two stay apart."""
    for _ in range(1000):
        things = []
        for shape, colour, motion, size, small in specs:
            side = size * SMALL_SCALE if small else size
            travel, x, y = _place(g, motion, side, PAIR_TRAVEL_SCALE if len(specs) == 2 else 1.0)
            things.append(Thing(shape, colour, motion, size, x, y, travel, small))
        if len(things) == 1 or _apart(*things):
            return tuple(things)
    raise RuntimeError(f"found no room for {specs}")  # not reached with the world's ranges


def sample_detail_scene(rng: np.random.Generator | int) -> Scene:
    """A random detail scene: a kind of DETAIL_KINDS, then every attribute uniform. A pair has two
    shapes of DETAIL_SHAPES and two colours, both distinct, and a motion each; a small object is one
    of SHAPES. Sizes and paths are drawn as in ``sample_scene``, a pair's travel scaled by
    PAIR_TRAVEL_SCALE and its paths drawn again until the two objects stay apart."""
    g = _rng(rng)
    kind = DETAIL_KINDS[g.integers(len(DETAIL_KINDS))]
    if kind == "pair":
        shapes = [DETAIL_SHAPES[k] for k in g.choice(len(DETAIL_SHAPES), 2, replace=False)]
    else:
        shapes = [SHAPES[g.integers(len(SHAPES))] if kind == "small" else "bar"]
    colours = [COLOURS[k] for k in g.choice(len(COLOURS), len(shapes), replace=False)]
    motions = [MOTIONS[k] for k in g.integers(len(MOTIONS), size=len(shapes))]
    sizes = g.uniform(*SIZE_RANGE, size=len(shapes)).tolist()
    background = BACKGROUNDS[g.integers(len(BACKGROUNDS))]
    specs = [(s, c, m, z, kind == "small") for s, c, m, z in zip(shapes, colours, motions, sizes)]
    return Scene.of(_placed(g, specs), background, int(g.integers(len(TEMPLATES))))


# Seeds the paths of detail_prompt_set: scene i draws from default_rng([DETAIL_PROMPT_SEED, i]).
DETAIL_PROMPT_SEED = 1000


def detail_prompt_set() -> list[Scene]:
    """The fixed detail prompt set: 48 scenes, 16 of each kind.

    Scene i is of kind DETAIL_KINDS[i % 3] (interleaved, so every prefix mixes the kinds). Scene j of a
    kind (j = i // 3) has motion MOTIONS[j % 8] (every motion twice), colour COLOURS[j % 6] and
    background BACKGROUNDS[(j + i % 3) % 3]; captions rotate through the templates. A pair's first shape
    is DETAIL_SHAPES[j % 4]; its second shape, colour and motion are shifted from the first by an offset
    that changes with j and is never 0 for shape and colour; both are 0.22 in size. Small objects are
    SHAPES[j % 3] at size 0.26, then 0.22 (drawn at half that); bars are 0.3, then 0.26. Paths are drawn
    as in ``sample_detail_scene``, from default_rng([DETAIL_PROMPT_SEED, i]).
    """
    scenes = []
    for i in range(48):
        kind, j = DETAIL_KINDS[i % len(DETAIL_KINDS)], i // len(DETAIL_KINDS)
        colour, motion = COLOURS[j % len(COLOURS)], MOTIONS[j % len(MOTIONS)]
        half = j // 8
        if kind == "pair":
            second = (
                DETAIL_SHAPES[(j + 1 + (j // 4) % 3) % len(DETAIL_SHAPES)],
                COLOURS[(j + 1 + j // 6) % len(COLOURS)],
                MOTIONS[(j + 3 + half) % len(MOTIONS)],
                0.22,
                False,
            )
            specs = [(DETAIL_SHAPES[j % len(DETAIL_SHAPES)], colour, motion, 0.22, False), second]
        elif kind == "small":
            specs = [(SHAPES[j % len(SHAPES)], colour, motion, (0.26, 0.22)[half], True)]
        else:
            specs = [("bar", colour, motion, (0.3, 0.26)[half], False)]
        things = _placed(np.random.default_rng([DETAIL_PROMPT_SEED, i]), specs)
        background = BACKGROUNDS[(j + i % len(DETAIL_KINDS)) % len(BACKGROUNDS)]
        scenes.append(Scene.of(things, background, i % len(TEMPLATES)))
    return scenes


def vocabulary() -> list[str]:
    """Every word a caption can hold, in a fixed order: what the world model's tokenizer knows.

    The detail scenes' words come last, so the shipped model's words keep their positions."""
    words: list[str] = []
    texts = [*TEMPLATES, *SHAPES, *COLOURS, *BACKGROUNDS, *MOTION_PHRASES.values()]
    texts += [*DETAIL_SHAPES[len(SHAPES) :], SMALL, AND]
    for text in texts:
        for word in text.replace(",", " , ").split():
            if not word.startswith("{") and word not in words:
                words.append(word)
    return words
