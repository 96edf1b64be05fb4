"""Choosing one endpoint inside a release (SPEC §2): p2c, round robin, hash.

Why p2c least-outstanding by default: two random choices weighted by the
endpoint weight, then the one with fewer requests in flight per unit of
weight, avoids both herd behaviour and a slow instance collecting a queue
(Mitzenmacher, "The Power of Two Choices"). Pure: counts are plain integers
the engine bumps through `acquire`/`release`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Final

import mmh3

from gateway.config import Endpoint
from gateway.routing import hrw_score

# Passive health, as nginx's max_fails/fail_timeout: after MAX_FAILS consecutive
# connect/timeout failures an endpoint sits out FAIL_TIMEOUT seconds. Without it a
# dead endpoint fails fast, keeps the fewest requests in flight and so attracts
# p2c's traffic (the "black hole").
MAX_FAILS: Final = 3
FAIL_TIMEOUT: Final = 10.0


class Slot:
    """One endpoint plus its live in-flight count and passive-health state."""

    __slots__ = (
        "endpoint",
        "host",
        "port",
        "weight",
        "outstanding",
        "fails",
        "down_until",
        "_cw",
        "_seed",
        "_inv",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.host = endpoint.host
        self.port = endpoint.port
        self.weight = max(1, endpoint.weight)
        self.outstanding = 0
        self.fails = 0
        self.down_until = 0.0
        self._cw = 0  # smooth weighted round robin current weight
        self._seed = int(mmh3.hash(endpoint.address, signed=False))
        self._inv = 1.0 / self.weight

    def __repr__(self) -> str:
        return f"Slot({self.endpoint.address}, w={self.weight}, out={self.outstanding})"

    def failed(self, now: float) -> None:
        """A connect error or timeout; the MAX_FAILS-th in a row ejects the endpoint."""
        self.fails += 1
        if self.fails >= MAX_FAILS:
            self.down_until = now + FAIL_TIMEOUT
            self.fails = 0

    def succeeded(self) -> None:
        self.fails = 0


class Pool:
    """The healthy endpoints of one release and the balancing policy over them."""

    __slots__ = ("kind", "slots", "_cum", "_total", "_rng", "down_until")

    def __init__(self, endpoints: Sequence[Endpoint], kind: str, rng: random.Random) -> None:
        self.kind = kind
        self.slots = tuple(Slot(e) for e in endpoints)
        acc = 0
        cum: list[int] = []
        for s in self.slots:
            acc += s.weight
            cum.append(acc)
        self._cum = cum
        self._total = acc
        self._rng = rng
        self.down_until = 0.0  # latest ejection end of any slot: one comparison when none

    def __len__(self) -> int:
        return len(self.slots)

    def carry_counts(self, old: Pool | None) -> None:
        """Keep in-flight counts of endpoints that survive a snapshot swap."""
        if old is None:
            return
        prev = {s.endpoint.address: s for s in old.slots}
        for s in self.slots:
            o = prev.get(s.endpoint.address)
            if o is not None:
                s.outstanding = o.outstanding
                s.fails, s.down_until = o.fails, o.down_until
        self.down_until = max((s.down_until for s in self.slots), default=0.0)

    def eject(self, slot: Slot, now: float) -> None:
        """Record a failure of `slot` (connect error or timeout)."""
        slot.failed(now)
        if slot.down_until > self.down_until:
            self.down_until = slot.down_until

    def live(self, now: float) -> tuple[Slot, ...] | None:
        """The endpoints not sitting out; None means all of them (the fast path)."""
        if self.down_until <= now:
            return None
        return tuple(s for s in self.slots if s.down_until <= now)

    def _weighted_index(self) -> int:
        return bisect.bisect_right(self._cum, self._rng.random() * self._total)

    def pick(self, key: str | None = None, now: float = 0.0) -> Slot | None:
        """An endpoint by the policy; None when empty or every endpoint sits out."""
        slots = self.slots
        if self.down_until > now:
            live = self.live(now)
            if not live:
                return None
            slots = live
        n = len(slots)
        if n == 0:
            return None
        if n == 1:
            return slots[0]
        if self.kind == "round_robin" and slots is self.slots:
            return self._pick_rr()
        if self.kind == "hash" and key:
            return max(slots, key=lambda s: hrw_score(key, s._seed, s._inv))
        if slots is not self.slots:
            a, b = self._rng.sample(slots, 2)
        else:
            a = slots[min(self._weighted_index(), n - 1)]
            b = slots[min(self._weighted_index(), n - 1)]
            if a is b:
                b = slots[(slots.index(a) + 1 + self._rng.randrange(n - 1)) % n]
        return a if a.outstanding * b.weight <= b.outstanding * a.weight else b

    def pick_other(self, tried: Sequence[Slot], key: str | None, now: float) -> Slot | None:
        """A live endpoint not in `tried`, for a retry (README "Failover"); None if none is left.

        Why apart from `pick`: a retry must not land on an endpoint that just
        failed, and round robin's rotation is left as it is.
        """
        rest = [s for s in self.slots if s.down_until <= now and s not in tried]
        n = len(rest)
        if n <= 1:
            return rest[0] if n else None
        if self.kind == "hash" and key:
            return max(rest, key=lambda s: hrw_score(key, s._seed, s._inv))
        a, b = self._rng.sample(rest, 2)
        return a if a.outstanding * b.weight <= b.outstanding * a.weight else b

    def _pick_rr(self) -> Slot:
        # nginx's smooth weighted round robin: evenly interleaved, honours weights.
        best: Slot | None = None
        for s in self.slots:
            s._cw += s.weight
            if best is None or s._cw > best._cw:
                best = s
        assert best is not None
        best._cw -= self._total
        return best
