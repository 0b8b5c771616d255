# The README's two commands: `make demo` and `make test`.  Both create and reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Jobs and tests keep every byte on 127.0.0.1: no usage stats, no cloud metadata probes, and a
# dead proxy for anything else (loopback.env, the one copy).  pip (install, corpus download) runs
# outside it: it needs PyPI.  The settings go on an `env` prefix, not `include`: included, a
# name that is also in make's own environment (HTTP_PROXY behind a real proxy) would be exported
# to every recipe, pip's included.
LOOPBACK_SETTINGS := $(shell sed -n '/^[A-Za-z_]/p' loopback.env)
$(if $(LOOPBACK_SETTINGS),,$(error loopback.env: no KEY=VALUE lines))
LOOPBACK := env $(LOOPBACK_SETTINGS)

.PHONY: demo test check install lock clean gpu-data

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[s3,gcs,test]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m charnn.data.corpora shakespeare
	$(LOOPBACK) $(PY) jobs/train.py --spec jobs/specs/shakespeare-demo.yaml

# Two pytest workers, a test file each at a time (a file's fixtures and order stay whole): the
# Ray tests wait on Ray's start-up and polling much of the time, so two of them share 2 cores
# in less time than one after the other (18m49s against 24m46s here).  The files go out in
# tests/conftest.py's order, the longest first (--no-loadscope-reorder).  TEST_WORKERS=0 runs
# them in this process.
TEST_WORKERS ?= 2
DIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(INSTALLED)
	$(LOOPBACK) $(PY) -m pytest -q $(DIST) --durations=15 tests

# The fast loop: ruff (pyproject.toml's rules) and every test that needs no Ray (`-m "not ray"`:
# tests/conftest.py marks each test that uses a Ray fixture), under a minute on 2 cores.  `make
# test` runs everything, ruff included.  One OpenMP thread per test process: torch's idle threads
# spin, and two workers' spinning threads on 2 cores made the Trainer's tests 4 times as slow here.
check: $(INSTALLED)
	$(VENV)/bin/ruff check --no-cache .
	$(LOOPBACK) OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(DIST) -m "not ray" \
		--durations=5 tests

# The Shakespeare dataset laid out for 1 worker x 256 rows, for bench/gpu.sh on a lent GPU
# (carry .gpu-data): the GPU machine has no Ray and no network.
gpu-data: $(INSTALLED)
	$(PY) -m charnn.data.corpora shakespeare
	$(LOOPBACK) $(PY) jobs/tokenize_corpus.py --spec jobs/specs/shakespeare-quality.yaml --set cluster.num_workers=1 \
		--set train.batch_per_worker=256 --set data.dataset_root=$(CURDIR)/.gpu-data

# Re-pin constraints.txt after changing pyproject.toml's ranges.
lock: $(INSTALLED)
	$(PY) -m pip freeze --exclude-editable --exclude charnn | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
