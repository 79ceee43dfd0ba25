# Two entry points (see README): `make run` trains a drafter on the embedded default, `make test` runs the tests.
# Both create .venv on first use: the CPU build of torch goes in FIRST (a looser spec would pull a multi-GB CUDA
# build), then dopd with its test, dashboard and experiment extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup run test test-fast test-deps lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,dashboards,experiments]"
	# speculators (the independent EAGLE-3/DFlash implementation tests/test_export.py checks exports against):
	# --no-deps because its declared deps pull torchvision/torchaudio, which have no CPU build here; its plain
	# deps are in the `test` extra
	$(PY) -m pip install -q --no-deps "speculators==0.9.0" "hs-connectors==0.9.0"
	touch $@

setup: $(VENV)/.installed

# the main job: local embedded Ray, SmolLM2-135M target, 2 rollout actors, 2 ZeRO-2 learner ranks, small budget
# (the config defaults, plus an 8192-token draft vocabulary with its own trained head, and OPD rounds that revisit the
# warm-up's prompts, whose target text is cached: a round then costs drafter forwards, not new target text)
run: setup
	$(VENV)/bin/dopd train --actors 2 --learners 2 --out runs/demo drafter.draft_vocab_size=8192 data.rollout_prompts=sft learner.steps=16 learner.opd_lr=2e-4

test: setup test-deps lint
	$(PY) -m pytest -q

# ruff (config in pyproject.toml): the tree stays formatted and lint-clean; `make test` runs it before pytest
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# the fast subset for development: no SmolLM2 (slow), no Ray (ray), no drafter training (heavy); `make test` is the full run
test-fast: setup test-deps
	$(PY) -m pytest -q -m "not slow and not ray and not heavy"

# The dashboard end-to-end tests run a real Prometheus. Missing: as root with apt-get, install the distribution's
# package; otherwise stop with one line saying how (DOPD_PROMETHEUS may name an unpacked release binary instead).
test-deps:
	@if ! command -v prometheus >/dev/null 2>&1 && [ -z "$$DOPD_PROMETHEUS" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make test: Prometheus is missing; installing the distribution's package (apt-get install prometheus)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "make test: the dashboard tests need Prometheus: run 'sudo make test-deps' (or 'sudo apt-get install prometheus', or set DOPD_PROMETHEUS=/path/to/prometheus), then 'make test'"; \
	    exit 1; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
