"""W3C Trace Context (Level 2) and W3C Baggage: parse what came in, build what goes upstream.

Why: the gateway is a trace participant on every hop (same trace-id, its own span as
parent, a new trace when the incoming one is absent or invalid) and requires malformed baggage
to be dropped rather than forwarded. Pure functions over header strings, so the rules are tested
with tables and the forwarding engine only passes values in and out.
"""

from __future__ import annotations

import binascii
import random
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

TRACE_HEADERS: Final = ("traceparent", "tracestate", "baggage")

TRACESTATE_MAX_MEMBERS: Final = 32
BAGGAGE_MAX_MEMBERS: Final = 180
BAGGAGE_MAX_BYTES: Final = 8192

FLAG_SAMPLED: Final = 0x01
FLAG_RANDOM: Final = 0x02

# The version-00 layout is also the mandatory prefix of every later version, so one pattern
# serves both; match() anchors only the start and the caller decides what may follow.
_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACEPARENT_LEN: Final = 55
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_TRACE_ID_B: Final = b"0" * 32
_ZERO_SPAN_ID: Final = "0" * 16
_ZERO_SPAN_ID_B: Final = b"0" * 16
# Indexed by FLAG_RANDOM | FLAG_SAMPLED: the only bits version 00 lets us set.
# A variable-length tuple type: compiled, a fixed-length one is held unboxed and indexing it
# by a variable makes a new tuple first.
_FLAGS_HEX_B: Final[tuple[bytes, ...]] = (b"00", b"01", b"02", b"03")

# W3C Trace Context 2, "tracestate Header Field Values", "Key": a lower-case letter or digit,
# then up to 255 of lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@" (level 1's tenant@system
# split is gone: "foo@", "foo@@bar" and "t@" + 15 letters are keys now).
_TRACESTATE_MEMBER: Final = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)

_OWS: Final = " \t"
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# baggage-octet minus "%", which may only start a percent-encoded octet.
_BAGGAGE_SAFE_CLASS: Final = r"[\x21\x23\x24\x26-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]"
_BAGGAGE_VALUE: Final = rf"(?:{_BAGGAGE_SAFE_CLASS}|%[0-9A-Fa-f]{{2}})*"
_BAGGAGE_MEMBER: Final = re.compile(
    rf"({_TOKEN})[ \t]*=[ \t]*{_BAGGAGE_VALUE}"
    rf"(?:[ \t]*;[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*{_BAGGAGE_VALUE})?)*"
)
_BAGGAGE_KEY: Final = re.compile(_TOKEN)
_BAGGAGE_SAFE_VALUE: Final = re.compile(rf"{_BAGGAGE_SAFE_CLASS}*")
_BAGGAGE_QUOTE_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid incoming `traceparent`: the caller's trace-id, its span and its flags.

    Why: W3C Trace Context 2 §3.2.2 ("traceparent Header Field Values"); `flags` keeps the whole
    byte so bits defined later stay visible even though we only re-emit two of them.
    """

    version: int
    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        """Whether the caller may have recorded its span.

        Why: W3C Trace Context 2 §3.2.2.5.1 (sampled flag, bit 0x01).
        """
        return bool(self.flags & FLAG_SAMPLED)

    @property
    def random(self) -> bool:
        """Whether the caller promises the trace-id's right-most 7 bytes are random.

        Why: W3C Trace Context 2 §3.2.2.5.2 (random trace-id flag, bit 0x02).
        """
        return bool(self.flags & FLAG_RANDOM)


def parse_traceparent(values: Sequence[str]) -> TraceParent | None:
    """Parse every received `traceparent` value; None means "restart the trace".

    Why: W3C Trace Context 2 §3.2 ("Traceparent Header", "Versioning of traceparent"): a
    duplicated, malformed, all-zero or 'ff'-versioned header is invalid; version 00 is exactly
    55 chars; a later version is read through its version-00 prefix if a '-' follows it.
    Surrounding OWS is not part of a field value (RFC 9110 §5.5).
    """
    if len(values) != 1:
        return None
    value = values[0]
    if len(value) != _TRACEPARENT_LEN:
        value = value.strip(_OWS)
        if len(value) < _TRACEPARENT_LEN:
            return None
    if _TRACEPARENT.match(value) is None:
        return None
    if value[0] == "0" and value[1] == "0":
        if len(value) != _TRACEPARENT_LEN:
            return None
        version = 0
    else:
        version = int(value[:2], 16)
        if version == 0xFF:
            return None
        # A comma means several values were folded into one field: a duplicated header.
        if len(value) > _TRACEPARENT_LEN and (value[_TRACEPARENT_LEN] != "-" or "," in value):
            return None
    trace_id = value[3:35]
    parent_id = value[36:52]
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return TraceParent(version, trace_id, parent_id, int(value[53:55], 16))


def parse_tracestate(values: Sequence[str]) -> str | None:
    """Combine and validate every received `tracestate` value into the header to forward.

    Why: W3C Trace Context 2 §3.3 ("Tracestate Header"): fields combine as one comma list (RFC
    9110 §5.3), empty members are allowed, at most 32 members; trailing spaces are OWS, not
    value. One malformed member or too many members make the whole header invalid, and an
    invalid tracestate is discarded, never repaired member by member (the strict cases of
    the W3C suite, w3c/trace-context test/test.py). A repeated key keeps its first member
    (the suite allows either). Only call it when the traceparent parsed: "If the vendor
    failed to parse traceparent, it MUST NOT attempt to parse tracestate" (§3.3).
    """
    if not values:
        return None
    header = values[0] if len(values) == 1 else ",".join(values)
    members: list[str] = []
    seen: set[str] = set()
    for raw in header.split(","):
        member = raw.strip(_OWS)
        if not member:
            continue
        if _TRACESTATE_MEMBER.fullmatch(member) is None:
            return None
        key = member[: member.index("=")]
        if key in seen:
            continue
        seen.add(key)
        members.append(member)
        if len(members) > TRACESTATE_MAX_MEMBERS:
            return None
    if not members:
        return None
    return ",".join(members)


class IdMint:
    """Random trace and span ids cut from one bulk draw of random hex.

    Why: the data path mints one span id per request and a trace id for each new
    trace; formatting a fresh `getrandbits` per id costs ~0.5 µs, a slice of a
    pre-drawn hex string ~0.05 µs. Ids stay uniformly random and non-zero
    (W3C Trace Context 2 §3.2.2.3-§3.2.2.4). The hex is kept as ASCII bytes: the
    ids go into header fields as bytes.

    Without an `rng` the bytes come from OpenSSL's CSPRNG (`ssl.RAND_bytes`, a
    DRBG that OpenSSL reseeds in a forked child, so workers never repeat each
    other's ids): a third of the CPU of `random.randbytes`, which builds a big
    integer from the Mersenne Twister's words and converts it back to bytes. With
    an `rng` (tests) the ids follow its seed.
    """

    __slots__ = ("_rng", "_chunk", "_buf", "_pos")

    def __init__(self, rng: random.Random | None = None, chunk: int = 4096) -> None:
        self._rng = rng
        self._chunk = chunk  # random bytes per draw: ~170 requests' worth of ids
        self._buf = b""
        self._pos = 0

    def _hex(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            r = self._rng
            self._buf = binascii.hexlify(
                ssl.RAND_bytes(self._chunk) if r is None else r.randbytes(self._chunk)
            )
            pos, end = 0, n
        self._pos = end
        return self._buf[pos:end]

    def span_id_b(self) -> bytes:
        while True:
            sid = self._hex(16)
            if sid != _ZERO_SPAN_ID_B:
                return sid

    def trace_id_b(self) -> bytes:
        while True:
            tid = self._hex(32)
            if tid != _ZERO_TRACE_ID_B:
                return tid

    def span_and_trace_b(self) -> tuple[bytes, bytes]:
        """`(span_id_b(), trace_id_b())`, the same ids, in one step when the draw holds both."""
        pos = self._pos
        end = pos + 48
        buf = self._buf
        if end <= len(buf):
            sid = buf[pos : pos + 16]
            tid = buf[pos + 16 : end]
            if sid != _ZERO_SPAN_ID_B and tid != _ZERO_TRACE_ID_B:
                self._pos = end
                return sid, tid
        return self.span_id_b(), self.trace_id_b()

    def span_id(self) -> str:
        return self.span_id_b().decode("ascii")

    def trace_id(self) -> str:
        return self.trace_id_b().decode("ascii")


def outgoing_traceparent(
    incoming: TraceParent | None,
    span_id: str,
    sampled: bool,
    rng: random.Random | None = None,
    mint: IdMint | None = None,
) -> tuple[str, str]:
    """Build the upstream `traceparent`: (trace_id, header value), version 00.

    Why: W3C Trace Context 2 "Mutating the traceparent Field": keep the trace-id, put our span
    in parent-id, set the sampled bit to our decision, keep the random bit (it describes the
    trace-id, §3.2.2.5.2), downgrade the version to 00; with no valid incoming header restart
    the trace with a random id. `span_id` must be 16 lowercase hex digits, not all zero.
    """
    if mint is None:
        mint = IdMint(rng, chunk=16)
    trace_id_b, flags = outgoing_trace(incoming, sampled, mint)
    trace_id = trace_id_b.decode("latin-1")
    return trace_id, f"00-{trace_id}-{span_id}-{flags.decode('latin-1')}"


def outgoing_trace(
    incoming: TraceParent | None, sampled: bool, mint: IdMint, new_trace_id: bytes = b""
) -> tuple[bytes, bytes]:
    """The upstream `traceparent`'s trace-id and trace-flags (two hex digits), as bytes.

    The rules of `outgoing_traceparent`; the data path writes the version-00 field
    `00-<trace-id>-<span-id>-<flags>` with the other fields it adds
    (headers.upstream_fields), so it is formatted once, with them.
    """
    if incoming is None:
        # `len`, not the truth of bytes: compiled, a native length read, not a generic call.
        trace_id = new_trace_id if len(new_trace_id) else mint.trace_id_b()
        flags = FLAG_RANDOM
    else:
        trace_id = incoming.trace_id.encode("latin-1")
        flags = incoming.flags & FLAG_RANDOM
    if sampled:
        flags |= FLAG_SAMPLED
    return trace_id, _FLAGS_HEX_B[flags]


def _encode_extra(key: str, value: str) -> str:
    if _BAGGAGE_KEY.fullmatch(key) is None:
        raise ValueError(f"baggage key {key!r} is not an RFC 7230 token; rename it")
    if _BAGGAGE_SAFE_VALUE.fullmatch(value) is None:
        value = quote(value, safe=_BAGGAGE_QUOTE_SAFE)
    return f"{key}={value}"


LANE_KEY: Final = "release.stage"
GRAY_TAG_KEY: Final = "gray.tag"
# Never dropped at the size limits: later hops route on them (README "Segments").
_PROTECTED: Final = (LANE_KEY, GRAY_TAG_KEY)


def gray_tag(pairs: Sequence[tuple[str, str]]) -> str:
    """A release's `tag:` map as the `gray.tag` value `k=v;k2=v2` (baggage encodes the `;`)."""
    return ";".join(f"{k}={v}" for k, v in pairs)


def lane_of(values: Sequence[str]) -> str | None:
    """The first well-formed `release.stage` member's value across every `baggage` line.

    Why the first: a client that appends a second member cannot override the one
    an earlier hop set; `;properties` are metadata, not part of the value (W3C
    Baggage "Header Content"); the value is percent-decoded UTF-8.
    """
    for line in values:
        if LANE_KEY not in line:
            continue
        for raw in line.split(","):
            member = raw.strip(_OWS)
            key, sep, rest = member.partition("=")
            if not sep or key.rstrip(_OWS) != LANE_KEY:
                continue
            if _BAGGAGE_MEMBER.fullmatch(member) is None:
                continue
            value = rest.partition(";")[0].strip(_OWS)
            return unquote(value) if "%" in value else value or None
    return None


def build_baggage(
    values: Sequence[str],
    extra: Sequence[tuple[str, str]],
    drop: Sequence[str] = (),
) -> str | None:
    """Build the upstream `baggage`: valid incoming members unchanged, then our `extra` members.

    Why: W3C Baggage "Header Content" and "Mutating baggage": a list-member not in the format
    MAY be removed (we always do), a value is a URL-encoded UTF-8 string, a key MAY be updated
    (our extra replaces it). "Limits" asks for at least 64 members and 8192 bytes; we keep 180
    (README "On every hop") and, when over, drop whole incoming members from the end, never our
    own nor an incoming `gray.tag`. Members keyed in `drop` (an untrusted client's steering
    members) are removed.
    """
    extras = [_encode_extra(key, value) for key, value in extra]
    if not values:
        return ",".join(extras) if extras else None
    header = values[0] if len(values) == 1 else ",".join(values)
    replaced = {key for key, _ in extra}
    replaced.update(drop)
    size = sum(map(len, extras)) + len(extras) - 1
    count = len(extras)
    valid: list[tuple[str, str]] = []
    for raw in header.split(","):
        member = raw.strip(_OWS)
        match = _BAGGAGE_MEMBER.fullmatch(member)
        if match is None or match.group(1) in replaced:
            continue
        valid.append((match.group(1), member))
    # Protected members are counted first, so the limits drop others before them.
    for key, member in valid:
        if key in _PROTECTED:
            size += len(member) + 1
            count += 1
    members: list[str] = []
    for key, member in valid:
        if key not in _PROTECTED:
            size += len(member) + 1
            count += 1
            if count > BAGGAGE_MAX_MEMBERS or size > BAGGAGE_MAX_BYTES:
                members.extend(m for k, m in valid[len(members) :] if k in _PROTECTED)
                break
        members.append(member)
    members.extend(extras)
    return ",".join(members) if members else None
