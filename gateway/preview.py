"""Explain and preview: what the data path does for a request, and what a change would move.

Why reuse `decide.decide` and the snapshot's own tables: an
explanation that differs from the data path is worse than none (README "Admin API",
explain: "exactly what the data path would do for that request now");
preview hashes the same synthetic keys with the old and the new table, so
its numbers are exact for that sample, not an estimate.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.decide import decide, shown_user
from gateway.headers import scan
from gateway.paths import normalize_path
from gateway.routing import REASON_REJECT, WeightTable, cookie_value
from gateway.state import Snapshot
from gateway.trust import client_address

REASON_UNAVAILABLE = "unavailable"
DEFAULT_SAMPLE = 100_000
MAX_SAMPLE = 1_000_000


@dataclass(frozen=True, slots=True)
class Explanation:
    service: str
    release: str | None  # None: no release can serve (the data path answers 503)
    reason: str  # header | cookie | tag | lane | segment | hash | random | fallback | unavailable
    key: str | None  # the sticky key as privacy.user_id lets it be shown (hashed, or None)
    chosen: str | None  # the pick before any fallback to the baseline (or the lane)
    trusted: bool  # whether stage overrides and tags from this client are honoured
    segment: str | None = None  # the user segment that chose the release, if one did
    client: str | None = None  # the client address (behind routing.trusted_proxies)
    lane: str | None = None  # the lane the request is in (routing.lanes)
    peer: str | None = None  # the TCP peer explain was asked about

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "service": self.service,
            "release": self.release,
            "reason": self.reason,
            "key": self.key,
            "chosen": self.chosen,
            "trusted": self.trusted,
            "segment": self.segment,
        }
        # Only when they say something: a client address other than the peer, a lane.
        if self.client is not None and self.client != self.peer:
            out["client"] = self.client
        if self.lane is not None:
            out["lane"] = self.lane
        return out


def explain(
    snap: Snapshot,
    service: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    client_ip: str = "127.0.0.1",
    rng: random.Random | None = None,
    now: float = 0.0,
    path: str = "/",
    query: str = "",
    method: str = "GET",
    wall: float | None = None,
) -> Explanation:
    """The data path's decision for a request with these headers (handler.ProxyHandler).

    The same scan and the same `decide` as the data path (gateway/decide.py), on
    the same header bytes. `client_ip` is the TCP peer; `path`, `query` (the raw
    query string) and `method` matter only to segments; `path` is normalized as
    the data path does (gateway/paths.py; raises BadTarget); `wall` is the
    wall-clock time for their time windows (default: now).
    """
    sv = snap.services[service]
    at = time.time() if wall is None else wall
    raw = [(n.encode(), v.encode()) for n, v in headers]
    s = scan(raw, snap.stage_l, snap.user_l, snap.tag_l)
    path_b = normalize_path(path.encode())
    target = path_b + b"?" + query.encode() if query else path_b
    dec = decide(
        snap,
        sv,
        s,
        raw,
        path_b.decode("latin-1"),
        target,
        method.encode(),
        client_ip,
        now,
        lambda: at,
        rng or random.Random(),
    )
    if dec is None or dec.reason == REASON_REJECT:
        user = s.user or cookie_value(s.cookie, snap.config.routing.user_cookie)
        client = client_ip
        if s.forwarded_for is not None and snap.proxies_on:
            client = client_address(client_ip, s.forwarded_for, snap.proxies)
        return Explanation(
            service,
            None,
            REASON_UNAVAILABLE if dec is None else dec.reason,
            shown_user(snap, user),
            None if dec is None else dec.chosen,
            snap.trust.trusted(client),
            None,
            client,
            None if dec is None else dec.chosen,
            client_ip,
        )
    return Explanation(
        service,
        dec.release,
        dec.reason,
        shown_user(snap, dec.key),
        dec.chosen,
        dec.trusted or snap.trust.trusted(dec.client),
        dec.segment,
        dec.client,
        dec.lane,
        client_ip,
    )


@dataclass(frozen=True, slots=True)
class Preview:
    sample: int
    moved_share: float  # fraction of the sample whose release changes
    moves: dict[str, float]  # "from->to" -> fraction of the sample
    shares: dict[str, float]  # fraction per release after the change
    before: dict[str, float]  # fraction per release now

    def to_json(self) -> dict[str, object]:
        return {
            "sample": self.sample,
            "moved_share": self.moved_share,
            "moves": self.moves,
            "shares": self.shares,
            "before": self.before,
        }


def sample_key(i: int) -> str:
    """The i-th synthetic sticky key; tests send the same keys through the gateway."""
    return f"user-{i}"


Moves = Counter[tuple[str | None, str | None]]


def count_moves(old: WeightTable, new: WeightTable, start: int, stop: int, into: Moves) -> None:
    """Hash synthetic keys `start` to `stop` with both tables; count (old, new) pairs."""
    for i in range(start, stop):
        k = sample_key(i)
        into[(old.pick_hash(k), new.pick_hash(k))] += 1


def preview(old: WeightTable, new: WeightTable, sample: int = DEFAULT_SAMPLE) -> Preview:
    """Hash `sample` synthetic keys with both tables and count who moves where."""
    moves: Moves = Counter()
    count_moves(old, new, 0, sample, moves)
    return summarize(old, new, moves, sample)


def summarize(old: WeightTable, new: WeightTable, moves: Moves, sample: int) -> Preview:
    """The preview of `sample` keys whose moves `count_moves` counted."""
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    moved = 0
    out: dict[str, float] = {}
    for (a, b), n in sorted(moves.items(), key=lambda e: (str(e[0][0]), str(e[0][1]))):
        before[str(a)] += n
        after[str(b)] += n
        if a != b:
            moved += n
            out[f"{a}->{b}"] = n / sample
    names = [*new.names, *(n for n in old.names if n not in new.names)]
    return Preview(
        sample=sample,
        moved_share=moved / sample,
        moves=out,
        shares={n: after.get(n, 0) / sample for n in names},
        before={n: before.get(n, 0) / sample for n in names},
    )
