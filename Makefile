# The two commands of the README:
#   make demo   start the control plane (SQLite + local launcher), submit examples/tiny-gpt.yaml, watch it
#               train to the end, print the dashboard address
#   make test   the whole test suite (SQLite and the PostgreSQL at 127.0.0.1:5432), slowest tests listed last
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install chromium demo test test-stress bench bench-load proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test]'
	@# DeepSpeed compiles its CPU communication op on first use; do it once here, not in every rank.
	TORCH_EXTENSIONS_DIR="$(CURDIR)/$(VENV)/torch_extensions" $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

# The dashboard's browser tests drive Debian's Chromium through Playwright (never `playwright install`).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

install: $(VENV)/.installed chromium

# The demo needs no browser: only the venv.
demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: install
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

# The multi-process tests three times in a row while two CPU hogs run (issue 13's stress check).
test-stress: install
	bash scripts/stress.sh 3 $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.create_job
	$(PY) -m benchmarks.create_job_costs
	$(PY) -m benchmarks.create_job_ceiling
	$(PY) -m benchmarks.read_calls
	$(PY) -m benchmarks.time_to_first_step

# The issue-16 load runs: 64 clients for 5 minutes, on SQLite, then on a private PostgreSQL restarted mid-run.
bench-load: install
	$(PY) -m benchmarks.load --clients 64 --seconds 300 --watches 200
	$(PY) -m benchmarks.load --clients 64 --seconds 300 --watches 200 --database postgresql

proto: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/gen_proto.sh

clean:
	rm -rf $(VENV) .roundhouse-demo *.egg-info
