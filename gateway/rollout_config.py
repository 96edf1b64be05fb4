"""The top-level `rollout:` config section: step minimums, deadlines and hooks.

Why its own module: gateway/config.py only calls `parse_rollout` and keeps
`RolloutConfig` on `Config`; the limits and hook fields are read here once per
load and every wrong value names its field (README "Rollouts",
docs/configuration.md "Rollouts").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

AddError = Callable[[str, str], None]

HOOK_TYPES: Final = (
    "pre_rollout",
    "step",
    "confirm_step",
    "confirm_promotion",
    "post_rollout",
    "rollback",
    "event",
)
DEADLINE_ACTIONS: Final = ("pause", "rollback")
MAX_HOOKS: Final = 32
MAX_RETRIES: Final = 10
MAX_HOOK_TIMEOUT: Final = 300.0
# The lease outlives a few driver ticks (1 s); a dead holder is replaced within it.
MIN_LEASE_TTL: Final = 3.0
MAX_LEASE_TTL: Final = 600.0
MIN_PUBLISH: Final = 0.5  # seconds: bounds each replica's store writes while a step waits
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_KEYS: Final = (
    "min_first_pause",
    "min_pause",
    "confirm_timeout",
    "progress_deadline",
    "progress_deadline_action",
    "webhooks",
    "lease_ttl",
    "publish_interval",
)
_HOOK_KEYS: Final = ("name", "type", "url", "timeout", "retries")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One rollout hook (Flagger's webhooks): called by the rollout driver, never per request."""

    name: str
    type: str  # one of HOOK_TYPES
    url: str
    timeout: float = 10.0  # seconds per attempt
    retries: int = 2  # extra attempts after a failed one (connection error, timeout, 5xx)


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    min_first_pause: float = 300.0  # a plan's first step pauses at least this long
    min_pause: float = 900.0  # every later non-final step at least this long
    confirm_timeout: float = 1800.0  # CircuitBreak confirms itself after this long
    progress_deadline: float = 1800.0  # Pending or Paused longer than this: alert, then act
    progress_deadline_action: str = "pause"  # or "rollback"
    webhooks: tuple[Webhook, ...] = ()
    # Several replicas (gateway/lease.py): how long the acting replica's lease lasts
    # unrenewed, and how often each replica publishes what it served in a step.
    lease_ttl: float = 10.0
    publish_interval: float = 5.0

    def hooks(self, kind: str) -> tuple[Webhook, ...]:
        return tuple(h for h in self.webhooks if h.type == kind)


class _Adder:
    """The `errs` shape gateway/config.py's helpers take, around an `add` callable."""

    def __init__(self, add: AddError) -> None:
        self.add = add


def _unknown(m: Mapping[str, Any], allowed: tuple[str, ...], path: str, add: AddError) -> bool:
    """The loader's own unknown-key check (same "did you mean" hints); False if any."""
    from gateway import config as config_mod

    seen: list[str] = []

    def note(p: str, msg: str) -> None:
        seen.append(p)
        add(p, msg)

    config_mod._unknown(m, set(allowed), path, _Adder(note))  # type: ignore[arg-type]
    return not seen


def _duration(m: Mapping[str, object], key: str, default: float, add: AddError) -> float:
    from gateway.config import parse_duration

    if key not in m:
        return default
    d = parse_duration(m[key])
    if d is None:
        add(f"rollout.{key}", "must be a duration such as 30s, 5m or 1h")
        return default
    return d


def _bounded(
    m: Mapping[str, object], key: str, default: float, lo: float, hi: float, add: AddError
) -> float:
    """`_duration` within [lo, hi] seconds; outside it the field is refused and `default` used."""
    d = _duration(m, key, default, add)
    if not lo <= d <= hi:
        add(f"rollout.{key}", f"must be a duration between {lo:g}s and {hi:g}s")
        return default
    return d


def _http_url(url: object) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _webhook(v: object, path: str, add: AddError) -> Webhook | None:
    from gateway.config import parse_duration

    if not isinstance(v, Mapping):
        add(path, "must be a mapping {name, type, url, timeout, retries}")
        return None
    ok = _unknown(v, _HOOK_KEYS, path, add)
    name = v.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        add(f"{path}.name", "must be a name of letters, digits, '.', '_' or '-' (at most 63)")
        ok = False
    kind = v.get("type")
    if kind not in HOOK_TYPES:
        add(f"{path}.type", f"must be one of {', '.join(HOOK_TYPES)}")
        ok = False
    url = v.get("url")
    if not _http_url(url):
        add(f"{path}.url", "must be an http:// or https:// URL with a host")
        ok = False
    timeout = 10.0
    if "timeout" in v:
        t = parse_duration(v["timeout"])
        if t is None or not 0 < t <= MAX_HOOK_TIMEOUT:
            add(f"{path}.timeout", f"must be a duration > 0 and at most {MAX_HOOK_TIMEOUT:g}s")
            ok = False
        else:
            timeout = t
    retries = v.get("retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= MAX_RETRIES:
        add(f"{path}.retries", f"must be an integer between 0 and {MAX_RETRIES}")
        ok = False
    if not ok:
        return None
    assert isinstance(name, str) and isinstance(kind, str) and isinstance(url, str)
    return Webhook(name, kind, url, timeout, int(retries))


def parse_rollout(v: object, add: AddError) -> RolloutConfig:
    """`rollout:` → RolloutConfig; every problem goes to `add(field path, message)`."""
    d = RolloutConfig()
    if v is None:
        return d
    if not isinstance(v, Mapping):
        add("rollout", "must be a mapping")
        return d
    _unknown(v, _KEYS, "rollout", add)
    first = _duration(v, "min_first_pause", d.min_first_pause, add)
    later = _duration(v, "min_pause", d.min_pause, add)
    ct = _duration(v, "confirm_timeout", d.confirm_timeout, add)
    if ct <= 0:
        add("rollout.confirm_timeout", "must be a duration > 0 such as 30m")
        ct = d.confirm_timeout
    deadline = _duration(v, "progress_deadline", d.progress_deadline, add)
    if deadline <= 0:
        add("rollout.progress_deadline", "must be a duration > 0 such as 30m")
        deadline = d.progress_deadline
    action = v.get("progress_deadline_action", d.progress_deadline_action)
    if action not in DEADLINE_ACTIONS:
        add("rollout.progress_deadline_action", f"must be one of {', '.join(DEADLINE_ACTIONS)}")
        action = d.progress_deadline_action
    hooks: list[Webhook] = []
    raw = v.get("webhooks")
    if raw is not None:
        if not isinstance(raw, list):
            add("rollout.webhooks", "must be a list of {name, type, url, timeout, retries}")
        elif len(raw) > MAX_HOOKS:
            add("rollout.webhooks", f"at most {MAX_HOOKS} hooks")
        else:
            seen: set[str] = set()
            for i, h in enumerate(raw):
                hook = _webhook(h, f"rollout.webhooks[{i}]", add)
                if hook is None:
                    continue
                if hook.name in seen:
                    add(f"rollout.webhooks[{i}].name", f"{hook.name!r} is used twice")
                    continue
                seen.add(hook.name)
                hooks.append(hook)
    ttl = _bounded(v, "lease_ttl", d.lease_ttl, MIN_LEASE_TTL, MAX_LEASE_TTL, add)
    every = _bounded(v, "publish_interval", d.publish_interval, MIN_PUBLISH, MAX_LEASE_TTL, add)
    return RolloutConfig(first, later, ct, deadline, str(action), tuple(hooks), ttl, every)
