"""What the request says, and what we decide: one function for the data path and explain.

Why one function: explain must answer exactly what the data path does (README
"Admin API", explain), so both call `decide` on the same scan of the same
header bytes (gateway/headers.py) rather than re-deriving the inputs. It reads
the request — cookies, the client address behind trusted proxies
(gateway/trust.py), who may steer, the colouring tag, the lane in the baggage
(W3C Baggage), the segment inputs — and hands them to `routing.choose_release`
in the order of README "Segments". Pure: no aiohttp, no asyncio.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Final

from gateway import propagation
from gateway.headers import Scanned
from gateway.rollout import CIRCUIT_BREAK, ROLLED_BACK
from gateway.routing import Decision, choose_release, cookie_value
from gateway.segments import salted_hash
from gateway.state import PRIVACY_HASH, PRIVACY_KEEP, ServiceView, Snapshot, live_releases
from gateway.statedoc import ServiceState
from gateway.trust import client_address

_TRIPPED: Final = (CIRCUIT_BREAK, ROLLED_BACK)


def decide(
    snap: Snapshot,
    sv: ServiceView,
    s: Scanned,
    headers: list[tuple[bytes, bytes]],
    path: str,
    target: bytes,
    method: bytes,
    peer: str,
    now: float,
    wall: Callable[[], float],
    rng: random.Random,
    into: Decision | None = None,
) -> Decision | None:
    """The release for one request (None: nothing can serve), with what the handler must strip.

    `s` is the scan of `headers`; `peer` the TCP peer's address; `now` the
    handler's clock (passive-health ejections), `wall` the wall clock (segment
    time windows); `into` a Decision to fill afresh (routing.choose_release).
    """
    stage_cookie = user_cookie = None
    if s.cookie is not None:
        stage_cookie = cookie_value(s.cookie, snap.stage_cookie)
        if s.user is None:
            user_cookie = cookie_value(s.cookie, snap.user_cookie)
    client = peer
    if s.forwarded_for is not None and snap.proxies_on:
        client = client_address(peer, s.forwarded_for, snap.proxies)
    trusted = False
    tag_release: str | None = None
    stage = s.stage
    tag = s.tag
    if stage or stage_cookie or tag is not None:
        trusted = snap.trust.trusted(client)
        if tag is not None and trusted:
            tag_release = sv.tags.get(tag)
    lane_release: str | None = None
    lane: str | None = None
    strip_baggage = False
    baggage = s.baggage
    if baggage is not None:
        lane_trusted = True
        steering = False
        for line in baggage:
            if propagation.LANE_KEY in line or propagation.GRAY_TAG_KEY in line:
                steering = True
                break
        if steering:
            lane_trusted = snap.lanes_trust.trusted(client)
            strip_baggage = not lane_trusted
        if steering and lane_trusted and snap.routing.lanes:
            lane = propagation.lane_of(baggage)
            if lane is not None and lane != sv.baseline:
                lane_release = sv.lanes.get(lane)
            else:
                lane = None
    user_key = s.user or user_cookie
    hit = None
    seg = sv.segments
    if seg is not None:  # one function for the data path and explain (gateway/segments.py)
        hit = seg.evaluate(headers, path, target, method, client, user_key, wall)
    dec = choose_release(
        sv.table,
        baseline=sv.baseline,
        available=live_releases(sv, now),
        stage_header=stage,
        stage_cookie=stage_cookie,
        user_key=user_key,
        trusted=trusted,
        rng=rng,
        mint_uid=snap.sticky_cookie,
        segment=hit[0] if hit is not None else None,
        segment_key=hit[1] if hit is not None else None,
        tag=tag_release,
        lane=lane_release,
        lane_unserved=lane if lane_release is None else None,
        lane_reject=sv.lane_reject,
        tripped=sv.tripped,
        into=into,
    )
    if dec is None:
        return None
    dec.client = client
    if trusted:  # the rest only when they differ from Decision's defaults: fewer stores
        dec.trusted = True
    elif tag is not None:
        dec.strip_tag = True
    if lane is not None:
        dec.lane = lane
    if strip_baggage:
        dec.strip_baggage = True
    return dec


def tripped_releases(services: Mapping[str, ServiceState]) -> dict[str, frozenset[str]]:
    """Per service, the release its stored rollout has in CircuitBreak or RolledBack.

    Why at snapshot time: a tripped release must stop taking segment, tag and
    lane traffic (README "Segments") until `retry`, and the data path
    must not read the rollout per request.
    """
    out: dict[str, frozenset[str]] = {}
    for name, st in services.items():
        raw = st.extra.get("rollout")
        if not isinstance(raw, Mapping):
            continue
        release = raw.get("release")
        if raw.get("state") in _TRIPPED and isinstance(release, str):
            out[name] = frozenset((release,))
    return out


def guard_request(s: Scanned, dec: Decision, snap: Snapshot) -> str | None:
    """Strip what an untrusted client may not send on, and apply `privacy.user_id`.

    Rewrites `s.kept` (what goes upstream): the tag header from an untrusted
    client goes; with `hash` the user header and cookie carry the salted
    SHA-256 of the id, with `drop` neither is sent. Returns the user id as logs
    and spans may show it (the hash), or None.
    """
    kept = s.kept
    if dec.strip_tag:
        tag_l = snap.tag_l
        kept = [(n, v) for n, v in kept if n.lower() != tag_l]
    mode = snap.privacy_mode
    shown: str | None = None
    if mode != PRIVACY_KEEP:
        rc = snap.config.routing
        user_l = snap.user_l
        key = dec.key
        hashed = salted_hash(snap.privacy_salt, key) if key is not None else None
        if mode == PRIVACY_HASH:
            shown = hashed
        out: list[tuple[bytes, bytes]] = []
        for n, v in kept:
            ln = n.lower()
            if ln == user_l:
                if mode == PRIVACY_HASH and hashed is not None:
                    out.append((n, hashed.encode()))
                continue
            if ln == b"cookie" and rc.user_cookie in v.decode("latin-1"):
                v2 = _replace_cookie(
                    v.decode("latin-1"),
                    rc.user_cookie,
                    hashed if mode == PRIVACY_HASH else None,
                )
                if v2:
                    out.append((n, v2.encode("latin-1")))
                continue
            out.append((n, v))
        kept = out
    s.kept = kept
    return shown


def _replace_cookie(header: str, name: str, value: str | None) -> str:
    """The Cookie header with `name`'s pairs given `value`, or removed when None (RFC 6265 §5.4)."""
    parts: list[str] = []
    for part in header.split(";"):
        k, sep, _ = part.partition("=")
        if sep and k.strip() == name:
            if value is not None:
                parts.append(f"{name}={value}")
            continue
        if part.strip():
            parts.append(part.strip())
    return "; ".join(parts)


def shown_user(snap: Snapshot, key: str | None) -> str | None:
    """A user id as explain and logs may show it under `privacy.user_id`."""
    if key is None or snap.privacy_mode == PRIVACY_KEEP:
        return key
    if snap.privacy_mode == PRIVACY_HASH:
        return salted_hash(snap.privacy_salt, key)
    return None
