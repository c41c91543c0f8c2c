"""The deployment files, checked by structure: compose.yaml, Dockerfile, .env.example, .dockerignore.

There is no Docker engine where the tests run, so nothing here builds an image or starts a container.
compose.yaml is read with yaml.safe_load (which resolves the ``<<: *worker`` merge keys) and its
``${VAR}`` interpolation is resolved here the way Compose does it, twice: with Compose's defaults (only
the required credentials set) and with the values of .env.example.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
PROFILES_DIR = ROOT / "configs" / "profiles"

SECRET_KEY = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|ROOT_USER", re.IGNORECASE)
MINIO_RELEASE_TAG = re.compile(r"^RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z$")
DRAIN_MIN_SECONDS = 10 * 60
REQUEUE_MAX_SECONDS = 2 * 60


# ---------------------------------------------------------------------------------------------- helpers

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution on one string."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"compose would refuse to start: {name}: {arg}")
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def variables_used(node) -> set[str]:
    """Names Compose would substitute in a parsed file's values ($$ is an escape; comments don't count)."""
    if isinstance(node, str):
        matches = _INTERPOLATION.finditer(node)
        return {m.group("braced") or m.group("bare") for m in matches if m.group(0) != "$$"}
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(*(variables_used(child) for child in children))


def parse_env_file(path: Path) -> dict[str, tuple[str, list[str]]]:
    """NAME -> (value, comment lines right above it)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    comments: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        else:
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {raw!r}"
            entries[name.strip()] = (value.strip(), [c for c in comments if c])
            comments = []
    return entries


def duration_seconds(text: str) -> float:
    """Compose durations: 90s, 45m, 1h30m, 1m30s, 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def gpus_argument(command: list[str]) -> str:
    assert "--gpus" in command, f"worker command has no --gpus: {command}"
    return command[command.index("--gpus") + 1]


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def is_per_gpu(name: str) -> bool:
    return re.fullmatch(r"worker-gpu\d+", name) is not None


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def raw_compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def env_example() -> dict[str, tuple[str, list[str]]]:
    return parse_env_file(ENV_EXAMPLE)


ENV_CASES = ["compose-defaults", "env-example"]


@pytest.fixture(scope="module", params=ENV_CASES)
def compose(request, raw_compose, env_example) -> dict:
    """compose.yaml with its variables resolved as Compose would, for one .env."""
    if request.param == "compose-defaults":
        env = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret-value"}
    else:
        env = {name: value for name, (value, _) in env_example.items()}
    return resolve(raw_compose, env)


@pytest.fixture(scope="module")
def workers(compose) -> dict[str, dict]:
    found = {name: svc for name, svc in compose["services"].items() if name.startswith("worker")}
    assert found, "compose.yaml has no worker service"
    return found


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# ------------------------------------------------------------------------------------------ compose.yaml


def test_redis_has_aof_volume_and_health_check(compose):
    redis = compose["services"]["redis"]
    image, _, tag = redis["image"].rpartition(":")
    assert image.endswith("redis") and re.match(r"^\d+\.\d+", tag), f"pin a redis version: {redis['image']}"
    command = redis["command"]
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"]), "redis /data must be a volume"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_s3_store_is_minio_from_quay_with_a_pinned_release(compose):
    minio = compose["services"]["minio"]
    image, _, tag = minio["image"].rpartition(":")
    assert image == "quay.io/minio/minio", minio["image"]
    assert tag != "latest" and MINIO_RELEASE_TAG.match(tag), f"pin a MinIO release tag, got {tag!r}"
    assert any(str(v).split(":")[1] == "/data" for v in minio["volumes"])
    test = " ".join(minio["healthcheck"]["test"])
    assert "mc ready local" in test or "/minio/health/live" in test


def test_minio_credentials_are_the_farm_s3_keys_from_env(raw_compose):
    env = raw_compose["services"]["minio"]["environment"]
    assert re.fullmatch(r"\$\{AWS_ACCESS_KEY_ID:\?[^}]*\}", env["MINIO_ROOT_USER"])
    assert re.fullmatch(r"\$\{AWS_SECRET_ACCESS_KEY:\?[^}]*\}", env["MINIO_ROOT_PASSWORD"])


def test_bucket_init_creates_the_bucket_once_minio_is_healthy(compose):
    init = compose["services"]["bucket-init"]
    image, _, tag = init["image"].rpartition(":")
    assert image == "quay.io/minio/mc" and MINIO_RELEASE_TAG.match(tag), init["image"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "mc mb --ignore-existing" in script
    assert "$SMARTDIFF_S3_BUCKET" in script  # the container's shell expands it ($$ in compose.yaml)
    assert init.get("restart", "no") == "no", "a one-shot service must not restart"


def test_every_worker_service_merges_the_worker_anchor(compose_text):
    """At the node level: each worker service's mapping has a `<<` key whose value is x-worker's node."""
    root = yaml.compose(compose_text)
    top = {key.value: value for key, value in root.value}
    anchor = top["x-worker"]
    services = {key.value: value for key, value in top["services"].value}
    worker_names = [name for name in services if name.startswith("worker")]
    assert "worker" in worker_names and any(is_per_gpu(n) for n in worker_names)
    for name in worker_names:
        merges = [value for key, value in services[name].value if key.tag == "tag:yaml.org,2002:merge"]
        assert merges and merges[0] is anchor, f"{name} must start with `<<: *worker`"


def test_worker_services_share_the_anchor_definition(raw_compose, compose, workers):
    anchor = resolve(raw_compose["x-worker"], {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    shared = ["image", "build", "env_file", "environment", "volumes", "healthcheck", "depends_on"]
    for key in shared:
        assert key in raw_compose["x-worker"], f"x-worker lacks {key}"
        values = {json.dumps(svc[key], sort_keys=True) for svc in workers.values()}
        assert len(values) == 1, f"worker services differ in {key}"
    # Only the worker services and the gateway (same code, no GPU) run the worker image.
    for name, svc in compose["services"].items():
        if svc.get("image") == next(iter(workers.values()))["image"]:
            assert name in workers or (name == "gateway" and not gpu_devices(svc)), name
    assert anchor["build"]["context"] == "." and (ROOT / anchor["build"]["dockerfile"]).is_file()


def test_workers_reach_redis_and_minio_and_hand_out_public_links(compose, workers):
    for name, svc in workers.items():
        env = environment(svc)
        broker = urlparse(env["SMARTDIFF_BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis", name
        s3 = urlparse(env["SMARTDIFF_S3_ENDPOINT"])
        assert s3.hostname == "minio" and s3.port == 9000, name
        assert urlparse(env["SMARTDIFF_S3_PUBLIC_ENDPOINT"]).scheme in ("http", "https"), name
        bucket_init = environment(compose["services"]["bucket-init"])
        assert env["SMARTDIFF_S3_BUCKET"] == bucket_init["SMARTDIFF_S3_BUCKET"], name
        assert env["SMARTDIFF_METRICS_PORT"] == "9400"
        profile = svc["command"][svc["command"].index("--profile") + 1]
        assert (PROFILES_DIR / f"{profile}.yaml").is_file(), f"{name}: unknown profile {profile}"


def test_workers_wait_for_redis_and_the_bucket(workers):
    for name, svc in workers.items():
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["bucket-init"]["condition"] == "service_completed_successfully", name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert svc.get("logging", {}).get("options", {}).get("max-size"), f"{name}: logs must rotate"


def test_workers_mount_the_models_read_only(workers):
    for name, svc in workers.items():
        env = environment(svc)
        root = env["SMARTDIFF_CHECKPOINT_ROOT"]
        mounts = []
        for volume in svc["volumes"]:
            if isinstance(volume, dict):
                mounts.append((volume["target"], bool(volume.get("read_only"))))
            else:
                parts = volume.split(":")
                mode = parts[2] if len(parts) > 2 else "rw"
                mounts.append((parts[1], "ro" in mode.split(",")))
        models = [read_only for target, read_only in mounts if target == root]
        assert models == [True], f"{name}: {root} must be mounted once, read-only: {svc['volumes']}"


def test_workers_are_safe_to_replicate(workers):
    for name, svc in workers.items():
        assert "container_name" not in svc and "hostname" not in svc, f"{name}: replicas need own names"
        assert "ports" not in svc, f"{name}: a published host port breaks --scale; use expose"


def test_per_gpu_services_reserve_one_distinct_gpu_and_use_it_as_cuda0(workers):
    per_gpu = {name: svc for name, svc in workers.items() if is_per_gpu(name)}
    assert len(per_gpu) >= 2
    seen: set[str] = set()
    for name, svc in per_gpu.items():
        devices = gpu_devices(svc)
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: device_ids and count exclude each other"
        ids = [str(i) for i in device["device_ids"]]
        assert len(ids) == 1 and ids[0] == name.removeprefix("worker-gpu"), f"{name}: device_ids {ids}"
        assert ids[0] not in seen, f"GPU {ids[0]} reserved twice"
        seen.add(ids[0])
        # Only the reserved GPU is visible inside the container, as index 0.
        assert gpus_argument(svc["command"]) == "0", name


def test_scalable_worker_sees_all_gpus_and_claims_one_by_lease(workers):
    worker = workers["worker"]
    devices = gpu_devices(worker)
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0].get("count") == "all" and "device_ids" not in devices[0]
    assert gpus_argument(worker["command"]) == "auto"
    assert int(worker["deploy"].get("replicas", 1)) >= 1


def test_scalable_and_static_workers_are_never_active_together(raw_compose, env_example):
    services = raw_compose["services"]
    scale_profiles = set(services["worker"].get("profiles", []))
    static_profiles = set()
    for name, svc in services.items():
        if is_per_gpu(name):
            static_profiles |= set(svc.get("profiles", []))
    assert scale_profiles and static_profiles and not scale_profiles & static_profiles
    for name in ("redis", "minio", "bucket-init"):
        assert not services[name].get("profiles"), f"{name} must run in every profile"
    chosen = set(env_example["COMPOSE_PROFILES"][0].split(","))
    assert (chosen & scale_profiles) and not (chosen & static_profiles), "the example picks one option"


def test_workers_have_a_health_check_on_the_heartbeat(workers):
    for name, svc in workers.items():
        # worker-health looks for a live worker of $SMARTDIFF_PROFILE on this host: the served one.
        served = svc["command"][svc["command"].index("--profile") + 1]
        assert environment(svc)["SMARTDIFF_PROFILE"] == served, f"{name}: health check asks another profile"
        check = svc["healthcheck"]
        test = check["test"]
        command = " ".join(test[1:]) if test[0] in ("CMD", "CMD-SHELL") else " ".join(test)
        assert command.startswith("smartdiff worker-health"), name
        assert duration_seconds(check["start_period"]) >= 5 * 60, f"{name}: start_period must cover loading"


def test_stop_grace_period_matches_the_shutdown_mode(workers):
    for name, svc in workers.items():
        mode = environment(svc)["SMARTDIFF_SHUTDOWN"]
        grace = duration_seconds(svc["stop_grace_period"])
        if mode == "drain":
            assert grace >= DRAIN_MIN_SECONDS, f"{name}: drain needs a long grace period, got {grace}s"
        elif mode == "requeue":
            assert grace <= REQUEUE_MAX_SECONDS, f"{name}: requeue should stop fast, got {grace}s"
        else:
            pytest.fail(f"{name}: SMARTDIFF_SHUTDOWN must be drain or requeue, got {mode!r}")


def test_gateway_serves_http_on_the_farm_without_a_gpu(compose, workers):
    gateway = compose["services"]["gateway"]
    worker = next(iter(workers.values()))
    assert gateway["image"] == worker["image"] and "build" not in gateway  # built once, by the workers
    command = gateway["command"]
    assert command[0] == "gateway" and command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert not gpu_devices(gateway) and "deploy" not in gateway
    env, worker_env = environment(gateway), environment(worker)
    for name in (
        "SMARTDIFF_BROKER_URL",
        "SMARTDIFF_S3_ENDPOINT",
        "SMARTDIFF_S3_PUBLIC_ENDPOINT",
        "SMARTDIFF_S3_BUCKET",
    ):
        assert env[name] == worker_env[name], f"gateway and workers disagree on {name}"
    [(host, container)] = [p.rsplit(":", 1) for p in gateway["ports"]]
    assert container == port and host.startswith("127.0.0.1:"), "publish on loopback by default"
    check = " ".join(gateway["healthcheck"]["test"])
    assert f":{port}/readyz" in check
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["bucket-init"]["condition"] == "service_completed_successfully"
    assert gateway.get("restart") == "unless-stopped" and gateway["logging"]["options"]["max-size"]


def test_flower_and_the_metrics_exporter_are_pinned_and_watch_redis(compose):
    flower = compose["services"]["flower"]
    image, _, tag = flower["image"].rpartition(":")
    assert image == "mher/flower" and re.fullmatch(r"\d+\.\d+\.\d+", tag), flower["image"]
    assert "--broker=redis://redis:6379/0" in flower["command"]
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"]), "Flower can stop workers: loopback only"
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    exporter = compose["services"]["redis-exporter"]
    image, _, tag = exporter["image"].rpartition(":")
    assert image == "oliver006/redis_exporter" and re.fullmatch(r"v\d+\.\d+\.\d+(-alpine)?", tag), tag
    assert environment(exporter)["REDIS_ADDR"] == "redis://redis:6379"
    assert "/health" in " ".join(exporter["healthcheck"]["test"]) and "ports" not in exporter
    for svc in (flower, exporter):
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc.get("restart") == "unless-stopped" and svc["logging"]["options"]["max-size"]


def test_duration_parser():
    assert duration_seconds("45m") == 2700
    assert duration_seconds("60s") == 60
    assert duration_seconds("1h30m") == 5400
    with pytest.raises(AssertionError):
        duration_seconds("45 minutes")


def test_no_secret_is_hard_coded(raw_compose, compose_text, env_example):
    for name, svc in raw_compose["services"].items():
        for key, value in environment(svc).items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}", value), (
                    f"{name}.{key} must come from .env as ${{VAR}} or ${{VAR:?msg}}, with no default"
                )
        for key in ("command", "entrypoint"):
            text = json.dumps(svc.get(key, ""))
            assert not re.search(r"(?<!\$)\$\{?AWS_SECRET", text), f"{name}.{key}: secret in the command line"
    for name, (value, _) in env_example.items():
        if SECRET_KEY.search(name):
            assert value not in compose_text, f"{name}'s example value appears in compose.yaml"
    assert "minioadmin" not in compose_text


def test_every_compose_variable_is_documented_in_env_example(raw_compose, env_example):
    used = variables_used(raw_compose)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SMARTDIFF_MODELS", "SMARTDIFF_SHUTDOWN"} <= used
    for name in sorted(used):
        assert name in env_example, f"${{{name}}} is used in compose.yaml but missing from .env.example"
        assert env_example[name][1], f"{name} in .env.example needs a comment line above it"


def test_env_example_values_are_placeholders_that_work(env_example):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "change-me" in env_example[name][0], f"{name} must be an obvious placeholder"
    assert len(env_example["AWS_SECRET_ACCESS_KEY"][0]) >= 8, "MinIO refuses root passwords under 8 chars"
    assert env_example["SMARTDIFF_SHUTDOWN"][0] in ("drain", "requeue")
    assert (PROFILES_DIR / f"{env_example['SMARTDIFF_PROFILE'][0]}.yaml").is_file()


# -------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies are kept with their RUN."""
    instructions: list[tuple[str, str]] = []
    lines = DOCKERFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = line
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", text)
        if heredoc and text.split(None, 1)[0].upper() == "RUN":
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                text += "\n" + lines[i]
                i += 1
            i += 1
        keyword, _, args = text.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def stages() -> list[dict]:
    result: list[dict] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"from": words[0], "name": name, "instructions": []})
        else:
            assert result or keyword == "ARG", f"{keyword} before FROM"
            if result:
                result[-1]["instructions"].append((keyword, args))
    return result


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value.strip('"')
    return defaults


def test_base_images_are_pinned():
    all_stages = stages()
    names = {s["name"] for s in all_stages if s["name"]}
    external = [s["from"] for s in all_stages if s["from"] not in names]
    assert external, "no base image"
    for image in external:
        assert "$" not in image, f"write the pinned tag in FROM: {image}"
        _, _, tag = image.rpartition(":")
        assert ":" in image and tag and tag != "latest", f"pin a tag: {image}"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?devel-ubuntu\d+\.\d+", all_stages[0]["from"])
    cuda_versions = {re.match(r"nvidia/cuda:(\d+\.\d+\.\d+)", i).group(1) for i in external if "cuda" in i}
    assert len(cuda_versions) == 1, f"build and runtime CUDA images differ: {cuda_versions}"


def test_the_image_installs_the_gpu_lock_with_hashes():
    runs = [a for k, a in dockerfile_instructions() if k == "RUN"]
    assert any("--require-hashes -r /tmp/gpu.txt" in r for r in runs)
    copies = [a for k, a in dockerfile_instructions() if k == "COPY"]
    assert "locks/gpu.txt /tmp/gpu.txt" in copies
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", (ROOT / "locks" / "gpu.txt").read_text(), re.M))
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["torch"]), (
        f"the image needs a CUDA build of torch: {pins['torch']}"
    )
    # PyPI's torch for CUDA 13.0 brings cuda-toolkit 13.0.x: the same release as the CUDA images.
    cuda_images = {
        re.match(r"nvidia/cuda:(\d+\.\d+)", s["from"]).group(1) for s in stages() if "cuda" in s["from"]
    }
    assert cuda_images == {".".join(pins["cuda-toolkit"].split(".")[:2])}
    for tool in ("setuptools", "ninja", "einops", "packaging", "psutil", "wheel"):
        assert tool in pins, f"the kernels build with {tool}: it must come from the lock"


def test_kernels_are_built_from_source_for_hopper():
    args = arg_defaults()
    assert "9.0" in args["TORCH_CUDA_ARCH_LIST"].split(";")
    assert int(args["MAX_JOBS"]) >= 1
    assert re.fullmatch(r"[0-9a-f]{40}", args["SAGEATTENTION_COMMIT"]), "pin SageAttention to a commit"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args["FLASH_ATTN_VERSION"])
    runs = [a for k, a in dockerfile_instructions() if k == "RUN"]
    flash = [r for r in runs if "flash-attn==" in r]
    assert flash and all("--no-build-isolation" in r and "--no-binary flash-attn" in r for r in flash)
    assert re.fullmatch(r"[0-9a-f]{40}", args["FLASH_ATTN3_COMMIT"]), "pin FlashAttention 3 to a commit"
    fa3 = [r for r in runs if "FLASH_ATTN3_COMMIT" in r]
    assert fa3 and all("--no-build-isolation" in r and "cd hopper" in r for r in fa3)
    # Restricted to the forward in bf16 at head dim 128 (what the DiTs run): the build fits minutes.
    (run,) = fa3
    assert 'export "FLASH_ATTENTION_DISABLE_${feature}=TRUE"' in run
    disabled = set(re.search(r"for feature in (.*?); do", run, re.S).group(1).replace("\\", " ").split())
    unused = {"BACKWARD", "FP16", "FP8", "HDIM64", "HDIM96", "HDIM192", "HDIM256", "PAGEDKV", "SPLIT"}
    assert unused <= disabled
    assert "HDIM128" not in disabled
    sage = [r for r in runs if "SAGEATTENTION_COMMIT" in r]
    assert sage and all("--no-build-isolation" in r for r in sage)
    envs = " ".join(a for k, a in dockerfile_instructions() if k == "ENV")
    assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in envs, "flash-attn must not fetch a prebuilt wheel"
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in envs


def test_kernel_builds_are_cached_apart_from_project_code():
    all_stages = stages()
    kernel_stages = [s for s in all_stages if any("flash-attn" in a for _, a in s["instructions"])]
    assert kernel_stages and all(s is not all_stages[-1] for s in kernel_stages)
    for stage in kernel_stages:
        copies = [a for k, a in stage["instructions"] if k in ("COPY", "ADD") and "--from" not in a]
        assert not copies, f"stage {stage['name']} copies project files: {copies}"
    # The project reaches the final image only as its wheel, installed without -e or its sources.
    final = all_stages[-1]["instructions"]
    assert not [a for k, a in final if k in ("COPY", "ADD") and "--from" not in a], (
        "the worker copies sources"
    )
    installs = [a for k, a in final if k == "RUN" and "pip install" in a]
    assert installs and all(" -e " not in a for a in installs)
    assert any("from=wheel" in a and "pip install --no-deps /dist/*.whl" in a for a in installs)


def test_final_stage_is_non_root_and_runs_smartdiff():
    final = stages()[-1]["instructions"]
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the worker must not run as root"
    entrypoint = [json.loads(a) for k, a in final if k == "ENTRYPOINT"]
    assert entrypoint[-1] == ["smartdiff"]
    cmd = [json.loads(a) for k, a in final if k == "CMD"][-1]
    assert cmd[0] == "worker" and gpus_argument(cmd) == "auto"
    profile = cmd[cmd.index("--profile") + 1]
    assert (PROFILES_DIR / f"{profile}.yaml").is_file()
    envs = " ".join(a for k, a in final if k == "ENV")
    assert f"SMARTDIFF_PROFILE={profile} " in envs, "the image's health check must ask the CMD's profile"
    assert any(k == "HEALTHCHECK" and "smartdiff" in a and "worker-health" in a for k, a in final)


def test_dockerignore_keeps_weights_environments_and_secrets_out():
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    for needed in (".venv", "checkpoints", "out", ".git", ".env", "**/__pycache__", ".pytest_cache"):
        assert needed in entries, f".dockerignore lacks {needed}"
    for kept in ("pyproject.toml", "README.md", "configs", "pipeline", "smartdiff", "weights", "locks"):
        assert kept not in entries, f".dockerignore drops {kept}, which the image needs"
