"""A tiny upstream run as its own process for the chaos tests (killed with SIGKILL by PID).

Usage: python tests/chaos_upstream.py NAME ARRIVALS_FILE DELAY_SECONDS
Listens on 127.0.0.1 port 0 and prints "PORT <n>" once serving. Every request's
X-Request-ID is appended to ARRIVALS_FILE with one unbuffered write as it
arrives, so the record survives a kill -9.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web


async def main(name: str, arrivals: str, delay: float) -> None:
    fd = os.open(arrivals, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def any_(request: web.Request) -> web.Response:
        os.write(fd, (request.headers.get("X-Request-ID", "-") + "\n").encode())
        body = await request.read()
        if delay:
            await asyncio.sleep(delay)  # the upstream's own work: keeps requests in flight
        return web.json_response(
            {"release": name, "pid": os.getpid(), "method": request.method, "len": len(body)}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
