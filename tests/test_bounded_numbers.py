"""Bounded numbers and admin errors (issue 10 item 2): shares agree with the hash; JSON errors."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import cli
from gateway import config as C
from gateway.admin import _percent
from gateway.errors import ConfigError
from gateway.routing import WeightTable, hrw_score
from gateway.statedoc import MAX_WEIGHT, MIN_WEIGHT, weight_problem
from tests.conftest import gateway_config, two_releases

# --------------------------------------------------------------------------- weight -> share math

_legal_positive = st.one_of(
    st.sampled_from([MIN_WEIGHT, 1e-3, 1.0, 5.0, 95.0, 1e3, MAX_WEIGHT]),
    st.floats(min_value=MIN_WEIGHT, max_value=MAX_WEIGHT),
)
_legal = st.one_of(st.just(0.0), _legal_positive)


@settings(max_examples=300, deadline=None, database=None)
@given(
    weights=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), _legal, min_size=1).filter(
        lambda w: any(v > 0 for v in w.values())
    )
)
def test_every_positive_legal_weight_has_a_positive_share_the_hash_can_pick(
    weights: dict[str, float],
) -> None:
    assert all(weight_problem(w) is None for w in weights.values())
    t = WeightTable.build("salt", weights)
    live = {e.name for e in t._live}
    for name, w in weights.items():
        assert (_percent(t.shares[name]) > 0) == (w > 0), (name, w, t.shares)
        assert (name in live) == (w > 0)
    assert math.isclose(sum(t.shares.values()), 1.0, rel_tol=1e-9)
    for e in t._live:
        # A finite, negative score: the release can win the rendezvous for some key.
        score = hrw_score("some-user", e.seed, e.inv)
        assert math.isfinite(e.inv) and math.isfinite(score) and score <= 0, e.name


# (id, weights, keys hashed): the hash's observed shares agree with the computed ones.
EXTREMES = [
    ("equal-max", {"stable": MAX_WEIGHT, "gray": MAX_WEIGHT}),
    ("min-vs-one", {"stable": 1.0, "gray": MIN_WEIGHT * 10**5}),
    ("tiny-only", {"stable": 0.0, "gray": MIN_WEIGHT}),
    ("mixed", {"a": MIN_WEIGHT, "b": 1.0, "c": 3e5, "d": MAX_WEIGHT}),
    ("usual", {"stable": 95.0, "gray": 5.0}),
]


@pytest.mark.parametrize("weights", [c[1] for c in EXTREMES], ids=[c[0] for c in EXTREMES])
def test_sticky_hash_shares_agree_with_percent(weights: dict[str, float]) -> None:
    t = WeightTable.build("user-api", weights)
    n = 20_000
    counts = dict.fromkeys(weights, 0)
    for i in range(n):
        picked = t.pick_hash(f"user-{i}")
        assert picked is not None
        counts[picked] += 1
    for name, share in t.shares.items():
        # 6 standard deviations of a binomial plus one key: never flaky, still catches a
        # release that the hash never picks (or always picks) against its share.
        slack = 6 * math.sqrt(share * (1 - share) / n) + 1 / n
        assert abs(counts[name] / n - share) <= slack, (name, counts, t.shares)


def test_issue_examples_no_longer_route_against_percent() -> None:
    # The values the issue reports are refused as input; the math stays consistent anyway.
    huge = WeightTable.build("s", {"stable": 1e308, "gray": 1e308})
    assert huge.shares == {"stable": 0.5, "gray": 0.5}
    denormal = WeightTable.build("s", {"stable": 0.0, "gray": 1e-320})
    assert denormal.shares == {"stable": 0.0, "gray": 0.0} and denormal.pick_hash("u") is None
    assert weight_problem(1e308) is not None and weight_problem(1e-320) is not None
    assert mmh3.hash64("u", 1)[0] != 0  # the hash under test is the real one


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),
        (MIN_WEIGHT, True),
        (MAX_WEIGHT, True),
        (10**6, True),
        (1e-7, False),
        (MAX_WEIGHT + 1, False),
        (10**400, False),
        (-1, False),
        (float("inf"), False),
        (float("nan"), False),
        (True, False),
        ("5", False),
    ],
    ids=["zero", "min", "max", "max-int", "below-min", "above-max", "400-digits", "negative"]
    + ["inf", "nan", "bool", "string"],
)
def test_weight_bounds(value: object, ok: bool) -> None:
    assert (weight_problem(value) is None) is ok


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("weight", [1.0e308, 10**400, 1e-9], ids=["1e308", "400-digits", "1e-9"])
def test_config_refuses_weights_out_of_bounds(tmp_path: Path, weight: object, capsys: Any) -> None:
    doc = gateway_config(two_releases("http://127.0.0.1:9", "http://127.0.0.1:9", 1, 1))
    doc["services"]["svc"]["releases"]["gray"]["weight"] = weight
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        C.load(str(path))
    assert e.value.errors[0][0] == "services.svc.releases.gray.weight"
    assert cli.main(["check", str(path)]) == 2
    assert "services.svc.releases.gray.weight" in capsys.readouterr().err


# --------------------------------------------------------------------------- admin API


async def _admin(upstreams: Any, gateway: Any) -> tuple[Any, str]:
    st_up, gr_up = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st_up.url, gr_up.url)))
    return gw, f"http://127.0.0.1:{gw.admin_port}"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"stable": 1e308, "gray": 1e308}', "weights.stable"),
        (b'{"stable": 0, "gray": 1e-320}', "weights.gray"),
        (b'{"gray": ' + b"9" * 400 + b"}", "weights.gray"),
        (b'{"gray": 1000001}', "weights.gray"),
    ],
    ids=["1e308", "1e-320", "400-digits", "above-max"],
)
async def test_admin_refuses_weights_out_of_bounds(
    upstreams: Any, gateway: Any, body: bytes, field: str
) -> None:
    gw, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession() as s:
        url = f"{admin}/admin/services/svc/weights"
        async with s.put(url, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and r.content_type == "application/json"
            assert (await r.json())["field"] == field
    assert gw.holder.current.version == 0


async def test_admin_percent_is_positive_for_the_smallest_weight(
    upstreams: Any, gateway: Any
) -> None:
    _, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession() as s:
        url = f"{admin}/admin/services/svc/weights"
        async with s.put(url, json={"stable": MAX_WEIGHT, "gray": MIN_WEIGHT}) as r:
            assert r.status == 200
            doc = await r.json()
    assert doc["percent"]["gray"] > 0 and doc["releases"]["gray"]["percent"] > 0


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "field"),
    [
        ("PUT", "/admin/services/svc/weights", {"If-Match": "7" * 5000}, b"{}", 400, "If-Match"),
        ("PUT", "/admin/services/svc/weights", {"If-Match": '"\u00b2"'}, b"{}", 400, "If-Match"),
        ("DELETE", "/admin/services/svc/weights", {"If-Match": "1" * 5000}, b"", 400, "If-Match"),
        ("PUT", "/admin/services/svc/weights", {}, b"\xff\xfe{", 400, "body"),
        ("PUT", "/admin/services/svc/weights", {}, b"[" * 200_000, 400, "body"),
        ("PUT", "/admin/services/svc/weights", {}, b'{"gray": 1' + b"0" * 5000 + b"}", 400, "body"),
        ("POST", "/admin/weights", {}, b'{"service": "svc", "gray_weight": 1e400}', 400, None),
        (
            "POST",
            "/admin/services/svc/rollout",
            {},
            b'{"release": "gray", "steps": [{"weight": 5, "pause": 1' + b"0" * 400 + b"}]}",
            400,
            "steps[0].pause",
        ),
        ("GET", "/admin/services/svc/preview?sample=%C2%B2", {}, b"", 400, "sample"),
        ("GET", "/admin/nowhere", {}, b"", 404, "path"),
        ("PATCH", "/admin/services/svc/weights", {}, b"", 405, "method"),
    ],
    ids=[
        "if-match-5000-digits",
        "if-match-superscript-digit",
        "delete-if-match-5000-digits",
        "bad-utf8",
        "nested-too-deep",
        "int-beyond-digit-limit",
        "platform-1e400",
        "rollout-pause-400-digits",
        "preview-superscript-sample",
        "404",
        "405",
    ],
)
async def test_admin_errors_are_json_never_500(
    upstreams: Any,
    gateway: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    field: str | None,
) -> None:
    gw, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession() as s:
        async with s.request(method, admin + path, headers=headers, data=body) as r:
            assert r.status == status, await r.text()
            assert r.content_type == "application/json"
            doc = await r.json()
    assert set(doc) >= {"error", "field"} and doc["error"]
    if field is not None:
        assert doc["field"] == field
    assert gw.holder.current.version == 0


async def test_admin_10mb_body_is_a_json_413(upstreams: Any, gateway: Any) -> None:
    gw, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession() as s:
        url = f"{admin}/admin/services/svc/weights"
        async with s.put(url, data=io.BytesIO(b" " * (10 * 1024 * 1024))) as r:
            assert r.status == 413 and r.content_type == "application/json"
            assert (await r.json())["field"] == "body"
    assert gw.holder.current.version == 0
