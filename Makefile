# mmjobs — the two commands are `make demo` and `make test`; each sets everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Installing is keyed on the dependency files: edit them and the next target reinstalls.
STAMP  := $(VENV)/.installed
# A second venv with torch + torchvision built as a pair (constraints/torchvision.txt): the
# torchvision image processors are tested there (make test-torchvision, part of make test).
TV_VENV  := .venv-torchvision
TV_STAMP := $(TV_VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` and the lanes (0: one process). Each test module, and
# each xdist_group (a shared recipe run, the distributed lane), stays on one worker; the
# longest lanes go first (tests/lanes.py). test-fast runs in one process: on 2 cores the
# second worker's collection costs more than it saves there (README: Development).
TEST_WORKERS ?= 2
FAST_WORKERS ?= 0
PYTEST = $(PY) -m pytest -n $(1) --dist loadgroup --no-loadscope-reorder
LANES  := unit integration pipelines containers distributed

.PHONY: demo test test-fast test-torchvision $(addprefix test-,$(LANES)) lint bench doctor clean help

help:
	@echo "make demo       set up .venv and run the default recipe end to end (CPU, tiny model)"
	@echo "make test       set up .venv with dev extras and run the whole test suite (CI)"
	@echo "make test-fast  the unit lane without its slow tests: everyday work"
	@echo "make test-LANE  one lane: $(LANES) (README: Development)"
	@echo "make test-torchvision  the image-processing tests with torchvision (.venv-torchvision)"
	@echo "make lint       ruff and the layer contracts (import-linter)"
	@echo "make bench      benchmarks (tests/bench; not run by CI)"

$(STAMP): pyproject.toml constraints/cpu.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mmjobs needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints/cpu.txt pins the CPU build of torch (an open range pulls CUDA wheels).
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e '.[train,dev]'
	touch $(STAMP)

# .venv-torchvision: torch + torchvision as a pair, the rest shared with .venv (the script says
# how and why). Rebuilt whenever .venv is.
$(TV_STAMP): $(STAMP) constraints/torchvision.txt constraints/torchvision-venv.sh
	constraints/torchvision-venv.sh $(PYTHON) $(VENV) $(TV_VENV)
	touch $(TV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmjobs doctor
	$(PY) -m mmjobs.demo

test: $(STAMP) $(TV_STAMP)
	$(call PYTEST,$(TEST_WORKERS)) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-torchvision

# MMJOBS_REQUIRE_TORCHVISION: a test that would skip for want of torchvision fails instead.
test-torchvision: $(TV_STAMP)
	MMJOBS_REQUIRE_TORCHVISION=1 $(TV_VENV)/bin/python -m pytest -m torchvision $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(call PYTEST,$(FAST_WORKERS)) -m "unit and not slow" $(PYTEST_ARGS)

$(addprefix test-,$(LANES)): test-%: $(STAMP)
	$(call PYTEST,$(TEST_WORKERS)) -m $* $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mmjobs pipelines tests
	$(VENV)/bin/lint-imports

# The loader bench again in .venv-torchvision: its image figures with torchvision's processors.
bench: $(STAMP) $(TV_STAMP)
	$(PY) -m tests.bench.run
	$(TV_VENV)/bin/python -m tests.bench.run loader

doctor: $(STAMP)
	$(VENV)/bin/mmjobs doctor

clean:
	rm -rf $(VENV) $(TV_VENV) .mmjobs .pytest_cache .ruff_cache

# --- Container images (docker/README.md) ----------------------------------------------------
# `make images` builds docker/<name>.Dockerfile as $(IMAGE_PREFIX)<name>:$(IMAGE_TAG) for each
# name in IMAGES, with podman or docker (whichever is installed). Every setting is overridable:
#   make images IMAGES="data train eval" IMAGE_PREFIX=registry.example.com/mmjobs-
#   make images BUILD_FLAGS="--build-arg PIP_INDEX_URL=https://mirror.example/simple"
# On a machine with no registry and no Docker engine (this workplace's): `make container-setup`
# once, then the `make images ...` line it prints.
CONTAINER       ?= $(notdir $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null))
CONTAINER_FLAGS ?=
IMAGES          ?= data
IMAGE_PREFIX    ?= localhost/mmjobs-
IMAGE_TAG       ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Empty: each Dockerfile's own default base.
BASE_IMAGE      ?=
# A CA bundle file for pip (proxy / mirror), passed as the build secret `ca`, never a build arg.
CA_BUNDLE       ?=
# A directory of wheels for pip's find-links (podman only: mounted into the build).
WHEELS_DIR      ?=
# podman: a containers.conf to use (container-setup writes one without default ulimits).
CONTAINERS_CONF ?=
BUILD_FLAGS     ?=

.PHONY: images container-setup
images:
	@test -n "$(CONTAINER)" || { echo "make images: neither podman nor docker is installed"; exit 1; }
	@set -e; for image in $(IMAGES); do \
	  test -f docker/$$image.Dockerfile || { echo "make images: no docker/$$image.Dockerfile"; exit 1; }; \
	  echo "== $(IMAGE_PREFIX)$$image:$(IMAGE_TAG)"; \
	  $(if $(CONTAINERS_CONF),CONTAINERS_CONF=$(abspath $(CONTAINERS_CONF))) \
	  $(CONTAINER) $(CONTAINER_FLAGS) build -f docker/$$image.Dockerfile \
	    -t $(IMAGE_PREFIX)$$image:$(IMAGE_TAG) \
	    --build-arg MMJOBS_VERSION=$(IMAGE_TAG) \
	    --build-arg VCS_REF=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	    --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
	    $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	    $(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(abspath $(CA_BUNDLE))) \
	    $(if $(WHEELS_DIR),--volume $(abspath $(WHEELS_DIR)):/wheels:ro --build-arg PIP_FIND_LINKS=/wheels) \
	    $(BUILD_FLAGS) . ; \
	done

comma := ,
# Podman on a machine like this workplace's (root, Debian, no registry, hybrid cgroups): install
# podman + runc + debootstrap, write a containers.conf without default ulimits, and build the
# local base image (docker/local-base.sh). Prints the `make images` line to use afterwards.
container-setup:
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then \
	  test "$$(id -u)" = 0 || { echo "container-setup: run as root to apt-get install podman runc debootstrap"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap; \
	fi
	@mkdir -p .mmjobs && printf '[containers]\ndefault_ulimits = []\n' > .mmjobs/containers.conf
	CONTAINERS_CONF=$(abspath .mmjobs/containers.conf) PODMAN="podman --runtime runc" sh docker/local-base.sh localhost/mmjobs-base:py311
	@echo "then: make images CONTAINER=podman CONTAINER_FLAGS='--runtime runc' CONTAINERS_CONF=.mmjobs/containers.conf \\"
	@echo "        BASE_IMAGE=localhost/mmjobs-base:py311 CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\"
	@echo "        WHEELS_DIR=/opt/wheels BUILD_FLAGS=--network=host"
