# syntax=docker/dockerfile:1.7
#
# The Smart-Diffusion worker image: the Python stack of locks/gpu.txt (CUDA build of PyTorch included),
# FlashAttention 2 and 3 and SageAttention compiled from source for Hopper (H100/H200), and the
# project's wheel.
#
#   docker build -t smart-diffusion/worker:0.1.0 .                # or: docker compose build
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" ...   # also A100 (longer build)
#
# Stages, slowest and least often changed first, so a code change rebuilds only the last few layers:
#   toolchain  CUDA devel image + Python venv
#   torch      every locked dependency, hash-checked (locks/gpu.txt): PyTorch, Triton, the farm's
#              dependencies and the kernels' build tools
#   kernels    FlashAttention 2 and 3 and SageAttention compiled from source (tens of minutes)
#   wheel      the project's wheel, built with the locked setuptools
#   worker     CUDA runtime image + that venv + the wheel (not editable: the image runs what users install)
#
# Versions go together: the CUDA image (13.0.3) must match the CUDA that PyTorch is built with (the
# torch stage checks it), and needs a host driver >= 580. Both FROM images must be the same Ubuntu
# release, because the venv is copied from one to the other.

############################################################################ toolchain
FROM nvidia/cuda:13.0.3-devel-ubuntu24.04 AS toolchain

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda

# Ubuntu 24.04's Python is 3.12 (what locks/gpu.txt is compiled for); a venv keeps pip away from the
# system's packages (PEP 668).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir pip==26.3

############################################################################ torch
FROM toolchain AS torch

# Everything the image runs and builds with, from the lock and checked against its hashes: PyTorch
# 2.13.0 (PyPI's build for CUDA 13.0, with its cuda-toolkit and nvidia-* wheels), Triton, the farm's
# dependencies and the kernels' build tools (setuptools, ninja, einops...). `make lock` regenerates
# it; a new lock rebuilds the kernels below, which link against this torch.
COPY locks/gpu.txt /tmp/gpu.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes -r /tmp/gpu.txt \
 && rm /tmp/gpu.txt

# The kernels are compiled by this image's nvcc against torch's CUDA: they must be the same release.
RUN python - <<'EOF'
import re
import subprocess

import torch

nvcc = re.search(r"release (\d+\.\d+)", subprocess.check_output(["nvcc", "--version"], text=True)).group(1)
assert torch.version.cuda and torch.version.cuda.startswith(nvcc), (
    f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but nvcc is {nvcc}"
)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, nvcc {nvcc}")
EOF

############################################################################ kernels
FROM torch AS kernels

# Compute capabilities to compile for: 9.0 is Hopper (H100, H200). Add "8.0" (A100), "8.9" (L40S)...
# separated by ";" to serve other cards; each one lengthens the build.
ARG TORCH_CUDA_ARCH_LIST="9.0"
# Parallel compile jobs. Each nvcc job can take 8-9 GB of RAM: MAX_JOBS=4 wants ~36 GB.
ARG MAX_JOBS=4
ARG NVCC_THREADS=2
# flash-attn 2, from its source distribution on PyPI (the pinned version; the sdist includes CUTLASS).
ARG FLASH_ATTN_VERSION=2.8.3.post2
# FlashAttention 3 (Hopper only: the `flash` backend prefers it) is not on PyPI either: its hopper/
# package, from git at a pinned commit that builds with CUDA 13's nvcc (older ones download nvcc 12.x).
ARG FLASH_ATTN3_REPO=https://github.com/Dao-AILab/flash-attention.git
ARG FLASH_ATTN3_COMMIT=0251105a2fb19d2957484b7f023cd8c115286ced
# SageAttention 2 is not on PyPI (PyPI's "sageattention" is the Triton-only 1.x): built from git at a
# pinned commit (version 2.2.0, which reads TORCH_CUDA_ARCH_LIST, so it builds without a GPU).
ARG SAGEATTENTION_REPO=https://github.com/thu-ml/SageAttention.git
ARG SAGEATTENTION_COMMIT=0263553c1ab901e2a5e0fa83adfacdfc71a89062

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    NVCC_THREADS=${NVCC_THREADS} \
    FLASH_ATTENTION_FORCE_BUILD=TRUE \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs

# FLASH_ATTENTION_FORCE_BUILD=TRUE: compile, never fetch a prebuilt wheel from GitHub.
# FLASH_ATTN_CUDA_ARCHS is flash-attn's own arch list, derived from TORCH_CUDA_ARCH_LIST ("9.0" -> "90").
# --no-cache-dir on purpose: pip's wheel cache does not know the arch list and could hand back a
# wheel built for other GPUs. Docker's layer cache (keyed by the ARGs above) is the cache here.
RUN export FLASH_ATTN_CUDA_ARCHS="$(echo "${TORCH_CUDA_ARCH_LIST}" | sed -e 's/+PTX//g' -e 's/\.//g' -e 's/a//g')" \
 && echo "flash-attn ${FLASH_ATTN_VERSION} for FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS}" \
 && pip wheel --no-cache-dir --no-build-isolation --no-deps --no-binary flash-attn \
        -w /wheels "flash-attn==${FLASH_ATTN_VERSION}"

# FlashAttention 3 restricted to what the workers call: the forward, bf16, head dim 128, no paging,
# splits, local windows, soft-capping, GQA packing or variable lengths: three sources to compile,
# about 3 minutes on 16 cores (the full build compiles hundreds). Hopper only, so only when 9.0 is asked.
RUN if echo ";${TORCH_CUDA_ARCH_LIST};" | grep -q ";9.0a\?;"; then \
      git init -q /src/flash-attention \
   && cd /src/flash-attention \
   && git remote add origin "${FLASH_ATTN3_REPO}" \
   && git fetch -q --depth 1 origin "${FLASH_ATTN3_COMMIT}" \
   && git checkout -q --detach FETCH_HEAD \
   && git submodule update -q --init --depth 1 csrc/cutlass \
   && cd hopper \
   && for feature in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 FP8 VARLEN CLUSTER \
                     HDIM64 HDIM96 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 SM80; do \
        export "FLASH_ATTENTION_DISABLE_${feature}=TRUE"; done \
   && pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels . \
   && rm -rf /src/flash-attention; \
    fi

# LIBRARY_PATH has the driver stub: SageAttention's sm90 module links -lcuda, and there is no GPU here.
# EXT_PARALLEL=1: one extension at a time, each already compiles MAX_JOBS files in parallel.
RUN git init -q /src/SageAttention \
 && cd /src/SageAttention \
 && git remote add origin "${SAGEATTENTION_REPO}" \
 && git fetch -q --depth 1 origin "${SAGEATTENTION_COMMIT}" \
 && git checkout -q --detach FETCH_HEAD \
 && EXT_PARALLEL=1 pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels . \
 && rm -rf /src/SageAttention

RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels

# The compiled modules must be there (a build that skipped an arch fails here, not at worker start).
RUN python - <<'EOF'
import glob
import os
import sysconfig

site = sysconfig.get_paths()["platlib"]
wanted = ["flash_attn_2_cuda*.so", "sageattention/_qattn_sm80*.so", "sageattention/_fused*.so"]
if "9.0" in os.environ["TORCH_CUDA_ARCH_LIST"]:
    wanted += ["sageattention/_qattn_sm90*.so", "flash_attn_3/_C*.so"]
for pattern in wanted:
    found = glob.glob(os.path.join(site, pattern))
    assert found, f"kernel build produced no {pattern}"
    print(found[0])
EOF

# The GPU stack is frozen from here on: installing the project can never swap torch or the kernels.
RUN pip freeze | grep -Ei '^(torch|triton|flash[-_]attn|sageattention|nvidia-|cuda-)' > /opt/venv/constraints.txt \
 && cat /opt/venv/constraints.txt

############################################################################ wheel
FROM kernels AS wheel

# The project's wheel: code, configs and the shipped world model. Only this stage sees the sources.
COPY . /src
RUN pip wheel --no-deps --no-build-isolation -w /dist /src

############################################################################ worker
FROM nvidia/cuda:13.0.3-runtime-ubuntu24.04 AS worker

# Triton and torch.compile compile small C launchers at run time: a C compiler and Python's headers.
# (ffmpeg comes inside the imageio-ffmpeg wheel.)
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Non-root. /cache holds Triton/Inductor caches (a named volume in compose takes this ownership).
RUN groupadd --gid 10001 smartdiff \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/smartdiff \
        --shell /usr/sbin/nologin smartdiff \
 && mkdir -p /cache /models \
 && chown smartdiff:smartdiff /cache

COPY --from=kernels /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_CONSTRAINT=/opt/venv/constraints.txt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The project as users install it: the wheel (not editable), its dependencies already there from the lock.
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-deps /dist/*.whl \
 && smartdiff --help > /dev/null

WORKDIR /home/smartdiff

# Weights are mounted read-only at /models; nothing is downloaded at run time.
# SMARTDIFF_PROFILE is what `smartdiff worker-health` checks: keep it equal to the CMD's --profile.
ENV SMARTDIFF_PROFILE=wan2.1-1.3b-lossless \
    SMARTDIFF_CHECKPOINT_ROOT=/models \
    SMARTDIFF_METRICS_PORT=9400 \
    SMARTDIFF_WORK_DIR=/tmp/smartdiff \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

USER 10001:10001
EXPOSE 9400
STOPSIGNAL SIGTERM

# compose.yaml defines the same check; this one serves plain `docker run`.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["smartdiff", "worker-health"]

ENTRYPOINT ["smartdiff"]
CMD ["worker", "--profile", "wan2.1-1.3b-lossless", "--gpus", "auto"]
