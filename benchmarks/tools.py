"""External tools (wrk, hey, nginx, haproxy): find them, install them from Debian, describe the
machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

# tool -> (Debian packages to try in order, why the benchmark needs it)
TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "wrk": (("wrk",), "load generator for the throughput and c1 runs"),
    "hey": (("hey",), "fixed-rate (5k req/s) latency runs"),
    "nginx": (("nginx-light", "nginx"), "the reference forwarder and the fast upstream pair"),
    "haproxy": (("haproxy",), "the second reference forwarder"),
}

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def find_tool(name: str) -> str | None:
    """The tool's path; nginx lives in sbin, which a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Keep apt from starting the distribution's nginx or haproxy (invoke-rc.d policy)."""
    if _POLICY_RC.exists():
        yield
        return
    _POLICY_RC.write_text("#!/bin/sh\n# temporary, benchmarks.tools\nexit 101\n")
    _POLICY_RC.chmod(0o755)
    try:
        yield
    finally:
        _POLICY_RC.unlink(missing_ok=True)


def _apt(args: list[str], log: Callable[[str], None]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            ["apt-get", *args], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        log(f"  apt-get {' '.join(args)} timed out")
        return False
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        log(f"  apt-get {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc.returncode == 0


def ensure_tools(
    names: list[str], *, install: bool = True, log: Callable[[str], None] = print
) -> dict[str, str | None]:
    """Path of each tool, installing missing ones with apt-get when root; None if unavailable."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if not missing:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        for name in missing:
            log(
                f"benchmarks: {name} not found ({TOOLS[name][1]}); cannot install it here "
                "(needs root and apt-get), so the runs that need it are skipped"
            )
        return found
    log("benchmarks: installing missing tools from Debian packages:")
    for name in missing:
        log(f"  {name}: {TOOLS[name][1]}")
    updated = False
    with _no_service_start():
        for name in missing:
            for pkg in TOOLS[name][0]:
                log(f"  apt-get install -y {pkg}")
                ok = _apt(["install", "-y", "-q", "--no-install-recommends", pkg], log)
                if not ok and not updated:
                    log("  apt-get update (package lists may be missing or stale)")
                    updated = _apt(["update", "-q"], log)
                    ok = updated and _apt(
                        ["install", "-y", "-q", "--no-install-recommends", pkg], log
                    )
                if ok and find_tool(name):
                    break
            found[name] = find_tool(name)
            if found[name] is None:
                log(f"benchmarks: could not install {name}; the runs that need it are skipped")
    return found


def _first_line(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0] if text else None


def nginx_has_stub_status(nginx: str) -> bool:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
    return "stub_status" in out.stdout + out.stderr


_PY_PROBE = """
import json, os, platform, sys, sysconfig
ca = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
print(json.dumps({"version": platform.python_version(), "build": sys.version,
    "implementation": platform.python_implementation(), "executable": sys.executable,
    "real_executable": os.path.realpath(sys.executable), "config_args": ca,
    "pgo": "--enable-optimizations" in ca, "lto": "--with-lto" in ca}))
"""


def python_build(python: str = sys.executable) -> dict[str, object]:
    """Which CPython build `python` is, and whether it is an optimized one (PGO).

    Why: the interpreter's own build moves the gateway's CPU per request
    (benchmarks/README.md "Which interpreter"; here ~1.3 µs of user time per request, a few percent
    of throughput). The container's `python:3.12` image is built with --enable-optimizations
    --with-lto; Debian and Ubuntu
    build their python3 packages with PGO too, without saying so in CONFIG_ARGS, so a
    packaged interpreter is recognised by its package.
    """
    done = subprocess.run(
        [python, "-c", _PY_PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} does not run: {(done.stderr or done.stdout)[-500:]}")
    info: dict[str, object] = json.loads(done.stdout)
    package = _deb_package(str(info["real_executable"]))
    info["package"] = package
    info["optimized"] = bool(info["pgo"]) or package is not None
    return info


def _deb_package(path: str) -> str | None:
    """'python3.11-minimal 3.11.2-6+deb12u6' when a Debian package owns `path`."""
    owner = _first_line(["dpkg-query", "-S", path])
    if not owner or ":" not in owner or owner.startswith("dpkg-query"):
        return None
    name = owner.split(":", 1)[0].strip()
    version = _first_line(["dpkg-query", "-W", "-f=${Version}", name])
    return f"{name} {version}" if version else name


def describe_python(info: Mapping[str, object]) -> str:
    """One line for the table header: version, path, and how it was built."""
    if info.get("package"):
        how = f"Debian package {info['package']}, a PGO build"
    elif info.get("pgo"):
        how = "built with --enable-optimizations" + (" --with-lto" if info.get("lto") else "")
    else:
        how = "built without --enable-optimizations: no PGO"
    return f"{info['implementation']} {info['version']} ({info['real_executable']}, {how})"


def unoptimized_note(info: Mapping[str, object]) -> str | None:
    """A warning when the gateway runs on a slower interpreter build than the container's."""
    if info.get("optimized"):
        return None
    return (
        f"the gateway ran on {describe_python(info)}; the container's python:3.12 image is a "
        "PGO+LTO build, which spends less CPU per request. For container-like figures run with "
        "--python pointing at an optimized interpreter's venv (e.g. /usr/bin/python3 -m venv "
        "DIR && DIR/bin/pip install -e '.[dev]'; then --python DIR/bin/python)"
    )


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _git_describe(repo: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty", "--tags"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip() if out.returncode == 0 else "unknown (no commit yet)"


def machine_info(tools: dict[str, str | None], repo: Path) -> dict[str, object]:
    """What ran the benchmark: figures are only comparable within one such record."""
    versions: dict[str, str | None] = {}
    if tools.get("nginx"):
        line = _first_line([str(tools["nginx"]), "-v"])
        versions["nginx"] = line.split("nginx/")[-1] if line else None
    if tools.get("wrk"):
        line = _first_line([str(tools["wrk"]), "-v"])
        m = re.search(r"wrk (\S+)", line or "")
        versions["wrk"] = m.group(1) if m else line
    if tools.get("haproxy"):
        line = _first_line([str(tools["haproxy"]), "-v"])
        m = re.search(r"version (\S+)", line or "")
        versions["haproxy"] = m.group(1) if m else line
    if tools.get("hey"):
        versions["hey"] = _first_line(["dpkg-query", "-W", "-f=${Version}", "hey"])
    return {
        "python": python_build(),
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "tools": {
            name: {"path": path, "version": versions.get(name)} for name, path in tools.items()
        },
        "git_describe": _git_describe(repo),
    }
