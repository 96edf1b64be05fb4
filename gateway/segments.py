"""User segments: ordered match rules that put a group of users on a release — pure policy.

Why compiled once: a service's `segments:` list is parsed and validated at config
load into small matcher objects (RE2 regexes, frozensets of user keys, parsed
networks, time windows with their zone), so a request pays only for reading its
own values: the header lines a rule names, its cookies and query string when a
rule needs them, each parsed once per request. README.md "Segments" documents
the matching rules.

Why RE2 (google-re2) and not `re`: a rule's regex runs on client-controlled
values; RE2 matches in time linear in the input, so no value (say `(a+)+$`
against 100 KB of `a`) can make matching slow, and patterns that need
backtracking (look-around, back-references) are refused at load time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import math
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import re2

from gateway.routing import SegmentRoute

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Values = list[str]

USER_SALT_ENV: Final = "GATEWAY_USER_SALT"
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order

# Value-test kinds (small ints: one comparison per test).
T_EXACT: Final = 0
T_PREFIX: Final = 1
T_REGEX: Final = 2
T_IN: Final = 3
T_PRESENT: Final = 4
T_ABSENT: Final = 5


def salted_hash(salt: str, key: str) -> str:
    """Hex SHA-256 of `salt + key`: how a `hashed: true` user file stores each key."""
    return hashlib.sha256((salt + key).encode()).hexdigest()


def compile_regex(pattern: str) -> Any:
    """An RE2 pattern object; raises ValueError (with RE2's reason) for a pattern RE2 refuses."""
    opts = re2.Options()
    opts.log_errors = False  # the config error names the field; no stderr noise
    try:
        return re2.compile(pattern, opts)
    except re2.error as e:
        why = e.args[0] if e.args else e
        raise ValueError(why.decode() if isinstance(why, bytes) else str(why)) from None


# --------------------------------------------------------------------------- one request


class Inputs:
    """What one request says, as the segments of its service need it (built by `gather`)."""

    __slots__ = (
        "headers",
        "cookies",
        "query",
        "path",
        "method",
        "client_ip",
        "user",
        "_wall",
        "_now",
        "_salt",
        "_hashed",
    )

    def __init__(
        self,
        headers: dict[str, Values],
        cookies: dict[str, Values] | None,
        query: dict[str, Values] | None,
        path: str,
        method: bytes,
        client_ip: str,
        user: str | None,
        wall: Callable[[], float],
    ) -> None:
        self.headers = headers  # lower-cased name -> values, only names some rule reads
        self.cookies = cookies
        self.query = query
        self.path = path
        self.method = method  # as sent: methods are case-sensitive (RFC 9110 §9.1)
        self.client_ip = client_ip
        self.user = user
        self._wall = wall  # wall clock, seconds since the epoch: read once, when a rule asks
        self._now = -1.0
        self._salt = ""  # the salt `_hashed` was computed with ("" = not yet)
        self._hashed = ""

    def now(self) -> float:
        """Wall-clock time for time windows, read at most once per request."""
        now = self._now
        if now < 0:
            now = self._now = self._wall()
        return now

    def hashed_user(self, user: str, salt: str) -> str:
        """salted_hash(salt, user), computed once per request however many lists ask."""
        if self._salt != salt:
            self._hashed = salted_hash(salt, user)
            self._salt = salt
        return self._hashed


_V4_MAPPED: Final = 0xFFFF << 32


def ip_number(addr: str) -> int:
    """An address as a 128-bit number in IPv6 space (IPv4-mapped for IPv4); -1 if invalid."""
    try:
        if ":" in addr:
            return int.from_bytes(socket.inet_pton(socket.AF_INET6, addr.partition("%")[0]))
        return _V4_MAPPED | int.from_bytes(socket.inet_pton(socket.AF_INET, addr))
    except (OSError, ValueError):
        return -1


def net_mask(net: Network) -> tuple[int, int]:
    """(network number, mask) in the IPv6 space of `ip_number`."""
    if isinstance(net, ipaddress.IPv4Network):
        bits = 96 + net.prefixlen
        base = _V4_MAPPED | int(net.network_address)
    else:
        bits = net.prefixlen
        base = int(net.network_address)
    mask = ((1 << bits) - 1) << (128 - bits)
    return base & mask, mask


def parse_cookies(lines: Sequence[str]) -> dict[str, Values]:
    """Every cookie pair of the Cookie lines (RFC 6265 §5.4), repeated names kept in order."""
    out: dict[str, Values] = {}
    for line in lines:
        for part in line.split(";"):
            k, sep, v = part.partition("=")
            if not sep:
                continue
            k = k.strip()
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            out.setdefault(k, []).append(v)
    return out


def parse_query(query: str) -> dict[str, Values]:
    """Query parameters, percent-decoded with `+` as a space (WHATWG URL, form encoding)."""
    out: dict[str, Values] = {}
    for k, v in parse_qsl(query, keep_blank_values=True, errors="replace"):
        out.setdefault(k, []).append(v)
    return out


# --------------------------------------------------------------------------- conditions


class ValueTest:
    """One test on the values of a header, cookie or query parameter: any value matching."""

    __slots__ = ("kind", "arg", "regex", "options", "negate")

    def __init__(
        self, kind: int, arg: str = "", *, regex: Any = None, options: frozenset[str] = frozenset()
    ) -> None:
        self.kind = kind
        self.arg = arg
        self.regex = regex
        self.options = options
        self.negate = False

    def test(self, values: Values | None) -> bool:
        kind = self.kind
        if kind == T_PRESENT:
            hit = values is not None
        elif kind == T_ABSENT:
            hit = values is None
        elif values is None:
            hit = False
        elif kind == T_EXACT:
            hit = self.arg in values
        elif kind == T_PREFIX:
            arg = self.arg
            hit = any(v.startswith(arg) for v in values)
        elif kind == T_IN:
            opts = self.options
            hit = any(v in opts for v in values)
        else:
            fullmatch = self.regex.fullmatch
            hit = any(fullmatch(v) is not None for v in values)
        return hit != self.negate


class Condition:
    """One `match:` entry; `test` is True when the request satisfies it."""

    __slots__ = ()

    def test(self, req: Inputs) -> bool:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


class HeaderCond(Condition):
    __slots__ = ("name", "vt")

    def __init__(self, name: str, vt: ValueTest) -> None:
        self.name = name  # lower-cased: header names are case-insensitive (RFC 9110 §5.1)
        self.vt = vt

    def test(self, req: Inputs) -> bool:
        return self.vt.test(req.headers.get(self.name))


class CookieCond(Condition):
    __slots__ = ("name", "vt")

    def __init__(self, name: str, vt: ValueTest) -> None:
        self.name = name
        self.vt = vt

    def test(self, req: Inputs) -> bool:
        c = req.cookies
        return self.vt.test(c.get(self.name) if c else None)


class QueryCond(Condition):
    __slots__ = ("name", "vt")

    def __init__(self, name: str, vt: ValueTest) -> None:
        self.name = name
        self.vt = vt

    def test(self, req: Inputs) -> bool:
        q = req.query
        return self.vt.test(q.get(self.name) if q else None)


class PathCond(Condition):
    __slots__ = ("vt",)

    def __init__(self, vt: ValueTest) -> None:
        self.vt = vt

    def test(self, req: Inputs) -> bool:
        vt = self.vt
        kind, path = vt.kind, req.path
        if kind == T_EXACT:
            hit = path == vt.arg
        elif kind == T_PREFIX:
            hit = path.startswith(vt.arg)
        else:
            hit = vt.regex.fullmatch(path) is not None
        return hit != vt.negate


class MethodCond(Condition):
    __slots__ = ("methods",)

    def __init__(self, methods: frozenset[str]) -> None:
        # Compared undecoded, one by one: a list names a few methods, and `==` on
        # bytes is cheaper than hashing the request's method for a set.
        self.methods = tuple(sorted(m.encode("latin-1") for m in methods))

    def test(self, req: Inputs) -> bool:
        method = req.method
        for m in self.methods:
            if m == method:
                return True
        return False


class UsersCond(Condition):
    """The sticky key is among the keys: O(1) per request however long the list.

    `keys` is a dict (values unused) so the cycle collector never walks it
    (gateway/segments_config.py, `_read_users`).
    """

    __slots__ = ("keys", "salt")

    def __init__(self, keys: dict[str, None], salt: str | None) -> None:
        self.keys = keys
        self.salt = salt  # None: raw keys; else the file holds salted_hash(salt, key)

    def test(self, req: Inputs) -> bool:
        u = req.user
        if not u:
            return False
        if self.salt is not None:
            u = req.hashed_user(u, self.salt)
        return u in self.keys


class CidrCond(Condition):
    """The client address is in one of the networks.

    Why integers and a memo: `ipaddress` parsing and membership cost ~10 µs a
    request; `inet_pton` and a mask compare a small fraction of that, and the
    answer per address string is kept (bounded: addresses come from clients).
    """

    __slots__ = ("nets", "_seen")

    def __init__(self, nets: tuple[Network, ...]) -> None:
        self.nets = tuple(net_mask(n) for n in nets)
        self._seen: dict[str, bool] = {}

    def contains(self, addr: str) -> bool:
        ip = ip_number(addr)
        if ip < 0:
            return False
        for base, mask in self.nets:
            if ip & mask == base:
                return True
        return False

    def test(self, req: Inputs) -> bool:
        addr = req.client_ip
        seen = self._seen
        hit = seen.get(addr)
        if hit is None:
            if len(seen) >= 4096:
                seen.clear()
            hit = seen[addr] = self.contains(addr)
        return hit


class TimeWindow(Condition):
    """A daily window in wall-clock time of a zone (`from` inclusive, `to` exclusive).

    Why minutes of local time: "22:00 Europe/Berlin" means what a Berlin clock
    shows, on either side of a daylight-saving change (zoneinfo applies the
    rules). `days` names the day on which the window opens, so a Friday 22:00 to
    06:00 window still holds at Saturday 05:59. `start == end` is 24 hours.
    The answer is kept for the current minute: every zone offset in use is a
    whole number of minutes, so it cannot change within one.
    """

    __slots__ = ("start", "end", "tz", "days", "_minute", "_hit")

    def __init__(self, start: int, end: int, tz: dt.tzinfo, days: frozenset[int]) -> None:
        self.start = start  # minutes after local midnight
        self.end = end
        self.tz = tz
        self.days = days  # datetime.weekday() numbers
        self._minute = -1  # the minute (since the epoch) `_hit` answers for
        self._hit = False

    def holds(self, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, self.tz)
        m = local.hour * 60 + local.minute
        day = local.weekday()
        start, end, days = self.start, self.end, self.days
        if start < end:
            return start <= m < end and day in days
        # wraps midnight, or (start == end) a whole day from `start`
        if m >= start:
            return day in days
        return m < end and (day - 1) % 7 in days

    def test(self, req: Inputs) -> bool:
        now = req.now()
        minute = math.floor(now / 60.0)
        if minute != self._minute:
            self._hit = self.holds(now)
            self._minute = minute
        return self._hit


# --------------------------------------------------------------------------- segments


GATE_NONE: Final = 0
GATE_HEADER: Final = 1
GATE_COOKIE: Final = 2
GATE_QUERY: Final = 3
# Header names up to this length are filtered by length before lower-casing.
_MAX_NAME: Final = 63
# Shared, never written: "no wanted header in this request" without a new dict.
_NO_VALUES: Final[dict[str, Values]] = {}


def _needs_value(vt: ValueTest) -> bool:
    """Whether the test can only hold when the field is present."""
    if vt.negate:
        return vt.kind == T_ABSENT
    return vt.kind != T_ABSENT


class Segment:
    """One named rule: every condition must hold; then `route` says where it goes."""

    __slots__ = ("name", "conds", "route", "sticky_header", "sticky_cookie", "gate", "gate_name")

    def __init__(
        self,
        name: str,
        conds: tuple[Condition, ...],
        route: SegmentRoute,
        sticky_header: str | None = None,
        sticky_cookie: str | None = None,
    ) -> None:
        self.name = name
        self.conds = conds
        self.route = route
        self.sticky_header = sticky_header  # lower-cased
        self.sticky_cookie = sticky_cookie
        # A header, cookie or query parameter the segment cannot match without: most
        # requests lack it, and one dict lookup then skips the segment.
        self.gate = GATE_NONE
        self.gate_name = ""
        for kind, cls in (
            (GATE_HEADER, HeaderCond),
            (GATE_COOKIE, CookieCond),
            (GATE_QUERY, QueryCond),
        ):
            for c in conds:
                if isinstance(c, cls) and _needs_value(c.vt):
                    self.gate, self.gate_name = kind, c.name
                    break
            if self.gate != GATE_NONE:
                break

    def matches(self, req: Inputs) -> bool:
        for c in self.conds:
            if not c.test(req):
                return False
        return True

    def key(self, req: Inputs) -> str | None:
        """The bucketing key of a weighted segment: `sticky_by`'s value, else the sticky key."""
        if self.sticky_header is not None:
            v = req.headers.get(self.sticky_header)
            return v[-1] if v else None
        if self.sticky_cookie is not None:
            c = req.cookies.get(self.sticky_cookie) if req.cookies else None
            return c[0] if c else None
        return req.user


class SegmentSet:
    """A service's segments in order (first match wins) and what they read from a request.

    Equal when built from the same document and the same user-file contents, so a
    reload that changes nothing compares equal.

    Why the precomputed scan: most header lines a request carries are not ones
    any rule names. `name_lens[n]` says whether some wanted name is `n` bytes
    long, so a line is lower-cased and looked up only when its length could
    match; a request whose lines name nothing wanted allocates nothing for them.
    A segment whose gate field is absent is skipped before anything else is
    built, and the rest (cookies, the query string, the per-request inputs) is
    parsed at most once, and only when a segment needs it.
    """

    __slots__ = (
        "segments",
        "header_names",
        "cookies",
        "query",
        "spec",
        "doc",
        "name_lens",
        "scan",
    )

    def __init__(self, segments: tuple[Segment, ...], spec: object, doc: object = None) -> None:
        self.segments = segments
        self.doc = doc  # the `segments:` list as written (config or admin API), for GET
        names: set[str] = set()
        cookies = query = False
        for s in segments:
            if s.sticky_header is not None:
                names.add(s.sticky_header)
            cookies = cookies or s.sticky_cookie is not None
            for c in s.conds:
                if isinstance(c, HeaderCond):
                    names.add(c.name)
                cookies = cookies or isinstance(c, CookieCond)
                query = query or isinstance(c, QueryCond)
        self.header_names = frozenset(n.encode("latin-1") for n in names)
        self.cookies = cookies
        self.query = query
        self.spec = spec
        lens = bytearray(_MAX_NAME + 1)
        for n in self.header_names:
            if len(n) <= _MAX_NAME:
                lens[len(n)] = 1
        if cookies:
            lens[len(b"cookie")] = 1
        self.name_lens = bytes(lens)
        # Names longer than _MAX_NAME: rare; then every line is looked at.
        self.scan = (
            2
            if any(len(n) > _MAX_NAME for n in self.header_names)
            else int(bool(self.header_names) or cookies)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SegmentSet) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(len(self.segments))

    def __repr__(self) -> str:
        return f"SegmentSet({[s.name for s in self.segments]!r})"

    def evaluate(
        self,
        headers: list[tuple[bytes, bytes]],
        path: str,
        target: bytes,
        method: bytes,
        client_ip: str,
        user: str | None,
        wall: Callable[[], float],
    ) -> tuple[SegmentRoute, str | None] | None:
        """The first matching segment's route and bucketing key; None when no segment matches.

        The data path (gateway/handler.py) and explain (gateway/preview.py) both
        call this, then `routing.choose_release`, so explain answers exactly what
        the data path does.
        """
        got = _NO_VALUES
        cookie_lines: list[str] | None = None
        scan = self.scan
        if scan:
            lens = self.name_lens
            want = self.header_names
            cookies = self.cookies
            for name, value in headers:
                n = len(name)
                if scan == 1 and (n > _MAX_NAME or not lens[n]):
                    continue
                low = name.lower()
                if low in want:
                    if got is _NO_VALUES:
                        got = {}
                    got.setdefault(low.decode("latin-1"), []).append(value.decode("latin-1"))
                elif cookies and low == b"cookie":
                    if cookie_lines is None:
                        cookie_lines = []
                    cookie_lines.append(value.decode("latin-1"))
        jar = parse_cookies(cookie_lines) if cookie_lines is not None else None
        query = None
        # An int needle (63 is "?"): CPython's bytes `in` tries a bytes needle as an
        # integer first and clears the TypeError; an int is a plain memchr.
        if self.query and 63 in target:
            query = parse_query(target[target.find(b"?") + 1 :].decode("latin-1"))
        req: Inputs | None = None
        for s in self.segments:
            gate = s.gate
            if gate != GATE_NONE:
                if gate == GATE_HEADER:
                    if got is _NO_VALUES or s.gate_name not in got:
                        continue
                elif gate == GATE_COOKIE:
                    if jar is None or s.gate_name not in jar:
                        continue
                elif query is None or s.gate_name not in query:
                    continue
            if req is None:
                req = Inputs(got, jar, query, path, method, client_ip, user, wall)
            for c in s.conds:  # Segment.matches, inline: no call per segment
                if not c.test(req):
                    break
            else:
                return s.route, s.key(req)
        return None
