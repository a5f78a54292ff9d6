# mmjobs `train` image (CUDA): the stages declared for it (training, merging, connectors; the
# build checks them with mmjobs.stages.registry), with torch's CUDA build (NCCL comes with it), DeepSpeed, TRL and, optionally, flash-attn.
#
#   make images IMAGES=train  [BUILD_FLAGS="--build-arg FLASH_ATTN_WHEEL=https://.../flash_attn-2.8.3+cu130torch2.13-cp312-cp312-linux_x86_64.whl"]
#   (on a GPU node) python3 -m mmjobs.cli stage train --config FILE --set ...
#
# The CUDA variant is chosen by three build args that must agree, and the build checks that
# they do: BASE_IMAGE/BUILD_BASE_IMAGE (the CUDA release, nvcc for DeepSpeed's ops), TORCH_VARIANT
# (+ its index) and FLASH_ATTN_WHEEL (its +cuXXXtorchX.Y tag, and cp312: Ubuntu 24.04's Python).
# Never built on the machines this repository is developed on (no CUDA base image reachable).
#
# Proxied / air-gapped builds: --build-arg PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS,
# and a CA bundle as the build secret `ca` (--secret id=ca,src=FILE), never a build arg.
# Not built in CI (no GPU, and several GB of CUDA wheels); tests/containers checks its structure.
#
# Stages: requirements (pip lists generated from pyproject.toml) -> deps (CUDA *devel* base: compilers and nvcc to prebuild DeepSpeed's CUDA ops, since
# the runtime image has no compilers to JIT them) -> build (mmjobs into /opt/mmjobs) -> runtime
# (CUDA *runtime* base + python3, the venv and /opt/mmjobs copied in).

# Tags, not digests, so the defaults stay readable: in production pin both by digest
# (nvidia/cuda:...@sha256:...). Both must be the same Ubuntu release (the venv links the
# system python3, 3.12 on Ubuntu 24.04, by path) and the CUDA major release torch is built for.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG BUILD_BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
# torch from PyPI is the CUDA build on linux/x86_64: for 2.13.0, CUDA 13.0 (its metadata
# requires cuda-toolkit 13.0.x). For CUDA 12, e.g. TORCH_VARIANT=+cu126 with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 and CUDA 12 bases.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=""
# The torchvision release built with TORCH_VERSION (same variant): the fast image processors.
ARG TORCHVISION_VERSION=0.28.0
# A prebuilt flash-attn wheel (URL or path inside the build) for this torch, its CUDA and
# Python 3.12, e.g. flash_attn-2.8.3+cu130torch2.13-cp312-cp312-linux_x86_64.whl; empty: no
# flash-attn (models use PyTorch SDPA). Building it from source takes hours.
ARG FLASH_ATTN_WHEEL=""
# DeepSpeed ops compiled into the image (1) instead of JIT-compiled at run time (impossible
# without compilers); GPU architectures to compile them for (no GPU at build time).
ARG DS_BUILD_FUSED_ADAM=1
ARG DS_BUILD_CPU_ADAM=1
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MMJOBS_VERSION=0.1.0
# Fixed numeric user, so Kubernetes can verify runAsNonRoot and volumes can be prepared for it.
ARG UID=10001

FROM ${BASE_IMAGE} AS requirements
ARG TORCH_VERSION
ARG TORCH_VARIANT
ARG TORCHVISION_VERSION
# The CUDA runtime base has no Python to run the generator; Ubuntu's packages are pinned by
# pinning the base image digest (see .hadolint.yaml, DL3008).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/build
COPY pyproject.toml ./
COPY docker/requirements.py docker/
RUN python3 docker/requirements.py pyproject.toml --extras train,torchvision > requirements.txt \
    && python3 docker/requirements.py pyproject.toml --build-system > build-requirements.txt \
    && echo "torch==${TORCH_VERSION}${TORCH_VARIANT}" > constraints.txt \
    && echo "torchvision==${TORCHVISION_VERSION}${TORCH_VARIANT}" >> constraints.txt \
    && cat requirements.txt build-requirements.txt constraints.txt

FROM ${BUILD_BASE_IMAGE} AS deps
ARG TORCH_VERSION
ARG TORCH_VARIANT
ARG FLASH_ATTN_WHEEL
ARG DS_BUILD_FUSED_ADAM
ARG DS_BUILD_CPU_ADAM
ARG TORCH_CUDA_ARCH_LIST
# Package sources for pip; empty means PyPI (docker/pip-install.sh drops empty ones).
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
# Compilers and Python headers for DeepSpeed's ops (this stage only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/build
RUN python3 -m venv /opt/venv
COPY docker/pip-install.sh docker/
# Only the generated lists: an edit of pyproject.toml that leaves them as they were keeps
# these expensive layers.
COPY --from=requirements /opt/build/requirements.txt /opt/build/build-requirements.txt \
    /opt/build/constraints.txt ./
# torch first: DeepSpeed's build compiles its ops against it (hence --no-build-isolation below).
RUN --mount=type=secret,id=ca \
    sh docker/pip-install.sh -c constraints.txt -r build-requirements.txt \
        "torch==${TORCH_VERSION}${TORCH_VARIANT}" ninja packaging
# A CPU torch would make every GPU job fail at run time: fail the build instead. So would a
# torch for another CUDA major release than the base's nvcc (CUDA_VERSION, set by the
# nvidia/cuda images): DeepSpeed refuses to compile its ops against it.
RUN /opt/venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
    && /opt/venv/bin/python -c "import os, torch; \
t, b = torch.version.cuda, os.environ.get('CUDA_VERSION', ''); \
assert t.split('.')[0] == b.split('.')[0], f'torch is built for CUDA {t}, the base image has \
CUDA {b or None}: make TORCH_VARIANT and BASE_IMAGE/BUILD_BASE_IMAGE agree'"
RUN --mount=type=secret,id=ca \
    sh docker/pip-install.sh --no-build-isolation -c constraints.txt -r requirements.txt \
    && if [ -n "${FLASH_ATTN_WHEEL}" ]; then \
        sh docker/pip-install.sh --no-deps "${FLASH_ATTN_WHEEL}" \
        && /opt/venv/bin/python -c "import flash_attn, flash_attn_2_cuda"; \
    fi \
    && /opt/venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
    && /opt/venv/bin/python -c "import torchvision.transforms.v2" \
    && /opt/venv/bin/python -c "import pathlib, sysconfig; \
pathlib.Path(sysconfig.get_path('purelib'), 'mmjobs.pth').write_text('/opt/mmjobs\n')"

FROM deps AS build
COPY pyproject.toml README.md ./
COPY mmjobs/ mmjobs/
RUN sh docker/pip-install.sh --no-deps --no-build-isolation --target /opt/mmjobs . \
    && /opt/venv/bin/python -c "import mmjobs.stages.registry as r; r.check_imports('train')"

FROM ${BASE_IMAGE} AS runtime
ARG UID
# Only the interpreter the venv links to; no compilers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
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
# read-only root filesystem. HOME too: Triton and others cache under ~.
ENV HOME=/tmp/home
# Scratch for checkpoints staged before upload: size the /tmp volume for them.
ENV TMPDIR=/tmp
# mmjobs' embedded defaults (local store, sqlite MLflow, tracking spool) when no server is set.
ENV MMJOBS_HOME=/tmp/mmjobs
# Hugging Face caches (models come from the store, never from a hub).
ENV HF_HOME=/tmp/huggingface
# matplotlib's font cache (loss curves); its default (~/.config/matplotlib) would be read-only.
ENV MPLCONFIGDIR=/tmp/matplotlib
# torch extension builds, Triton kernels and other caches follow XDG.
ENV XDG_CACHE_HOME=/tmp/cache
# Declared here, not at the top of the stage: a new version must not invalidate the layers above.
ARG MMJOBS_VERSION
# Recorded as a tag on every MLflow run this image makes.
ENV MMJOBS_IMAGE=mmjobs-train:${MMJOBS_VERSION}
WORKDIR /tmp
USER ${UID}:${UID}
ENTRYPOINT ["python3", "-m", "mmjobs.cli", "stage"]
CMD ["train", "--help"]
# Last, so a new commit or build date changes only this metadata layer.
ARG BASE_IMAGE
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="mmjobs-train" \
      org.opencontainers.image.description="mmjobs CUDA training stages: training, merging, connectors" \
      org.opencontainers.image.version="${MMJOBS_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
