"""Choosing one endpoint inside a release (SPEC §2): p2c, round robin, hash.

Why p2c least-outstanding by default: two random choices weighted by the
endpoint weight, then the one with fewer requests in flight per unit of
weight, avoids both herd behaviour and a slow instance collecting a queue
(Mitzenmacher, "The Power of Two Choices"). Pure: counts are plain integers
the engine bumps through `acquire`/`release`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence

import mmh3

from gateway.config import Endpoint

_TWO64 = float(2**64)


class Slot:
    """One endpoint plus its live in-flight count."""

    __slots__ = ("endpoint", "host", "port", "weight", "outstanding", "_cw", "_seed")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.host = endpoint.host
        self.port = endpoint.port
        self.weight = max(1, endpoint.weight)
        self.outstanding = 0
        self._cw = 0  # smooth weighted round robin current weight
        self._seed = int(mmh3.hash(endpoint.address, signed=False))

    def __repr__(self) -> str:
        return f"Slot({self.endpoint.address}, w={self.weight}, out={self.outstanding})"


class Pool:
    """The healthy endpoints of one release and the balancing policy over them."""

    __slots__ = ("kind", "slots", "_cum", "_total", "_rng")

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

    def _weighted_index(self) -> int:
        return bisect.bisect_right(self._cum, self._rng.random() * self._total)

    def pick(self, key: str | None = None) -> Slot | None:
        n = len(self.slots)
        if n == 0:
            return None
        if n == 1:
            return self.slots[0]
        if self.kind == "round_robin":
            return self._pick_rr()
        if self.kind == "hash" and key:
            return self._pick_hash(key)
        a = self.slots[min(self._weighted_index(), n - 1)]
        b = self.slots[min(self._weighted_index(), n - 1)]
        if a is b:
            b = self.slots[(self.slots.index(a) + 1 + self._rng.randrange(n - 1)) % n]
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

    def _pick_hash(self, key: str) -> Slot:
        best = self.slots[0]
        best_score = -math.inf
        for s in self.slots:
            h = mmh3.hash64(key, s._seed, signed=False)[0]
            score = math.log((h + 0.5) / _TWO64) / s.weight
            if score > best_score:
                best, best_score = s, score
        return best
