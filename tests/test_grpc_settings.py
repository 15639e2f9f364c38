"""The ext_proc's GRPC_EXPERIMENTS (extproc/server.py) only works if extproc.server is what
imports grpc first in the serving process: grpc reads the variable once, at import. These run
in fresh interpreters, since this one has long imported grpc."""

from __future__ import annotations

import os
import subprocess
import sys

from extproc.server import GRPC_EXPERIMENTS

# What `tollgate serve` (extproc/cli.py `_serve`) and tests/bench_floor.py import before
# extproc.server.
_SERVE_PATH = """
import sys
import extproc.cli, extproc.workers, extproc.app, extproc.attribution, extproc.config
import envoy.service.ext_proc.v3.external_processor_pb2, extproc.messages, extproc.lifecycle.protect, extproc.usage
assert "grpc" not in sys.modules, "grpc imported before extproc.server: GRPC_EXPERIMENTS would be ignored"
import extproc.server, os
print(os.environ.get("GRPC_EXPERIMENTS"))
"""


def _run(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    return subprocess.run([sys.executable, "-c", _SERVE_PATH], env=env, capture_output=True, text=True, timeout=60)


def test_serving_imports_set_the_grpc_experiments_before_grpc():
    p = _run(None)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == GRPC_EXPERIMENTS


def test_an_operators_own_grpc_experiments_win():
    p = _run("-event_engine_listener")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "-event_engine_listener"
