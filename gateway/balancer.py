"""Choosing one endpoint inside a release (README "How routing decides"): p2c, round robin, hash.

Why p2c least-outstanding by default: two random choices weighted by the
endpoint weight, then the one with fewer requests in flight per unit of
weight, avoids both herd behaviour and a slow instance collecting a queue
(Mitzenmacher, "The Power of Two Choices"). Pure: counts are plain integers
the handler bumps on the shared `Slot`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Final

import mmh3

from gateway.config import Endpoint, OutlierConfig
from gateway.routing import hrw_score

# Passive health, as nginx's max_fails/fail_timeout: after MAX_FAILS consecutive
# connect/timeout failures an endpoint sits out FAIL_TIMEOUT seconds. Without it a
# dead endpoint fails fast, keeps the fewest requests in flight and so attracts
# p2c's traffic (the "black hole").
MAX_FAILS: Final = 3
FAIL_TIMEOUT: Final = 10.0
_FOREVER: Final = float("inf")


class Slot:
    """One endpoint's live state: in-flight count, passive health, ejection deadline.

    Why one object per (service, release, address) shared by successive pools: a
    request that started before a snapshot swap finishes on the slot it picked,
    and the next snapshot's pool must see that decrement and any ejection it
    causes; a copy per pool drifts by one per request in flight at each swap.
    """

    __slots__ = (
        "endpoint",
        "host",
        "port",
        "tls",
        "weight",
        "outstanding",
        "fails",
        "errors",
        "down_until",
        "checked_down",
        "_cw",
        "_seed",
        "_inv",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.host = endpoint.host
        self.port = endpoint.port
        self.tls = endpoint.tls  # https:// (a native field: read per request)
        self.weight = max(1, endpoint.weight)
        self.outstanding = 0
        self.fails = 0
        self.errors = 0  # consecutive 5xx answers (outlier ejection)
        self.down_until = 0.0
        self.checked_down = False  # the active health check says it is down
        self._cw = 0  # smooth weighted round robin current weight
        self._seed = int(mmh3.hash(endpoint.address, signed=False))
        self._inv = 1.0 / self.weight

    def __repr__(self) -> str:
        return f"Slot({self.endpoint.address}, w={self.weight}, out={self.outstanding})"

    def reweigh(self, endpoint: Endpoint) -> None:
        """Follow a new weight (e.g. Consul Weights.Passing) for the same address."""
        self.endpoint = endpoint
        self.tls = endpoint.tls
        self.weight = max(1, endpoint.weight)
        self._inv = 1.0 / self.weight

    def failed(self, now: float) -> None:
        """A connect error or timeout; the MAX_FAILS-th in a row ejects the endpoint."""
        self.fails += 1
        if self.fails >= MAX_FAILS:
            self.down_until = max(self.down_until, now + FAIL_TIMEOUT)
            self.fails = 0

    def succeeded(self) -> None:
        self.fails = 0
        self.errors = 0


class SlotGroup:
    """Every slot a release has had, by address, and the latest ejection end among them.

    Shared by all pools of one (service, release), so an ejection reported
    through an old pool is seen by the current one.
    """

    __slots__ = ("by_address", "down_until")

    def __init__(self) -> None:
        self.by_address: dict[str, Slot] = {}
        self.down_until = 0.0

    def slot(self, endpoint: Endpoint) -> Slot:
        s = self.by_address.get(endpoint.address)
        if s is None:
            s = self.by_address[endpoint.address] = Slot(endpoint)
        elif s.endpoint != endpoint:
            s.reweigh(endpoint)
        return s

    def prune(self, keep: frozenset[str]) -> None:
        """Forget endpoints that are gone and have nothing in flight."""
        for addr in [a for a, s in self.by_address.items() if a not in keep]:
            if self.by_address[addr].outstanding <= 0:
                del self.by_address[addr]
        self.recompute()

    def recompute(self) -> None:
        self.down_until = max((s.down_until for s in self.by_address.values()), default=0.0)

    def set_checked(self, slot: Slot, healthy: bool) -> None:
        """An active health check's verdict: down until it passes again (no time limit)."""
        slot.checked_down = not healthy
        if healthy:
            if slot.down_until == _FOREVER:
                slot.down_until = 0.0
            self.recompute()
        else:
            slot.down_until = _FOREVER
            self.down_until = _FOREVER


class SlotRegistry:
    """The live endpoint state of every release; it outlives snapshots (state.py carries it)."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], SlotGroup] = {}

    def group(self, service: str, release: str) -> SlotGroup:
        g = self.groups.get((service, release))
        if g is None:
            g = self.groups[(service, release)] = SlotGroup()
        return g

    def prune(self, live: dict[tuple[str, str], frozenset[str]]) -> None:
        """Keep only endpoints in `live` ({(service, release): addresses}) or still busy."""
        for key in list(self.groups):
            g = self.groups[key]
            g.prune(live.get(key, frozenset()))
            if not g.by_address and key not in live:
                del self.groups[key]


class Pool:
    """The healthy endpoints of one release and the balancing policy over them."""

    __slots__ = ("kind", "slots", "group", "outlier", "_cum", "_total", "_rng")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        kind: str,
        rng: random.Random,
        group: SlotGroup | None = None,
        outlier: OutlierConfig | None = None,
    ) -> None:
        self.kind = kind
        self.outlier = OutlierConfig() if outlier is None else outlier
        # `group` shares live state with the release's other pools (see Slot).
        self.group = group = SlotGroup() if group is None else group
        self.slots = tuple(group.slot(e) for e in endpoints)
        acc = 0
        cum: list[int] = []
        for s in self.slots:
            s._cw = 0
            acc += s.weight
            cum.append(acc)
        self._cum = cum
        self._total = acc
        self._rng = rng

    @property
    def down_until(self) -> float:
        """The latest ejection end of any slot: one comparison when none sits out."""
        return self.group.down_until

    def __len__(self) -> int:
        return len(self.slots)

    def eject(self, slot: Slot, now: float) -> None:
        """Record a failure of `slot` (connect error or timeout)."""
        slot.failed(now)
        g = self.group
        if slot.down_until > g.down_until:
            g.down_until = slot.down_until

    def server_error(self, slot: Slot, now: float) -> bool:
        """A 5xx answer; True when it ejects `slot` (Envoy's outlier `consecutive_5xx`).

        Why the cap: `max_ejection_percent` of the release's endpoints at most may sit
        out for 5xx at once (rounded down), so a release whose every endpoint answers
        5xx keeps serving (the guard, not the balancer, judges a bad release).
        """
        o = self.outlier
        slot.errors += 1
        if o.consecutive_5xx <= 0 or slot.errors < o.consecutive_5xx:
            return False
        slot.errors = 0
        if slot.down_until > now:
            return False
        out = sum(1 for s in self.slots if s.down_until > now)
        if (out + 1) * 100 > o.max_ejection_percent * len(self.slots):
            return False
        slot.down_until = now + o.ejection_time
        g = self.group
        if slot.down_until > g.down_until:
            g.down_until = slot.down_until
        return True

    def healthy(self, now: float) -> int:
        """How many endpoints can be picked now (none ejected by any kind of health)."""
        if self.group.down_until <= now:
            return len(self.slots)
        return sum(1 for s in self.slots if s.down_until <= now)

    def live(self, now: float) -> tuple[Slot, ...] | None:
        """The endpoints not sitting out; None means all of them (the fast path)."""
        if self.group.down_until <= now:
            return None
        return tuple(s for s in self.slots if s.down_until <= now)

    def _weighted_index(self) -> int:
        return bisect.bisect_right(self._cum, self._rng.random() * self._total)

    def pick(self, key: str | None = None, now: float = 0.0) -> Slot | None:
        """An endpoint by the policy; None when empty or every endpoint sits out."""
        slots = self.slots
        if self.group.down_until > now:
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
