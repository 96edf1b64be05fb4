"""Run the public W3C Trace Context suite against the gateway, end to end, on 127.0.0.1.

    git clone https://github.com/w3c/trace-context /tmp/trace-context
    .venv/bin/python -m tests.run_w3c_suite /tmp/trace-context/test

The suite (test/test.py) POSTs to a "service" and expects it to call the harness
back, once per URL it names, with the trace context it propagates. Here the
service is the gateway in front of a tiny pass-through app: the app makes each
callback *through the gateway again* (Host `harness.local` routes to the
harness), carrying the traceparent/tracestate it received, so every callback
is one gateway hop with its own span, as the suite's multi-callback cases need.
Spec level 2, strict level 2 (the suite's defaults are 1 and 2). Exits with the
suite's status; tests/test_w3c_trace_suite.py pins the same cases without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from tests.conftest import free_port, serve_app

_TRACE = ("traceparent", "tracestate")


def callback_app(gateway_port: list[int]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        actions = await request.json()
        trace = {k: v for k, v in request.headers.items() if k.lower() in _TRACE}
        async with aiohttp.ClientSession() as s:
            for action in actions or []:
                path = "/" + action["url"].split("/", 3)[3]
                async with s.post(
                    f"http://127.0.0.1:{gateway_port[0]}{path}",
                    json=action.get("arguments") or [],
                    headers={"Host": "harness.local", **trace},
                ) as r:
                    await r.read()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


async def run(suite: Path) -> int:
    harness_port = free_port()
    gateway_port: list[int] = []
    runner, app_port = await serve_app(callback_app(gateway_port))
    doc = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "memory"},
        "services": {
            "service": {
                "match": {"hosts": ["127.0.0.1"]},
                "releases": {
                    "stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{app_port}"]}
                },
            },
            "harness": {
                "match": {"hosts": ["harness.local"]},
                "releases": {
                    "stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{harness_port}"]}
                },
            },
        },
    }
    gw = Gateway(C.build(doc, env={}))
    await gw.start()
    assert gw.port is not None
    gateway_port.append(gw.port)
    try:
        env = {
            **os.environ,
            "HARNESS_PORT": str(harness_port),
            "STRICT_LEVEL": "2",
            "SPEC_LEVEL": "2",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "test.py", f"http://127.0.0.1:{gw.port}/test", cwd=suite, env=env
        )
        return await proc.wait()
    finally:
        await gw.stop(1.0)
        await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", type=Path, help="the suite's test/ directory (holds test.py)")
    return asyncio.run(run(p.parse_args().suite))


if __name__ == "__main__":
    sys.exit(main())
