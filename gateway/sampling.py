"""The per-request sampling decision, as one compiled object the handler calls directly.

Why a class in its own module: `gateway/telemetry.py` imports the OpenTelemetry SDK and
runs as Python source, so a decision function defined there is an interpreted call on
every request; this module is compiled with the per-request ones (setup.py), and the
handler calls `RequestSampler.sample` as a C function (a method of a typed attribute:
calling the object itself would go through Python's generic call protocol). The rules are
the OpenTelemetry SDK samplers' of the same names (OpenTelemetry specification, "Built-in samplers";
`OTEL_TRACES_SAMPLER` in its environment variable specification); telemetry.py
computes the ratio bound with the SDK's own function. Pure: no I/O, randomness passed in.
"""

from __future__ import annotations

import random
from typing import Final

from gateway.propagation import FLAG_SAMPLED, TraceParent

# The sampler names this decides, in the SDK's spelling.
ALWAYS_ON: Final = "always_on"
ALWAYS_OFF: Final = "always_off"
TRACE_ID_RATIO: Final = "traceidratio"
PARENT_ALWAYS_ON: Final = "parentbased_always_on"
PARENT_ALWAYS_OFF: Final = "parentbased_always_off"
PARENT_TRACE_ID_RATIO: Final = "parentbased_traceidratio"
KINDS: Final = (
    ALWAYS_ON,
    ALWAYS_OFF,
    TRACE_ID_RATIO,
    PARENT_ALWAYS_ON,
    PARENT_ALWAYS_OFF,
    PARENT_TRACE_ID_RATIO,
)


class RequestSampler:
    """`sampler.sample(incoming traceparent or None) -> bool`: sample this request or not.

    Ratio sampling compares the trace-id's low 64 bits with `bound` (the SDK's
    `TraceIdRatioBased.get_bound_for_rate`), so every OTel hop with the same ratio keeps
    the same traces; a trace the gateway starts has no id yet, so that decision draws
    its own 64 random bits from `rng` (the `random` module's when None).
    """

    __slots__ = ("kind", "bound", "_rng", "_parent", "_fixed")

    def __init__(self, kind: str, bound: int, rng: random.Random | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown sampler {kind!r}; one of {', '.join(KINDS)}")
        self.kind = kind
        self.bound = bound
        self._rng = rng
        # The kind's rules, read once here rather than as string tests per request.
        self._parent = kind.startswith("parentbased_")
        self._fixed = (  # 1: always sample, 0: never, -1: by the trace-id ratio
            1
            if kind in (ALWAYS_ON, PARENT_ALWAYS_ON)
            else 0
            if kind in (ALWAYS_OFF, PARENT_ALWAYS_OFF)
            else -1
        )

    def _draw(self) -> bool:
        r = self._rng
        return (random.getrandbits(64) if r is None else r.getrandbits(64)) < self.bound

    def sample(self, incoming: TraceParent | None) -> bool:
        """The decision; the handler calls this method (a native call when compiled)."""
        if incoming is not None and self._parent:
            return incoming.flags & FLAG_SAMPLED != 0  # the caller's decision stands
        fixed = self._fixed
        if fixed >= 0:
            return fixed == 1
        if incoming is None:  # traceidratio, or parentbased_traceidratio at a root
            return self._draw()
        return int(incoming.trace_id[16:], 16) < self.bound

    def __repr__(self) -> str:
        return f"RequestSampler({self.kind!r})"
