"""Benchmark harness: the gateway against nginx and a direct hop, on loopback.

Run it with ``python -m benchmarks.run``; see ``benchmarks/README.md``.
"""

from __future__ import annotations
