from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an official Wan checkpoint file (tests/data/reference/NAME.keys.tsv)."""
    shapes = {}
    for line in (REFERENCE_DIR / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    """A config folder in place of the installed one, holding the tiny model; tests write the rest."""
    from smartdiff.pipeline import config

    (tmp_path / "models").mkdir()
    (tmp_path / "profiles").mkdir()
    shutil.copy(config.CONFIG_DIR / "models" / "tiny.yaml", tmp_path / "models")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    config.load_profile.cache_clear()
    config.load_model_config.cache_clear()
    yield tmp_path
    config.load_profile.cache_clear()
    config.load_model_config.cache_clear()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny model in the official layout, written once per test session."""
    from smartdiff.pipeline.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny") / "tiny"
    write_tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback for the whole session; tests use their own bucket names."""
    from s3_server import start_moto_server, stop_moto_server

    server, url = start_moto_server()
    yield url
    stop_moto_server(server)


@pytest.fixture
def farm(tmp_path, s3_endpoint, tiny_checkpoint, monkeypatch):
    """A private Redis, a bucket and worker processes on the tiny model, started on demand."""
    from farm_helpers import Farm

    farm = Farm(tmp_path, s3_endpoint, tiny_checkpoint.parent, monkeypatch)
    yield farm
    farm.close()
