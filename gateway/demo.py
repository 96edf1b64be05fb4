"""`gateway demo`: two built-in upstreams and the gateway at 90/10 on them.

Why: a newcomer sees header override, cookie override and sticky users work
in one command, with nothing to install or configure (README "Trying the demo").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from gateway import config as config_mod
from gateway.app import Gateway, site_port

# The demo's one service bears the name README's examples use, so every admin example
# there works pasted against a fresh demo (tests/test_readme_examples.py runs them).
DEMO_SERVICE = "user-api"


def demo_upstream(release: str) -> web.Application:
    """An upstream that answers with its release name and the headers it received."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "release": release,
                "method": request.method,
                "path": request.path_qs,
                "body_bytes": len(body),
                "headers": dict(request.headers),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve_app(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    """Run an aiohttp app on an ephemeral port; the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, site_port(site)


async def start_upstream(release: str, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    return await serve_app(demo_upstream(release), host)


def demo_config(host: str, port: int, admin_port: int, stable: int, gray: int) -> config_mod.Config:
    return config_mod.build(
        {
            "listen": f"{host}:{port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": None},
            "state": {"store": "memory"},
            "drain_timeout": "2s",
            "services": {
                DEMO_SERVICE: {
                    "releases": {
                        "stable": {"weight": 90, "upstreams": [f"http://127.0.0.1:{stable}"]},
                        "gray": {"weight": 10, "upstreams": [f"http://127.0.0.1:{gray}"]},
                    }
                }
            },
        },
        env={},
        source="<demo>",
    )


def curl_lines(port: int, admin_port: int) -> list[tuple[str, str]]:
    base = f"http://127.0.0.1:{port}/hello"
    return [
        ("header override -> always gray", f"curl -s -H 'X-Release-Stage: gray' {base}"),
        ("cookie override -> always gray", f"curl -s --cookie 'release_stage=gray' {base}"),
        (
            "sticky user -> the same release on every call",
            f"curl -s -H 'X-User-ID: alice' {base}",
        ),
        ("no key -> 90 % stable / 10 % gray at random", f"curl -si {base}"),
        ("admin: releases and weights", f"curl -s http://127.0.0.1:{admin_port}/admin/services"),
    ]


async def run_demo(host: str, port: int, admin_port: int, duration: float | None = None) -> int:
    runners: list[web.AppRunner] = []
    r1, p_stable = await start_upstream("stable")
    runners.append(r1)
    r2, p_gray = await start_upstream("gray")
    runners.append(r2)
    cfg = demo_config(host, port, admin_port, p_stable, p_gray)
    gw = Gateway(cfg)
    try:
        await gw.start()
    except OSError as e:
        print(
            f"gateway demo: cannot listen on {host}:{port} or admin {admin_port}: {e}.",
            file=sys.stderr,
        )
        print("Try: gateway demo --port 18080 --admin-port 19901", file=sys.stderr)
        for r in runners:
            await r.cleanup()
        return 1
    assert gw.port is not None and gw.admin_port is not None
    from gateway.version import build_description

    print(f"gateway demo {gw.version} ({build_description()})")
    print(f"stable on :{p_stable} (90 %), gray on :{p_gray} (10 %)")
    print(f"gateway on http://{host}:{gw.port}  admin on http://127.0.0.1:{gw.admin_port}")
    print("Try (each answer names the release that served it):")
    for what, line in curl_lines(gw.port, gw.admin_port):
        print(f"  # {what}\n  {line}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the line that says Ctrl-C works
        loop.add_signal_handler(sig, stop.set)
    print("Ctrl-C to stop.", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)
    await gw.stop(2.0)
    for r in runners:
        await r.cleanup()
    return 0
