"""Command line: argparse, uvloop, process management — no routing logic here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger("gateway")
Adjust = Callable[["Config"], "Config"]


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _printable(text: str) -> str:
    """Control characters escaped as repr does: user text never prints a raw CR/LF."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_config_errors(e: ConfigError) -> None:
    print(f"{_printable(e.source)}: {len(e.errors)} error(s)", file=sys.stderr)
    for line in e.lines():
        print(f"  {_printable(line)}", file=sys.stderr)


def _preflight(cfg: Any, *, bind: bool = True) -> int:
    """Exit status 2 after listing what would stop `run` on this machine, else 0."""
    from gateway import preflight

    found = preflight.problems(cfg, bind=bind)
    if not found:
        return 0
    _print_config_errors(ConfigError(found, cfg.source))
    return 2


# --------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from gateway import config

    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        _print_config_errors(e)
        return 2
    if _preflight(cfg, bind=not args.no_bind):
        return 2
    n = sum(len(s.releases) for s in cfg.services.values())
    print(f"{cfg.source}: OK ({len(cfg.services)} service(s), {n} release(s))")
    return 0


# --------------------------------------------------------------------------- run


async def _serve(cfg: Any, *, admin: bool, data: bool = True, adjust: Adjust | None = None) -> int:
    from gateway.app import Gateway

    gw = Gateway(cfg, admin=admin, data=data)
    if adjust is not None:  # a reload keeps the command line's ports
        gw.control.adjust = adjust
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, gw.request_reload)
    await gw.start()
    if admin and not data:
        log.info("admin listening on %s", gw.admin_port)
    if data:
        from gateway.version import build_description

        log.info("serving: engine %s, %s", cfg.engine, build_description())
    _settle_heap()
    await stop.wait()
    log.info("draining (up to %.1fs)", cfg.drain_timeout)
    await gw.stop()
    return 0


# Tracked allocations (net of frees) between two young collections; CPython's default is 700.
# Requests in flight are young objects that survive: with 1,000 client connections the
# default collected (and promoted) them ~140 times a second (benchmarks/README.md "Idle
# connections"). The request path makes no cycles, so waiting longer costs no memory.
GC_YOUNG_THRESHOLD = 10_000


def _settle_heap() -> None:
    """Serving starts: freeze what start-up made and collect the young generation less often.

    Why: the configuration, modules and metrics live as long as the process; frozen,
    the cycle collector's full collections no longer walk them (Python docs, gc.freeze).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import config

    _setup_logging(args.log_level)
    adjust = _port_overrides(args.port, args.admin_port)
    try:
        cfg = adjust(config.load(args.config))
    except ConfigError as e:
        _print_config_errors(e)
        return 2
    workers = args.workers or cfg.workers
    if not args.worker and _preflight(cfg):  # a worker shares the port its master checked
        return 2
    try:
        if args.worker or workers <= 1:
            return _run_loop(_serve(cfg, admin=not args.worker, adjust=adjust))
        return _supervise(args, cfg, workers, adjust)
    except GatewayError as e:  # unsafe admin listener, corrupt state file: exit 2
        if isinstance(e, ConfigError):
            _print_config_errors(e)
        else:
            print(f"gateway: {_printable(e.message)}", file=sys.stderr)
        return 2
    except OSError as e:  # a listener taken between the check above and the bind
        print(f"gateway: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 2


def _supervise(args: argparse.Namespace, cfg: Any, workers: int, adjust: Adjust) -> int:
    """Master: N data-path workers on one port (SO_REUSEPORT) + the admin listener."""
    mp_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    cmd = [sys.executable, "-m", "gateway", "run", "--worker", "-c", cfg.source]
    cmd += ["--log-level", args.log_level]
    for flag, value in (("--port", args.port), ("--admin-port", args.admin_port)):
        if value is not None:
            cmd += [flag, str(value)]
    procs: list[asyncio.subprocess.Process] = []

    async def main() -> int:
        from gateway.app import Gateway

        gw = Gateway(cfg, admin=True, data=False)
        gw.control.adjust = adjust
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def forward_hup() -> None:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGHUP)

        # A reload that validated (SIGHUP or POST /admin/reload) reaches the workers too.
        gw.control.reload_listeners.append(forward_hup)
        loop.add_signal_handler(signal.SIGHUP, gw.request_reload)
        await gw.start()  # before the workers: a refused start leaves no orphans
        for _ in range(workers):
            procs.append(await asyncio.create_subprocess_exec(*cmd))
        while not stop.is_set():
            waits = [asyncio.ensure_future(p.wait()) for p in procs]
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
            for w in (stopper, *waits):
                w.cancel()
            for i, p in enumerate(procs):
                if p.returncode is not None and not stop.is_set():
                    log.error("worker %d exited with %s; restarting", p.pid, p.returncode)
                    procs[i] = await asyncio.create_subprocess_exec(*cmd)
        gw.begin_drain()  # the master's admin /healthz says so while workers drain
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        rc = 0
        for p in procs:
            try:
                code = await asyncio.wait_for(p.wait(), cfg.drain_timeout + 5)
            except TimeoutError:
                p.kill()
                await p.wait()
                code = 1
            rc = rc or (0 if code == 0 else 1)
        await gw.stop(0)
        return rc

    try:
        return _run_loop(main())
    finally:
        shutil.rmtree(mp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _setup_logging("WARNING")
    try:
        return _run_loop(run_demo(args.host, args.port, args.admin_port, args.duration))
    except ConfigError as e:  # e.g. --port equal to --admin-port, or a bad --host
        _print_config_errors(e)
        return 2


# --------------------------------------------------------------------------- entry


class _VersionAction(argparse.Action):
    """Prints the version and the build (compiled or pure, and why) unwrapped, then exits."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from gateway.version import build_description, build_version

        print(f"gateway {build_version()} ({build_description()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Gray-release edge gateway")
    p.add_argument("--version", action=_VersionAction, help="the version and which build serves")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run",
        help="serve traffic",
        description="Serve the data listener and the admin API from a config file; "
        "SIGTERM drains, SIGHUP reloads (docs/operations.md).",
    )
    r.add_argument(
        "-c",
        "--config",
        default=None,
        help="config file (default: $GATEWAY_CONFIG or config/gateway.yaml)",
    )
    r.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-path worker processes sharing the port (SO_REUSEPORT); default: `workers`",
    )
    r.add_argument(
        "--port",
        type=_port,
        default=None,
        help="serve on this port instead of the config's `listen` port (0: any free port)",
    )
    r.add_argument(
        "--admin-port",
        type=_port,
        default=None,
        help="admin API on this port instead of the config's `admin.listen` port",
    )
    r.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        type=str.upper,
        help="log level (default: INFO)",
    )
    r.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate a config file; exit 2 listing every error")
    c.add_argument(
        "config_pos", nargs="?", default=None, metavar="FILE", help="the config file to check"
    )
    c.add_argument(
        "-c",
        "--config",
        default=None,
        help="the config file (default: FILE, $GATEWAY_CONFIG or config/gateway.yaml)",
    )
    c.add_argument(
        "--no-bind",
        action="store_true",
        help="skip trying the listen ports (e.g. to check a file while the gateway runs)",
    )
    c.set_defaults(func=lambda a: cmd_check(_pos_config(a)))

    d = sub.add_parser(
        "demo",
        help="two built-in upstreams + the gateway at 90/10",
        description="Start two built-in upstreams (stable, gray) and the gateway at 90/10 "
        "on them, with its admin API, and print curl lines to try "
        '(README "Trying the demo"). Ctrl-C stops it.',
    )
    d.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the demo gateway serves on (default: %(default)s)",
    )
    d.add_argument(
        "--port", type=_port, default=8080, help="the gateway's port (default: %(default)s)"
    )
    d.add_argument(
        "--admin-port",
        type=_port,
        default=9901,
        help="the admin API's port on 127.0.0.1 (default: %(default)s)",
    )
    d.add_argument("--duration", type=float, default=None, help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    from gateway import cli_admin

    cli_admin.add_commands(sub)
    return p


def _port(text: str) -> int:
    """A TCP port for --port/--admin-port: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def _port_overrides(port: int | None, admin_port: int | None) -> Adjust:
    """`run --port/--admin-port` as a function on a loaded config (reloads apply it too).

    The override still goes through the loader's rule that the admin listener may not
    share the data listener's port (docs/configuration.md, `admin`).
    """
    from dataclasses import replace

    from gateway import config as config_mod
    from gateway.config import HostPort

    def adjust(cfg: Config) -> Config:
        if port is None and admin_port is None:
            return cfg
        listen = cfg.listen if port is None else HostPort(cfg.listen.host, port)
        a = cfg.admin.listen
        admin = a if admin_port is None else HostPort(a.host, admin_port)
        if (clash := config_mod._listeners_clash(listen, admin)) is not None:
            raise ConfigError([("--admin-port", clash)], cfg.source)
        return replace(cfg, listen=listen, admin=replace(cfg.admin, listen=admin))

    return adjust


def _pos_config(a: argparse.Namespace) -> argparse.Namespace:
    if a.config is None:
        a.config = a.config_pos
    return a


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
