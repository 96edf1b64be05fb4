"""gateway/files.py: a FIFO, a device or a huge file named as a users or tokens file is refused.

A users file named by `PUT …/segments` used to be read with `Path.read_text`:
a FIFO held a worker thread until a writer came (eight of them wedged every
admin write, the state store's writes run on the same threads), and
`/dev/zero` would have grown memory until the process died.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as C
from gateway import files
from gateway.app import Gateway
from tests.conftest import gateway_check, gateway_config, two_releases


@contextlib.contextmanager
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO; on the way out, whoever still waits on it is let go (a writer opens and closes)."""
    p = tmp_path / "users.fifo"
    os.mkfifo(p)
    try:
        yield p
    finally:
        for _ in range(64):  # each open releases every reader waiting at that moment
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break  # ENXIO: no reader waits


def _kind(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        return tmp_path
    if kind == "device":
        return Path("/dev/zero")
    if kind == "missing":
        return tmp_path / "nope"
    p = tmp_path / "big"
    p.write_bytes(b"k\n" * 600)
    return p


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("directory", "Is a directory"),
        ("device", "not a regular file"),
        ("missing", "No such file"),
        ("too-large", "larger than 1,000 bytes"),
    ],
    ids=["directory", "dev-zero", "missing", "too-large"],
)
def test_read_text_refuses_what_is_not_a_small_regular_file(
    tmp_path: Path, kind: str, words: str
) -> None:
    with pytest.raises(OSError) as e:
        files.read_text(_kind(tmp_path, kind), limit=1000)
    assert words in str(e.value.strerror)


def test_read_text_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    with fifo(tmp_path) as p, pytest.raises(OSError) as e:
        files.read_text(p)
    assert "not a regular file" in str(e.value.strerror)


def test_read_text_reads_a_regular_file_up_to_the_limit(tmp_path: Path) -> None:
    p = tmp_path / "users.txt"
    p.write_text("alice\nbob\n")
    assert files.read_text(p, limit=10) == "alice\nbob\n"
    p.write_bytes(b"\xff\n")
    with pytest.raises(UnicodeDecodeError):
        files.read_text(p)


async def test_users_files_that_are_fifos_get_400s_and_admin_writes_keep_working(
    upstreams: Any, gateway: Any, tmp_path: Path
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url),
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    gw = await gateway(doc)
    svc = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    timeout = aiohttp.ClientTimeout(total=30)
    with fifo(tmp_path) as p:
        body = [{"name": "b", "match": {"users": {"file": str(p)}}, "release": "gray"}]
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def put_segments() -> tuple[int, Any]:
                async with s.put(f"{svc}/segments", json=body) as r:
                    return r.status, await r.json()

            # More than the default thread pool's workers (min(32, cores + 4)).
            answers = await asyncio.gather(*(put_segments() for _ in range(40)))
            for status, doc_ in answers:
                assert status == 400, doc_
                assert doc_["field"] == "segments[0].match.users.file"
                assert "not a regular file" in doc_["error"]
            async with s.put(f"{svc}/weights", json={"gray": 7}) as r:
                assert r.status == 200, await r.text()
    assert gw.holder.current.services["svc"].table.raw["gray"] == 7.0


@pytest.mark.parametrize(
    ("where", "field"),
    [
        (("admin", "tokens_file"), "admin.tokens_file"),
        (("tls", "cert"), "tls.cert"),
    ],
    ids=["tokens-file", "tls-cert"],
)
def test_gateway_check_refuses_a_fifo_file_at_once(
    tmp_path: Path, where: tuple[str, str], field: str
) -> None:
    """Both read the FIFO on the event loop at a reload: `gateway check` hung, as SIGHUP would."""
    with fifo(tmp_path) as p:
        doc = gateway_config(two_releases("http://127.0.0.1:9", "http://127.0.0.1:9"))
        doc.setdefault(where[0], {})[where[1]] = str(p)
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        proc = gateway_check(cfg)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and "not a regular file" in proc.stderr, proc.stderr[-2000:]


async def test_reload_of_a_config_replaced_by_a_fifo_answers_and_keeps_serving(
    upstreams: Any, tmp_path: Path
) -> None:
    """A reload read the config file on the event loop: a FIFO in its place held it for good."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    cfg = tmp_path / "users.fifo"  # the name fifo() makes: the config's path is now a FIFO
    cfg.write_text(yaml.safe_dump(gateway_config(two_releases(st.url, gr.url, 100, 0))))
    gw = Gateway(C.load(str(cfg), env={}))
    await gw.start()
    try:
        cfg.unlink()
        with fifo(tmp_path):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                async with s.post(f"http://127.0.0.1:{gw.admin_port}/admin/reload") as r:
                    assert r.status == 400
                    body = await r.json()
                assert body["field"] == "(file)"
                assert "no longer a regular file" in body["errors"][0]["error"]
                async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u"}) as r:
                    assert r.status == 200
    finally:
        await gw.stop(1.0)
