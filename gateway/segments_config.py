"""Parsing and validating `services.<s>.segments` into gateway/segments.py's matchers.

Why apart from the matchers: this runs once per config load (and names every
wrong field, as the rest of gateway/config.py does); the matchers run per
request. README.md "Segments" documents the fields.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway import files
from gateway.routing import SegmentRoute, WeightTable
from gateway.segments import (
    DAYS,
    T_ABSENT,
    T_EXACT,
    T_IN,
    T_PREFIX,
    T_PRESENT,
    T_REGEX,
    USER_SALT_ENV,
    CidrCond,
    Condition,
    CookieCond,
    HeaderCond,
    MethodCond,
    Network,
    PathCond,
    QueryCond,
    Segment,
    SegmentSet,
    TimeWindow,
    UsersCond,
    ValueTest,
    compile_regex,
)

AddError = Callable[[str, str], None]

_MATCH_KEYS: Final = ("header", "cookie", "query", "path", "method", "users", "cidrs", "time")
_SEGMENT_KEYS: Final = frozenset({"name", "match", "release", "weights", "sticky_by"})
_VALUE_KINDS: Final = ("exact", "prefix", "regex", "in", "present", "absent", "not")


def _value_test(v: object, path: str, add: AddError, *, allow_presence: bool = True) -> ValueTest:
    """`"x"` | {exact|prefix|regex|in|present|absent: …} | {not: <any of these>}."""
    if isinstance(v, str):
        return ValueTest(T_EXACT, v)
    if not isinstance(v, Mapping) or len(v) != 1:
        add(path, f"must be a string or a mapping with one of: {', '.join(_VALUE_KINDS)}")
        return ValueTest(T_ABSENT)
    ((k, arg),) = v.items()
    p = f"{path}.{k}"
    if k == "not":
        vt = _value_test(arg, p, add, allow_presence=allow_presence)
        vt.negate = not vt.negate
        return vt
    if k in ("exact", "prefix", "regex"):
        if not isinstance(arg, str):
            add(p, "must be a string (quote YAML numbers and booleans)")
            return ValueTest(T_ABSENT)
        if k == "exact":
            return ValueTest(T_EXACT, arg)
        if k == "prefix":
            return ValueTest(T_PREFIX, arg)
        try:
            return ValueTest(T_REGEX, arg, regex=compile_regex(arg))
        except ValueError as e:
            add(p, f"not an RE2 pattern: {e}")
            return ValueTest(T_ABSENT)
    if k == "in":
        if not isinstance(arg, list) or not arg or not all(isinstance(x, str) for x in arg):
            add(p, "must be a non-empty list of strings")
            return ValueTest(T_ABSENT)
        return ValueTest(T_IN, options=frozenset(arg))
    if k in ("present", "absent") and allow_presence:
        if arg is not True:
            add(p, "must be true (wrap it in `not:` for the opposite)")
        return ValueTest(T_PRESENT if k == "present" else T_ABSENT)
    add(path, f"unknown test {k!r} (one of: {', '.join(_VALUE_KINDS)})")
    return ValueTest(T_ABSENT)


def _named(
    raw: object,
    path: str,
    add: AddError,
    make: Callable[[str, ValueTest], Condition],
    *,
    header: bool = False,
) -> list[Condition]:
    if not isinstance(raw, Mapping) or not raw:
        add(path, "must be a mapping of name -> test")
        return []
    out: list[Condition] = []
    for name, v in raw.items():
        p = f"{path}.{name}"
        if not isinstance(name, str) or not name:
            add(p, "name must be a non-empty string")
            continue
        if header and not _is_token(name):
            add(p, "not a valid header name")
            continue
        out.append(make(name.lower() if header else name, _value_test(v, p, add)))
    return out


def _is_token(name: str) -> bool:
    # RFC 9110 §5.6.2 tchar
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name)


def _clock(v: object, path: str, add: AddError) -> int:
    """'HH:MM' -> minutes after midnight."""
    if isinstance(v, str):
        hh, sep, mm = v.partition(":")
        if sep and hh.isdigit() and mm.isdigit() and len(mm) == 2:
            h, m = int(hh), int(mm)
            if 0 <= h <= 23 and 0 <= m <= 59:
                return h * 60 + m
    add(path, 'must be a quoted "HH:MM" time between "00:00" and "23:59"')
    return 0


def _time(raw: object, path: str, add: AddError) -> TimeWindow | None:
    if not isinstance(raw, Mapping):
        add(path, "must be a mapping {from, to, tz, days}")
        return None
    for k in raw:
        if k not in ("from", "to", "tz", "days"):
            add(f"{path}.{k}", "unknown field")
    for k in ("from", "to"):
        if k not in raw:
            add(f"{path}.{k}", 'is required ("HH:MM")')
    start = _clock(raw.get("from", "00:00"), f"{path}.from", add)
    end = _clock(raw.get("to", "00:00"), f"{path}.to", add)
    tzname = raw.get("tz", "UTC")
    tz: dt.tzinfo = dt.UTC
    if not isinstance(tzname, str) or not tzname:
        add(f"{path}.tz", "must be an IANA time zone name such as Europe/Berlin")
    else:
        try:
            tz = ZoneInfo(tzname)
        except (ZoneInfoNotFoundError, ValueError):
            add(f"{path}.tz", f"unknown time zone {tzname!r} (an IANA name such as Europe/Berlin)")
    days = frozenset(range(7))
    if "days" in raw:
        d = raw["days"]
        if (
            not isinstance(d, list)
            or not d
            or not all(isinstance(x, str) and x.lower() in DAYS for x in d)
        ):
            add(f"{path}.days", f"must be a non-empty list of: {', '.join(DAYS)}")
        else:
            days = frozenset(DAYS.index(x.lower()) for x in d)
    return TimeWindow(start, end, tz, days)


def _read_users(
    raw: object, path: str, add: AddError, base_dir: Path, salt: str | None
) -> tuple[dict[str, None], str | None, object] | None:
    """(keys, salt for hashed keys, what equality compares) or None after an error.

    Why a dict of keys and not a frozenset: CPython's cycle collector tracks
    every set and walks all of its entries on each full collection (a million
    keys: ~85 M instructions, tens of milliseconds of pause that land on
    whichever request allocates at that moment), while a dict that holds only
    strings is left untracked. Membership costs the same.
    """
    if isinstance(raw, list):
        if not raw or not all(isinstance(u, str) and u for u in raw):
            add(path, "must be a non-empty list of strings, or {file, hashed}")
            return None
        keys = dict.fromkeys(raw)
        return keys, None, keys
    if not isinstance(raw, Mapping):
        add(path, "must be a list of user keys or {file: PATH, hashed: false}")
        return None
    for k in raw:
        if k not in ("file", "hashed"):
            add(f"{path}.{k}", "unknown field")
    f = raw.get("file")
    hashed = raw.get("hashed", False)
    if not isinstance(hashed, bool):
        add(f"{path}.hashed", "must be true or false")
        return None
    if not isinstance(f, str) or not f:
        add(f"{path}.file", "is required (a path, relative to the config file's directory)")
        return None
    if hashed and not salt:
        add(f"{path}.hashed", f"needs the salt in env {USER_SALT_ENV}")
        return None
    p = Path(f)
    if not p.is_absolute():
        p = base_dir / p
    try:
        text = files.read_text(p)
    except (OSError, UnicodeDecodeError) as e:
        add(f"{path}.file", f"cannot read {str(p)!r}: {getattr(e, 'strerror', None) or e}")
        return None
    # C-speed passes only (map over str methods, one split, one hex decode): a
    # million keys must load in well under 2 s.
    if hashed:
        keys = dict.fromkeys(text.lower().split())  # hex digests hold no blanks
        bad: str | None = None
        if keys and set(map(len, keys)) != {64}:
            bad = next(k for k in keys if len(k) != 64)
        elif keys:
            try:
                bytes.fromhex("".join(keys))  # every digit is hex
            except ValueError:
                bad = next(k for k in keys if not _is_hex(k))
        if bad is not None:
            add(f"{path}.file", f"hashed: every line must be 64 hex digits (SHA-256), got {bad!r}")
            return None
    else:
        keys = dict.fromkeys(map(str.strip, text.splitlines()))
        keys.pop("", None)
    if not keys:
        add(f"{path}.file", f"{str(p)!r} holds no user keys")
        return None
    return keys, (salt if hashed else None), keys


def _is_hex(k: str) -> bool:
    try:
        bytes.fromhex(k)
    except ValueError:
        return False
    return True


def _conditions(
    m: Mapping[str, Any], path: str, add: AddError, base_dir: Path, salt: str | None
) -> tuple[list[Condition], list[object]]:
    """The match's conditions, cheapest first, and the parts equality compares."""
    conds: list[Condition] = []
    extra: list[object] = []
    for k in m:
        if k not in _MATCH_KEYS:
            add(f"{path}.{k}", f"unknown match key (one of: {', '.join(_MATCH_KEYS)})")
    if "method" in m:
        ms = m["method"]
        if not isinstance(ms, list) or not ms or not all(isinstance(x, str) and x for x in ms):
            add(f"{path}.method", "must be a non-empty list of methods such as [GET, HEAD]")
        else:
            conds.append(MethodCond(frozenset(x.upper() for x in ms)))
    if "path" in m:
        raw = m["path"]
        p = f"{path}.path"
        if (
            not isinstance(raw, Mapping)
            or len(raw) != 1
            or next(iter(raw))
            not in (
                "exact",
                "prefix",
                "regex",
            )
        ):
            add(p, "must be one of {exact: /p}, {prefix: /p}, {regex: RE2}")
        else:
            conds.append(PathCond(_value_test(raw, p, add)))
    if "header" in m:
        conds += _named(m["header"], f"{path}.header", add, HeaderCond, header=True)
    if "cookie" in m:
        conds += _named(m["cookie"], f"{path}.cookie", add, CookieCond)
    if "query" in m:
        conds += _named(m["query"], f"{path}.query", add, QueryCond)
    if "users" in m:
        got = _read_users(m["users"], f"{path}.users", add, base_dir, salt)
        if got is not None:
            conds.append(UsersCond(got[0], got[1]))
            extra.append(got[2])
    if "cidrs" in m:
        raw = m["cidrs"]
        if not isinstance(raw, list) or not raw:
            add(f"{path}.cidrs", "must be a non-empty list of CIDRs such as 10.1.0.0/16")
        else:
            nets: list[Network] = []
            for i, c in enumerate(raw):
                try:
                    if not isinstance(c, str):
                        raise ValueError
                    nets.append(ipaddress.ip_network(c, strict=False))
                except ValueError:
                    add(f"{path}.cidrs[{i}]", f"not a CIDR: {c!r}")
            conds.append(CidrCond(tuple(nets)))
    if "time" in m:
        tw = _time(m["time"], f"{path}.time", add)
        if tw is not None:
            conds.append(tw)
    return conds, extra


def parse_segments(
    raw: object,
    path: str,
    add: AddError,
    *,
    service: str,
    releases: Sequence[str],
    base_dir: Path,
    env: Mapping[str, str],
) -> SegmentSet | None:
    """`services.<s>.segments` -> a SegmentSet (None when absent or empty); errors via `add`."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        add(path, "must be a list of segments")
        return None
    salt = env.get(USER_SALT_ENV) or None
    out: list[Segment] = []
    spec: list[object] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            add(p, "must be a mapping {name, match, release | weights}")
            continue
        for k in item:
            if k not in _SEGMENT_KEYS:
                add(f"{p}.{k}", f"unknown field (one of: {', '.join(sorted(_SEGMENT_KEYS))})")
        name = item.get("name")
        if not isinstance(name, str) or not _is_name(name):
            add(f"{p}.name", "is required: letters, digits, '.', '_' or '-'")
            name = f"#{i}"
        elif name in seen:
            add(f"{p}.name", f"duplicate segment name {name!r}")
        seen.add(name)
        mraw = item.get("match")
        if not isinstance(mraw, Mapping) or not mraw:
            add(f"{p}.match", "is required: a mapping with at least one condition")
            mraw = {}
        conds, extra = _conditions(mraw, f"{p}.match", add, base_dir, salt)
        route = _route(item, p, add, service, name, releases)
        sticky_h = sticky_c = None
        if "sticky_by" in item:
            sb = item["sticky_by"]
            sp = f"{p}.sticky_by"
            if "weights" not in item:
                add(sp, "applies only to a segment with `weights`")
            if (
                not isinstance(sb, Mapping)
                or len(sb) != 1
                or next(iter(sb)) not in ("header", "cookie")
                or not isinstance(next(iter(sb.values())), str)
                or not next(iter(sb.values()))
            ):
                add(sp, "must be {header: NAME} or {cookie: NAME}")
            elif "header" in sb:
                if not _is_token(sb["header"]):
                    add(f"{sp}.header", "not a valid header name")
                sticky_h = str(sb["header"]).lower()
            else:
                sticky_c = str(sb["cookie"])
        if route is None:
            continue
        spec.append((repr(item), tuple(extra)))
        out.append(Segment(name, tuple(conds), route, sticky_h, sticky_c))
    if not out:
        return None
    return SegmentSet(tuple(out), tuple(spec), raw)


def _is_name(name: str) -> bool:
    return (
        0 < len(name) <= 63
        and name[0].isascii()
        and name[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )


def _route(
    item: Mapping[str, Any],
    p: str,
    add: AddError,
    service: str,
    name: str,
    releases: Sequence[str],
) -> SegmentRoute | None:
    has_r, has_w = "release" in item, "weights" in item
    if has_r == has_w:
        add(p, "needs exactly one of `release` or `weights`")
        return None
    if has_r:
        r = item["release"]
        if not isinstance(r, str) or r not in releases:
            add(f"{p}.release", f"names no release of {service!r} (have: {', '.join(releases)})")
            return None
        return SegmentRoute(name, r, None, True)
    w = item["weights"]
    if not isinstance(w, Mapping) or not w:
        add(f"{p}.weights", "must be a mapping release -> weight")
        return None
    weights: dict[str, float] = {}
    ok = True
    for r, v in w.items():
        if r not in releases:
            add(
                f"{p}.weights.{r}", f"names no release of {service!r} (have: {', '.join(releases)})"
            )
            ok = False
        elif (
            not isinstance(v, int | float)
            or isinstance(v, bool)
            or not math.isfinite(v)
            or v < 0
            or v > 1_000_000
        ):
            add(f"{p}.weights.{r}", "must be a number between 0 and 1000000")
            ok = False
        else:
            weights[str(r)] = float(v)
    if ok and not any(v > 0 for v in weights.values()):
        add(f"{p}.weights", "all weights are zero; at least one must be > 0")
        ok = False
    if not ok:
        return None
    # Salted with the service and the segment: independent of the service's split
    # and of every other segment's.
    return SegmentRoute(
        name, None, WeightTable.build(f"{service}/{name}", weights), "sticky_by" not in item
    )
