"""`gateway check`: every config that would misbehave is refused, naming the field and the cause."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as C
from gateway import config_syntax as S
from gateway import preflight
from gateway.demo import demo_config
from gateway.errors import ConfigError
from tests.conftest import gateway_config

ROOT = Path(__file__).resolve().parent.parent
UP = "http://127.0.0.1:9001"
ONE = f"releases: {{stable: {{weight: 1, upstreams: ['{UP}']}}}}"


def svc(name: str, body: str = "") -> str:
    """One service block under `services:` (4-space indented body lines)."""
    lines = [f"  {name}:"] + [f"    {line}" for line in (body or ONE).splitlines()]
    return "\n".join(lines) + "\n"


def doc(*services: str, top: str = "") -> str:
    return top + "services:\n" + "".join(services or (svc("svc"),))


class Case(NamedTuple):
    id: str
    text: str
    field: str
    phrase: str
    env: dict[str, str] = {}


CASES = [
    Case(
        "idle-park-negative",
        doc(top="timeouts: {idle_park: -1s}\n"),
        "timeouts.idle_park",
        "must be a duration",
    ),
    Case(
        "host-collision-case-insensitive",
        doc(
            svc("a", f"match: {{hosts: [x.local]}}\n{ONE}"),
            svc("b", f"match: {{hosts: [X.LOCAL]}}\n{ONE}"),
        ),
        "services.b.match.hosts[0]",
        "already matched by service 'a'",
    ),
    Case(
        "host-collision-trailing-dot",
        doc(
            svc("a", f"match: {{hosts: [x.local]}}\n{ONE}"),
            svc("b", f"match: {{hosts: [x.local.]}}\n{ONE}"),
        ),
        "services.b.match.hosts[0]",
        "would never be chosen",
    ),
    Case(
        "two-hostless-services-on-root",
        doc(svc("a"), svc("b")),
        "services.b.match.path_prefix",
        "no hosts (any host) with path_prefix '/' is already matched by service 'a'",
    ),
    Case(
        "equal-host-and-prefix",
        doc(
            svc("a", f"match: {{hosts: [api.local], path_prefix: /v1}}\n{ONE}"),
            svc("b", f"match: {{hosts: [other.local, api.local], path_prefix: /v1}}\n{ONE}"),
        ),
        "services.b.match.hosts[1]",
        "host 'api.local' with path_prefix '/v1'",
    ),
    Case(
        "duplicate-release-key",
        doc(
            svc(
                "svc",
                f"releases:\n  stable: {{weight: 1, upstreams: ['{UP}']}}\n"
                f"  stable: {{weight: 2, upstreams: ['{UP}']}}",
            )
        ),
        "services.svc.releases.stable",
        "duplicate key 'stable' on line 5 (first on line 4)",
    ),
    Case(
        "duplicate-top-level-key",
        doc(top="listen: '127.0.0.1:0'\nlisten: '127.0.0.1:1'\n"),
        "listen",
        "duplicate key 'listen' on line 2",
    ),
    Case(
        "unknown-key-in-upstream-object",
        doc(
            svc(
                "svc",
                f"releases: {{stable: {{weight: 1, upstreams: [{{url: '{UP}', wieght: 2}}]}}}}",
            )
        ),
        "services.svc.releases.stable.upstreams[0].wieght",
        "unknown field (did you mean 'weight'?)",
    ),
    Case(
        "unknown-key-in-match",
        doc(svc("svc", f"match: {{host: [x.local]}}\n{ONE}")),
        "services.svc.match.host",
        "did you mean 'hosts'?",
    ),
    Case(
        "consul-address-not-a-url",
        doc(top="consul: {address: 'not a url at all'}\n"),
        "consul.address",
        "not an http(s)://host[:port] URL",
    ),
    Case(
        "consul-address-wrong-scheme",
        doc(top="consul: {address: 'ftp://consul:8500'}\n"),
        "consul.address",
        "the scheme must be http:// or https://",
    ),
    Case(
        "consul-address-port-range",
        doc(top="consul: {address: 'http://consul:85000'}\n"),
        "consul.address",
        "port 85000 is out of range 1-65535",
    ),
    Case(
        "consul-http-addr-env-not-a-url",
        doc(),
        "CONSUL_HTTP_ADDR",
        "(environment, overrides consul.address)",
        {"CONSUL_HTTP_ADDR": "not a url at all"},
    ),
    Case(
        "host-star",
        doc(svc("svc", f"match: {{hosts: ['*']}}\n{ONE}")),
        "services.svc.match.hosts[0]",
        "a wildcard is one leading '*.' label followed by a name",
    ),
    Case(
        "host-star-dot",
        doc(svc("svc", f"match: {{hosts: ['*.']}}\n{ONE}")),
        "services.svc.match.hosts[0]",
        "a wildcard is one leading '*.' label",
    ),
    Case(
        "host-bad-characters",
        doc(svc("svc", f"match: {{hosts: ['bad host!']}}\n{ONE}")),
        "services.svc.match.hosts[0]",
        "'bad host!' is not a host name",
    ),
    Case(
        "host-with-port",
        doc(svc("svc", f"match: {{hosts: ['x.local:8080']}}\n{ONE}")),
        "services.svc.match.hosts[0]",
        "hosts are matched without the port",
    ),
    Case(
        "prefix-dot-segments",
        doc(svc("svc", f"match: {{path_prefix: /a/../b}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "not in normal form (dot segments, '//' or percent-encoded unreserved characters; "
        "RFC 3986 §6.2.2, §5.2.4): write '/b'",
    ),
    Case(
        "prefix-double-slash",
        doc(svc("svc", f"match: {{path_prefix: /a//b}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "write '/a/b'",
    ),
    Case(
        "prefix-encoded-letter",
        doc(svc("svc", f"match: {{path_prefix: /%61pi}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "write '/api'",
    ),
    Case(
        "prefix-encoded-dots",
        doc(svc("svc", f"match: {{path_prefix: /a/%2E%2e/b}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "write '/b'",
    ),
    Case(
        "prefix-encoded-slash",
        doc(svc("svc", f"match: {{path_prefix: /a%2Fb}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "percent-encoded '/'",
    ),
    Case(
        "prefix-query",
        doc(svc("svc", f"match: {{path_prefix: '/a?x=1'}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "without a query",
    ),
    Case(
        "prefix-space",
        doc(svc("svc", f"match: {{path_prefix: '/a b'}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "write '/a%20b'",
    ),
    Case(
        "drain-timeout-zero",
        doc(top="drain_timeout: 0\n"),
        "drain_timeout",
        "must be a positive duration",
    ),
    Case(
        "guard-window-zero",
        doc(svc("svc", f"guard: {{window: 0}}\n{ONE}")),
        "services.svc.guard.window",
        "must be a positive duration",
    ),
    Case(
        "state-poll-interval-zero",
        doc(top="state: {poll_interval: 0s}\n"),
        "state.poll_interval",
        "must be a positive duration",
    ),
    Case(
        "consul-poll-wait-zero",
        doc(top="consul: {poll_wait: 0ms}\n"),
        "consul.poll_wait",
        "must be a positive duration",
    ),
    Case(
        "admin-listen-equals-listen",
        doc(top="listen: '127.0.0.1:18080'\nadmin: {listen: '127.0.0.1:18080'}\n"),
        "admin.listen",
        "overlaps the data listener '127.0.0.1:18080' (same port)",
    ),
    Case(
        "admin-listen-inside-wildcard-listen",
        doc(top="listen: '0.0.0.0:18080'\nadmin: {listen: '127.0.0.1:18080'}\n"),
        "admin.listen",
        "overlaps the data listener",
    ),
    Case(
        "listen-on-the-default-admin-port",
        doc(top="listen: '0.0.0.0:9901'\n"),
        "admin.listen",
        "'127.0.0.1:9901' overlaps the data listener '0.0.0.0:9901'",
    ),
    Case(
        "host-empty",
        doc(svc("svc", f"match: {{hosts: ['']}}\n{ONE}")),
        "services.svc.match.hosts[0]",
        "is empty",
    ),
    Case(
        "upstream-weight-zero",
        doc(
            svc(
                "svc",
                f"releases: {{stable: {{weight: 1, upstreams: [{{url: '{UP}', weight: 0}}]}}}}",
            )
        ),
        "services.svc.releases.stable.upstreams[0].weight",
        "upstream weight must be an integer >= 1, not 0",
    ),
    Case(
        "upstream-weight-1e3-is-a-string",
        doc(
            svc(
                "svc",
                f"releases: {{stable: {{weight: 1, upstreams: [{{url: '{UP}', weight: 1e3}}]}}}}",
            )
        ),
        "services.svc.releases.stable.upstreams[0].weight",
        "YAML read '1e3' as a string",
    ),
    Case(
        "release-weight-1e3-is-a-string",
        doc(svc("svc", f"releases: {{stable: {{weight: 1e3, upstreams: ['{UP}']}}}}")),
        "services.svc.releases.stable.weight",
        "YAML read '1e3' as a string, not a number (YAML 1.1 needs a dot and a signed "
        "exponent, e.g. 1.0e+3): write 1000",
    ),
    Case(
        "upstream-object-without-url",
        doc(svc("svc", "releases: {stable: {weight: 1, upstreams: [{weight: 2}]}}")),
        "services.svc.releases.stable.upstreams[0].url",
        "is required",
    ),
    Case(
        "listen-port-99999",
        doc(top="listen: '127.0.0.1:99999'\n"),
        "listen",
        "port 99999 is out of range 0-65535",
    ),
    Case(
        "listen-not-a-string",
        doc(top="listen: 8080\n"),
        "listen",
        'must be a "host:port" string, e.g. "0.0.0.0:8080"',
    ),
    Case(
        "listen-bad-host",
        doc(top="listen: 'no such host!:8080'\n"),
        "listen",
        "is not a host name",
    ),
    Case(
        "admin-port-99999",
        doc(top="admin: {listen: '127.0.0.1:99999'}\n"),
        "admin.listen",
        "port 99999 is out of range 0-65535",
    ),
    Case(
        "upstream-port-99999",
        doc(svc("svc", "releases: {stable: {weight: 1, upstreams: ['http://127.0.0.1:99999']}}")),
        "services.svc.releases.stable.upstreams[0]",
        "port 99999 is out of range 1-65535",
    ),
    Case(
        "upstream-port-0",
        doc(svc("svc", "releases: {stable: {weight: 1, upstreams: ['127.0.0.1:0']}}")),
        "services.svc.releases.stable.upstreams[0]",
        "port 0 is out of range 1-65535",
    ),
    Case(
        "upstream-with-path",
        doc(svc("svc", f"releases: {{stable: {{weight: 1, upstreams: ['{UP}/api']}}}}")),
        "services.svc.releases.stable.upstreams[0]",
        "must not have a path ('/api')",
    ),
    Case(
        "access-log-maybe",
        doc(top="access_log: maybe\n"),
        "access_log",
        "must be true or false, not 'maybe'",
    ),
    Case(
        "service-name-with-crlf",
        doc(svc('"a\\r\\nb"')),
        "services['a\\r\\nb']",
        "service name must be",
    ),
    Case(
        "release-name-with-crlf",
        doc(svc("svc", f"releases: {{\"gr\\r\\nay\": {{weight: 1, upstreams: ['{UP}']}}}}")),
        "services.svc.releases['gr\\r\\nay']",
        "release name must be",
    ),
    Case(
        "baseline-with-crlf",
        doc(svc("svc", f'baseline: "st\\nable"\n{ONE}')),
        "services.svc.baseline",
        "'st\\nable' names no release (have: 'stable')",
    ),
    Case(
        "yaml-syntax-error-on-one-line",
        "services: [unclosed\n",
        "(yaml)",
        "not valid YAML at line 2, column 1: expected ',' or ']'",
    ),
    Case(
        "yaml-control-character",
        'services: "\x01"\n',
        "(yaml)",
        "special characters are not allowed ('\\x01')",
    ),
    Case(
        "sticky-max-age-1e6-is-a-string",
        doc(top="routing: {sticky_cookie_max_age: 1e6}\n"),
        "routing.sticky_cookie_max_age",
        "YAML read '1e6' as a string",
    ),
    Case(
        "yaml-nested-too-deeply",
        "services: " + "[" * 5000 + "]" * 5000 + "\n",
        "(yaml)",
        "nested too deeply",
    ),
    Case(
        "prefix-encoded-backslash",
        doc(svc("svc", f"match: {{path_prefix: /a%5Cb}}\n{ONE}")),
        "services.svc.match.path_prefix",
        "percent-encoded '/' or '\\', which is never a path separator",
    ),
    Case("workers-zero", doc(top="workers: 0\n"), "workers", "between 1 and 256"),
    Case("workers-257", doc(top="workers: 257\n"), "workers", "between 1 and 256"),
]


def _errors(tmp_path: Path, text: str, env: dict[str, str]) -> list[tuple[str, str]]:
    f = tmp_path / "gateway.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        C.load(str(f), env=env)
    return e.value.errors


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_refuses_naming_the_field_and_the_cause(tmp_path: Path, case: Case) -> None:
    errors = _errors(tmp_path, case.text, case.env)
    assert any(p == case.field and case.phrase in m for p, m in errors), errors
    for p, m in errors:  # user text is repr-quoted: never a raw CR/LF in a line
        assert not any(c in p + m for c in "\r\n"), (p, m)


def test_a_weight_read_as_a_string_is_the_only_cause_named(tmp_path: Path) -> None:
    text = doc(svc("svc", f"releases: {{stable: {{weight: 1e3, upstreams: ['{UP}']}}}}"))
    assert [p for p, _ in _errors(tmp_path, text, {})] == ["services.svc.releases.stable.weight"]


def test_duplicates_are_reported_with_the_other_errors(tmp_path: Path) -> None:
    text = doc(top="access_log: true\naccess_log: false\nworkers: 0\n")
    errors = _errors(tmp_path, text, {})
    assert [p for p, _ in errors] == ["access_log", "workers"]
    assert "duplicate key 'access_log' on line 2 (first on line 1)" in errors[0][1]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = (
        f"services:\n  svc:\n    releases:\n      stable: &rel {{weight: 1, upstreams: ['{UP}']}}\n"
        "      gray:\n        <<: *rel\n        weight: 2\n"
    )
    f = tmp_path / "gateway.yaml"
    f.write_text(text, encoding="utf-8")
    cfg = C.load(str(f), env={})
    assert cfg.services["svc"].releases["gray"].weight == 2.0


# --------------------------------------------------------------------------- valid forms


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("x.local", "x.local"),
        ("X.Local.", "x.local"),
        ("*.Example.COM", "*.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("localhost", "localhost"),
        ("a-1.b2", "a-1.b2"),
    ],
    ids=[
        "plain",
        "case-and-dot",
        "wildcard",
        "ipv4",
        "ipv6-bare",
        "ipv6-brackets",
        "single",
        "digits",
    ],
)
def test_match_hosts_accepted_in_the_form_requests_are_compared(text: str, want: str) -> None:
    assert S.match_host(text) == (want, None)


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [
        ("/a/../b", "'/b'"),
        ("/a/./b", "'/a/b'"),
        ("/a/.", "'/a/'"),
        ("//a///b/", "'/a/b/'"),
        ("/%61pi", "'/api'"),
        ("/%2E%2e/x", "climbs above the root"),
    ],
    ids=["up", "dot", "trailing-dot", "slashes", "encoded-letter", "above-root"],
)
def test_prefix_not_in_the_normal_form_requests_are_matched_in(prefix: str, normal: str) -> None:
    problem = S.path_prefix_problem(prefix)
    assert problem is not None and normal in problem


@pytest.mark.parametrize(
    "prefix",
    ["/", "/api", "/api/", "/v1/users", "/a%20b", "/~me", "/a:b@c"],
    ids=["root", "plain", "slash", "deep", "escape", "tilde", "pchar"],
)
def test_normal_prefixes_are_accepted(prefix: str) -> None:
    assert S.path_prefix_problem(prefix) is None


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080, None)),
        (":8080", ("0.0.0.0", 8080, None)),
        ("[::1]:0", ("::1", 0, None)),
        ("localhost:65535", ("localhost", 65535, None)),
    ],
    ids=["ipv4", "any", "ipv6", "name"],
)
def test_listen_addresses_accepted(value: str, want: tuple[str, int, None]) -> None:
    assert S.listen_address(value) == want


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("https://consul.service:8501/", "https://consul.service:8501"),
        ("http://[::1]:8500", "http://[::1]:8500"),
    ],
    ids=["bare", "https", "ipv6"],
)
def test_consul_addresses_accepted(value: str, want: str) -> None:
    assert S.consul_address(value) == (want, None)


def test_every_config_in_the_repo_still_passes() -> None:
    for f in sorted((ROOT / "config").glob("*.yaml")):
        if f.name == "strategy.example.yaml":  # a strategy file: tests/test_strategy_example.py
            continue
        cfg = C.load(str(f), env={})
        assert preflight.problems(cfg, bind=False) == [], f
    demo = demo_config("127.0.0.1", 8080, 9901, 9001, 9002)
    assert preflight.problems(demo, bind=False) == []


# --------------------------------------------------------------------------- the machine


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 held by a listening socket (without SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _cfg(listen: str, admin: str, token: str | None = None) -> C.Config:
    env = {"TOK": token} if token else {}
    text = {"listen": listen, "admin": {"listen": admin, "token_env": "TOK"}}
    services = {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [UP]}}}}
    return C.build({**text, "services": services}, env=env)


def test_listener_in_use_is_refused(taken: int) -> None:
    found = preflight.problems(_cfg(f"127.0.0.1:{taken}", "127.0.0.1:0"))
    assert [p for p, _ in found] == ["listen"]
    assert f"'127.0.0.1:{taken}' is already in use" in found[0][1]


def test_admin_listener_in_use_is_refused(taken: int) -> None:
    found = preflight.problems(_cfg("127.0.0.1:0", f"127.0.0.1:{taken}"))
    assert [p for p, _ in found] == ["admin.listen"]
    assert "already in use" in found[0][1]


def test_no_bind_skips_the_port_probe(taken: int) -> None:
    assert preflight.problems(_cfg(f"127.0.0.1:{taken}", "127.0.0.1:0"), bind=False) == []


@pytest.mark.parametrize(
    ("admin", "token", "refused"),
    [
        ("0.0.0.0:0", None, True),
        ("0.0.0.0:0", "s3cret", False),
        ("127.0.0.1:0", None, False),
        ("[::1]:0", None, False),
    ],
    ids=["any-no-token", "any-with-token", "loopback", "loopback-v6"],
)
def test_admin_exposure_without_a_token(admin: str, token: str | None, refused: bool) -> None:
    found = preflight.problems(_cfg("127.0.0.1:0", admin, token), bind=False)
    if refused:
        assert found[0][0] == "admin.listen" and "no admin token is set" in found[0][1]
        assert "export TOK=<secret>" in found[0][1]
    else:
        assert found == []


# --------------------------------------------------------------------------- the process


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "GATEWAY_"))},
    )


PROCESS_CASES = [
    c
    for c in CASES
    if c.id
    in {
        "idle-park-negative",
        "host-collision-case-insensitive",
        "duplicate-release-key",
        "unknown-key-in-upstream-object",
        "prefix-dot-segments",
        "release-weight-1e3-is-a-string",
        "service-name-with-crlf",
    }
]


@pytest.mark.parametrize("case", PROCESS_CASES, ids=[c.id for c in PROCESS_CASES])
def test_check_process_exits_2_naming_the_field(tmp_path: Path, case: Case) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(case.text, encoding="utf-8")
    r = _gateway("check", "-c", str(f), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"  {case.field}: " in r.stderr and case.phrase in r.stderr
    assert "Traceback" not in r.stderr and "\r" not in r.stderr


def _in_use_config(tmp_path: Path, port: int, admin_port: int = 0) -> Path:
    f = tmp_path / "gateway.yaml"
    f.write_text(
        doc(
            top=f"listen: '127.0.0.1:{port}'\n"
            f"admin: {{listen: '127.0.0.1:{admin_port}', token_env: null}}\n"
            "state: {store: memory}\n"
        ),
        encoding="utf-8",
    )
    return f


def test_check_process_refuses_a_port_in_use(tmp_path: Path, taken: int) -> None:
    f = _in_use_config(tmp_path, taken)
    r = _gateway("check", str(f), cwd=tmp_path)
    assert r.returncode == 2 and f"  listen: '127.0.0.1:{taken}' is already in use" in r.stderr
    ok = _gateway("check", "--no-bind", str(f), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("which", ["listen", "admin.listen"], ids=["data", "admin"])
def test_run_with_a_listener_in_use_exits_2_without_a_traceback(
    tmp_path: Path, taken: int, which: str
) -> None:
    f = _in_use_config(tmp_path, *((taken, 0) if which == "listen" else (0, taken)))
    r = _gateway("run", "-c", str(f), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"  {which}: '127.0.0.1:{taken}' is already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_with_one_port_for_both_listeners_exits_2(tmp_path: Path) -> None:
    port = "18080"  # never bound: the config is refused before anything listens
    r = _gateway("demo", "--port", port, "--admin-port", port, "--duration", "1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "  admin.listen: '127.0.0.1:18080' overlaps the data listener" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- any input


_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["1e3", "0", "x.local", "*.", "/a/../b", "127.0.0.1:99999", "2s", "a\r\nb"])
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)
_SPOTS: list[tuple[str | int, ...]] = [
    ("listen",),
    ("admin",),
    ("admin", "listen"),
    ("admin", "token_env"),
    ("workers",),
    ("drain_timeout",),
    ("access_log",),
    ("state",),
    ("state", "poll_interval"),
    ("consul",),
    ("consul", "address"),
    ("routing",),
    ("routing", "trust_overrides"),
    ("services",),
    ("services", "svc"),
    ("services", "svc", "match"),
    ("services", "svc", "match", "hosts"),
    ("services", "svc", "match", "path_prefix"),
    ("services", "svc", "guard"),
    ("services", "svc", "releases"),
    ("services", "svc", "releases", "stable"),
    ("services", "svc", "releases", "stable", "weight"),
    ("services", "svc", "releases", "stable", "upstreams"),
    ("services", "svc", "releases", "stable", "upstreams", 0),
    ("services", "svc", "releases", "stable", "consul"),
    ("services", "svc", "releases", "stable", "baggage"),
    ("services", "other"),
]


def _base() -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "services": {
            "svc": {
                "match": {"hosts": ["x.local"]},
                "releases": {"stable": {"weight": 1, "upstreams": [{"url": UP, "weight": 1}]}},
            }
        },
    }


def _put(doc: dict[str, Any], spot: tuple[str | int, ...], value: object) -> None:
    node: Any = doc
    for step in spot[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(step, {})
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return  # an earlier edit replaced the parent: nothing to put
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(spot[-1], int)):
        if isinstance(node, list):
            node[spot[-1] % max(len(node), 1) :] = [value]
        else:
            node[spot[-1]] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_SPOTS), _VALUES), min_size=1, max_size=4))
def test_any_value_anywhere_is_a_config_error_never_a_crash(
    edits: list[tuple[tuple[str | int, ...], object]],
) -> None:
    doc = _base()
    for spot, value in edits:
        _put(doc, spot, value)
    try:
        C.build(doc, env={})
    except ConfigError as e:
        assert e.errors
        for p, m in e.errors:
            assert (p + m).isprintable(), (p, m)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_text_is_a_config_error_never_a_crash(text: str) -> None:
    with contextlib.suppress(ConfigError):
        C.loads(text, env={})


def test_a_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_bytes(b"services:\n  \xff\xfe: {}\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(f), env={})
    assert e.value.errors[0][0] == "(file)" and "not UTF-8 text" in e.value.errors[0][1]


async def test_hosts_are_matched_in_the_normal_form_check_gives_them(
    upstreams: Any, gateway: Any, client: Any
) -> None:
    """A configured 'API.Example.' or bare '::1' used to never match a request's Host."""
    a, b = await upstreams("named"), await upstreams("ipv6")
    services = {
        "named": {
            "match": {"hosts": ["API.Example."]},
            "releases": {"stable": {"weight": 1, "upstreams": [a.url]}},
        },
        "ipv6": {
            "match": {"hosts": ["::1"]},
            "releases": {"stable": {"weight": 1, "upstreams": [b.url]}},
        },
    }
    gw = await gateway(gateway_config(services))
    base = f"http://127.0.0.1:{gw.port}/x"
    for host, want in [
        ("api.example", "named"),
        ("API.EXAMPLE.:80", "named"),
        ("[::1]:8080", "ipv6"),
    ]:
        async with client.get(base, headers={"Host": host}) as r:
            assert r.status == 200, (host, await r.text())
            assert r.headers["X-Release-Stage"] == "stable"
            assert (await r.json())["release"] == want, host
