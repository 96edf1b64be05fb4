"""docs/configuration.md and the config loader stay in step.

Every key the loader accepts has a row in the reference, and every row names a
key the loader accepts. The accepted keys come from the loader itself: each
strict mapping goes through a module-level `_unknown(m, allowed, path, ...)`
(gateway/config.py's, or a section module's own), so spies on those functions,
fed a config that opens every nested mapping they learn of, read the loader's
own tables; the segment DSL keeps its keys as data in gateway/segments_config.py.
A documented key is checked by loading a config that sets it, so a section
checked some other way is checked in that direction too.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from gateway import segments_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
TOP = "(top level)"
NAMES = {"<service>": "svc", "<release>": "rel"}  # placeholder -> the name used in probes
PROBE = "zz_not_a_field"
# How the loader words an unknown key (not "unknown template ...", a bad value).
UNKNOWN_KEY = ("unknown field", "unknown match key")

Raw = dict[str, Any]


def _base() -> Raw:
    rel = {"weight": 1, "upstreams": [{"url": "http://127.0.0.1:9"}]}
    return {"services": {"svc": {"releases": {"rel": rel}}}}


def _norm(path: str) -> str:
    """`services.svc.guard.rules[0]` -> `services.<service>.guard.rules[]`."""
    back = {v: k for k, v in NAMES.items()}
    segs = [re.sub(r"\[\d+\]", "[]", s) for s in path.split(".") if s]
    return ".".join(back.get(s, s) for s in segs)


def _errors(raw: Raw) -> list[tuple[str, str]]:
    try:
        config_mod.build(raw, env={})
    except ConfigError as e:
        return list(e.errors)
    return []


def _checkers() -> list[tuple[Any, Callable[..., Any]]]:
    """(module, function) for every `_unknown(m, allowed, path, ...)` of a gateway module.

    The loader and each config section module (gateway/config.py and the `*_config.py`
    modules it calls) refuse unknown keys through a module-level `_unknown` taking the
    mapping, the allowed keys and the path first; each module calls its own by name.
    """
    found = []
    for src in sorted((ROOT / "gateway").rglob("*.py")):
        if "_unknown" not in src.read_text(encoding="utf-8"):
            continue
        name = ".".join(src.relative_to(ROOT).with_suffix("").parts)
        mod = importlib.import_module(name)
        fn = getattr(mod, "_unknown", None)
        if callable(fn):
            found.append((mod, fn))
    return found


CHECKERS = _checkers()


def _spy_run(raw: Raw) -> dict[str, set[str]]:
    """Section -> the keys the `_unknown` checks allowed there, for one load of `raw`."""
    seen: dict[str, set[str]] = {}

    def spying(real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(m: Any, allowed: Any, path: str, *rest: Any, **kw: Any) -> Any:
            seen.setdefault(_norm(path), set()).update(str(k) for k in allowed)
            return real(m, allowed, path, *rest, **kw)

        return spy

    for mod, fn in CHECKERS:
        mod._unknown = spying(fn)
    try:
        _errors(raw)
    finally:
        for mod, fn in CHECKERS:
            mod._unknown = fn
    return seen


def accepted_keys() -> dict[str, set[str]]:
    """Open every key that the loader treats as a mapping (or list of mappings) until no new one."""
    raw = _base()
    svc = raw["services"]["svc"]
    rel = svc["releases"]["rel"]
    where: dict[str, dict[str, Any]] = {
        "": raw,
        "services.<service>": svc,
        "services.<service>.releases.<release>": rel,
        "services.<service>.releases.<release>.upstreams[]": rel["upstreams"][0],
    }
    seen = _spy_run(raw)
    tried: set[tuple[str, str]] = set()
    grown = True
    while grown:
        grown = False
        for section, keys in list(seen.items()):
            m = where.get(section)
            for key in sorted(keys):
                if m is None or (section, key) in tried or key in m:
                    continue
                tried.add((section, key))
                child = f"{section}.{key}" if section else key
                for value, inner in (({}, child), ([{}], f"{child}[]")):
                    m[key] = value
                    now = _spy_run(raw)
                    if inner in now:
                        seen, grown = now, True
                        where[inner] = value if isinstance(value, dict) else value[0]
                        break
                else:
                    del m[key]
    seen.setdefault("services.<service>.segments[]", set()).update(segments_config._SEGMENT_KEYS)
    seen.setdefault("services.<service>.segments[].match", set()).update(
        segments_config._MATCH_KEYS
    )
    return seen


# Other spellings of the placeholders, as a writer may use them.
_PLACEHOLDERS = {"<s>": "<service>", "<svc>": "<service>", "<r>": "<release>", "<rel>": "<release>"}
# Column headers -> the cell each holds ("field" may also be "key").
_COLUMNS = {"field": "field", "key": "field", "default": "default", "unit": "unit"}


def _canonical(path: str) -> str:
    segs = [re.sub(r"\[[^\]]*\]$", "[]", s) for s in path.split(".")]
    return ".".join(_PLACEHOLDERS.get(s, s) for s in segs)


def _column(header: str) -> str | None:
    h = header.strip().lower()
    if "reload" in h:
        return "reload"
    return _COLUMNS.get(h, "meaning" if h else None)


def documented() -> dict[str, dict[str, dict[str, str]]]:
    """Section -> field -> its cells by column (field, default, unit, reload, meaning).

    A table belongs to the heading above it whose text is the section's path in backticks
    (`### (top level)` for the root); a field cell that holds a dotted path
    (`analysis.prometheus.address`) names its own section instead.
    """
    out: dict[str, dict[str, dict[str, str]]] = {}
    section: str | None = None
    columns: list[str | None] = []
    fenced = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            m = re.fullmatch(r"`([^`]+)`", title)
            section = "" if title == TOP else _canonical(m.group(1)) if m else None
            columns = []
            continue
        if not line.startswith("|"):
            columns = []
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not columns:  # the header row of a table
            columns = [_column(c) for c in cells]
            continue
        if "field" not in columns or set(cells) <= {"---", ":---", "---:"} or not cells:
            continue
        named = {c: v for c, v in zip(columns, cells, strict=False) if c is not None}
        field = re.fullmatch(r"`([^`]+)`", named.get("field", ""))
        if field is None:
            continue
        path = _canonical(field.group(1))
        if "." in path and not path.startswith("<"):
            where, _, key = path.rpartition(".")
        elif section is not None:
            where, key = section, path
        else:
            continue
        out.setdefault(where, {})[key] = named
    return out


def _row_hint(section: str, key: str) -> str:
    heading = TOP if section == "" else f"`{section}`"
    return (
        f"add a row to the table under `### {heading}` in docs/configuration.md "
        f"(create the heading and its table if it is missing):\n"
        f"| `{key}` | <default> | <unit> | <applied/restart/kept on reload> | <what it does> |"
    )


def test_every_accepted_field_is_documented() -> None:
    docs = documented()
    missing = [
        _row_hint(section, key)
        for section, keys in sorted(accepted_keys().items())
        for key in sorted(keys)
        if key not in docs.get(section, {})
    ]
    assert not missing, "\n\n".join(missing)


def test_the_exploration_reaches_every_nested_section() -> None:
    """The spy saw the deep sections, so a missing row there would be caught."""
    found = accepted_keys()
    for section in (
        "",
        "admin",
        "timeouts",
        "services.<service>.guard.rules[]",
        "services.<service>.releases.<release>.upstreams[]",
        "services.<service>.releases.<release>.health_check",
    ):
        assert section in found, section


def _materialize(section: str, key: str, value: object) -> tuple[Raw, str]:
    """A config whose `section` holds `key: value`, and the concrete path of that key."""
    raw = _base()
    node: Any = raw
    concrete: list[str] = []
    for seg in section.split(".") if section else []:
        name, is_list = (seg[:-2], True) if seg.endswith("[]") else (seg, False)
        name = NAMES.get(name, name)
        nxt = node.get(name)
        if is_list:
            if not isinstance(nxt, list) or not nxt or not isinstance(nxt[0], dict):
                nxt = node[name] = [{}]
            node = nxt[0]
            concrete.append(f"{name}[0]")
        else:
            if not isinstance(nxt, dict):
                nxt = node[name] = {}
            node = nxt
            concrete.append(name)
    node[key] = value
    return raw, ".".join([*concrete, key])


def _unknown_at(section: str, key: str) -> bool:
    raw, path = _materialize(section, key, None)
    return any(p == path and msg.startswith(UNKNOWN_KEY) for p, msg in _errors(raw))


def _documented_fields() -> Iterator[tuple[str, str]]:
    """Documented fields, but for placeholders (`analysis.templates.<name>`: any name)."""
    for section, fields in documented().items():
        for key in fields:
            if not key.startswith("<"):
                yield section, key


@pytest.mark.parametrize(
    ("section", "key"),
    list(_documented_fields()),
    ids=[f"{s or 'top'}.{k}" for s, k in _documented_fields()],
)
def test_every_documented_field_is_accepted(section: str, key: str) -> None:
    assert _unknown_at(section, PROBE), (
        f"docs/configuration.md documents section `{section or TOP}`, but the loader does not "
        f"refuse an unknown key there, so this test cannot tell whether `{key}` is real: "
        f"check the section's path, or make the loader refuse unknown keys in it"
    )
    assert not _unknown_at(section, key), (
        f"docs/configuration.md documents `{key}` under `{section or TOP}`, "
        f"but the loader refuses it as an unknown field: fix or remove the row"
    )


def test_every_row_fills_default_unit_reload_and_meaning() -> None:
    reload_words = ("applied", "restart", "kept", "see rows")
    for section, fields in documented().items():
        for key, cells in fields.items():
            where = f"`{section or TOP}`.`{key}`"
            for column in ("default", "unit", "reload", "meaning"):
                assert cells.get(column), (
                    f"docs/configuration.md {where}: the row needs a `{column}` cell "
                    "(columns: field | default | unit | reload | meaning)"
                )
            assert cells["reload"].startswith(reload_words), (
                f"{where}: the reload cell starts with applied, restart or kept"
            )


def test_the_loader_refuses_a_field_nobody_documented() -> None:
    """The check above is not vacuous: an unknown key really is refused."""
    assert _unknown_at("services.<service>.guard", PROBE)
    assert not _unknown_at("services.<service>.guard", "window")
