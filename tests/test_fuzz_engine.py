"""Bad bytes never crash the data path: every malformed head gets a clean answer or a close."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import gateway_config, two_releases

VALID = b"GET /p HTTP/1.1\r\nHost: t\r\nX-User-ID: u1\r\nContent-Length: 3\r\n\r\nabc"
# A head engine/fast_head.py reads without llhttp: mutated, it is read there or left to llhttp.
PLAIN = b"GET /p HTTP/1.1\r\nHost: t\r\nX-User-ID: u1\r\nConnection: keep-alive\r\n\r\n"

_mutations = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(
        lambda i, b: VALID[:i] + b + VALID[i:],
        st.integers(0, len(VALID)),
        st.binary(min_size=1, max_size=12),
    ),
    st.builds(lambda i: VALID[:i] + VALID[i + 1 :], st.integers(0, len(VALID) - 1)),
    st.builds(
        lambda i, b: PLAIN[:i] + b + PLAIN[i:],
        st.integers(0, len(PLAIN)),
        st.binary(min_size=1, max_size=12),
    ),
    st.builds(
        lambda n, v: b"GET / HTTP/1.1\r\nHost: t\r\n" + n + b": " + v + b"\r\n\r\n",
        st.binary(min_size=0, max_size=20),
        st.binary(min_size=0, max_size=40),
    ),
)


async def _exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    """Send `data`; with `half_close`, EOF tells the gateway nothing more is coming."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        else:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return await asyncio.wait_for(reader.read(65536), 10)
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def test_malformed_requests_get_clean_answers(upstreams: Any, gateway: Any) -> None:
    st_up, gr_up = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st_up.url, gr_up.url), engine="fast"))
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=_mutations)
    def check(data: bytes) -> None:
        fut = asyncio.run_coroutine_threadsafe(_exchange(gw.port, data), loop)
        out = fut.result(30)
        seen.append(out[:12])
        if out:
            assert out.startswith(b"HTTP/1.1 ") or out.startswith(b"HTTP/1.0 ")
            code = int(out[9:12])
            assert 100 <= code < 600 and code not in (500,), out[:200]

    await asyncio.to_thread(check)
    assert len(seen) >= 100 and any(s.startswith(b"HTTP/1.1 4") for s in seen)
    ok = await _exchange(gw.port, VALID, half_close=False)  # still serving
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert gw.engine.in_flight == 0
