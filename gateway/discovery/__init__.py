"""Endpoints per release: listed in the config or discovered from Consul.

README "Consul discovery".

Why a package of its own: discovery streams complete endpoint mappings
{(service, release): endpoints} to one callback; the owner merges them with the
static ones and rebuilds the snapshot (state.build_snapshot), so nothing here
knows about routing, weights or aiohttp servers.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import Config, ConsulSelector, Endpoint
from gateway.discovery.consul import ConsulDiscovery, EndpointSets, ReleaseKey
from gateway.discovery.pacing import Pacing

__all__ = [
    "ConsulDiscovery",
    "EndpointSets",
    "Pacing",
    "ReleaseKey",
    "consul_selectors",
    "merge_endpoints",
]


def consul_selectors(config: Config) -> dict[ReleaseKey, ConsulSelector]:
    """Every release that names a Consul selector, keyed like build_snapshot's endpoints."""
    return {
        (s.name, r.name): r.consul
        for s in config.services.values()
        for r in s.releases.values()
        if r.consul is not None
    }


def merge_endpoints(
    static: Mapping[ReleaseKey, tuple[Endpoint, ...]],
    discovered: Mapping[ReleaseKey, tuple[Endpoint, ...]],
) -> dict[ReleaseKey, tuple[Endpoint, ...]]:
    """Static endpoints first, then discovered ones not already listed.

    Both may be set (README "Consul discovery").
    """
    out = dict(static)
    for key, eps in discovered.items():
        have = out.get(key, ())
        seen = {(e.host, e.port) for e in have}
        out[key] = have + tuple(e for e in eps if (e.host, e.port) not in seen)
    return out
