"""Optional compiled build of the per-request path (mypyc).

Why: the forwarding engine and the policy it calls run once per request; mypyc
compiles these typed modules to C extensions (as black and mypy ship), which
cuts the gateway's CPU per request by ~40 % on the benchmark (benchmarks/
RESULTS.md). The same sources run unchanged as pure Python, which stays the
default: `pip install .` needs no compiler. `GATEWAY_COMPILE=1` opts in; it
needs a C compiler and mypy in the build environment (so build with
`--no-build-isolation`, as the Dockerfile does) and fails loudly without them.
"""

from __future__ import annotations

import os

from setuptools import setup

# Every module on the per-request path, and what it calls per request.
COMPILED = [
    "gateway/engine/api.py",
    "gateway/engine/fast.py",
    "gateway/engine/fast_client.py",
    "gateway/engine/fast_pool.py",
    "gateway/engine/fast_upstream.py",
    "gateway/engine/fast_wire.py",
    "gateway/balancer.py",
    "gateway/guard.py",
    "gateway/handler.py",
    "gateway/headers.py",
    "gateway/metrics.py",
    "gateway/propagation.py",
    "gateway/routing.py",
    "gateway/tally.py",
    "gateway/state.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("GATEWAY_COMPILE", "") not in ("1", "true", "yes"):
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy

    # Types are checked (strictly) by CI's mypy run; the build only needs them to
    # generate code, so it must not depend on which stubs the builder has: no
    # config file, and third-party modules without types are treated as Any.
    flags = ["--config-file", "", "--ignore-missing-imports"]
    return list(mypycify([*flags, *COMPILED], opt_level="3"))


setup(ext_modules=_ext_modules())
