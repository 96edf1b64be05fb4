"""Admin client commands: `gateway weights|strategy|audit|rollout|preview` (README "Admin API").

Why plain urllib: the client runs once per command, needs no event loop and
must work from any shell with only the gateway installed. The admin address
comes from `--admin` or $GATEWAY_ADMIN_URL, the token from
$GATEWAY_ADMIN_TOKEN, as operators set them for curl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"


class AdminError(Exception):
    """The admin API refused a request or could not be reached."""


def admin_url(args: argparse.Namespace) -> str:
    url: str = args.admin or os.environ.get("GATEWAY_ADMIN_URL") or DEFAULT_ADMIN_URL
    return url.rstrip("/")


def call(
    base: str, method: str, path: str, body: object = None, *, if_match: str | None = None
) -> Any:
    """One admin API request -> parsed JSON; AdminError with the server's message otherwise."""
    headers = {"Accept": "application/json"}
    token = os.environ.get("GATEWAY_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if if_match is not None:
        headers["If-Match"] = f'"{if_match}"'
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        with e:
            raw = e.read()
        try:
            err = json.loads(raw)
            msg = f"{err.get('field')}: {err.get('error')}" if err.get("field") else err["error"]
        except (ValueError, KeyError, TypeError, AttributeError):
            msg = raw.decode("utf-8", "replace")[:200]
        raise AdminError(f"{method} {path}: HTTP {e.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach the admin API at {base}: {reason}") from None


def _fail(prog: str, msg: str, code: int = 1) -> int:
    print(f"{prog}: {msg}", file=sys.stderr)
    return code


def parse_assignments(items: list[str]) -> dict[str, float]:
    """['stable=95', 'gray=5'] -> {'stable': 95.0, 'gray': 5.0}; ValueError names the bad one."""
    out: dict[str, float] = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not name:
            raise ValueError(f"{it!r} is not release=weight")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{it!r}: weight {value!r} is not a number") from None
    return out


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# --------------------------------------------------------------------------- weights


def cmd_weights(args: argparse.Namespace) -> int:
    base = admin_url(args)
    path = f"/admin/services/{quote(args.service, safe='')}"
    try:
        if args.action == "get":
            if args.assignments:
                return _fail("gateway weights get", "takes no release=weight arguments", 2)
            doc = call(base, "GET", path)
        else:
            try:
                weights = parse_assignments(args.assignments)
            except ValueError as e:
                return _fail("gateway weights set", str(e), 2)
            if not weights:
                return _fail("gateway weights set", "give at least one release=weight", 2)
            doc = call(base, "PUT", path + "/weights", weights, if_match=args.if_match)
    except AdminError as e:
        return _fail(f"gateway weights {args.action}", str(e))
    _print_json(
        {
            "service": doc["service"],
            "state_version": doc["state_version"],
            "weights": doc["weights"],
            "percent": doc["percent"],
        }
    )
    return 0


# --------------------------------------------------------------------------- strategy


def cmd_strategy(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway import strategy
    from gateway.errors import ConfigError

    prog = f"gateway strategy {args.action}"
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        print(f"{e.source}: config: {len(e.errors)} error(s)", file=sys.stderr)
        for line in e.lines():
            print(f"  {line}", file=sys.stderr)
        return 2
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        return _fail(prog, f"cannot read {args.file}: {e.strerror or e}", 2)
    try:
        st = strategy.load_text(text, cfg, source=args.file)
    except ConfigError as e:
        print(f"{args.file}: {len(e.errors)} error(s)", file=sys.stderr)
        for line in e.lines():
            print(f"  {line}", file=sys.stderr)
        return 2
    plan = strategy.plan(st, cfg)
    if args.action == "validate":
        print(
            f"{args.file}: OK ({len(st.targets)} target(s), traffic {st.traffic:g}%, "
            f"checked against {cfg.source})"
        )
        return 0
    if args.action == "plan":
        _print_json(plan)
        return 0
    base = admin_url(args)
    rc = 0
    applied: dict[str, Any] = {}
    for service, weights in plan.items():
        try:
            doc = call(base, "PUT", f"/admin/services/{quote(service, safe='')}/weights", weights)
        except AdminError as e:
            print(f"{prog}: {service}: {e}", file=sys.stderr)
            rc = 1
            continue
        applied[service] = {"state_version": doc["state_version"], "weights": doc["weights"]}
    _print_json(applied)
    return rc


# --------------------------------------------------------------------------- audit


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit trail, one JSON record a line, oldest first."""
    from urllib.parse import urlencode

    params = {"limit": str(args.limit)}
    if args.service:
        params["service"] = args.service
    if args.since:
        params["since"] = args.since
    try:
        doc = call(admin_url(args), "GET", "/admin/audit?" + urlencode(params))
    except AdminError as e:
        return _fail("gateway audit", str(e))
    for rec in doc["records"]:
        print(json.dumps(rec, separators=(",", ":"), sort_keys=True))
    return 0


# --------------------------------------------------------------------------- rollout / preview

# `rollout status --watch` exit codes (README "Rollouts"): for CI pipelines.
WATCH_PROMOTED, WATCH_FAILED, WATCH_TIMEOUT = 0, 1, 2
_FAILED_STATES = ("CircuitBreak", "RolledBack")


def parse_traffic(text: str) -> float:
    """'15%' or '15' -> 15.0; ValueError naming the problem."""
    t = text.strip()
    t = t[:-1] if t.endswith("%") else t
    try:
        w = float(t)
    except ValueError:
        raise ValueError(f"--traffic {text!r} is not a percentage such as 15%") from None
    if not 0 <= w <= 100:
        raise ValueError(f"--traffic {text!r} must be between 0% and 100%")
    return w


def _plan_from(args: argparse.Namespace) -> dict[str, Any]:
    """The POST .../rollout body from --plan FILE (YAML or JSON) or --traffic N%."""
    if args.traffic is not None:
        return {"release": args.release, "steps": [{"weight": parse_traffic(args.traffic)}]}
    import yaml

    try:
        text = Path(args.plan).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {args.plan}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{args.plan}: not YAML or JSON: {e}") from None
    if isinstance(doc, list):
        doc = {"steps": doc}
    if not isinstance(doc, dict) or "steps" not in doc:
        raise ValueError(f"{args.plan}: must hold a list of steps or a mapping with 'steps'")
    if doc.get("release", args.release) != args.release:
        raise ValueError(f"{args.plan} names release {doc['release']!r}, not {args.release!r}")
    return {"release": args.release, "steps": doc["steps"]}


def status_line(doc: Mapping[str, Any]) -> str:
    """One line per rollout change: state, step, weight, reason."""
    r = doc.get("rollout")
    if not r:
        return f"{doc.get('service')}: no rollout"
    steps = r.get("steps") or []
    line = (
        f"{doc.get('service')}: {r.get('release')} {r.get('state')} "
        f"step {int(r.get('step', -1)) + 1}/{len(steps)} weight {r.get('weight'):g}%"
    )
    if r.get("reason"):
        line += f" ({r['reason']})"
    return line


def watch(
    base: str,
    service: str,
    timeout: float,
    *,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    out: Callable[[str], None] | None = None,
) -> int:
    """Print each change until Promoted (0), CircuitBreak/RolledBack (1) or `timeout` (2).

    A gateway that cannot be reached for a moment (a restart) is waited for.
    """
    if out is None:

        def out(line: str) -> None:  # each change at once, also into a pipe
            print(line, flush=True)

    end = clock() + timeout
    path = f"/admin/services/{quote(service, safe='')}"
    last = None
    while True:
        try:
            doc = call(base, "GET", path)
        except AdminError as e:
            if "cannot reach" not in str(e):
                print(f"gateway rollout status: {e}", file=sys.stderr)
                return WATCH_FAILED
            line = f"{service}: {e}"
        else:
            line = status_line(doc)
            state = (doc.get("rollout") or {}).get("state")
            if line != last:
                out(line)
                last = line
            if state == "Promoted":
                return WATCH_PROMOTED
            if state in _FAILED_STATES:
                return WATCH_FAILED
        if line != last:
            out(line)
            last = line
        if clock() >= end:
            out(f"{service}: timed out after {timeout:g}s")
            return WATCH_TIMEOUT
        sleep(min(interval, max(0.0, end - clock())))


def cmd_rollout(args: argparse.Namespace) -> int:
    prog = f"gateway rollout {args.action}"
    base = admin_url(args)
    svc = f"/admin/services/{quote(args.service, safe='')}"
    try:
        if args.action == "start":
            if (args.plan is None) == (args.traffic is None):
                return _fail(prog, "give exactly one of --plan FILE or --traffic N%", 2)
            if not args.release:
                return _fail(prog, "--release R is required", 2)
            try:
                body = _plan_from(args)
            except ValueError as e:
                return _fail(prog, str(e), 2)
            doc = call(base, "POST", svc + "/rollout", body)
        elif args.action == "status":
            if args.watch:
                from gateway.config import parse_duration

                timeout = parse_duration(args.timeout)
                if timeout is None:
                    return _fail(prog, f"--timeout {args.timeout!r} is not a duration (30m)", 2)
                return watch(base, args.service, timeout, interval=args.interval)
            doc = call(base, "GET", svc)
            _print_json({"service": doc["service"], "rollout": doc["rollout"]})
            return 0
        else:
            route = {"confirm": "/rollout/confirm", "retry": "/rollout/retry"}.get(
                args.action, f"/{args.action}"
            )
            full = {"full": True} if args.action == "promote" and args.full else None
            doc = call(base, "POST", svc + route, full)
    except AdminError as e:
        return _fail(prog, str(e))
    print(status_line(doc))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """What a traffic share would move: GET .../preview with the weights it implies."""
    from urllib.parse import urlencode

    prog = "gateway preview"
    try:
        pct = parse_traffic(args.traffic)
    except ValueError as e:
        return _fail(prog, str(e), 2)
    base = admin_url(args)
    svc = f"/admin/services/{quote(args.service, safe='')}"
    try:
        doc = call(base, "GET", svc)
        baseline = doc["baseline"]
        current: dict[str, float] = doc["percent"]
        release = args.release
        if release is None:
            others = [r for r in current if r != baseline]
            if len(others) != 1:
                return _fail(prog, f"say which release with --release ({', '.join(others)})", 2)
            release = others[0]
        if release not in current or release == baseline:
            names = ", ".join(r for r in current if r != baseline)
            return _fail(prog, f"--release {release!r} is not a non-baseline release ({names})", 2)
        weights = {r: w for r, w in current.items() if r not in (baseline, release)}
        weights[release] = pct
        weights[baseline] = max(0.0, 100.0 - sum(w for r, w in weights.items() if r != baseline))
        params = {k: f"{v:g}" for k, v in weights.items()}
        if args.sample is not None:
            params["sample"] = str(args.sample)
        out = call(base, "GET", f"{svc}/preview?{urlencode(params)}")
    except AdminError as e:
        return _fail(prog, str(e))
    _print_json(out)
    return 0


# --------------------------------------------------------------------------- parser


def _admin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        default=None,
        metavar="URL",
        help=f"admin API base URL (default: $GATEWAY_ADMIN_URL or {DEFAULT_ADMIN_URL}); "
        "token from $GATEWAY_ADMIN_TOKEN",
    )


def add_commands(sub: Any) -> None:
    """Register the admin-client subcommands on the main parser."""
    w = sub.add_parser("weights", help="get or set a service's release weights (admin API)")
    w.add_argument("action", choices=("get", "set"))
    w.add_argument("service")
    w.add_argument("assignments", nargs="*", metavar="release=weight")
    w.add_argument(
        "--if-match",
        default=None,
        metavar="VERSION",
        help="refuse if the state version changed (409)",
    )
    _admin_arg(w)
    w.set_defaults(func=cmd_weights)

    s = sub.add_parser(
        "strategy", help='validate, plan or apply a strategy file (README "Admin API")'
    )
    s.add_argument("action", choices=("validate", "plan", "apply"))
    s.add_argument("file", metavar="FILE")
    s.add_argument(
        "-c",
        "--config",
        default=None,
        help="gateway config to check against (default: $GATEWAY_CONFIG or config/gateway.yaml)",
    )
    _admin_arg(s)
    s.set_defaults(func=cmd_strategy)

    a = sub.add_parser("audit", help="the audit trail: who changed what (admin API)")
    a.add_argument("service", nargs="?", default=None, metavar="SERVICE")
    a.add_argument(
        "--since", default=None, metavar="T", help="RFC 3339 time, epoch seconds or 10m (ago)"
    )
    a.add_argument("--limit", type=int, default=100, help="at most this many records (1-1000)")
    _admin_arg(a)
    a.set_defaults(func=cmd_audit)

    ro = sub.add_parser(
        "rollout", help='start, watch and steer a step rollout (admin API, README "Rollouts")'
    )
    ro.add_argument(
        "action",
        choices=("start", "status", "pause", "resume", "promote", "abort", "confirm", "retry"),
    )
    ro.add_argument("service", metavar="SERVICE")
    ro.add_argument("--release", default=None, help="start: the release to roll out")
    ro.add_argument("--plan", default=None, metavar="FILE", help="start: YAML/JSON step plan")
    ro.add_argument(
        "--traffic", default=None, metavar="N%", help="start: one step at N%% until promote"
    )
    ro.add_argument("--full", action="store_true", help="promote: all remaining steps")
    ro.add_argument(
        "--watch",
        action="store_true",
        help="status: print each change; exit 0 Promoted, 1 CircuitBreak/RolledBack, 2 timeout",
    )
    ro.add_argument("--timeout", default="30m", help="status --watch: give up after (30m)")
    ro.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    _admin_arg(ro)
    ro.set_defaults(func=cmd_rollout)

    pv = sub.add_parser(
        "preview", help="what share of users a traffic change would move (admin API)"
    )
    pv.add_argument("service", metavar="SERVICE")
    pv.add_argument("--traffic", required=True, metavar="N%", help="the release's new share")
    pv.add_argument(
        "--release", default=None, help="which release (default: the only non-baseline)"
    )
    pv.add_argument("--sample", type=int, default=None, help="synthetic keys (default 100,000)")
    _admin_arg(pv)
    pv.set_defaults(func=cmd_preview)
