# opensandbox-ingress: build, test, lint, container image.
#
#   make build                      sdist + wheel in $(DIST), build metadata baked in
#   VERSION=1.2.3 GIT_COMMIT=$(git rev-parse HEAD) BUILD_TIME=$(date -u +%Y-%m-%dT%H:%M:%SZ) make build
#   make test | lint | image | clean
#
# VERSION, GIT_COMMIT and BUILD_TIME default to git and the clock and can be
# overridden from the environment or the command line.  With
# SOURCE_DATE_EPOCH set (reproducible builds), BUILD_TIME is that instant.

PYTHON ?= python3
DIST   ?= dist
IMAGE  ?= opensandbox/ingress
TAG    ?= local

VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo "dev")
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo "unknown")
BUILD_TIME ?= $(shell if [ -n "$(SOURCE_DATE_EPOCH)" ]; then \
	date -u -d "@$(SOURCE_DATE_EPOCH)" +"%Y-%m-%dT%H:%M:%SZ" 2>/dev/null \
	|| date -u -r "$(SOURCE_DATE_EPOCH)" +"%Y-%m-%dT%H:%M:%SZ"; \
	else date -u +"%Y-%m-%dT%H:%M:%SZ"; fi)
# `?=` is re-evaluated at every use; evaluate once so the sdist and the
# wheel (and every line of a recipe) agree on BUILD_TIME.
VERSION    := $(VERSION)
GIT_COMMIT := $(GIT_COMMIT)
BUILD_TIME := $(BUILD_TIME)

# `python -m build` when installed (pip install build), else setup.py sdist
# plus `pip wheel` of that sdist.  Either way the wheel is built from the
# sdist, so the sdist is known to be complete.  Extra flags for `build`
# (e.g. --no-isolation, offline) go in BUILD_FLAGS.
PYBUILD ?= $(shell $(PYTHON) -m build --version >/dev/null 2>&1 && echo build || echo pip)
BUILD_FLAGS ?=
# setup.py reads these three and writes opensandbox_ingress/_build_info.py
# into the build (never into the source tree).
BUILD_ENV = VERSION='$(VERSION)' GIT_COMMIT='$(GIT_COMMIT)' BUILD_TIME='$(BUILD_TIME)'

.PHONY: help build test lint image clean

help: ## List the targets.
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: ## sdist + wheel in $(DIST) with VERSION, GIT_COMMIT, BUILD_TIME baked in.
	@echo "building VERSION=$(VERSION) GIT_COMMIT=$(GIT_COMMIT) BUILD_TIME=$(BUILD_TIME) into $(DIST)/"
	@mkdir -p '$(DIST)'
ifeq ($(PYBUILD),build)
	$(BUILD_ENV) $(PYTHON) -m build $(BUILD_FLAGS) --outdir '$(DIST)' .
else
	$(BUILD_ENV) $(PYTHON) setup.py -q sdist --dist-dir '$(DIST)'
	$(BUILD_ENV) $(PYTHON) -m pip wheel -q --no-deps --wheel-dir '$(DIST)' \
		"$$(ls -t '$(DIST)'/opensandbox[-_]ingress-*.tar.gz | head -n 1)"
endif

test: ## The README's test command.
	python3 -m pip install '.[test]' && python3 -m pytest

lint: ## ruff + mypy (pip install '.[lint]').
	$(PYTHON) -m ruff check opensandbox_ingress twisted tests
	$(PYTHON) -m mypy

image: ## docker build, tagged $(IMAGE):$(TAG), with the build metadata.
	docker build \
		--build-arg VERSION='$(VERSION)' \
		--build-arg GIT_COMMIT='$(GIT_COMMIT)' \
		--build-arg BUILD_TIME='$(BUILD_TIME)' \
		-t '$(IMAGE):$(TAG)' .

clean: ## Remove build outputs.
	rm -rf build '$(DIST)' ./*.egg-info opensandbox_ingress/_build_info.py \
		twisted/plugins/dropin.cache
	find opensandbox_ingress twisted tests bench -name __pycache__ -type d -prune -exec rm -rf {} +
