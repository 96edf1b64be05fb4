"""Segments changed live through the admin API, laid over the config's (README "Segments").

Why a module of its own: `PUT /admin/services/{s}/segments` stores the list
as written in the state document (`segments` of the service), and every
process (master, each worker, each replica) turns that list into matchers
when it applies the document, with the same code that parses the config's
`segments:` (gateway/segments_config.py), so a list the admin API accepted is
a list every process accepts.

Why a cache: a list can name a user file of a million keys; parsing it again
on every weight change or discovery update would stall the event loop. The
parsed set is kept per service while its stored list is unchanged, and
dropped on a config reload, so user files are re-read on PUT and on reload
(and nowhere else).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config import Config, ServiceConfig
from gateway.errors import BadRequest
from gateway.routing import WeightTable
from gateway.segments import SegmentSet
from gateway.segments_config import parse_segments
from gateway.statedoc import StateDoc, weight_problem

log = logging.getLogger("gateway.segments")

KEY = "segments"  # the service's field in the state document


def base_dir(config: Config) -> Path:
    """Where relative user files resolve: next to the config file, as for its own segments."""
    src = config.source
    return Path.cwd() if src.startswith("<") else Path(src).parent


def parse(
    svc: ServiceConfig, raw: object, config: Config, env: Mapping[str, str]
) -> SegmentSet | None:
    """A list as the admin API takes it -> matchers; BadRequest naming the first wrong field.

    Field paths read as in the config, rooted at `segments`
    (e.g. `segments[2].match.header.X-Region.regex`).
    """
    errors: list[tuple[str, str]] = []
    if not isinstance(raw, list):
        raise BadRequest("body must be a JSON array of segments (as in the config)", KEY)
    segs = parse_segments(
        raw,
        KEY,
        lambda path, msg: errors.append((path, msg)),
        service=svc.name,
        releases=tuple(svc.releases),
        base_dir=base_dir(config),
        env=env,
    )
    if errors:
        path, msg = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BadRequest(msg + more, path)
    return segs


def stored(doc: StateDoc, service: str) -> list[Any] | None:
    """The service's live list in the document, or None when the config's list is in force."""
    st = doc.services.get(service)
    raw = st.extra.get(KEY) if st is not None else None
    return raw if isinstance(raw, list) else None


class LiveSegments:
    """Per process: the parsed live lists, re-parsed only when a stored list changes."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        # service -> (stored list as text, its matchers, the config generation parsed for)
        self._cache: dict[str, tuple[str, SegmentSet | None, int]] = {}
        self._generation = 0

    def forget(self) -> None:
        """A config reload: re-read user files and re-check releases on the next apply.

        The parsed sets are kept (stale) as the last good ones, should a list no
        longer parse against the new config.
        """
        self._generation += 1

    def remember(self, service: str, raw: list[Any], segs: SegmentSet | None) -> None:
        """A list just parsed for a PUT: the apply that follows need not parse it again."""
        self._cache[service] = (_text(raw), segs, self._generation)

    def overlay(self, config: Config, doc: StateDoc) -> Config:
        """`config` with every stored list in force instead of the config's own.

        A stored list that no longer parses (a release removed from the config, a
        user file gone) leaves the last list that did in force for that service, or
        the config's, with a warning: last known good.
        """
        changed: dict[str, ServiceConfig] = {}
        for name, svc in config.services.items():
            raw = stored(doc, name)
            if raw is None:
                self._cache.pop(name, None)
                continue
            text = _text(raw)
            hit = self._cache.get(name)
            if hit is None or hit[0] != text or hit[2] != self._generation:
                try:
                    segs = parse(svc, raw, config, self.env)
                except BadRequest as e:
                    keep = "the last good list" if hit is not None else "the config's list"
                    log.warning(
                        "state: the live segments of %r are not usable (%s: %s); %s stays in force",
                        name,
                        e.field,
                        e.message,
                        keep,
                    )
                    # Kept for this list and config: one warning, not one per apply.
                    segs = hit[1] if hit is not None else svc.segments
                hit = self._cache[name] = (text, segs, self._generation)
            changed[name] = replace(svc, segments=hit[1])
        if not changed:
            return config
        return replace(config, services={**config.services, **changed})


def _text(raw: object) -> str:
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def as_json(segs: SegmentSet | None) -> list[Any]:
    """The list in force as the admin API shows it (the document it was parsed from)."""
    if segs is None:
        return []
    doc = segs.doc
    return json.loads(json.dumps(doc, default=str)) if isinstance(doc, list) else []


def split_change(
    service: str, segs: SegmentSet | None, segment: str, body: Mapping[str, float]
) -> tuple[WeightTable, WeightTable, dict[str, float]]:
    """(the segment's split now, after `body`, the new raw weights) for preview.

    A weighted segment keeps the weights `body` does not name, as PUT …/weights
    does for the service; a segment naming one release is that release at 100.
    Both tables are salted `<service>/<segment>` like the data path's.
    """
    route = None
    for s in segs.segments if segs is not None else ():
        if s.name == segment:
            route = s.route
    if route is None:
        have = ", ".join(s.name for s in segs.segments) if segs is not None else "none"
        raise BadRequest(f"no segment {segment!r} in force (have: {have})", "segment")
    salt = f"{service}/{segment}"
    if route.table is not None:
        current = dict(route.table.raw)
    else:
        current = {str(route.release): 1.0}
    merged = {**current}
    for rel, w in body.items():
        if (p := weight_problem(w)) is not None:
            raise BadRequest(f"weight of {rel!r} {p}", f"weights.{rel}")
        merged[rel] = float(w)
    if not any(w > 0 for w in merged.values()):
        raise BadRequest("all weights would be zero; at least one must be > 0", "weights")
    return WeightTable.build(salt, current), WeightTable.build(salt, merged), merged
