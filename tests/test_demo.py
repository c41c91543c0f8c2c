"""``smartdiff demo`` as a new user runs it: the whole farm on this machine (private Redis, S3 on
loopback, one CPU worker on the shipped world model), and the video it downloads read back."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import replace

from smartdiff.cli import python_module_command
from smartdiff.demo import add_arguments
from smartdiff.pipeline.video import read_mp4
from smartdiff.world.probe import adherence, probe
from smartdiff.world.scenes import TEMPLATES, Scene, caption


def test_the_demo_video_shows_the_circle_it_asks_for(tmp_path):
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    prompt = defaults.parse_args([]).prompt
    scene = Scene("circle", "red", "white", "right")
    assert prompt in {caption(replace(scene, template=k)) for k in range(len(TEMPLATES))}
    out = tmp_path / "demo.mp4"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTDIFF_")}  # its own services
    result = subprocess.run(
        python_module_command("smartdiff", "demo", "--out", str(out)),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    assert record["state"] == "SUCCEEDED" and record["params"]["prompt"] == prompt
    frames, _ = read_mp4(out)
    assert frames.shape == (17, 64, 64, 3)
    reading = probe(frames)
    assert adherence(reading, scene) == {"colour": True, "shape": True, "motion": True, "background": True}
