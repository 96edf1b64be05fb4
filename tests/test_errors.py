"""gateway/errors.py: one exception tree, one status per error and per upstream failure kind."""

from __future__ import annotations

from typing import get_args

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


def test_the_upstream_error_kinds_are_one_closed_set_with_the_metric_label_strings() -> None:
    """`gateway_upstream_errors_total{kind}` values are a contract: the same strings."""
    kinds = set(get_args(errors.UpstreamErrorKind))
    constants = {getattr(errors, n) for n in dir(errors) if n.startswith("ERR_")}
    assert kinds == constants
    assert kinds == {"connect", "reset", "timeout", "protocol", "client_abort", "limit", "tls"}


@pytest.mark.parametrize("table", ["STATUS_BY_UPSTREAM_ERROR", "MESSAGE_BY_UPSTREAM_ERROR"])
def test_every_kind_that_is_answered_has_a_status_and_a_message(table: str) -> None:
    kinds = set(get_args(errors.UpstreamErrorKind))
    assert set(getattr(errors, table)) == kinds - {errors.ERR_CLIENT}


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("connect", 502, "upstream refused or unreachable"),
        ("reset", 502, "upstream closed the connection"),
        ("timeout", 504, "upstream timed out"),
        ("protocol", 502, "upstream sent an invalid response"),
        ("limit", 503, "upstream connection limit"),
        ("tls", 502, "upstream TLS error"),
    ],
    ids=lambda x: str(x),
)
def test_status_and_message_per_kind(
    kind: errors.UpstreamErrorKind, status: int, message: str
) -> None:
    assert (errors.upstream_status(kind), errors.upstream_message(kind)) == (status, message)
