# mmjobs `data` image (CPU): the data stages (dataset preparation and tokenization, as declared
# in mmjobs.stages.registry). No CUDA: torch is the CPU build.
# It is also the Helm chart's default image (charts/mmjobs), so it carries what those pods run:
# the MLflow server with basic auth (mlflow[auth]) and PostgreSQL (psycopg2-binary), and, for
# the pipeline-upload job's `mmjobs compile`, kfp-kubernetes, the pipelines/ package and its
# recipes (/opt/mmjobs/pipelines, next to the mmjobs package, as in a source checkout).
#
#   make images IMAGES=data                      (see docker/README.md for every option)
#   podman run --rm --read-only --tmpfs /tmp IMAGE prepare --set source_format=... --set ...
#   podman run --rm --read-only --tmpfs /tmp -w /opt/mmjobs --entrypoint mmjobs IMAGE \
#       compile pipelines/recipes/chart-demo.yaml -o /tmp/chart-demo.yaml
#
# Proxied / air-gapped builds: --build-arg PIP_INDEX_URL=... / PIP_EXTRA_INDEX_URL=... /
# PIP_FIND_LINKS=... (a URL, or a directory mounted into the build: podman build
# --volume /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels), and a CA bundle as the
# build secret `ca` (--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt), never a build arg.
#
# Stages: requirements (the pip lists, generated from pyproject.toml) -> deps (a venv with them;
# rebuilt only when the lists change) -> build (mmjobs itself, into /opt/mmjobs) -> runtime
# (both copied onto a clean base; no pip caches, no build files). Editing mmjobs/ rebuilds only
# the small /opt/mmjobs layer.

# A tag, not a digest, so the default stays readable: in production pin it by digest
# (python:3.11-slim-bookworm@sha256:...) so that rebuilds are reproducible.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The +cpu local version makes pip refuse PyPI's CUDA wheel of the same release: the image
# stays lean, and the build fails if no CPU wheel is offered (find-links or a +cpu index).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=+cpu
ARG MMJOBS_VERSION=0.1.0
# Fixed numeric user, so Kubernetes can verify runAsNonRoot and volumes can be prepared for it.
ARG UID=10001

FROM ${BASE_IMAGE} AS requirements
ARG TORCH_VERSION
ARG TORCH_VARIANT
WORKDIR /opt/build
COPY pyproject.toml ./
COPY docker/requirements.py docker/data-packages.txt docker/
RUN python3 docker/requirements.py pyproject.toml --select docker/data-packages.txt \
        > requirements.txt \
    && python3 docker/requirements.py pyproject.toml --build-system >> requirements.txt \
    && echo "torch==${TORCH_VERSION}${TORCH_VARIANT}" > constraints.txt \
    && cat requirements.txt constraints.txt

FROM ${BASE_IMAGE} AS deps
# Package sources for pip; empty means PyPI (docker/pip-install.sh drops empty ones).
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
WORKDIR /opt/build
RUN python3 -m venv /opt/venv
COPY docker/pip-install.sh docker/
# Only the generated lists: an edit of pyproject.toml that leaves them as they were (a new
# test dependency, a tool setting) keeps this expensive layer.
COPY --from=requirements /opt/build/requirements.txt /opt/build/constraints.txt ./
RUN --mount=type=secret,id=ca \
    sh docker/pip-install.sh -c constraints.txt -r requirements.txt
# A CUDA torch here would be gigabytes of unusable libraries: fail the build instead. The
# chart's MLflow options (basic auth, PostgreSQL) need Flask-WTF and psycopg2: checked too.
# mmjobs is installed to /opt/mmjobs (build stage); a .pth puts it on the venv's path.
RUN /opt/venv/bin/python -c "import sys, torch; sys.exit(1 if torch.version.cuda else 0)" \
    && /opt/venv/bin/python -c "import flask_wtf, psycopg2, kfp.kubernetes" \
    && /opt/venv/bin/python -c "import pathlib, sysconfig; \
pathlib.Path(sysconfig.get_path('purelib'), 'mmjobs.pth').write_text('/opt/mmjobs\n')"

FROM deps AS build
COPY pyproject.toml README.md ./
COPY mmjobs/ mmjobs/
# --no-build-isolation: setuptools and wheel came with the dependencies; nothing is fetched.
RUN sh docker/pip-install.sh --no-deps --no-build-isolation --target /opt/mmjobs . \
    && /opt/venv/bin/python -c "import mmjobs.stages.registry as r; r.check_imports('data')"
# The pipeline definitions and recipes for `mmjobs compile` (the chart's pipeline-upload job,
# workingDir /opt/mmjobs): beside the mmjobs package, so `import pipelines` works and recipe
# paths read as in a checkout (pipelines/recipes/chart-demo.yaml). Bytecode checked by hash, as
# COPY may not keep file times; then every recipe must load and wire into its pipeline.
COPY pipelines/ /opt/mmjobs/pipelines/
RUN /opt/venv/bin/python -m compileall -q --invalidation-mode checked-hash /opt/mmjobs/pipelines \
    && /opt/venv/bin/python -m mmjobs.cli validate /opt/mmjobs/pipelines/recipes/*.yaml

FROM ${BASE_IMAGE} AS runtime
ARG UID
RUN groupadd --gid "${UID}" mmjobs \
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
# Everything a stage writes goes under /tmp (a tmpfs or emptyDir in a pod), so the image runs
# with a read-only root filesystem. HOME too, for libraries that write to ~.
ENV HOME=/tmp/home
# Scratch for staged outputs and downloads: size the /tmp volume for the dataset.
ENV TMPDIR=/tmp
# mmjobs' embedded defaults (local store, sqlite MLflow, tracking spool) when no server is set.
ENV MMJOBS_HOME=/tmp/mmjobs
# Hugging Face caches (processor files come from the store, never from a hub).
ENV HF_HOME=/tmp/huggingface
# matplotlib's font cache; its default (~/.config/matplotlib) would be read-only.
ENV MPLCONFIGDIR=/tmp/matplotlib
# Other libraries' caches (torch, fontconfig) follow XDG.
ENV XDG_CACHE_HOME=/tmp/cache
# Declared here, not at the top of the stage: a new version must not invalidate the layers above.
ARG MMJOBS_VERSION
# Recorded as a tag on every MLflow run this image makes.
ENV MMJOBS_IMAGE=mmjobs-data:${MMJOBS_VERSION}
WORKDIR /tmp
USER ${UID}:${UID}
ENTRYPOINT ["python3", "-m", "mmjobs.cli", "stage"]
CMD ["--help"]
# Last, so a new commit or build date changes only this metadata layer.
ARG BASE_IMAGE
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="mmjobs-data" \
      org.opencontainers.image.description="mmjobs CPU data stages, MLflow server, pipeline compile and upload" \
      org.opencontainers.image.version="${MMJOBS_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
