# Tollgate: two commands do everything on a fresh machine.
#   make run    the whole local stack in the foreground (Redis, fake provider, ext_proc, Envoy)
#   make test   the test suite
# Both create .venv, install the package, and make sure a redis-server exists first.

# The interpreter .venv is made from: the distribution's python3 when it is 3.11 or newer and has
# venv (Debian's is built with profile-guided and link-time optimization, its interpreter linked
# statically), else python3 on PATH. pyenv's default build (python3 on PATH on this kind of
# machine) is neither, and ran the ext_proc's hot path 15-20% slower (docs/operations.md,
# "Which Python"). PYTHON=... overrides; an existing .venv is kept (rm -rf .venv to remake it).
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in /usr/bin/python3 python3; do \
	  $$p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; exit; }; \
	done; echo python3)
endif
VENV := .venv
PY := $(VENV)/bin/python
POLICIES ?= $(or $(TOLLGATE_POLICIES),policies)
export TOLLGATE_POLICIES := $(POLICIES)

.PHONY: run test bench install redis-server redis-binary wrk-binary chromium-binary check clean

run: install redis-server
	$(PY) -m extproc.cli run --policies $(POLICIES)

# The tests start their own Redis on free ports, so they need the binary even when REDIS_URL is set;
# wrk for the benchmark's smoke run (tests/test_bench_quick.py); Chromium for the dashboard's
# browser test (tests/test_dashboard.py, headless).
test: install redis-binary wrk-binary chromium-binary
	$(PY) -m pytest $(PYTEST_ARGS)

# Tollgate's throughput, latency, CPU and memory against plain Envoy and a no-op ext_proc, in one
# run (tests/bench.py: every target measured in 3 interleaved rounds, the tables show medians;
# ~9 min on 2 cores, BENCH_ARGS="--rounds 1" ~3.5); needs Debian's wrk. BENCH_ARGS="--long" adds the
# 100,000-request memory run, BENCH_ARGS="--quick" is the test suite's smoke run (~50 s).
bench: install redis-binary wrk-binary
	$(PY) -m tests.bench $(BENCH_ARGS)

check: install
	$(PY) -m extproc.cli check $(POLICIES)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml protos/tollgate/admin/v1/admin.proto
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tollgate needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The admin API's gRPC stubs and Envoy descriptor set, compiled from protos/ (not committed).
	$(PY) -m extproc.admin.build
	touch $@

# `make run` uses REDIS_URL when set; otherwise it needs Debian's redis-server.
redis-server:
	@if [ -z "$$REDIS_URL" ]; then $(MAKE) --no-print-directory redis-binary; fi

redis-binary:
	@if command -v redis-server >/dev/null 2>&1; then exit 0; fi; \
	echo "redis-server not found: installing the Debian package"; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server

wrk-binary:
	@if command -v wrk >/dev/null 2>&1; then exit 0; fi; \
	echo "wrk not found: installing the Debian package"; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk

chromium-binary:
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	echo "chromium not found: installing the Debian package"; \
	SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium

clean:
	rm -rf .run .pytest_cache
