"""When a gateway process is ready for traffic (pure; `/readyz`).

Why this rule: a release with weight > 0 and no endpoint gets its share of
requests served by the baseline instead (docs/configuration.md, "Health and
readiness"), so the split the operator set, and every sticky user's release,
silently differ from the state store; a process that has not yet seen a Consul-discovered release's
endpoints must not take traffic in that state. The rule subsumes "every
service has an endpoint" (at least one release of a service has a positive
weight). The price: every replica sees the same Consul, so a weighted release
that loses all its endpoints takes every replica out of rotation together;
the guard's `min_endpoints` rollback (weight 0) makes them ready again, as
does setting the weight to 0 by hand.
"""

from __future__ import annotations

from gateway.state import Snapshot


def unready_releases(snap: Snapshot) -> list[tuple[str, str]]:
    """(service, release) pairs with a positive weight and no endpoint, in config order."""
    return [
        (name, rname)
        for name, sv in snap.services.items()
        for rname, rv in sv.releases.items()
        if rv.raw_weight > 0 and not rv.endpoints
    ]
