# mmjobs `eval` image: the infer, evaluate and report stages. CUDA by default; CPU with
#
#   make images IMAGES=eval BUILD_FLAGS="--build-arg DEVICE=cpu \
#       --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_VARIANT=+cpu \
#       --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
#
# Proxied / air-gapped builds: --build-arg PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS,
# and a CA bundle as the build secret `ca` (--secret id=ca,src=FILE), never a build arg.
# The CUDA variant is not built in CI (several GB of CUDA wheels); tests/containers checks its
# structure. It has never been built on the machines this repository is developed on (no CUDA
# base image reachable). Its CUDA release is chosen by BASE_IMAGE and TORCH_VARIANT (+ index),
# which must agree (checked), and optionally FLASH_ATTN_WHEEL (cp312: Ubuntu 24.04's Python).
#
# Stages: python (the base, plus python3 if it has none) -> requirements (pip lists generated
# from pyproject.toml) -> deps (a venv with them; rebuilt only when the lists change) -> build
# (mmjobs into /opt/mmjobs) -> runtime (the base, the venv and /opt/mmjobs copied in; no pip
# caches, no build files).

# A tag, not a digest, so the default stays readable: in production pin it by digest
# (nvidia/cuda:...@sha256:...) so that rebuilds are reproducible. Any base with python3 >= 3.11,
# or an apt-based one without python (it is installed), works. CUDA 13.0: the release PyPI's
# torch 2.13.0 is built for.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# cuda: torch must be a CUDA build (PyPI's default on linux/x86_64) for the base's CUDA major
# release; cpu: it must not be a CUDA build.
ARG DEVICE=cuda
ARG TORCH_VERSION=2.13.0
# "" is PyPI's CUDA 13.0 build; e.g. +cu126 (with PIP_EXTRA_INDEX_URL=
# https://download.pytorch.org/whl/cu126 and a CUDA 12 base), or +cpu with DEVICE=cpu.
ARG TORCH_VARIANT=""
# The torchvision release built with TORCH_VERSION (same variant): the fast image processors.
ARG TORCHVISION_VERSION=0.28.0
# DEVICE=cuda only: a prebuilt flash-attn wheel for this torch, its CUDA and the base's Python
# (e.g. flash_attn-2.8.3+cu130torch2.13-cp312-cp312-linux_x86_64.whl); empty: SDPA attention.
ARG FLASH_ATTN_WHEEL=""
ARG MMJOBS_VERSION=0.1.0
# Fixed numeric user, so Kubernetes can verify runAsNonRoot and volumes can be prepared for it.
ARG UID=10001

FROM ${BASE_IMAGE} AS python
# CUDA bases have no Python (python3-venv for the build stages' venv). Ubuntu's packages are
# pinned by pinning the base image digest (see .hadolint.yaml, DL3008).
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS requirements
ARG TORCH_VERSION
ARG TORCH_VARIANT
ARG TORCHVISION_VERSION
WORKDIR /opt/build
COPY pyproject.toml ./
COPY docker/requirements.py docker/
RUN python3 docker/requirements.py pyproject.toml --extras torchvision > requirements.txt \
    && python3 docker/requirements.py pyproject.toml --build-system >> requirements.txt \
    && echo "torch==${TORCH_VERSION}${TORCH_VARIANT}" > constraints.txt \
    && echo "torchvision==${TORCHVISION_VERSION}${TORCH_VARIANT}" >> constraints.txt \
    && cat requirements.txt constraints.txt

FROM python AS deps
ARG DEVICE
ARG FLASH_ATTN_WHEEL
# Package sources for pip; empty means PyPI (docker/pip-install.sh drops empty ones).
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
WORKDIR /opt/build
RUN python3 -m venv /opt/venv
COPY docker/pip-install.sh docker/
# Only the generated lists: an edit of pyproject.toml that leaves them as they were keeps
# this expensive layer.
COPY --from=requirements /opt/build/requirements.txt /opt/build/constraints.txt ./
RUN --mount=type=secret,id=ca \
    sh docker/pip-install.sh -c constraints.txt -r requirements.txt \
    && if [ -n "${FLASH_ATTN_WHEEL}" ]; then \
        sh docker/pip-install.sh --no-deps "${FLASH_ATTN_WHEEL}" \
        && /opt/venv/bin/python -c "import flash_attn, flash_attn_2_cuda"; \
    fi
# The wrong torch build fails the build, not the first job: CUDA for DEVICE=cuda (the base's
# major release, CUDA_VERSION of the nvidia/cuda images, when it says), else none.
RUN /opt/venv/bin/python -c "import os, sys, torch; \
sys.exit(0 if bool(torch.version.cuda) == (os.environ['DEVICE'] == 'cuda') else 1)" \
    && /opt/venv/bin/python -c "import os, torch; \
t, b = torch.version.cuda, os.environ.get('CUDA_VERSION', ''); \
assert not (t and b) or t.split('.')[0] == b.split('.')[0], f'torch is built for CUDA {t}, \
the base image has CUDA {b}: make TORCH_VARIANT and BASE_IMAGE agree'" \
    && /opt/venv/bin/python -c "import torchvision.transforms.v2" \
    && /opt/venv/bin/python -c "import pathlib, sysconfig; \
pathlib.Path(sysconfig.get_path('purelib'), 'mmjobs.pth').write_text('/opt/mmjobs\n')"

FROM deps AS build
COPY pyproject.toml README.md ./
COPY mmjobs/ mmjobs/
RUN sh docker/pip-install.sh --no-deps --no-build-isolation --target /opt/mmjobs . \
    && /opt/venv/bin/python -c "import mmjobs.stages.registry as r; r.check_imports('eval')"

FROM ${BASE_IMAGE} AS runtime
ARG UID
# Only the interpreter the venv links to (when the base has none), and bubblewrap: the evaluate
# stage runs program-of-thought programs each in its own namespaces under it and refuses to run
# them without it (mmjobs/eval/pot). No compilers.
RUN apt-get update \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3; \
    fi \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${UID}" mmjobs \
    && useradd --uid "${UID}" --gid "${UID}" --no-create-home --home-dir /tmp/home \
        --shell /usr/sbin/nologin mmjobs
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /opt/mmjobs /opt/mmjobs
# The venv's python first; /opt/mmjobs/bin holds the `mmjobs` console script.
ENV PATH=/opt/mmjobs/bin:/opt/venv/bin:${PATH}
# Logs reach `kubectl logs` as they happen, not when a buffer fills.
ENV PYTHONUNBUFFERED=1
# The root filesystem may be read-only; bytecode was compiled at build time.
ENV PYTHONDONTWRITEBYTECODE=1
# Everything a stage writes goes under /tmp (an emptyDir in a pod), so the image runs with a
# read-only root filesystem. HOME too, for libraries that write to ~.
ENV HOME=/tmp/home
# Scratch for predictions staged before upload and for the program-of-thought sandbox.
ENV TMPDIR=/tmp
# mmjobs' embedded defaults (local store, sqlite MLflow, tracking spool) when no server is set.
ENV MMJOBS_HOME=/tmp/mmjobs
# Hugging Face caches (models come from the store, never from a hub).
ENV HF_HOME=/tmp/huggingface
# matplotlib's font cache (report figures); its default (~/.config/matplotlib) would be read-only.
ENV MPLCONFIGDIR=/tmp/matplotlib
# Other libraries' caches (torch, Triton) follow XDG.
ENV XDG_CACHE_HOME=/tmp/cache
# Declared here, not at the top of the stage: a new version must not invalidate the layers above.
ARG MMJOBS_VERSION
# Recorded as a tag on every MLflow run this image makes.
ENV MMJOBS_IMAGE=mmjobs-eval:${MMJOBS_VERSION}
WORKDIR /tmp
USER ${UID}:${UID}
ENTRYPOINT ["python3", "-m", "mmjobs.cli", "stage"]
CMD ["evaluate", "--help"]
# Last, so a new commit or build date changes only this metadata layer.
ARG BASE_IMAGE
ARG DEVICE
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="mmjobs-eval" \
      org.opencontainers.image.description="mmjobs evaluation stages (${DEVICE}): infer, evaluate, report" \
      org.opencontainers.image.version="${MMJOBS_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
