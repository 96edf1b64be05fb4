"""Explain and preview: what the data path does for a request, and what a change would move.

Why reuse `routing.choose_release` and the snapshot's own tables: an
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

from gateway.paths import normalize_path
from gateway.routing import WeightTable, choose_release, cookie_value
from gateway.state import Snapshot, live_releases

REASON_UNAVAILABLE = "unavailable"
DEFAULT_SAMPLE = 100_000
MAX_SAMPLE = 1_000_000


@dataclass(frozen=True, slots=True)
class Explanation:
    service: str
    release: str | None  # None: no release can serve (the data path answers 503)
    reason: str  # header | cookie | hash | random | fallback | unavailable
    key: str | None
    chosen: str | None  # the pick before any fallback to the baseline
    trusted: bool  # whether stage overrides from this client are honoured
    segment: str | None = None  # the user segment that chose the release, if one did

    def to_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "release": self.release,
            "reason": self.reason,
            "key": self.key,
            "chosen": self.chosen,
            "trusted": self.trusted,
            "segment": self.segment,
        }


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

    `path`, `query` (the raw query string) and `method` matter only to segments;
    `path` is normalized as the data path does (gateway/paths.py; raises BadTarget);
    `wall` is the wall-clock time for their time windows (default: now).
    """
    sv = snap.services[service]
    rc = snap.config.routing
    stage_n, user_n = rc.stage_header.lower(), rc.user_header.lower()
    stage: str | None = None
    user: str | None = None
    cookies: list[str] = []
    for name, value in headers:  # like headers.scan: the last occurrence wins
        n = name.lower()
        if n == "cookie":
            cookies.append(value)
        elif n == stage_n:
            stage = value.strip()
        elif n == user_n:
            user = value.strip() or None
    cookie = "; ".join(cookies) if cookies else None
    stage_cookie = cookie_value(cookie, rc.stage_cookie)
    user_cookie = cookie_value(cookie, rc.user_cookie) if user is None else None
    trusted = snap.trust.trusted(client_ip)
    hit = None
    if sv.cfg.segments is not None:  # the data path's own function, on the same bytes
        at = time.time() if wall is None else wall
        path_b = normalize_path(path.encode())
        target = path_b + b"?" + query.encode() if query else path_b
        hit = sv.cfg.segments.evaluate(
            [(n.encode(), v.encode()) for n, v in headers],
            path_b.decode("latin-1"),
            target,
            method.encode(),
            client_ip,
            user or user_cookie,
            lambda: at,
        )
    dec = choose_release(
        sv.table,
        baseline=sv.cfg.baseline,
        available=live_releases(sv, now),
        stage_header=stage,
        stage_cookie=stage_cookie,
        user_key=user or user_cookie,
        trusted=trusted,
        rng=rng or random.Random(),
        mint_uid=rc.sticky_cookie,
        segment=hit[0] if hit is not None else None,
        segment_key=hit[1] if hit is not None else None,
    )
    if dec is None:
        seg = hit[0].name if hit is not None else None
        return Explanation(
            service, None, REASON_UNAVAILABLE, user or user_cookie, None, trusted, seg
        )
    return Explanation(service, dec.release, dec.reason, dec.key, dec.chosen, trusted, dec.segment)


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


def preview(old: WeightTable, new: WeightTable, sample: int = DEFAULT_SAMPLE) -> Preview:
    """Hash `sample` synthetic keys with both tables and count who moves where."""
    moves: Counter[tuple[str | None, str | None]] = Counter()
    for i in range(sample):
        k = sample_key(i)
        moves[(old.pick_hash(k), new.pick_hash(k))] += 1
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
