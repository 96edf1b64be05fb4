"""Bad input for who may steer, tags, lanes, the gray tag and privacy: exit 2 naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as C
from gateway.errors import ConfigError
from gateway.steering_config import DEFAULT_LANES_TRUST
from tests.conftest import gateway_config

ROOT = Path(__file__).resolve().parent.parent
UP = "http://127.0.0.1:9001"


def _doc(routing: Any = None, gray: Any = None, top: Any = None, **svc: Any) -> dict[str, Any]:
    releases = {
        "stable": {"weight": 90, "upstreams": [UP]},
        "gray": {"weight": 10, "upstreams": [UP], **(gray or {})},
        "v3": {"weight": 0, "upstreams": [UP]},
    }
    doc = gateway_config({"svc": {"releases": releases, **svc}})
    if routing is not None:
        doc["routing"] = routing
    doc.update(top or {})
    return doc


BAD = [
    ("bad-cidr-proxies", _doc({"trusted_proxies": ["10.0.0.0/33"]}), "routing.trusted_proxies[0]"),
    ("proxies-not-list", _doc({"trusted_proxies": "10.0.0.0/8"}), "routing.trusted_proxies"),
    ("bad-cidr-lanes", _doc({"lanes_trust": ["10.0.0/8x"]}), "routing.lanes_trust[0]"),
    ("lanes-trust-number", _doc({"lanes_trust": [10]}), "routing.lanes_trust[0]"),
    ("tag-header-space", _doc({"tag_header": "X Tag"}), "routing.tag_header"),
    ("tags-not-mapping", _doc({"tags": ["gray"]}), "routing.tags"),
    ("tags-unknown-release", _doc({"tags": {"canary": "nope"}}), "routing.tags.canary"),
    ("tags-release-not-string", _doc({"tags": {"canary": 5}}), "routing.tags.canary"),
    ("lanes-not-bool", _doc({"lanes": "yes"}), "routing.lanes"),
    ("lane-fallback", _doc({"lane_fallback": "drop"}), "routing.lane_fallback"),
    ("release-lanes-not-list", _doc(gray={"lanes": "canary"}), "services.svc.releases.gray.lanes"),
    ("release-lane-bad-name", _doc(gray={"lanes": ["a b"]}), "services.svc.releases.gray.lanes[0]"),
    (
        "release-lane-twice",
        _doc(gray={"lanes": ["x", "x"]}),
        "services.svc.releases.gray.lanes[1]",
    ),
    (
        "lane-is-baseline",
        _doc(gray={"lanes": ["stable"]}),
        "services.svc.releases.gray.lanes[0]",
    ),
    (
        "lane-is-other-release",
        _doc(gray={"lanes": ["v3"]}),
        "services.svc.releases.gray.lanes[0]",
    ),
    ("tag-not-mapping", _doc(gray={"tag": ["env"]}), "services.svc.releases.gray.tag"),
    (
        "tag-value-semicolon",
        _doc(gray={"tag": {"env": "a;b"}}),
        "services.svc.releases.gray.tag.env",
    ),
    ("tag-key-equals", _doc(gray={"tag": {"a=b": "x"}}), "services.svc.releases.gray.tag['a=b']"),
    ("privacy-mode", _doc(top={"privacy": {"user_id": "encrypt"}}), "privacy.user_id"),
    ("privacy-unknown", _doc(top={"privacy": {"user": "hash"}}), "privacy.user"),
    ("privacy-not-mapping", _doc(top={"privacy": "hash"}), "privacy"),
    ("privacy-hash-no-salt", _doc(top={"privacy": {"user_id": "hash"}}), "privacy.user_id"),
    ("routing-typo", _doc({"lane": True}), "routing.lane"),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_value_names_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert field in [p for p, _ in e.value.errors], e.value.errors


def test_two_releases_claiming_one_lane() -> None:
    doc = _doc(gray={"lanes": ["canary"]})
    doc["services"]["svc"]["releases"]["v3"]["lanes"] = ["canary"]
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    [(field, why)] = e.value.errors
    assert field == "services.svc.releases.v3.lanes[0]" and "already claimed" in why


def test_defaults_and_good_values() -> None:
    cfg = C.build(_doc(), env={})
    rc = cfg.routing
    assert (rc.trusted_proxies, rc.lanes_trust, rc.tag_header, rc.tags) == (
        (),
        DEFAULT_LANES_TRUST,
        "X-Traffic-Tag",
        (),
    )
    assert (rc.lanes, rc.lane_fallback, cfg.privacy.user_id) == (False, "baseline", "keep")
    good = _doc(
        {
            "trusted_proxies": ["10.0.0.1", "fd00::/8"],
            "lanes_trust": [],
            "tags": {"canary-v2": "gray"},
            "lanes": True,
            "lane_fallback": "reject",
        },
        gray={"lanes": ["canary"], "tag": {"env": "pre", "group": "v2"}},
        top={"privacy": {"user_id": "hash"}},
    )
    cfg = C.build(good, env={"GATEWAY_USER_SALT": "s"})
    assert [str(n) for n in cfg.routing.trusted_proxies] == ["10.0.0.1/32", "fd00::/8"]
    assert cfg.routing.lanes_trust == ()
    assert cfg.services["svc"].releases["gray"].lanes == ("canary",)
    assert cfg.services["svc"].releases["gray"].tag == (("env", "pre"), ("group", "v2"))
    assert (cfg.privacy.user_id, cfg.privacy.salt) == ("hash", "s")


def test_gateway_check_exits_2_naming_every_field(tmp_path: Path) -> None:
    doc = _doc(
        {"trusted_proxies": ["10.0.0.300/8"], "tags": {"canary": "nope"}, "lane_fallback": "x"},
        gray={"lanes": ["stable"]},
        top={"privacy": {"user_id": "scramble"}},
    )
    p = tmp_path / "gateway.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(p)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for field in (
        "routing.trusted_proxies[0]",
        "routing.tags.canary",
        "routing.lane_fallback",
        "services.svc.releases.gray.lanes[0]",
        "privacy.user_id",
    ):
        assert field in out, (field, out)
