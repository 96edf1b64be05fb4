"""Every request of the W3C Trace Context test suite, pinned as a table (spec level 2, strict).

Source: w3c/trace-context, test/test.py at acab820 ("Fix tracestate key grammar tests",
#584): each row is one request its harness sends (`make_single_request_and_get_tracecontext`
or `make_request`), named after the suite's test method, with what the suite asserts about
the `traceparent` and `tracestate` the service passes on. The rows run twice: through the
pure parsers (as the handler calls them), and end to end through a running gateway whose
upstream records what it received.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.propagation import parse_traceparent, parse_tracestate
from tests.conftest import Upstream, gateway_config
from tests.test_trace_e2e import Recorder

TID = "12345678901234567890123456789012"
PID = "1234567890123456"
TP00 = f"00-{TID}-{PID}-00"
TP01 = f"00-{TID}-{PID}-01"

# What the suite checks of the outgoing traceparent.
SAME = "same"  # the same trace-id, a new parent-id
NEW = "new"  # a restarted trace: none of the trace-ids sent
RANDOM = "same+random"  # SAME, and the random flag (0x02) still set


@dataclass(frozen=True)
class Case:
    name: str
    headers: tuple[tuple[str, str], ...]
    traceparent: str
    tracestate: str | None  # exactly what is forwarded; None: no tracestate header


def _c(name: str, tp: str, ts: str | None, *headers: tuple[str, str]) -> Case:
    return Case(name, headers, tp, ts)


_KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
_KEY_AT = _KEY + "@a-z0-9_-*/"
_VALUE = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))
_BARS = [",".join(f"bar{i:02}={i:02}" for i in range(a, b)) for a, b in ((1, 11), (11, 21))]
_BARS += [",".join(f"bar{i:02}={i:02}" for i in range(21, 31))]
_BAR32 = ",".join(f"bar{i:02}={i:02}" for i in range(1, 33))


def _tp(value: str) -> tuple[str, str]:
    return ("traceparent", value)


def _ts(value: str) -> tuple[str, str]:
    return ("tracestate", value)


CASES: list[Case] = [
    _c("both_traceparent_and_tracestate_missing", NEW, None),
    _c("traceparent_included_tracestate_missing", SAME, None, _tp(TP01)),
    _c("traceparent_duplicated", NEW, None, _tp(f"00-{TID[:-1]}1-{PID}-01"), _tp(TP01)),
    _c("traceparent_header_name-1", NEW, None, ("trace-parent", TP01)),
    _c("traceparent_header_name-2", NEW, None, ("trace.parent", TP01)),
    _c("traceparent_header_name_valid_casing-1", SAME, None, ("TraceParent", TP01)),
    _c("traceparent_header_name_valid_casing-2", SAME, None, ("TrAcEpArEnT", TP01)),
    _c("traceparent_header_name_valid_casing-3", SAME, None, ("TRACEPARENT", TP01)),
    _c("traceparent_version_0x00-1", NEW, None, _tp(TP01 + ".")),
    _c("traceparent_version_0x00-2", NEW, None, _tp(TP01 + "-what-the-future-will-be-like")),
    _c("traceparent_version_0xcc-1", SAME, None, _tp(f"cc-{TID}-{PID}-01")),
    _c(
        "traceparent_version_0xcc-2",
        SAME,
        None,
        _tp(f"cc-{TID}-{PID}-01-what-the-future-will-be-like"),
    ),
    _c(
        "traceparent_version_0xcc-3",
        NEW,
        None,
        _tp(f"cc-{TID}-{PID}-01.what-the-future-will-be-like"),
    ),
    _c("traceparent_version_0xff", NEW, None, _tp(f"ff-{TID}-{PID}-01")),
    _c("traceparent_version_illegal_characters-1", NEW, None, _tp(f".0-{TID}-{PID}-01")),
    _c("traceparent_version_illegal_characters-2", NEW, None, _tp(f"0.-{TID}-{PID}-01")),
    _c("traceparent_version_too_long-1", NEW, None, _tp(f"000-{TID}-{PID}-01")),
    _c("traceparent_version_too_long-2", NEW, None, _tp(f"0000-{TID}-{PID}-01")),
    _c("traceparent_version_too_short", NEW, None, _tp(f"0-{TID}-{PID}-01")),
    _c("traceparent_trace_id_all_zero", NEW, None, _tp(f"00-{'0' * 32}-{PID}-01")),
    _c("traceparent_trace_id_illegal_characters-1", NEW, None, _tp(f"00-.{TID[1:]}-{PID}-01")),
    _c("traceparent_trace_id_illegal_characters-2", NEW, None, _tp(f"00-{TID[:-1]}.-{PID}-01")),
    _c("traceparent_trace_id_too_long", NEW, None, _tp(f"00-{TID}3-{PID}-01")),
    _c("traceparent_trace_id_too_short", NEW, None, _tp(f"00-{TID[:-1]}-{PID}-01")),
    _c("traceparent_parent_id_all_zero", NEW, None, _tp(f"00-{TID}-{'0' * 16}-01")),
    _c("traceparent_parent_id_illegal_characters-1", NEW, None, _tp(f"00-{TID}-.{PID[1:]}-01")),
    _c("traceparent_parent_id_illegal_characters-2", NEW, None, _tp(f"00-{TID}-{PID[:-1]}.-01")),
    _c("traceparent_parent_id_too_long", NEW, None, _tp(f"00-{TID}-{PID}7-01")),
    _c("traceparent_parent_id_too_short", NEW, None, _tp(f"00-{TID}-{PID[:-1]}-01")),
    _c("traceparent_trace_flags_illegal_characters-1", NEW, None, _tp(f"00-{TID}-{PID}-.0")),
    _c("traceparent_trace_flags_illegal_characters-2", NEW, None, _tp(f"00-{TID}-{PID}-0.")),
    _c("traceparent_trace_flags_too_long", NEW, None, _tp(f"00-{TID}-{PID}-001")),
    _c("traceparent_trace_flags_too_short", NEW, None, _tp(f"00-{TID}-{PID}-1")),
    _c("traceparent_ows_handling-1", SAME, None, _tp(" " + TP01)),
    _c("traceparent_ows_handling-2", SAME, None, _tp("\t" + TP01)),
    _c("traceparent_ows_handling-3", SAME, None, _tp(TP01 + " ")),
    _c("traceparent_ows_handling-4", SAME, None, _tp(TP01 + "\t")),
    _c("traceparent_ows_handling-5", SAME, None, _tp("\t " + TP01 + " \t")),
    _c("tracestate_included_traceparent_missing-1", NEW, None, _ts("foo=1")),
    _c("tracestate_included_traceparent_missing-2", NEW, None, _ts("foo=1,bar=2")),
    _c(
        "tracestate_included_traceparent_included",
        SAME,
        "foo=1,bar=2",
        _tp(TP00),
        _ts("foo=1,bar=2"),
    ),
    _c("tracestate_header_name-1", SAME, None, _tp(TP00), ("trace-state", "foo=1")),
    _c("tracestate_header_name-2", SAME, None, _tp(TP00), ("trace.state", "foo=1")),
    _c("tracestate_header_name_valid_casing-1", SAME, "foo=1", _tp(TP00), ("TraceState", "foo=1")),
    _c("tracestate_header_name_valid_casing-2", SAME, "foo=1", _tp(TP00), ("TrAcEsTaTe", "foo=1")),
    _c("tracestate_header_name_valid_casing-3", SAME, "foo=1", _tp(TP00), ("TRACESTATE", "foo=1")),
    _c("tracestate_empty_header-1", SAME, None, _tp(TP00), _ts("")),
    _c("tracestate_empty_header-2", SAME, "foo=1", _tp(TP00), _ts("foo=1"), _ts("")),
    _c("tracestate_empty_header-3", SAME, "foo=1", _tp(TP00), _ts(""), _ts("foo=1")),
    _c(
        "tracestate_multiple_headers_different_keys",
        SAME,
        "foo=1,bar=2,rojo=1,congo=2,baz=3",
        _tp(TP00),
        _ts("foo=1,bar=2"),
        _ts("rojo=1,congo=2"),
        _ts("baz=3"),
    ),
    _c("tracestate_duplicated_keys-1", SAME, "foo=1", _tp(TP00), _ts("foo=1,foo=1")),
    _c("tracestate_duplicated_keys-2", SAME, "foo=1", _tp(TP00), _ts("foo=1,foo=2")),
    _c("tracestate_duplicated_keys-3", SAME, "foo=1", _tp(TP00), _ts("foo=1"), _ts("foo=1")),
    _c("tracestate_duplicated_keys-4", SAME, "foo=1", _tp(TP00), _ts("foo=1"), _ts("foo=2")),
    _c(
        "tracestate_all_allowed_characters-1",
        SAME,
        f"{_KEY}={_VALUE}",
        _tp(TP00),
        _ts(f"{_KEY}={_VALUE}"),
    ),
    _c(
        "tracestate_all_allowed_characters-2",
        SAME,
        f"{_KEY_AT}={_VALUE}",
        _tp(TP00),
        _ts(f"{_KEY_AT}={_VALUE}"),
    ),
    _c(
        "tracestate_ows_handling-1",
        SAME,
        "foo=1,bar=2,baz=3",
        _tp(TP00),
        _ts("foo=1 \t , \t bar=2, \t baz=3"),
    ),
    _c(
        "tracestate_ows_handling-2",
        SAME,
        "foo=1,bar=2,baz=3",
        _tp(TP00),
        _ts("foo=1\t \t,\t \tbar=2,\t \tbaz=3"),
    ),
    _c("tracestate_ows_handling-3", SAME, "foo=1", _tp(TP00), _ts(" foo=1")),
    _c("tracestate_ows_handling-4", SAME, "foo=1", _tp(TP00), _ts("\tfoo=1")),
    _c("tracestate_ows_handling-5", SAME, "foo=1", _tp(TP00), _ts("foo=1 ")),
    _c("tracestate_ows_handling-6", SAME, "foo=1", _tp(TP00), _ts("foo=1\t")),
    _c("tracestate_ows_handling-7", SAME, "foo=1", _tp(TP00), _ts("\t foo=1 \t")),
    _c("tracestate_key_illegal_characters-1", SAME, None, _tp(TP00), _ts("foo =1")),
    _c("tracestate_key_illegal_characters-2", SAME, None, _tp(TP00), _ts("FOO=1")),
    _c("tracestate_key_illegal_characters-3", SAME, None, _tp(TP00), _ts("foo.bar=1")),
    _c(
        "tracestate_key_illegal_vendor_format-1",
        SAME,
        "foo@=1,bar=2",
        _tp(TP00),
        _ts("foo@=1,bar=2"),
    ),
    _c("tracestate_key_illegal_vendor_format-2", SAME, None, _tp(TP00), _ts("@foo=1,bar=2")),
    _c(
        "tracestate_key_illegal_vendor_format-3",
        SAME,
        "foo@@bar=1,bar=2",
        _tp(TP00),
        _ts("foo@@bar=1,bar=2"),
    ),
    _c(
        "tracestate_key_illegal_vendor_format-4",
        SAME,
        "foo@bar@baz=1,bar=2",
        _tp(TP00),
        _ts("foo@bar@baz=1,bar=2"),
    ),
    _c(
        "tracestate_member_count_limit-1",
        SAME,
        _BAR32,
        _tp(TP00),
        *(_ts(v) for v in _BARS),
        _ts("bar31=31,bar32=32"),
    ),
    _c(
        "tracestate_member_count_limit-2",
        SAME,
        None,
        _tp(TP00),
        *(_ts(v) for v in _BARS),
        _ts("bar31=31,bar32=32,bar33=33"),
    ),
    _c(
        "tracestate_key_length_limit-1",
        SAME,
        f"foo=1,{'z' * 256}=1",
        _tp(TP00),
        _ts("foo=1"),
        _ts("z" * 256 + "=1"),
    ),
    _c("tracestate_key_length_limit-2", SAME, None, _tp(TP00), _ts("foo=1"), _ts("z" * 257 + "=1")),
    _c(
        "tracestate_key_length_limit-3",
        SAME,
        f"foo=1,{'t' * 241}@{'v' * 14}=1",
        _tp(TP00),
        _ts("foo=1"),
        _ts(f"{'t' * 241}@{'v' * 14}=1"),
    ),
    _c(
        "tracestate_key_length_limit-4",
        SAME,
        f"foo=1,{'t' * 242}@v=1",
        _tp(TP00),
        _ts("foo=1"),
        _ts(f"{'t' * 242}@v=1"),
    ),
    _c(
        "tracestate_key_length_limit-5",
        SAME,
        f"foo=1,t@{'v' * 15}=1",
        _tp(TP00),
        _ts("foo=1"),
        _ts(f"t@{'v' * 15}=1"),
    ),
    _c("tracestate_value_illegal_characters-1", SAME, None, _tp(TP00), _ts("foo=bar=baz")),
    _c("tracestate_value_illegal_characters-2", SAME, None, _tp(TP00), _ts("foo=,bar=3")),
    # AdvancedTest asks for three callbacks; a proxy makes one upstream call per request,
    # so the e2e test sends these three times and checks the ids across them.
    _c("multiple_requests_with_valid_traceparent", SAME, None, _tp(TP01)),
    _c("multiple_requests_without_traceparent", NEW, None),
    _c("multiple_requests_with_illegal_traceparent", NEW, None, _tp(f"00-{'0' * 32}-{PID}-01")),
    _c("propagates_random_flag", RANDOM, None, _tp(f"00-{TID}-{PID}-02")),
]
IDS = [c.name for c in CASES]
REPEATED = {c.name for c in CASES if c.name.startswith("multiple_requests_")}


def _values(case: Case, name: str) -> list[str]:
    # Field names are case-insensitive (RFC 9110 §5.1); an HTTP parser drops the OWS
    # around a field value (§5.5) before the handler sees it.
    return [v.strip(" \t") for n, v in case.headers if n.lower() == name]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_suite_case_through_the_parsers(case: Case) -> None:
    incoming = parse_traceparent(_values(case, "traceparent"))
    if case.traceparent == NEW:
        assert incoming is None
        return
    assert incoming is not None and incoming.trace_id == TID
    assert (incoming.flags & 0x02 != 0) == (case.traceparent == RANDOM)
    ts = _values(case, "tracestate")
    assert (parse_tracestate(ts) if ts else None) == case.tracestate


async def test_suite_end_to_end_through_the_gateway(
    upstreams: Callable[..., Awaitable[Upstream]], gateway: Any
) -> None:
    rec = Recorder()
    up = await upstreams(app=rec.app())
    doc = gateway_config({"svc": {"releases": {"stable": {"weight": 1, "upstreams": [up.url]}}}})
    gw = await gateway(doc)
    url = f"http://127.0.0.1:{gw.port}/test"
    failures: list[str] = []
    async with aiohttp.ClientSession() as s:
        for case in CASES:
            seen: list[dict[str, str]] = []
            for _ in range(3 if case.name in REPEATED else 1):
                async with s.post(url, headers=CIMultiDict(case.headers)) as r:
                    assert r.status == 200, (case.name, await r.text())
                seen.append(rec.seen[-1])
            if problem := _check(case, seen):
                failures.append(f"{case.name}: {problem}")
    assert failures == [], "\n".join(failures)
    assert len(rec.seen) == len(CASES) + 2 * len(REPEATED)


def _check(case: Case, seen: list[dict[str, str]]) -> str | None:
    sent = {v.strip(" \t")[3:35] for n, v in case.headers if n.lower() == "traceparent"}
    parents: set[str] = set()
    for got in seen:
        version, trace_id, parent, flags = got["traceparent"].split("-")
        if version != "00" or len(trace_id) != 32 or trace_id == "0" * 32:
            return f"bad traceparent {got['traceparent']!r}"
        if case.traceparent == NEW and trace_id in sent | {TID}:
            return f"trace not restarted: {got['traceparent']!r}"
        if case.traceparent != NEW and (trace_id != TID or parent == PID):
            return f"trace not continued: {got['traceparent']!r}"
        if case.traceparent == RANDOM and not int(flags, 16) & 0x02:
            return f"random flag lost: {got['traceparent']!r}"
        if (got["tracestate"] or None) != case.tracestate:
            return f"tracestate {got['tracestate']!r}, want {case.tracestate!r}"
        parents.add(parent)
    if len(parents) != len(seen):
        return f"parent ids repeat: {sorted(parents)}"
    return None
