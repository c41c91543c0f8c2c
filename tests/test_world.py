"""The procedural world (world.scenes) and its probe (world.probe): determinism, captions, read-back."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from smartdiff.world.probe import STILL_MAX_TRAVEL, UNKNOWN, adherence, degrade, probe
from smartdiff.world.scenes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    LINEAR_MOTIONS,
    MOTIONS,
    SHAPES,
    TEMPLATES,
    Scene,
    caption,
    dataset,
    prompt_set,
    render,
    sample_scene,
)

VOCAB = {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS, "background": BACKGROUNDS}


def _accuracy(videos_and_scenes) -> dict[str, float]:
    hits: dict[str, list[bool]] = {k: [] for k in VOCAB}
    for video, scene in videos_and_scenes:
        for k, ok in adherence(probe(video), scene).items():
            hits[k].append(ok)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_dataset_is_deterministic_from_seed():
    a = list(dataset(3, 6, frames=9, size=64))
    b = list(dataset(3, 6, frames=9, size=64))
    assert [c for c, _, _ in a] == [c for c, _, _ in b]
    assert all(np.array_equal(va, vb) for (_, va, _), (_, vb, _) in zip(a, b))
    assert [s for _, _, s in a] == [s for _, _, s in b]
    # A shorter dataset is a prefix of a longer one: item i depends only on (seed, i).
    assert [s for _, _, s in dataset(3, 3)] == [s for _, _, s in a[:3]]

    other = list(dataset(4, 6, frames=9, size=64))
    assert [s for _, _, s in other] != [s for _, _, s in a]
    assert not all(np.array_equal(va, vo) for (_, va, _), (_, vo, _) in zip(a, other))


def test_sample_scene_accepts_seed_or_generator():
    assert sample_scene(11) == sample_scene(np.random.default_rng(11))
    assert len({sample_scene(s) for s in range(20)}) == 20


def test_render_shape_dtype_and_colours():
    scene = Scene("square", "red", "gray", "right")
    video = render(scene, frames=5, size=32)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    colours = {tuple(p) for p in video.reshape(-1, 3)}
    assert colours == {BACKGROUND_RGB["gray"], COLOUR_RGB["red"]}
    assert render(scene, frames=1, size=16).shape == (1, 16, 16, 3)


def test_colours_are_far_from_each_other_and_from_backgrounds():
    rgb = {**{f"c:{k}": v for k, v in COLOUR_RGB.items()}, **{f"b:{k}": v for k, v in BACKGROUND_RGB.items()}}
    for a in rgb:
        for b in rgb:
            if a < b and not (a.startswith("b:") and b.startswith("b:")):
                assert np.linalg.norm(np.subtract(rgb[a], rgb[b])) >= 100, (a, b)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text)


@pytest.mark.parametrize("scene", [sample_scene(s) for s in range(64)] + prompt_set(), ids=str)
def test_caption_names_its_scene_and_nothing_else(scene):
    words = _words(caption(scene))
    for attr, vocab in VOCAB.items():
        named = [w for w in words if w in vocab]
        assert named == [getattr(scene, attr)], (attr, caption(scene))


def test_captions_use_every_template_and_are_deterministic():
    scenes = [sample_scene(s) for s in range(64)]
    assert {s.template for s in scenes} == set(range(len(TEMPLATES)))
    left = Scene("circle", "red", "white", "left")
    assert caption(left) == "a red circle moving left on a white background"
    assert caption(Scene("square", "blue", "black", "still", template=0)) == (
        "a blue square staying still on a black background"
    )


def test_prompt_set_is_fixed_and_covers_the_vocabulary():
    scenes = prompt_set()
    assert scenes == prompt_set()
    assert 24 <= len(scenes) <= 48
    assert len({caption(s) for s in scenes}) == len(scenes)
    for attr, vocab in VOCAB.items():
        counts = Counter(getattr(s, attr) for s in scenes)
        assert set(counts) == set(vocab), attr
    # Every (motion, shape) and every (motion, background) pair appears.
    assert {(s.motion, s.shape) for s in scenes} == {(m, sh) for m in MOTIONS for sh in SHAPES}
    assert {(s.motion, s.background) for s in scenes} == {(m, b) for m in MOTIONS for b in BACKGROUNDS}


def test_object_is_whole_in_every_frame_and_motion_is_large():
    for _, video, scene in dataset(5, 40, frames=17, size=128):
        bg = np.asarray(BACKGROUND_RGB[scene.background])
        on = (video != bg).any(axis=-1)
        assert on.any(axis=(1, 2)).all(), scene  # visible in every frame
        assert not (on[:, 0].any() or on[:, -1].any() or on[:, :, 0].any() or on[:, :, -1].any()), scene
        if scene.motion in LINEAR_MOTIONS:
            assert probe(video).details["travel"] >= 0.3, scene


def test_scenes_that_leave_the_frame_or_use_unknown_words_are_refused():
    with pytest.raises(ValueError, match="leaves the frame"):
        Scene("circle", "red", "white", "left", x=0.2, travel=0.45)
    with pytest.raises(ValueError, match="unknown colour"):
        Scene("circle", "mauve", "white", "left")
    with pytest.raises(ValueError, match="unknown motion"):
        Scene("circle", "red", "white", "spinning")


def test_probe_reads_the_clean_prompt_set_perfectly():
    scenes = prompt_set()
    accuracy = _accuracy((render(s), s) for s in scenes)
    assert accuracy == {k: 1.0 for k in VOCAB}, accuracy


def test_probe_reads_degraded_prompt_set():
    # Box blur 3x3 then Gaussian noise sigma 10 (levels): what a half-trained model might produce.
    scenes = prompt_set()
    accuracy = _accuracy((degrade(render(s), seed=i), s) for i, s in enumerate(scenes))
    assert all(v >= 0.95 for v in accuracy.values()), accuracy


def test_probe_reads_degraded_random_scenes():
    pairs = [(degrade(v, seed=i), s) for i, (_, v, s) in enumerate(dataset(9, 24))]
    accuracy = _accuracy(pairs)
    assert all(v >= 0.95 for v in accuracy.values()), accuracy


def test_probe_reading_has_tracks_and_confidence():
    scene = Scene("triangle", "yellow", "black", "down", travel=0.4)
    reading = probe(render(scene, frames=17, size=128))
    assert reading.centroid.shape == (17, 2) and reading.area.shape == (17,)
    assert np.all(np.diff(reading.centroid[:, 1]) > 0)  # y increases every frame
    assert np.allclose(reading.centroid[:, 0], 0.5, atol=0.01)
    assert 0.2 < reading.confidence <= 1.0
    assert reading.details["travel_y"] == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_motion_threshold_separates_still_from_slow(motion):
    """STILL_MAX_TRAVEL (0.08 of the frame over the clip) is the line: below it, still; above, moving."""
    slow = Scene("circle", "green", "white", motion, travel=1.5 * STILL_MAX_TRAVEL)
    drift = Scene("circle", "green", "white", motion, travel=0.5 * STILL_MAX_TRAVEL)
    assert probe(render(slow)).motion == motion
    assert probe(render(drift)).motion == "still"
    assert probe(degrade(render(slow), seed=1)).motion == motion
    assert probe(degrade(render(drift), seed=1)).motion == "still"


def test_growing_and_circling_are_not_mistaken_for_moves():
    for motion in ("growing", "shrinking", "circling", "still"):
        for shape in SHAPES:
            scene = Scene(shape, "purple", "gray", motion, travel=0.3 if motion == "circling" else 0.0)
            assert probe(render(scene)).motion == motion, scene


def test_probe_on_a_blank_clip_finds_nothing():
    blank = np.full((9, 64, 64, 3), 255, dtype=np.uint8)
    reading = probe(blank)
    assert (reading.colour, reading.shape, reading.motion, reading.background) == (
        UNKNOWN,
        UNKNOWN,
        UNKNOWN,
        "white",
    )
    assert reading.confidence == 0.0
    assert adherence(reading, Scene("circle", "red", "white", "still")) == {
        "colour": False,
        "shape": False,
        "motion": False,
        "background": True,
    }


def test_probe_handles_other_sizes():
    # 64x64, 9 frames: shapes down to ~7 px (shrinking) still read back on clean clips.
    pairs = [(v, s) for _, v, s in dataset(2, 24, frames=9, size=64)]
    accuracy = _accuracy(pairs)
    assert all(v >= 0.95 for v in accuracy.values()), accuracy
