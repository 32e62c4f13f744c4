# Two entry points for a fresh machine:  `make demo`  (the main job)  and  `make test`.
# Both build the virtual environment first if it is missing.

VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and alone: this CPU build lies on local disk here; on a GPU machine pass e.g.
# TORCH_SPEC="torch==2.11.0" (or reuse an environment that has torch: make VENV=/path/to/venv).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vigor-installed
# CI requires these backends to be built and tested (missing = failure, not skip).
REQUIRE_BACKENDS ?= torch,triton,cpp

.PHONY: install demo verify bench test lint clean mutants

install: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt requirements/lock.txt requirements/no-deps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import vigor_kernels as vk; [print(' ', s) for s in vk.available_backends().values()]"
	touch $@

demo: install
	rm -rf runs/demo
	$(VENV)/bin/vigor train --config configs/demo.yaml

verify: install
	$(VENV)/bin/vigor verify

bench: install
	$(PY) bench/grad_norm_bench.py

test: install
	TRITON_INTERPRET=1 VIGOR_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) $(PY) -m pytest -q

# Mutation testing (slow, not in CI): the curated bugs of tests/mutants/catalog.py, one at a time, in a scratch
# copy; writes tests/mutants/results/report.{json,md}.
mutants: install
	OMP_NUM_THREADS=1 $(PY) -m tests.mutants

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info vigor_kernels/_C*.so
