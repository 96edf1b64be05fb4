from __future__ import annotations

import os
import random
import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.propagation import (
    TRACE_HEADERS,
    IdMint,
    TraceParent,
    build_baggage,
    outgoing_traceparent,
    parse_traceparent,
    parse_tracestate,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
SPAN = "b7ad6b7169203331"
VALID = f"00-{TID}-{PID}-01"

# Oracles written from the ABNF, independently of the module under test.
STRICT_TRACEPARENT_00 = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-0[0-3]")
TS_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = r"(?:[\x21\x23\x24\x26-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]|%[0-9A-Fa-f]{2})*"
BAGGAGE_MEMBER = re.compile(
    rf"({_TOKEN})[ \t]*=[ \t]*{_VALUE}(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*{_VALUE})?)*"
)


# Draws 0 first, to prove an all-zero id is redrawn rather than emitted.
class ZeroFirst(random.Random):
    def __init__(self) -> None:
        super().__init__(7)
        self.first = True

    def getrandbits(self, k: int, /) -> int:
        if self.first:
            self.first = False
            return 0
        return super().getrandbits(k)


def test_header_names_are_lowercase() -> None:
    # The handler matches field names lower-cased (RFC 9110 §5.1): a capital never matches.
    assert all(h == h.lower() for h in TRACE_HEADERS)
    assert {"traceparent", "tracestate", "baggage"} <= set(TRACE_HEADERS)


# --- traceparent ------------------------------------------------------------------------------


def test_valid_traceparent_continues_trace_with_our_span_as_parent() -> None:
    incoming = parse_traceparent([VALID])
    assert incoming == TraceParent(0, TID, PID, 0x01)
    trace_id, header = outgoing_traceparent(incoming, SPAN, sampled=True)
    assert trace_id == TID
    assert header == f"00-{TID}-{SPAN}-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"cc-{TID}-{PID}-01-what-the-future-will-be-like", TraceParent(0xCC, TID, PID, 0x01)),
        (f"01-{TID}-{PID}-09", TraceParent(0x01, TID, PID, 0x09)),
        (f" \t{VALID} ", TraceParent(0, TID, PID, 0x01)),
    ],
    ids=["future-version-extra-fields", "future-version-exact-length", "surrounding-ows"],
)
def test_traceparent_accepted(value: str, expected: TraceParent) -> None:
    assert parse_traceparent([value]) == expected


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        [f"ff-{TID}-{PID}-01"],
        [f"{VALID}-extra"],
        [f"{VALID}."],
        [f"cc-{TID}-{PID}-01.what-the-future-will-be-like"],
        [f"cc-{TID}-{PID}-0"],
        [f"0A-{TID}-{PID}-01"],
        [f"00-{TID.upper()}-{PID}-01"],
        [f"00-{TID}-{PID.upper()}-01"],
        [f"00-{TID}-{PID}-0A"],
        [f"0-{TID}-{PID}-01"],
        [f"000-{TID}-{PID}-01"],
        [f"00-{TID[:-1]}-{PID}-01"],
        [f"00-{TID}0-{PID}-01"],
        [f"00-{TID}-{PID[:-1]}-01"],
        [f"00-{TID}-{PID}0-01"],
        [f"00-{TID}-{PID}-1"],
        [f"00-{TID}-{PID}-001"],
        [f"00-{'0' * 32}-{PID}-01"],
        [f"00-{TID}-{'0' * 16}-01"],
        [f"00_{TID}_{PID}_01"],
        [f"00-{TID}-{PID}_01"],
        [f"00-{TID[:-1]}g-{PID}-01"],
        [f"00-{TID}-{PID[:-1]}x-01"],
        [VALID, VALID],
        [f"{VALID},{VALID}"],
        [f"cc-{TID}-{PID}-01-x,{VALID}"],
    ],
    ids=[
        "absent",
        "empty",
        "version-ff",
        "version-00-trailing-field",
        "version-00-trailing-char",
        "future-version-no-dash-after-flags",
        "future-version-shorter-than-55",
        "uppercase-version",
        "uppercase-trace-id",
        "uppercase-parent-id",
        "uppercase-flags",
        "version-too-short",
        "version-too-long",
        "trace-id-too-short",
        "trace-id-too-long",
        "parent-id-too-short",
        "parent-id-too-long",
        "flags-too-short",
        "flags-too-long",
        "all-zero-trace-id",
        "all-zero-parent-id",
        "separators-not-dashes",
        "one-bad-separator",
        "non-hex-trace-id",
        "non-hex-parent-id",
        "duplicated-two-fields",
        "duplicated-comma-joined",
        "future-version-comma-joined",
    ],
)
def test_invalid_traceparent_restarts_trace(values: list[str]) -> None:
    assert parse_traceparent(values) is None
    trace_id, header = outgoing_traceparent(None, SPAN, sampled=False, rng=random.Random(1))
    assert trace_id != TID
    assert header == f"00-{trace_id}-{SPAN}-02"


@pytest.mark.parametrize(
    ("flags", "sampled", "random_bit", "out_flags"),
    [
        ("01", True, False, "01"),
        ("00", False, False, "00"),
        ("09", True, False, "01"),
        ("02", False, True, "02"),
        ("03", True, True, "03"),
        ("fe", False, True, "02"),
    ],
    ids=[
        "sampled-kept",
        "unsampled-kept",
        "unknown-bits-zeroed",
        "random-kept",
        "random-and-sampled-kept",
        "random-kept-unknown-bits-zeroed",
    ],
)
def test_trace_flags_propagate(flags: str, sampled: bool, random_bit: bool, out_flags: str) -> None:
    incoming = parse_traceparent([f"00-{TID}-{PID}-{flags}"])
    assert incoming is not None
    assert (incoming.sampled, incoming.random) == (sampled, random_bit)
    _, header = outgoing_traceparent(incoming, SPAN, sampled=incoming.sampled)
    assert header == f"00-{TID}-{SPAN}-{out_flags}"


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
def test_new_trace_sets_random_flag(sampled: bool) -> None:
    trace_id, header = outgoing_traceparent(None, SPAN, sampled=sampled)
    assert header == f"00-{trace_id}-{SPAN}-{'03' if sampled else '02'}"


def test_sampling_decision_overrides_incoming_sampled_bit() -> None:
    incoming = parse_traceparent([f"00-{TID}-{PID}-03"])
    _, header = outgoing_traceparent(incoming, SPAN, sampled=False)
    assert header.endswith("-02")


def test_ids_are_deterministic_with_rng_and_never_zero() -> None:
    def ids(rng: random.Random | None = None) -> tuple[str, str]:
        mint = IdMint(rng, chunk=24)  # one draw: a trace id and a span id
        return mint.trace_id(), mint.span_id()

    def new_span_id(rng: random.Random | None = None) -> str:
        return IdMint(rng, chunk=8).span_id()

    assert ids(random.Random(3)) == ids(random.Random(3))
    assert new_span_id(random.Random(3)) == new_span_id(random.Random(3))
    trace_id, span_id = ids(ZeroFirst())
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
    assert re.fullmatch(r"[0-9a-f]{16}", span_id) and span_id != "0" * 16
    assert new_span_id(ZeroFirst()) != "0" * 16
    assert len({new_span_id() for _ in range(100)}) == 100


def test_id_mint_is_deterministic_refills_and_never_zero() -> None:
    a, b = IdMint(random.Random(5), chunk=64), IdMint(random.Random(5), chunk=64)
    ids = [a.span_id() if i % 2 else a.trace_id() for i in range(50)]  # several refills
    assert ids == [b.span_id() if i % 2 else b.trace_id() for i in range(50)]
    assert all(re.fullmatch(r"[0-9a-f]{16}|[0-9a-f]{32}", x) for x in ids)
    assert len(set(ids)) == 50
    zero = IdMint(ZeroFirst(), chunk=16)  # the first draw is all zero bytes
    assert zero.trace_id() != "0" * 32
    assert IdMint(ZeroFirst(), chunk=8).span_id() != "0" * 16
    trace_id, header = outgoing_traceparent(None, SPAN, sampled=False, mint=IdMint())
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and header == f"00-{trace_id}-{SPAN}-02"


def test_ids_without_rng_are_random_and_never_repeat_in_a_forked_child() -> None:
    # Without an rng the mint draws from OpenSSL's generator, which is used here before
    # the fork: a worker forked from a process that minted ids must still mint its own.
    parent = IdMint(chunk=64)
    ids = [parent.trace_id_b() for _ in range(8)]  # several draws
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 8
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh mint, as a worker makes after the fork
        try:
            mint = IdMint(chunk=64)
            os.write(w, b"".join(mint.trace_id_b() for _ in range(8)))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    os.waitpid(pid, 0)
    theirs = {got[i : i + 32] for i in range(0, len(got), 32)}
    after = IdMint(chunk=64)
    ours = {after.trace_id_b() for _ in range(8)}
    assert len(theirs) == 8 and not theirs & ours and not theirs & set(ids)


@pytest.mark.parametrize("chunk", [8, 24, 40, 64, 4096], ids=lambda c: f"chunk-{c}")
def test_span_and_trace_in_one_step_are_the_ids_minted_one_by_one(chunk: int) -> None:
    # Refills that split the pair (chunks not a multiple of 24 bytes) and a first draw
    # of zeros included: the pair is always what span_id_b() then trace_id_b() give.
    for rng_a, rng_b in ((random.Random(9), random.Random(9)), (ZeroFirst(), ZeroFirst())):
        a, b = IdMint(rng_a, chunk=chunk), IdMint(rng_b, chunk=chunk)
        for _ in range(40):
            assert a.span_and_trace_b() == (b.span_id_b(), b.trace_id_b())


# --- tracestate -------------------------------------------------------------------------------


def _ts_members(n: int) -> str:
    return ",".join(f"k{i}=v{i}" for i in range(n))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (["fw529a3039@dt=x,0tenant_/*-@sys_/*-=y"], "fw529a3039@dt=x,0tenant_/*-@sys_/*-=y"),
        (["a@1b=3,1abc=2,a@b@c=5,foo@=1"], "a@1b=3,1abc=2,a@b@c=5,foo@=1"),
        (["Rojo=1,ok=7"], None),
        (["@x=4,ok=7"], None),
        (["k!=6,ok=7"], None),
        ([f"{'a' * 257}=1,{'a' * 256}=2"], None),
        ([f"{'a' * 256}=2"], f"{'a' * 256}=2"),
        ([f"{'t' * 242}@s=1,t@{'s' * 15}=2"], f"{'t' * 242}@s=1,t@{'s' * 15}=2"),
        (["a=b=c,ok=1"], None),
        (["b=\x01,ok=1"], None),
        (["c=é,ok=1"], None),
        (["d=,ok=1"], None),
        ([f"a={'v' * 257},b=1"], None),
        ([f"b={'v' * 256}"], f"b={'v' * 256}"),
        (["a=1,b=2,a=3"], "a=1,b=2"),
        ([_ts_members(33)], None),
        ([_ts_members(32)], _ts_members(32)),
        ([_ts_members(32) + ",k0=again"], _ts_members(32)),
        (["a=1 ,b=2  "], "a=1,b=2"),
        (["a=   ,b=2"], None),
        (["a= x,b=2"], "a= x,b=2"),
        (["a=1,, \t ,b=2,"], "a=1,b=2"),
        (["", " "], None),
        (["a=1", "b=2", "c=3"], "a=1,b=2,c=3"),
        (["ok=1", "Bad=1"], None),
        ([], None),
    ],
    ids=[
        "valid-pass-through",
        "at-sign-keys",
        "at-sign-anywhere-after-the-first-character",
        "upper-case-key-drops-the-header",
        "key-starting-with-at-drops-the-header",
        "illegal-key-character-drops-the-header",
        "key-over-256-drops-the-header",
        "key-of-256",
        "long-at-sign-keys-within-256",
        "equals-in-value-drops-the-header",
        "control-char-drops-the-header",
        "non-ascii-drops-the-header",
        "empty-value-drops-the-header",
        "value-over-256-drops-the-header",
        "value-of-256",
        "duplicate-key-keeps-first",
        "over-32-members-drops-header",
        "32-members-kept",
        "a-repeated-key-is-not-a-33rd-member",
        "trailing-space-is-ows",
        "value-of-only-spaces-drops-the-header",
        "leading-space-kept",
        "empty-members-ignored",
        "only-empty-members",
        "multiple-fields-combined",
        "an-invalid-field-drops-every-field",
        "absent",
    ],
)
def test_tracestate(values: list[str], expected: str | None) -> None:
    assert parse_tracestate(values) == expected


# --- baggage ----------------------------------------------------------------------------------

STAGE = ("release.stage", "gray")


@pytest.mark.parametrize(
    ("values", "extra", "expected"),
    [
        (
            ["userId =   alice", "serverNode = DF%2028, isProduction = false"],
            [],
            "userId =   alice,serverNode = DF%2028,isProduction = false",
        ),
        ([], [STAGE], "release.stage=gray"),
        (["a=1,b=2"], [STAGE], "a=1,b=2,release.stage=gray"),
        (["release.stage=stable,a=1"], [STAGE], "a=1,release.stage=gray"),
        (["novalue,a=1"], [STAGE], "a=1,release.stage=gray"),
        (["k y=1,k(=1,=1,a=1"], [STAGE], "a=1,release.stage=gray"),
        (['k=a"b,k=a\\b,k=a b,k=é,a=1'], [STAGE], "a=1,release.stage=gray"),
        (["k=50%,k=%zz,a=%2C"], [], "a=%2C"),
        (["k=v;p1;p2=x, j=w ; p = y ;q"], [], "k=v;p1;p2=x,j=w ; p = y ;q"),
        (["k=v;=x,k=v;p=a b,a=1"], [], "a=1"),
        (["k=a=b=c"], [], "k=a=b=c"),
        (["a=1,,b=2"], [], "a=1,b=2"),
        (
            [],
            [("release.stage", 'gray canary/é%,;"\\')],
            "release.stage=gray%20canary/%C3%A9%25%2C%3B%22%5C",
        ),
        (["bad"], [], None),
        ([], [], None),
    ],
    ids=[
        "members-unchanged",
        "stage-added-alone",
        "stage-appended",
        "same-key-replaced",
        "no-equals-dropped",
        "bad-key-chars-dropped",
        "bad-value-chars-dropped",
        "bare-percent-dropped",
        "properties-kept",
        "malformed-property-drops-member",
        "equals-in-value-kept",
        "empty-member-dropped",
        "extras-percent-encoded",
        "nothing-valid",
        "nothing-at-all",
    ],
)
def test_baggage(values: list[str], extra: list[tuple[str, str]], expected: str | None) -> None:
    assert build_baggage(values, extra) == expected


def test_baggage_member_limit_drops_incoming_from_the_end() -> None:
    incoming = [f"k{i}=v" for i in range(200)]
    result = build_baggage([",".join(incoming)], [STAGE])
    assert result is not None
    members = result.split(",")
    assert len(members) == 180
    assert members == [*incoming[:179], "release.stage=gray"]


def test_baggage_byte_limit_drops_incoming_from_the_end() -> None:
    incoming = [f"k{i}={'v' * 1000}" for i in range(10)]
    result = build_baggage(incoming, [STAGE])
    assert result is not None
    members = result.split(",")
    assert len(result.encode()) <= 8192
    assert members == [*incoming[: len(members) - 1], "release.stage=gray"]
    assert len(result) + len(incoming[len(members) - 1]) + 1 > 8192


def test_baggage_rejects_extra_key_that_is_not_a_token() -> None:
    with pytest.raises(ValueError, match="release stage"):
        build_baggage([], [("release stage", "gray")])


# --- properties -------------------------------------------------------------------------------

_hexish = "0123456789abcdefABX-"
near_traceparent = st.builds(
    lambda v, t, p, f, rest: f"{v}-{t}-{p}-{f}{rest}",
    st.text(_hexish, min_size=1, max_size=3),
    st.text(_hexish, min_size=31, max_size=33),
    st.text(_hexish, min_size=15, max_size=17),
    st.text(_hexish, min_size=1, max_size=3),
    st.text(max_size=5),
)
header_values = st.lists(st.one_of(st.text(), near_traceparent), max_size=3)


@settings(database=None)
@given(values=header_values, sampled=st.booleans(), seed=st.integers())
def test_outgoing_traceparent_is_always_strict_version_00(
    values: list[str], sampled: bool, seed: int
) -> None:
    rng = random.Random(seed)
    incoming = parse_traceparent(values)
    trace_id, header = outgoing_traceparent(incoming, IdMint(rng).span_id(), sampled, rng)
    assert STRICT_TRACEPARENT_00.fullmatch(header)
    assert header[3:35] == trace_id
    if incoming is not None:
        assert trace_id == incoming.trace_id


_ts_chars = "abz09_-*/@=, \t!~Aé"
tracestate_values = st.lists(st.one_of(st.text(), st.text(_ts_chars, max_size=40)), max_size=4)


@settings(database=None)
@given(values=tracestate_values)
def test_tracestate_output_is_always_valid(values: list[str]) -> None:
    result = parse_tracestate(values)
    if result is None:
        return
    members = result.split(",")
    assert len(members) <= 32
    assert all(TS_MEMBER.fullmatch(m) for m in members)
    keys = [m.split("=", 1)[0] for m in members]
    assert len(keys) == len(set(keys))


_bg_chars = 'ab09=;,% \t"\\é.-!'
baggage_values = st.lists(
    st.one_of(
        st.text(),
        st.text(_bg_chars, max_size=60),
        st.lists(st.text("abc=%2", min_size=1, max_size=90), max_size=200).map(",".join),
    ),
    max_size=4,
)


@settings(database=None)
@given(values=baggage_values, stage=st.text())
def test_build_baggage_output_is_always_valid_and_within_limits(
    values: list[str], stage: str
) -> None:
    result = build_baggage(values, [("release.stage", stage)])
    assert result is not None
    members = result.split(",")
    assert len(members) <= 180
    assert len(result.encode()) <= 8192
    matches = [BAGGAGE_MEMBER.fullmatch(m) for m in members]
    assert all(matches)
    keys = [m.group(1) for m in matches if m is not None]
    assert keys.count("release.stage") == 1 and keys[-1] == "release.stage"
    assert unquote(members[-1].split("=", 1)[1], errors="strict") == stage
