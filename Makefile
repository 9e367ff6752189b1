# Two commands on a fresh machine: `make demo` and `make test`.
# Everything lives in .venv inside the repo; re-runs are cheap (a stamp file tracks
# the packaging files, so the pip steps only run again when those change).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.metarl-installed
# Pinned: an unpinned torch resolves to a multi-GB CUDA build.
TORCH ?= torch==2.13.0

# DDS stays on loopback, on a domain of its own for each run: 1..101 from the shell's PID
# (101 is the highest domain whose ports stay below Linux's ephemeral range).
# Override with `make test DOMAIN_ID=42`.
DOMAIN_ID ?=
ROS_ENV = ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOCALHOST_ONLY=1 \
	ROS_DOMAIN_ID=$(or $(DOMAIN_ID),$$(( $$$$ % 101 + 1 )))

PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help venv test demo lint colcon clean

help:
	@echo "make demo    set up .venv (first run) and run the demo on shipped defaults"
	@echo "make test    set up .venv (first run) and run the test suite"
	@echo "make lint    ruff check"
	@echo "make colcon  colcon build into a temporary workspace"
	@echo "make clean   remove .venv and build output"

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip >= 25.3 always installs editables through PEP 660. Older pips (3.11's venv ships
# 23.2.1) fall back to `setup.py develop` when `wheel` is installed, which honours
# setup.cfg's [develop] script_dir and puts `metarl` in .venv/lib/metarl_ros/, not .venv/bin/.
$(STAMP): setup.py setup.cfg package.xml | $(PY)
	$(PIP) install --quiet 'pip>=25.3'
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[learn,ros,dev,control,distributed]'
	@touch $@

venv: $(STAMP)

test: venv
	$(ROS_ENV) $(PY) -m pytest test/ $(PYTEST_ARGS)

demo: venv
	$(ROS_ENV) $(VENV)/bin/metarl demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

colcon: venv
	@ws=$$(mktemp -d -t metarl_colcon.XXXXXX) && \
	$(VENV)/bin/colcon --log-base $$ws/log build --base-paths . \
		--build-base $$ws/build --install-base $$ws/install && \
	echo "Installed into $$ws/install (source $$ws/install/setup.bash)"

clean:
	rm -rf $(VENV) build install log *.egg-info .pytest_cache .ruff_cache
