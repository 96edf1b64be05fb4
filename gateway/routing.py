"""Choosing the service and the release for a request — pure policy (README "How routing decides").

Why weighted rendezvous hashing: each release r scores a key k with
``ln(u_r(k)) / w_r`` where ``u_r(k)`` is a uniform hash in (0, 1); the highest
score wins. ``-ln(u)/w`` is exponential with rate ``w``, so release r wins with
probability ``w_r / Σw`` (exact shares), the score depends only on the key,
the salt and r's own weight (sticky on every worker and replica, no state),
and changing one release's weight moves keys only into or out of that release
(monotone). Cumulative bucket ranges have the first two properties, not the
third.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import mmh3

if TYPE_CHECKING:  # a plain int at run time; an unboxed int64 in the compiled build
    from mypy_extensions import i64

_TWO64: Final = float(2**64)
# The 128-bit x64 MurmurHash3 as 16 little-endian bytes (mmh3 byte-swaps on big-endian
# machines): its first 8 are `hash64`'s first value. One bytes object per call instead of
# hash64's tuple of two integers (built from a format string), and a C static here.
_HASH_BYTES: Final = mmh3.hash_bytes
# The same function, taking the seed as the int object WeightTable keeps: compiled, a seed
# read as `int` is unboxed and then boxed again (a new int object) for every call.
_HASH_BYTES_SEEDED: Final = cast("Callable[[str, object], bytes]", mmh3.hash_bytes)

REASON_HEADER: Final = "header"
REASON_COOKIE: Final = "cookie"
REASON_HASH: Final = "hash"
REASON_RANDOM: Final = "random"
REASON_FALLBACK: Final = "fallback"
REASON_SEGMENT: Final = "segment"
REASON_TAG: Final = "tag"
REASON_LANE: Final = "lane"
REASON_REJECT: Final = "lane_unavailable"  # routing.lane_fallback: reject (a 503)


# The mmh3 seed that turns (salt, release) into each release's own hash seed. Any constant
# works (this one is the 32-bit golden ratio, a customary hash constant), but it is part of
# every user's assignment: changing it reshuffles every sticky user of every service, on
# every replica, at once (docs/routing.md, "The salt and the seed").
RELEASE_SEED_HASH_SEED: Final = 0x9E3779B9


def release_seed(salt: str, release: str) -> int:
    """Per-(service salt, release) 32-bit seed so each release hashes keys independently."""
    return int(mmh3.hash(f"{salt}\x1f{release}", RELEASE_SEED_HASH_SEED, signed=False))


def hrw_score(key: str, seed: int, inv_weight: float) -> float:
    """ln(u)/w for one release; u in (0, 1) from the key's 64-bit mmh3 hash."""
    d = _HASH_BYTES(key, seed)
    return _halves_score(_le32(d[4], d[5], d[6], d[7]), _le32(d[0], d[1], d[2], d[3]), inv_weight)


def _le32(b0: i64, b1: i64, b2: i64, b3: i64) -> i64:
    """Four bytes, least significant first, as an unsigned 32-bit value.

    Why `i64` parameters: compiled, each byte is unboxed once at the call and the
    shifts and ors are machine arithmetic (on `int`, each is a tagged-integer call).
    """
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


def _score(h: i64, inv_weight: float) -> float:
    """ln((float(h mod 2**64) + 0.5) / 2**64) * inv_weight, for a signed 64-bit hash `h`.

    Why the two halves: float(unsigned h) must be exactly what it has always been (one
    correct rounding of the unsigned value; a changed score would move users;
    README "How routing decides": sticky across restarts). hi * 2**32 and lo are exact doubles and
    IEEE addition rounds their exact sum once, so this equals float(h + 2**64) for a negative h,
    without the
    big integer (which in the compiled build is a heap object and slow arithmetic).
    """
    return _halves_score((h >> 32) & 0xFFFFFFFF, h & 0xFFFFFFFF, inv_weight)


def _halves_score(hi: i64, lo: i64, inv_weight: float) -> float:
    """`_score` of the unsigned hash hi * 2**32 + lo, given as its two 32-bit halves."""
    return math.log((float(hi) * 4294967296.0 + float(lo) + 0.5) / _TWO64) * inv_weight


class HashEntry:
    """A live release as `WeightTable` picks it: name, hash seed, 1/weight.

    Why a class and not a tuple: compiled, its attributes are typed fields (the
    1/weight a C double), where a tuple is checked, unpacked and its float
    unboxed per release per request.
    """

    __slots__ = ("name", "seed", "inv")

    def __init__(self, name: str, seed: object, inv: float) -> None:
        self.name = name
        self.seed = seed  # an int, kept as the object mmh3 takes (_HASH_BYTES_SEEDED)
        self.inv = inv


@dataclass(frozen=True, slots=True)
class WeightTable:
    """A service's releases and weights, precomputed once per snapshot."""

    names: tuple[str, ...]  # every release, config order
    raw: Mapping[str, float]
    shares: Mapping[str, float]  # normalized, sum to 1
    _live: tuple[HashEntry, ...]  # the releases of weight > 0, config order
    _cum: tuple[float, ...]  # cumulative shares for random picks

    @classmethod
    def build(cls, salt: str, weights: Mapping[str, float]) -> WeightTable:
        """Shares and hash entries from raw weights; share > 0 exactly when the hash can pick.

        Why scale by the largest weight when the sum overflows: the sum of two
        huge weights is inf, which would make every share 0. Why a release whose 1/weight
        is not finite gets no share: its hash score is -inf, so the hash could
        never pick it. The store and config bound weights (gateway/statedoc.py)
        so neither happens to legal values; this keeps the two views in step anyway.
        """
        names = tuple(weights)
        live_w = {
            n: float(w)
            for n, w in weights.items()
            if w > 0 and math.isfinite(w) and math.isfinite(1.0 / w)
        }
        scaled = live_w
        total = float(sum(scaled.values()))
        if math.isinf(total):
            top = max(live_w.values())
            scaled = {n: w / top for n, w in live_w.items()}
            total = float(sum(scaled.values()))
        shares = {n: (scaled[n] / total if n in scaled else 0.0) for n in names}
        live = tuple(
            HashEntry(n, release_seed(salt, n), 1.0 / live_w[n]) for n in names if n in live_w
        )
        cum: list[float] = []
        acc = 0.0
        for e in live:
            acc += shares[e.name]
            cum.append(acc)
        return cls(names, dict(weights), shares, live, tuple(cum))

    def pick_hash(self, key: str) -> str | None:
        """The release for a sticky key (None when every weight is zero)."""
        best: str | None = None
        best_score = -math.inf
        # hrw_score per live release, inline: this runs once per request per live release.
        for e in self._live:
            d = _HASH_BYTES_SEEDED(key, e.seed)
            s = _halves_score(_le32(d[4], d[5], d[6], d[7]), _le32(d[0], d[1], d[2], d[3]), e.inv)
            if s > best_score:
                best_score = s
                best = e.name
        return best

    def pick_random(self, rng: random.Random) -> str | None:
        """A weighted random release for a request without a key."""
        if not self._live:
            return None
        x = rng.random()
        for e, c in zip(self._live, self._cum, strict=True):
            if x < c:
                return e.name
        return self._live[-1].name


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """Value of one cookie from a Cookie header (RFC 6265 §5.4 pairs separated by ';')."""
    if not cookie_header:
        return None
    idx = cookie_header.find(name)
    if idx < 0:
        return None
    for part in cookie_header.split(";"):
        k, sep, v = part.partition("=")
        if sep and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            return v
    return None


class TrustPolicy:
    """Whether a client may force a release with the stage header or cookie."""

    __slots__ = ("_all", "_nets")

    def __init__(
        self, trust: bool | Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
    ) -> None:
        self._all = trust if isinstance(trust, bool) else None
        self._nets = () if isinstance(trust, bool) else tuple(trust)

    def trusted(self, client_ip: str) -> bool:
        if self._all is not None:
            return self._all
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._nets)


class SegmentRoute:
    """Where a matched user segment sends its requests (gateway/segments.py matches them).

    Either one fixed `release`, or the segment's own split `table` (salted
    `<service>/<segment>`, so it is independent of the service's split) keyed by
    the segment's bucketing key. `keyed_by_user`: that key is the sticky key
    (no `sticky_by`), so a minted sticky cookie can key it too.
    """

    __slots__ = ("name", "release", "table", "keyed_by_user")

    def __init__(
        self, name: str, release: str | None, table: WeightTable | None, keyed_by_user: bool
    ) -> None:
        self.name = name
        self.release = release
        self.table = table
        self.keyed_by_user = keyed_by_user

    def __repr__(self) -> str:
        return f"SegmentRoute({self.name!r}, {self.release!r})"


class Decision:
    """Which release serves a request, and why (the answer `explain` gives).

    A plain slotted class: a dataclass __init__ (frozen or not) costs ~0.3 µs more
    and stays interpreted in the compiled build. The handler fills one per request
    (choose_release's `into`, `refill`).
    """

    __slots__ = (
        "release",
        "reason",
        "key",
        "chosen",
        "set_cookie",
        "segment",
        "client",
        "trusted",
        "lane",
        "strip_tag",
        "strip_baggage",
    )

    release: str  # the release that serves the request
    reason: str  # header | cookie | hash | random | fallback
    key: str | None  # the sticky key used, if any
    chosen: str  # the release picked before any fallback
    set_cookie: str | None  # a fresh sticky uid to hand to the client
    segment: str | None  # the user segment that chose `chosen`, if one did
    # Set by gateway/decide.py, which reads the request:
    client: str  # the client address (routing.trusted_proxies)
    trusted: bool  # stage header, cookie and tag header honoured
    lane: str | None  # the lane to keep in the baggage passed on
    strip_tag: bool  # remove the tag header before forwarding (untrusted)
    strip_baggage: bool  # remove an incoming gray.tag member (untrusted)

    def __init__(
        self,
        release: str,
        reason: str,
        key: str | None,
        chosen: str,
        set_cookie: str | None = None,
        segment: str | None = None,
    ) -> None:
        self.refill(release, reason, key, chosen, set_cookie, segment)

    def refill(
        self,
        release: str,
        reason: str,
        key: str | None,
        chosen: str,
        set_cookie: str | None,
        segment: str | None,
    ) -> None:
        """Every field as `Decision(...)` gives it (headers.Scanned.refill says why a method)."""
        self.release = release
        self.reason = reason
        self.key = key
        self.chosen = chosen
        self.set_cookie = set_cookie
        self.segment = segment
        self.client = ""
        self.trusted = False
        self.lane = None
        self.strip_tag = False
        self.strip_baggage = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (
            self.release,
            self.reason,
            self.key,
            self.chosen,
            self.set_cookie,
            self.segment,
        ) == (
            other.release,
            other.reason,
            other.key,
            other.chosen,
            other.set_cookie,
            other.segment,
        )

    def __repr__(self) -> str:
        return f"Decision({self.release!r}, {self.reason!r}, {self.key!r}, {self.chosen!r})"


def _decision(
    into: Decision | None,
    release: str,
    reason: str,
    key: str | None,
    chosen: str,
    set_cookie: str | None = None,
    segment: str | None = None,
) -> Decision:
    """`Decision(...)`, or `into` given exactly the fields a new one would have.

    Why: the handler decides one request at a time and keeps no Decision past it, so
    it passes the same one for every request (ProxyHandler): no 11-field object made
    and freed per request.
    """
    if into is None:
        return Decision(release, reason, key, chosen, set_cookie, segment)
    into.refill(release, reason, key, chosen, set_cookie, segment)
    return into


def choose_release(
    table: WeightTable,
    *,
    baseline: str,
    available: frozenset[str],
    stage_header: str | None,
    stage_cookie: str | None,
    user_key: str | None,
    trusted: bool,
    rng: random.Random,
    mint_uid: bool = False,
    segment: SegmentRoute | None = None,
    segment_key: str | None = None,
    tag: str | None = None,
    lane: str | None = None,
    lane_unserved: str | None = None,
    lane_reject: bool = False,
    tripped: frozenset[str] = frozenset(),
    into: Decision | None = None,
) -> Decision | None:
    """In order: trusted header, trusted cookie, tag, lane, user segment, sticky key, random.

    `available` are the releases that have a healthy endpoint now; a chosen
    release outside it falls back to the baseline. None: nothing can serve.
    `segment` is the first segment the request matched (README "Segments"), and
    `segment_key` its bucketing key (its `sticky_by` value, else the sticky key).
    `tag` / `lane` are the release a trusted colouring tag or lane names
    (gateway/decide.py reads them); `lane_unserved` a trusted lane no release
    here serves: the baseline serves it as a fallback, or with `lane_reject`
    the answer is REASON_REJECT (a 503). A release in `tripped` (its rollout is in
    CircuitBreak or RolledBack) is reached only by the stage header and cookie:
    a tag, lane or segment naming it is served by the baseline as a fallback.
    `into`: a Decision to fill afresh instead of making one (`_decision`).
    """
    release: str | None = None
    reason = REASON_HASH
    key = user_key or None
    new_uid: str | None = None
    seg_name: str | None = None
    if trusted and stage_header and stage_header in table.raw:
        release, reason = stage_header, REASON_HEADER
    elif trusted and stage_cookie and stage_cookie in table.raw:
        release, reason = stage_cookie, REASON_COOKIE
    elif tag is not None:
        release, reason = tag, REASON_TAG
    elif lane is not None:
        release, reason = lane, REASON_LANE
    elif lane_unserved is not None:
        if lane_reject:
            return _decision(into, "", REASON_REJECT, key, lane_unserved)
        if baseline in available:
            return _decision(into, baseline, REASON_FALLBACK, key, lane_unserved)
        return None
    elif segment is not None:
        seg_name, reason = segment.name, REASON_SEGMENT
        st = segment.table
        if segment.release is not None or st is None:
            release = segment.release
        elif segment_key:
            release = st.pick_hash(segment_key)
        elif mint_uid and segment.keyed_by_user:
            new_uid = f"{rng.getrandbits(128):032x}"
            release, key = st.pick_hash(new_uid), new_uid
        else:
            release = st.pick_random(rng)
    elif key is not None:
        release = table.pick_hash(key)
    elif mint_uid:
        # Route the first request by the hash of the uid we hand out, so the
        # next request (which carries it) lands on the same release.
        new_uid = f"{rng.getrandbits(128):032x}"
        release, reason, key = table.pick_hash(new_uid), REASON_RANDOM, new_uid
    else:
        release, reason = table.pick_random(rng), REASON_RANDOM
    if release is None:
        release = baseline
    elif (
        tripped
        and release in tripped
        and (reason == REASON_TAG or reason == REASON_LANE or reason == REASON_SEGMENT)
    ):
        if baseline in available:
            return _decision(into, baseline, REASON_FALLBACK, key, release, new_uid, seg_name)
        return None
    if release in available:
        return _decision(into, release, reason, key, release, new_uid, seg_name)
    if baseline in available:
        return _decision(into, baseline, REASON_FALLBACK, key, release, new_uid, seg_name)
    return None


# --------------------------------------------------------------------------- service match


def _prefix_ok(path: str, prefix: str) -> bool:
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


class ServiceMatcher:
    """Host + longest path prefix -> service: exact host > wildcard > any.

    README "How routing decides".
    """

    __slots__ = ("_exact", "_wild", "_any", "_any_root", "_cache", "_by_host")

    def __init__(self, services: Iterable[tuple[str, Sequence[str], str]]) -> None:
        exact: dict[str, list[tuple[str, str]]] = {}
        wild: dict[str, list[tuple[str, str]]] = {}
        anyhost: list[tuple[str, str]] = []
        for name, hosts, prefix in services:
            if not hosts:
                anyhost.append((prefix, name))
            for h in hosts:
                h = h.lower()
                if h.startswith("*."):
                    wild.setdefault(h[1:], []).append((prefix, name))
                else:
                    exact.setdefault(h, []).append((prefix, name))

        def order(v: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
            return tuple(sorted(v, key=lambda e: -len(e[0])))

        self._exact = {h: order(v) for h, v in exact.items()}
        # Longer wildcard suffixes are more specific: try them first.
        self._wild = tuple(
            sorted(((s, order(v)) for s, v in wild.items()), key=lambda e: -len(e[0]))
        )
        anyhost_ordered = order(anyhost)
        # The any-host service at "/", the last one tried, apart: `_prefix_ok(path, "/")`
        # is `path.startswith("/")`, so no loop step and call for it per request.
        root = anyhost_ordered[-1] if anyhost_ordered and anyhost_ordered[-1][0] == "/" else None
        self._any = anyhost_ordered[:-1] if root is not None else anyhost_ordered
        self._any_root = root[1] if root is not None else None
        self._cache: dict[str, str] = {}
        self._by_host = bool(exact or wild)  # does any service name hosts?

    def match_field(self, host: bytes | None, path: str) -> str | None:
        """`match` for the Host field as received: decoded only when a service names hosts."""
        if host is None or not self._by_host:
            return self.match(None, path)
        return self.match(host.decode("latin-1"), path)

    def match(self, host: str | None, path: str) -> str | None:
        if self._by_host and host:
            cache = self._cache
            h = cache.get(host)
            if h is None:
                if len(cache) > 4096:  # bounded: Host values come from clients
                    cache.clear()
                h = cache[host] = normalize_host(host)
        else:
            h = ""
        if h:
            cand = self._exact.get(h)
            if cand:
                for prefix, name in cand:
                    if _prefix_ok(path, prefix):
                        return name
            for suffix, cand2 in self._wild:
                if h.endswith(suffix) and len(h) > len(suffix):
                    for prefix, name in cand2:
                        if _prefix_ok(path, prefix):
                            return name
        for prefix, name in self._any:
            if _prefix_ok(path, prefix):
                return name
        # `path[0] == "/"` (after a length test) is `path.startswith("/")`; compiled, the
        # character is a cached string and a compare, where a one-character slice goes
        # through the generic substring and `startswith` through the generic tail match.
        if self._any_root is not None and len(path) != 0 and path[0] == "/":
            return self._any_root
        return None


def normalize_host(host: str | None) -> str:
    """Lower-case Host without its port (RFC 9110 §7.2)."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host[colon + 1 :].isdigit():
        host = host[:colon]
    return host.rstrip(".")
