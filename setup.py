"""The build: the per-request modules compiled with mypyc by default, else pure Python.

Why: the forwarding engine and the policy it calls run once per request; mypyc
compiles these typed modules to C extensions (as black and mypy ship), which
cuts the gateway's CPU per request by ~40 % on the benchmark (benchmarks/
RESULTS.md). The same sources run unchanged as pure Python. Whether to compile
is decided by the in-tree build backend (_build/gateway_build.py): `pip install .`
compiles when a C compiler is there and falls back to pure with one warning line;
`GATEWAY_PURE=1` opts out, editable installs stay pure, `GATEWAY_COMPILE=1`
compiles or fails loudly (the Dockerfile, with `--no-build-isolation`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent / "_build"))
import gateway_build  # noqa: E402 - the in-tree backend, found through the line above

# Every module on the per-request path, and what it calls per request
# (gateway/version.py's COMPILED_MODULES names the same modules for compiled()).
COMPILED = [
    "gateway/engine/api.py",
    "gateway/engine/fast.py",
    "gateway/engine/fast_client.py",
    "gateway/engine/fast_head.py",
    "gateway/engine/fast_pool.py",
    "gateway/engine/fast_timers.py",
    "gateway/engine/fast_upstream.py",
    "gateway/engine/fast_reply.py",
    "gateway/engine/fast_wire.py",
    "gateway/engine/tls_conn.py",
    "gateway/balancer.py",
    "gateway/decide.py",
    "gateway/guard.py",
    "gateway/handler.py",
    "gateway/headers.py",
    "gateway/metrics.py",
    "gateway/propagation.py",
    "gateway/routing.py",
    "gateway/segments.py",
    "gateway/tally.py",
    "gateway/trust.py",
    "gateway/state.py",
    "gateway/sampling.py",
]
BUILD_RECORD = "gateway/_build.json"  # read by gateway.version.build_description()

CHOICE = gateway_build.current_choice()


def _ext_modules() -> list[object]:
    if not CHOICE.compile:
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy

    # Types are checked (strictly) by CI's mypy run; the build only needs them to
    # generate code, so it must not depend on which stubs the builder has: no
    # config file, and third-party modules without types are treated as Any.
    flags = ["--config-file", "", "--ignore-missing-imports"]
    return list(mypycify([*flags, *COMPILED], opt_level="3"))


class BuildPyRecordingTheBuild(build_py):
    """build_py that also writes which build this is, and why, into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # the source tree serves: no record, compiled() says pure
        path = Path(self.build_lib) / BUILD_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(CHOICE.record()) + "\n")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / BUILD_RECORD))
        return outputs


setup(ext_modules=_ext_modules(), cmdclass={"build_py": BuildPyRecordingTheBuild})
