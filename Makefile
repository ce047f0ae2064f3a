# jvpn developer entry points. `make help` lists them.
#
# Works with GNU make >= 4.3 and a POSIX /bin/sh (dash): recipes use no bashisms.
# Everything Python lives in $(VENV); nothing is installed into the system Python.

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
# Written after a successful `pip install -e`; redone whenever pyproject.toml or
# constraints.txt changes. Two installs into the one venv: the demo's (jvpn and what it
# runs on, nothing else) and the developers' (plus the test and cluster extras: pytest,
# mypy, ruff, hypothesis, grpcio, aetcd, ...). The second includes the first.
DEMO_STAMP := $(VENV)/.jvpn-demo.stamp
STAMP := $(VENV)/.jvpn-install.stamp
PIP_FLAGS ?= --disable-pip-version-check --progress-bar off
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: one per core (CI: 2). The tests make unique names
# and ports and hold on a loaded machine, so they may share the cores; PYTEST_WORKERS=0
# runs them in this one process.
PYTEST_WORKERS ?= auto

# Tools the tests use, as command:debian-package. A package is installed only when its
# command is missing; tests that need a tool that is still missing skip themselves.
SYSTEM_TOOLS := ip:iproute2 iperf3:iperf3 etcd:etcd-server tmux:tmux ping:iputils-ping

.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules
.SUFFIXES:
# Targets run their prerequisites in the order written, even under `make -j`.
.NOTPARALLEL:
.PHONY: help venv demo test lint fmt bench sysdeps clean screenshots

help: ## list the targets
	@echo "jvpn make targets:"
	@sed -n 's/^\([a-z][a-z-]*\):.*## \(.*\)$$/\1|\2/p' $(MAKEFILE_LIST) \
		| awk -F'|' '{ printf "  %-10s %s\n", $$1, $$2 }'
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) PYTEST_ARGS='$(PYTEST_ARGS)' PYTEST_WORKERS=$(PYTEST_WORKERS)"

venv: $(STAMP) ## create .venv and install jvpn into it (editable, test+cluster extras)

# The interpreter. Debian's python3 needs python3-venv (ensurepip) for `-m venv`:
# installed here under the same guard as the test tools (root + apt-get only).
$(VENV_PY):
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "venv: $(PYTHON) has no ensurepip; installing python3-venv"; \
			apt-get -q update && \
			DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends \
				python3-venv || exit 1; \
		else \
			echo "venv: $(PYTHON) cannot create a venv (no ensurepip)." \
				"Install python3-venv (as root: apt-get install python3-venv) and retry." >&2; \
			exit 1; \
		fi; \
	fi
	$(PYTHON) -m venv $(VENV)

# Versions are pinned by constraints.txt (the set the snapshots and linters were checked
# with). pip runs only when the stamp is older than either file (or missing): a re-run
# of `make test` or `make demo` with nothing changed does no network access.
$(STAMP): pyproject.toml constraints.txt | $(VENV_PY)
	$(VENV_PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,cluster]'
	@touch $(DEMO_STAMP) $@

# The demo runs jvpn from this directory (`python -m jvpn_tui`): it needs jvpn's own
# dependencies ([project] dependencies of pyproject.toml, pinned by constraints.txt) and
# nothing else, neither the extras nor an install of jvpn itself (building the editable
# install takes longer than all the rest). --no-compile: Python compiles what the demo
# imports when it first starts, a fraction of what pip would compile (every one of
# pygments' lexers, ...). `make test` later adds the extras and jvpn to the same venv.
DEMO_REQUIREMENTS := $(VENV)/demo-requirements.txt
$(DEMO_STAMP): pyproject.toml constraints.txt | $(VENV_PY)
	$(VENV_PY) -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb")); \
		print("\n".join(project["project"]["dependencies"]))' > $(DEMO_REQUIREMENTS)
	$(VENV_PY) -m pip install $(PIP_FLAGS) --no-compile -c constraints.txt -r $(DEMO_REQUIREMENTS)
	@touch $@

demo: $(DEMO_STAMP) ## set up (jvpn's dependencies only), then run the demo (no root)
	$(VENV_PY) -m jvpn_tui --demo

# Guarded: installs only missing tools, only as root with apt-get, one `apt-get update`.
# Not root: print what is missing and carry on (the tests that need it skip).
sysdeps: ## install missing system tools the tests use (root + apt-get only)
	@missing=""; \
	for pair in $(SYSTEM_TOOLS); do \
		cmd=$${pair%%:*}; pkg=$${pair#*:}; \
		if ! command -v "$$cmd" >/dev/null 2>&1 \
			&& [ ! -x "/usr/sbin/$$cmd" ] && [ ! -x "/sbin/$$cmd" ]; then \
			missing="$$missing $$pkg"; \
		fi; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "sysdeps: system tools present"; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: installing$$missing"; \
		apt-get -q update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends $$missing \
			|| { echo "sysdeps: apt-get failed for$$missing" >&2; exit 1; }; \
	else \
		echo "NOTE: missing system packages:$$missing"; \
		echo "NOTE: not root or no apt-get, so not installing them; tests that need them"; \
		echo "NOTE: will skip. To install: sudo apt-get install$$missing"; \
	fi

lint: $(STAMP) ## ruff + mypy (mypy config: [tool.mypy] in pyproject.toml)
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m mypy

fmt: $(STAMP) ## apply ruff's automatic fixes (import order, upgrades)
	$(VENV_PY) -m ruff check --fix .

test: sysdeps lint ## install what the tests need, lint, then run pytest
	$(VENV_PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP) ## run every bench/*.py (prints tables; never pass/fail on timing)
	@found=0; \
	for script in bench/*.py; do \
		[ -f "$$script" ] || continue; \
		found=1; \
		echo "== $$script"; \
		$(VENV_PY) "$$script" || exit 1; \
	done; \
	if [ "$$found" -eq 0 ]; then echo "bench: no benchmark scripts in bench/ yet"; fi

screenshots: $(STAMP) ## redraw screenshots/*.svg (jvpn-tui against its scripted fake engine)
	$(VENV_PY) -m jvpn_tui.screenshots

clean: ## remove .venv and tool caches (nothing else)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	find . -maxdepth 2 -path ./.git -prune -o -type d -name '*.egg-info' -prune \
		-exec rm -rf {} +
