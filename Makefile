# The README's two commands: `make demo` and `make test`.  Both create and reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Keep every byte on 127.0.0.1: no usage stats, no cloud metadata probes, no stray proxies.
export HTTP_PROXY := http://127.0.0.1:9
export HTTPS_PROXY := http://127.0.0.1:9
export NO_PROXY := 127.0.0.1,localhost
export RAY_USAGE_STATS_ENABLED := 0
export RAY_USAGE_STATS_REPORT_URL := http://127.0.0.1:9/
export AWS_EC2_METADATA_DISABLED := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test install lock clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[s3,gcs,test]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) jobs/train.py --spec jobs/specs/shakespeare-demo.yaml

test: $(INSTALLED)
	$(PY) -m pytest -q tests

# Re-pin constraints.txt after changing pyproject.toml's ranges.
lock: $(INSTALLED)
	$(PY) -m pip freeze --exclude-editable --exclude charnn | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
