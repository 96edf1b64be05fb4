"""gateway/errors.py: one exception tree, one status per error and per upstream failure kind."""

from __future__ import annotations

import pytest

from gateway import errors


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.BadRequest, 400),
        (errors.Unauthorized, 401),
        (errors.Forbidden, 403),
        (errors.NotFound, 404),
        (errors.Conflict, 409),
        (errors.StateError, 503),
        (errors.Unavailable, 503),
        (errors.GatewayError, 500),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_status_per_error(cls: type[errors.GatewayError], status: int) -> None:
    e = cls("what to fix", "field.path")
    assert e.status == status
    assert e.to_json() == {"error": "what to fix", "field": "field.path"}


def test_an_error_without_a_field_has_no_field_key() -> None:
    assert errors.NotFound("no such service").to_json() == {"error": "no such service"}


def test_a_config_error_lists_every_problem_and_leads_with_the_first() -> None:
    e = errors.ConfigError([("listen", "bad port"), ("workers", "too many")], "gw.yaml")
    assert (e.status, e.field, e.source) == (400, "listen", "gw.yaml")
    assert e.lines() == ["listen: bad port", "workers: too many"]


@pytest.mark.parametrize(
    ("kind", "status"),
    [("connect", 502), ("reset", 502), ("protocol", 502), ("timeout", 504), ("other", 502)],
    ids=["connect", "reset", "protocol", "timeout", "unknown"],
)
def test_upstream_status(kind: str, status: int) -> None:
    assert errors.upstream_status(kind) == status
