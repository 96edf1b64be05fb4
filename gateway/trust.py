"""The client address behind trusted proxies (README "Segments and lanes", who may steer).

Why the right-most untrusted hop: every proxy appends the address it received
the request from to `X-Forwarded-For` (the de-facto form of RFC 7239 §5.2's
`for=`), so only the hops our own proxies appended can be believed; the first
address from the right that is not one of them is the client, and anything left
of it is whatever that client chose to send. A peer that is not a trusted proxy
is the client itself, whatever it sends.
"""

from __future__ import annotations

from gateway.routing import TrustPolicy


def client_address(peer: str, forwarded_for: bytes | None, proxies: TrustPolicy) -> str:
    """The client address: `peer`, or behind trusted proxies the right-most untrusted hop.

    When every hop is a trusted proxy the left-most one is the client (as
    uvicorn's proxy-headers middleware answers).
    """
    if forwarded_for is None or not proxies.trusted(peer):
        return peer
    hops = forwarded_for.decode("latin-1").split(",")
    client = peer
    for raw in reversed(hops):
        hop = raw.strip()
        if not hop:
            continue
        client = hop
        if not proxies.trusted(hop):
            break
    return client
