"""How the project installs: one import name, package data, no checkout folder shadowing a distribution."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from smartdiff.pipeline import config

REPO = Path(__file__).resolve().parent.parent
# The repository's top-level folders that install under ``smartdiff``.
FOLDERS = ("configs", "farm", "kernels", "pipeline", "producer", "weights", "worker", "world")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    sources = tmp_path_factory.mktemp("sources") / "project"
    skipped = (".git", ".venv*", "build", "*.egg-info", "*_cache", "__pycache__", "out", "checkpoints")
    shutil.copytree(REPO, sources, ignore=shutil.ignore_patterns(*skipped))
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-P", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(out), str(sources)], check=True, capture_output=True)
    (path,) = out.glob("smart_diffusion-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_exactly_one_import_name(wheel):
    names = wheel.namelist()
    top_level = {
        n.split("/")[0].removesuffix(".py") for n in names if not n.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"smartdiff"}
    for folder in FOLDERS:
        assert f"smartdiff/{folder}/__init__.py" in names, f"{folder}/ is not installed as smartdiff.{folder}"
    # Every module of every folder, under its namespaced name.
    modules = [*(REPO / "smartdiff").glob("*.py"), *(m for f in FOLDERS for m in (REPO / f).glob("*.py"))]
    for module in modules:
        installed = (
            f"smartdiff/{module.name}"
            if module.parent.name == "smartdiff"
            else f"smartdiff/{module.parent.name}/{module.name}"
        )
        assert installed in names, f"{module.relative_to(REPO)} is not in the wheel"


def test_the_wheel_carries_every_config_and_the_shipped_models(wheel):
    names = set(wheel.namelist())
    # wan-world and its student wan-world-distill4
    shipped = sorted(p for p in (REPO / "weights").glob("*/**/*") if "__pycache__" not in p.parts)
    assert {p.relative_to(REPO / "weights").parts[0] for p in shipped} >= {"wan-world", "wan-world-distill4"}
    for path in sorted((REPO / "configs").rglob("*.yaml")) + shipped:
        if path.is_file():
            assert f"smartdiff/{path.relative_to(REPO).as_posix()}" in names, (
                f"{path.relative_to(REPO)} is missing"
            )
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.11" in metadata


def _imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_code_tests_and_benches_import_the_folders_only_through_smartdiff():
    sources = [p for d in ("smartdiff", *FOLDERS, "tests", "bench") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 50
    for path in sources:
        bare = _imported_top_level_names(path) & set(FOLDERS)
        assert not bare, f"{path.relative_to(REPO)} imports {sorted(bare)} without the smartdiff prefix"


def test_docs_name_modules_by_their_installed_names():
    bare = re.compile(rf"(python (-P )?-m|from|import) ({'|'.join(FOLDERS)})\b")
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not bare.search(line), f"{path.name}:{number}: {line.strip()}"


def test_the_checkout_does_not_shadow_installed_distributions():
    """The suite runs as `make test` runs it: the checkout's root is not on sys.path, so the folder
    `kernels/` cannot stand in for the distribution of that name that transformers imports."""
    for name in FOLDERS:
        spec = importlib.util.find_spec(name)
        found = Path(spec.origin).resolve() if spec and spec.origin else None
        assert found != REPO / name / "__init__.py", (
            f"`import {name}` finds the checkout's folder: run the tests with `pytest` or `python -P`"
        )
    if importlib.util.find_spec("kernels") is not None:  # transformers 5 brings it
        from transformers.integrations import hub_kernels  # imports `kernels`: the checkout's would fail

        assert hub_kernels is not None


@pytest.mark.skipif(bool(os.environ.get("SMARTDIFF_CONFIG_DIR")), reason="SMARTDIFF_CONFIG_DIR is set")
def test_configs_and_the_shipped_weights_are_package_data(monkeypatch, tmp_path):
    assert config.CONFIG_DIR == Path(str(resources.files("smartdiff.configs")))
    assert "wan2.1-t2v-1.3b" in config.list_model_names() and "wan-world" in config.list_profile_names()
    shipped = Path(str(resources.files("smartdiff.weights"))) / "wan-world"
    monkeypatch.delenv("SMARTDIFF_WEIGHTS_DIR", raising=False)
    assert config.load_profile("wan-world").checkpoint_dir == shipped
    assert (shipped / "diffusion_pytorch_model.safetensors").is_file()
    monkeypatch.setenv("SMARTDIFF_WEIGHTS_DIR", str(tmp_path))
    assert config.load_profile("wan-world").checkpoint_dir == tmp_path / "wan-world"


def test_a_deployment_points_at_its_own_configs(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "models" / "tiny.yaml").write_text((REPO / "configs" / "models" / "tiny.yaml").read_text())
    code = "import json; from smartdiff.pipeline import config; print(json.dumps(config.list_model_names()))"
    result = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env={**os.environ, "SMARTDIFF_CONFIG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == ["tiny"]


def test_from_smartdiff_import_client_is_the_producer_client():
    from smartdiff import Client, FarmError, Job
    from smartdiff.producer import client

    assert (Client, FarmError, Job) == (client.Client, client.FarmError, client.Job)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import smartdiff

        smartdiff.nothing  # noqa: B018
