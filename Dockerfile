# One image for every RayJob (H100 training, sampling, evaluation) and the RayService (RTX 4090
# serving): the official Ray GPU image for the pinned Ray and Python, the CUDA torch build, the
# project's exact lock, and the GPU-only lines of that lock (flash-attn, which
# model.attn_implementation=flash_attention_2 and `cmevlm plan` assume). No Docker engine runs on
# the development machines: `make test` lints this file with hadolint (tests/test_docker.py);
# build it where one does:  docker build -t cmevlm:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cu128 AS base

ENV RAY_USAGE_STATS_ENABLED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/home/ray/torch_extensions

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /home/ray/cmevlm
COPY --chown=ray:users requirements.lock pyproject.toml README.md ./
# The CUDA build of torch 2.13.0 (the lock pins the CPU machines' build), then the lock
# without torch, then the package. torchvision is not needed and not installed.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
 && grep -v '^torch==' requirements.lock > /tmp/lock.txt \
 && pip install -r /tmp/lock.txt \
 && grep 'extra == "gpu"' requirements.lock | sed 's/ *;.*//' > /tmp/gpu.txt \
 && pip install --no-build-isolation -r /tmp/gpu.txt \
 && python -c "import flash_attn" \
 && rm -f /tmp/lock.txt /tmp/gpu.txt
COPY --chown=ray:users cmevlm ./cmevlm
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users helm ./helm
RUN pip install --no-deps . \
 && python -c "import cmevlm.cli, cmevlm.serve.app"

# The rayproject image's user is `ray` (uid 1000): pods run as non-root with this uid.
USER 1000
