"""Who may steer, colouring tags, lanes, the gray tag and `privacy:` (README "Segments and lanes").

Why apart from gateway/config.py: these fields belong together (they decide which
client may pick a release, and what leaves the gateway about a user); this runs
once per config load and names every wrong field, as the rest of the config does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.config_syntax import key_path
from gateway.segments import USER_SALT_ENV

AddError = Callable[[str, str], None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LANE_FALLBACKS: Final = ("baseline", "reject")
USER_ID_MODES: Final = ("keep", "hash", "drop")
# Loopback and the private ranges (RFC 1918, RFC 4193): east-west callers inside the cluster.
DEFAULT_LANES_TRUST: Final[tuple[Network, ...]] = tuple(
    ipaddress.ip_network(c)
    for c in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
ROUTING_FIELDS: Final = frozenset(
    {"trusted_proxies", "lanes_trust", "tag_header", "tags", "lanes", "lane_fallback"}
)
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9._-]+$")
_HEADER_RE: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A gray.tag key or value: no `;` or `=` (they separate pairs), no `,` or space (baggage syntax).
_TAG_PART_RE: Final = re.compile(r"^[A-Za-z0-9._:/@+-]+$")


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """What the upstream, logs, spans and explain may see of the user id (`privacy.user_id`)."""

    user_id: str = "keep"  # keep | hash | drop
    salt: str = ""  # from env GATEWAY_USER_SALT, for `hash`


def cidr_list(v: object, path: str, add: AddError) -> tuple[Network, ...] | None:
    """A list of CIDRs (a bare address is a /32 or /128); None after an error."""
    if not isinstance(v, list):
        add(path, f"must be a list of CIDRs, not {v!r}")
        return None
    nets: list[Network] = []
    ok = True
    for i, c in enumerate(v):
        try:
            if not isinstance(c, str):
                raise ValueError
            nets.append(ipaddress.ip_network(c.strip(), strict=False))
        except ValueError:
            add(f"{path}[{i}]", f"not a CIDR: {c!r}")
            ok = False
    return tuple(nets) if ok else None


def parse_routing(m: Mapping[str, Any], add: AddError) -> dict[str, Any]:
    """The steering fields of `routing:` as RoutingConfig keyword arguments (absent: defaults)."""
    out: dict[str, Any] = {}
    for key in ("trusted_proxies", "lanes_trust"):
        if key in m:
            nets = cidr_list(m[key], f"routing.{key}", add)
            if nets is not None:
                out[key] = nets
    if "tag_header" in m:
        th = m["tag_header"]
        if not isinstance(th, str) or not _HEADER_RE.match(th):
            add("routing.tag_header", f"must be a valid header name, not {th!r}")
        else:
            out["tag_header"] = th
    if m.get("tags") is not None:
        tm = m["tags"]
        if not isinstance(tm, Mapping):
            add("routing.tags", "must be a mapping of tag value: release")
        else:
            tags: list[tuple[str, str]] = []
            for k, r in tm.items():
                p = key_path("routing.tags", k)
                if not isinstance(k, str) or not k or k != k.strip():
                    add(p, "a tag value must be a non-empty string without surrounding spaces")
                elif not isinstance(r, str) or not _NAME_RE.match(r):
                    add(p, f"must name a release, not {r!r}")
                else:
                    tags.append((k, r))
            out["tags"] = tuple(tags)
    if "lanes" in m:
        if not isinstance(m["lanes"], bool):
            add("routing.lanes", f"must be true or false, not {m['lanes']!r}")
        else:
            out["lanes"] = m["lanes"]
    if "lane_fallback" in m:
        lf = m["lane_fallback"]
        if lf not in LANE_FALLBACKS:
            add("routing.lane_fallback", f"must be one of {', '.join(LANE_FALLBACKS)}, not {lf!r}")
        else:
            out["lane_fallback"] = lf
    return out


def parse_release(m: Mapping[str, Any], path: str, add: AddError) -> dict[str, Any]:
    """A release's `lanes:` and `tag:` as ReleaseConfig keyword arguments."""
    out: dict[str, Any] = {}
    if m.get("lanes") is not None:
        lv = m["lanes"]
        if not isinstance(lv, list):
            add(f"{path}.lanes", "must be a list of lane names")
        else:
            lanes: list[str] = []
            for i, lane in enumerate(lv):
                if not isinstance(lane, str) or not _NAME_RE.match(lane):
                    add(f"{path}.lanes[{i}]", "a lane is letters, digits, '.', '_' or '-'")
                elif lane in lanes:
                    add(f"{path}.lanes[{i}]", f"lane {lane!r} is listed twice")
                else:
                    lanes.append(lane)
            out["lanes"] = tuple(lanes)
    if m.get("tag") is not None:
        tv = m["tag"]
        if not isinstance(tv, Mapping) or not tv:
            add(f"{path}.tag", "must be a non-empty mapping of key: value")
        else:
            pairs: list[tuple[str, str]] = []
            for k, v in tv.items():
                p = key_path(f"{path}.tag", k)
                if not isinstance(k, str) or not _TAG_PART_RE.match(k):
                    add(p, "a tag key is letters, digits or . _ : / @ + -")
                elif not isinstance(v, str | int) or isinstance(v, bool):
                    add(p, f"must be a string, not {v!r}")
                elif not _TAG_PART_RE.match(str(v)):
                    add(p, "a tag value is letters, digits or . _ : / @ + - (no ';', '=', ',')")
                else:
                    pairs.append((k, str(v)))
            out["tag"] = tuple(pairs)
    return out


def parse_privacy(v: object, env: Mapping[str, str], add: AddError) -> PrivacyConfig:
    """`privacy: {user_id: keep|hash|drop}`; `hash` needs the salt in env GATEWAY_USER_SALT."""
    if v is None:
        return PrivacyConfig()
    if not isinstance(v, Mapping):
        add("privacy", "must be a mapping")
        return PrivacyConfig()
    for k in v:
        if k != "user_id":
            add(key_path("privacy", k), "unknown field (allowed: user_id)")
    mode = v.get("user_id", "keep")
    if mode not in USER_ID_MODES:
        add("privacy.user_id", f"must be one of {', '.join(USER_ID_MODES)}, not {mode!r}")
        return PrivacyConfig()
    salt = env.get(USER_SALT_ENV, "")
    if mode == "hash" and not salt:
        add("privacy.user_id", f"hash needs a salt in env {USER_SALT_ENV}")
    return PrivacyConfig(str(mode), salt)


def check_services(
    services: Mapping[str, Any], tags: tuple[tuple[str, str], ...], add: AddError
) -> None:
    """Cross-field rules: tags name a release some service has; one lane, one release."""
    every = {r for s in services.values() for r in s.releases}
    for value, release in tags:
        if every and release not in every:
            add(key_path("routing.tags", value), f"{release!r} is a release of no service")
    for s in services.values():
        owner: dict[str, str] = {}
        for r in s.releases.values():
            for i, lane in enumerate(r.lanes):
                p = f"{key_path(key_path('services', s.name) + '.releases', r.name)}.lanes[{i}]"
                if lane == s.baseline:
                    add(p, f"{lane!r} is the baseline's name, which is not a lane")
                elif lane in s.releases and lane != r.name:
                    add(p, f"{lane!r} is the name of release {lane!r}, which holds that lane")
                elif lane in owner:
                    add(p, f"lane {lane!r} is already claimed by release {owner[lane]!r}")
                else:
                    owner[lane] = r.name
