"""The policy side of the data path: one request head in, one decision out.

Why a separate module: the engine moves bytes; this decides service, release
and endpoint, rewrites headers (README "On every hop") and accounts for the outcome
(metrics, balancer counts, guard). It imports neither aiohttp nor asyncio, so
either engine can drive it and tests can call it with plain values.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from gateway import propagation
from gateway.balancer import Pool, Slot, SlotGroup
from gateway.decide import decide, guard_request
from gateway.engine.api import Forward, Headers, RequestHead, Respond
from gateway.errors import (
    ERR_CONNECT,
    ERR_TIMEOUT,
    ERR_TLS,
    UpstreamErrorKind,
    upstream_message,
    upstream_status,
)
from gateway.headers import Scanned, forwarded_lines, scan, set_authority, upstream_fields
from gateway.metrics import Metrics
from gateway.paths import BadTarget, origin_target
from gateway.ratelog import RateLimiter
from gateway.retry import RetryBudget, may_retry
from gateway.routing import REASON_FALLBACK, REASON_REJECT, Decision
from gateway.sampling import RequestSampler
from gateway.state import ReleaseView, ServiceView, Snapshot, SnapshotHolder
from gateway.tally import Tally

if TYPE_CHECKING:  # a plain int at run time; an unboxed int64 in the compiled build
    from mypy_extensions import i64

log = logging.getLogger("gateway.access")
errlog = logging.getLogger("gateway.handler")
_JSON: Final = [(b"Content-Type", b"application/json")]
_PROBE: Final = float("inf")
# Baggage members an untrusted client may not set (README "Segments").
_STEERING_MEMBERS: Final = (propagation.LANE_KEY, propagation.GRAY_TAG_KEY)


class Observer(Protocol):
    """Anything that wants every finished exchange (the guard, tests), a tally at a time."""

    def record_tally(self, t: Tally) -> None: ...


class Tracer(Protocol):
    """Span hooks; only called for sampled requests (an SDK span costs ~10 µs)."""

    def start(
        self,
        head: RequestHead,
        service: str,
        release: str,
        trace_id: str,
        parent: str | None,
        span_id: str,
        *,
        upstream_host: str,
        upstream_port: int,
        extra_attrs: Sequence[tuple[str, str]] = (),
    ) -> Callable[[int, str | None], None]: ...


def span_attrs(
    gray_tag: str | None, user: str | None, client: str, peer: str
) -> Sequence[tuple[str, str]]:
    """Extra SERVER span attributes: `gray.tag`, a hashed user id, the client behind proxies.

    Why the last: OpenTelemetry's HTTP semantic conventions make `client.address`
    the client behind proxies and `network.peer.address` the connection's peer.
    """
    if gray_tag is None and user is None and client == peer:
        return ()
    out: list[tuple[str, str]] = []
    if gray_tag is not None:
        out.append(("gray.tag", gray_tag))
    if user is not None:
        out.append(("user.id", user))
    if client != peer:
        out.append(("client.address", client))
        out.append(("network.peer.address", peer))
    return out


def json_body(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def respond_json(status: int, obj: object, extra: Headers | None = None) -> Respond:
    return Respond(status, json_body(obj), _JSON + (extra or []))


# The longest request-target `plain_path_end` walks: each str `in` test of `path_end` costs
# ~100 instructions whatever the length (PyUnicode_Contains, compiled), a walk ~10 a byte.
WALK_MAX: Final = 32


def plain_path_end(target: bytes) -> i64:
    """Where a plain origin-form `target`'s path ends: at its `?`, else its length; -1: not plain.

    Plain: starts with `/`, and its path holds no `%`, no `//` and no `/.` (the rare
    targets gateway/paths.py normalizes, RFC 3986 §5.2.4 and §6.2.2, and the
    absolute form of RFC 9112 §3.2.2). The same answer as `path_end`, by one walk
    over the bytes: for a short target cheaper than the four str tests there.
    """
    n: i64 = len(target)
    if n == 0 or target[0] != 47:  # b"/"
        return -1
    prev: i64 = 47
    i: i64 = 1
    while i < n:
        c: i64 = target[i]
        if c == 63:  # b"?": the query is not the path's
            return i
        if c == 37 or (prev == 47 and (c == 47 or c == 46)):  # b"%", b"//", b"/."
            return -1
        prev = c
        i += 1
    return n


def path_end(path: str) -> i64:
    """`plain_path_end` of the target that decodes (latin-1) to `path`, by str tests.

    Why str: compiled, str `find`/`in` are C calls, while a bytes `find` (or a bytes
    needle `in` bytes) is a Python method call.
    """
    end = len(path)
    if "?" in path:  # `in` first: compiled, cheaper than a `find` in the common case, no query
        end = path.find("?")
        path = path[:end]
    if path[:1] != "/" or "%" in path or ("." in path and "/." in path) or "//" in path:
        return -1
    return end


class ProxyHandler:
    """Implements engine.api.Handler over the current routing snapshot."""

    def __init__(
        self,
        holder: SnapshotHolder,
        *,
        metrics: Metrics | None = None,
        observers: list[Observer] | None = None,
        tracer: Tracer | None = None,
        sampler: RequestSampler | None = None,
        version: str = "dev",
        ready: Callable[[], bool] | None = None,
        access_log: bool = False,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
        defer: Callable[[Callable[[], None]], object] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.observers = observers or []
        self.tracer = tracer
        self.sampler = sampler
        self.version_b = version.encode()
        self.ready = ready or (lambda: True)
        self.draining = False  # set at SIGTERM: /healthz answers 503 (load balancers stop sending)
        self.access_log = access_log
        self.rng = rng or random.Random()
        # Ids from OpenSSL's CSPRNG unless a (seeded) rng is given: propagation.IdMint.
        self.ids = propagation.IdMint(rng)
        self.clock = clock
        self.wall = wall  # wall-clock time for segments' time windows (gateway/segments.py)
        # Accounting (metrics, guard windows) is batched: `on_done` adds to its
        # release's tally (gateway/tally.py), and
        # `flush` runs later via `defer` (every 50 ms in the gateway, app.py
        # ACCOUNTING_INTERVAL), so a thousand finished requests cost a few counter
        # updates instead of thousands of locked ones. Without `defer` every
        # exchange is flushed at once.
        self.defer = defer
        self._tallies: dict[str, dict[str, Tally]] = {}  # service -> release -> tally
        # The same tallies by the release's SlotGroup (one per (service, release), shared
        # by every snapshot's pool: balancer.py): one lookup by identity per request
        # instead of two by name.
        self._tally_of: dict[SlotGroup, Tally] = {}
        # The last request's service and release as looked up (their views, the tally).
        self._last = _Last()
        self._dirty: list[Tally] = []  # tallies with exchanges since the last flush
        self._budgets: dict[tuple[str, str], RetryBudget] = {}  # (service, release) -> budget
        self._errlines = RateLimiter()  # one log line per 502/503/504, a few per second
        # What `scan` found and what `decide` chose, filled again by every request: `handle`
        # runs to its end before the next one starts, and nothing it returns holds either.
        self._scanned = Scanned([])
        self._decision = Decision("", "", None, "")
        # The last client address and scheme; the address as X-Forwarded-For carries it, and
        # the X-Forwarded-* lines a request from it carries (headers.forwarded_lines).
        self._peer = ""
        self._scheme = ""
        self._peer_b = b""
        self._peer_lines = b""
        self._failover = _Failover()  # every request's `retry` (when it may fail over)

    def budget(self, service: str, release: str) -> RetryBudget:
        """The retry budget of (service, release); made on its first retry."""
        c = self.holder.current.config.retry_budget  # a reload may have changed it
        b = self._budgets.get((service, release))
        if b is None:
            b = self._budgets[(service, release)] = RetryBudget()
        b.ratio = c.percent / 100.0
        b.minimum = c.min_concurrent
        return b

    def log_error(
        self, status: int, service: str, release: str, upstream: str, kind: str, rid: str
    ) -> None:
        """One line for a 502/503/504 the gateway answers itself, rate-limited per service+kind."""
        suppressed = self._errlines.allow((service, kind), self.clock())
        if suppressed is None:
            return
        fields: dict[str, object] = {
            "status": status,
            "service": service,
            "release": release,
            "upstream": upstream,
            "kind": kind,
            "request_id": rid,
        }
        if suppressed:
            fields["suppressed"] = suppressed
        errlog.warning("upstream error %s", json.dumps(fields, separators=(",", ":")))

    def flush(self) -> None:
        """Hand every finished exchange since the last flush to metrics and observers."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        metrics = self.metrics
        for t in dirty:
            try:
                if metrics is not None:
                    metrics.observe_tally(t)
                for o in self.observers:
                    o.record_tally(t)
            except Exception:  # never let accounting stop: a tally left full is never queued again
                errlog.exception("accounting failed for %s/%s", t.service, t.release)
            finally:
                t.clear()

    def _tally_of_group(self, group: SlotGroup, service: str, release: str) -> Tally:
        t = self._tally_of.get(group)
        if t is None:
            t = self._tally_of[group] = self.tally(service, release)
        return t

    def tally(self, service: str, release: str) -> Tally:
        """The accumulator a request of (service, release) reports to when it ends."""
        per = self._tallies.get(service)
        if per is None:
            per = self._tallies[service] = {}
        t = per.get(release)
        if t is None:
            t = per[release] = Tally(service, release)
        return t

    # ----------------------------------------------------------------- request
    def handle(self, head: RequestHead) -> Forward | Respond:
        snap = self.holder.current
        target = head.target
        path = target.decode("latin-1")
        # Short targets by one walk over their bytes, longer ones by str tests (path_end).
        end = plain_path_end(target) if len(target) <= WALK_MAX else path_end(path)
        authority: bytes | None = None
        fwd_target: bytes | None = None
        if end >= 0:
            if end < len(path):  # a query
                path = path[:end]
        else:
            # The rare case: dot segments, `//`, `%` or a non-origin form (gateway/paths.py).
            try:
                authority, norm, path_b = origin_target(head.method, target)
            except BadTarget as e:
                return respond_json(400, {"error": e.message})
            if norm != target:
                fwd_target = norm
            path = path_b.decode("latin-1")
        if path == "/healthz" or path == "/readyz":
            return self._health(path)
        s = scan(head.headers, snap.stage_l, snap.user_l, snap.tag_l, self._scanned)
        if authority is not None:
            set_authority(s, authority)
        elif s.host_b is None and head.http_version != "1.0":
            return respond_json(400, {"error": "missing Host header"})
        svc_name = snap.matcher.match_field(s.host_b, path)
        if svc_name is None:
            return respond_json(404, {"error": "no service matches this host and path"})
        last = self._last
        sv = last.sv
        if sv is None or svc_name is not last.service or snap is not last.snap:
            sv = snap.services[svc_name]
            last.new_service(snap, svc_name, sv)
        now = self.clock()
        dec = decide(
            snap, sv, s, head.headers, path, target, head.method, head.client_ip, now, self.wall,
            self.rng, self._decision,
        )  # fmt: skip
        if dec is None:
            self.log_error(503, svc_name, "", "", "unavailable", s.request_id or "")
            return respond_json(
                503, {"error": "no healthy endpoint in any release", "service": svc_name}
            )
        if dec.reason == REASON_REJECT:
            return respond_json(503, {"error": "lane unavailable", "lane": dec.chosen})
        if dec.segment is not None and self.metrics is not None:
            self.metrics.segment_request(svc_name, dec.segment, dec.release)
        release = dec.release
        rv = last.rv
        if rv is None or release is not last.release:
            rv = sv.releases[release]
            last.new_release(release, rv, self._tally_of_group(rv.pool.group, svc_name, release))
        t = last.tally
        pool = rv.pool
        # None only when every release is out and all are probed (live_releases):
        # then pick as if no endpoint sat out (a time past every ejection).
        slot = pool.pick(dec.key, now) or pool.pick(dec.key, _PROBE)
        if slot is None:  # pragma: no cover - available implies endpoints
            return respond_json(503, {"error": "no healthy endpoint", "service": svc_name})
        slot.outstanding += 1

        tp = s.traceparent
        incoming = propagation.parse_traceparent(tp) if tp is not None else None
        sampled = self.sampler.sample(incoming) if self.sampler is not None else False
        # Ids and the traceparent as bytes: they go into header fields as they are.
        if incoming is None:  # a new trace: its id and our span's in one step
            span_id, new_tid = self.ids.span_and_trace_b()
        else:
            span_id, new_tid = self.ids.span_id_b(), b""
        trace_id, flags = propagation.outgoing_trace(incoming, sampled, self.ids, new_tid)
        if s.request_id:
            rid_b = s.request_id.encode("latin-1")
        elif incoming is None:
            rid_b = trace_id  # a new trace's random id doubles as the request id: one lookup key
        else:
            rid_b = self.ids.trace_id_b()  # 128 random bits, as a generated request id needs
        if dec.strip_tag or snap.privacy_mode:
            user_shown = guard_request(s, dec, snap)
        else:
            user_shown = None

        # The trace fields after traceparent's value, from the CRLF that ends its line.
        baggage = s.baggage
        if baggage is not None:
            extra = rv.extra_baggage
            if dec.lane is not None:  # the lane goes on, whichever release served it
                extra = ((propagation.LANE_KEY, dec.lane), *extra[1:])
            bg = propagation.build_baggage(
                baggage, extra, _STEERING_MEMBERS if dec.strip_baggage else ()
            )
            trace_tail = b"\r\nbaggage: " + bg.encode("latin-1") + b"\r\n" if bg else b"\r\n"
        else:
            trace_tail = rv.lines.baggage_end
        tracestate = s.tracestate
        if tracestate is not None and incoming is not None:
            ts = propagation.parse_tracestate(tracestate)
            if ts:
                trace_tail = b"\r\ntracestate: " + ts.encode("latin-1") + trace_tail
        # The client's own field lines go on as one block when policy kept every one
        # of them unchanged (no field dropped, renamed or rewritten: headers.Scanned).
        raw = head.fields if s.kept is head.headers else None
        peer = head.client_ip
        scheme = head.scheme
        # The engine interns addresses (and the scheme is a constant): two compares while
        # one client's requests repeat.
        if peer is not self._peer or scheme is not self._scheme:
            self._peer = peer
            self._scheme = scheme
            self._peer_b = peer.encode("latin-1")
            self._peer_lines = forwarded_lines(self._peer_b, scheme)
        lines = rv.lines
        fields = upstream_fields(
            s, raw, client_ip=self._peer_b, proto=scheme, lines=lines, request_id=rid_b,
            trace=(trace_id, span_id, flags), trace_tail=trace_tail, peer_lines=self._peer_lines,
        )  # fmt: skip
        # To the client: the stage field and X-Request-ID, rendered as field lines.
        resp = b"%b%b\r\n" % (lines.stage_rid, rid_b)
        if dec.reason == REASON_FALLBACK:
            resp += b"X-Release-Fallback: " + dec.chosen.encode() + b"\r\n"
        if dec.set_cookie is not None:
            resp += (
                f"Set-Cookie: {snap.user_cookie}={dec.set_cookie}; Path=/; Max-Age="
                f"{snap.routing.sticky_cookie_max_age}; HttpOnly; SameSite=Lax\r\n".encode()
            )

        start = now
        service = svc_name
        span_done = None
        if sampled and self.tracer is not None:
            parent = incoming.parent_id if incoming is not None else None
            span_done = self.tracer.start(
                head,
                service,
                release,
                trace_id.decode("latin-1"),
                parent,
                span_id.decode("latin-1"),
                upstream_host=slot.host,
                upstream_port=slot.port,
                extra_attrs=span_attrs(rv.gray_tag, user_shown, dec.client, head.client_ip),
            )

        fwd = _Forward(
            self, slot, pool, start, t, span_done, sv, rv, service, release, fields, resp,
            fwd_target, dec.key,
        )  # fmt: skip
        if fwd.retries and len(pool) > 1:
            fwd.retry = self._failover
        if self.access_log:
            fields_log: dict[str, object] = {
                "trace_id": trace_id.decode("latin-1"),
                "request_id": rid_b.decode("latin-1"),
                "service": service,
                "release": release,
                "reason": dec.reason,
                "upstream": slot.endpoint.address,
                "method": head.method.decode("latin-1"),
            }
            if s.request_id_replaced:
                fields_log["request_id_replaced"] = True
            if user_shown is not None:
                fields_log["user"] = user_shown
            fwd.log_fields = fields_log
        return fwd

    def finished(self, t: Tally, status: int, elapsed: float, error: str | None) -> None:
        """Add one finished exchange to its tally; `flush` hands it on (metrics, guard)."""
        if not t.n:
            if not self._dirty and self.defer is not None:
                self.defer(self.flush)
            self._dirty.append(t)
        t.add(status, elapsed, error)
        if self.defer is None:
            self.flush()

    def error_body(self, status: int, kind: UpstreamErrorKind, fwd: Forward) -> Respond:
        msg = upstream_message(kind)
        if kind == ERR_TLS:
            msg = f"{msg}: {fwd.detail or 'handshake failed'}"
        status = status or upstream_status(kind)
        rid = ""
        for n, v in fwd.response_headers:
            if n == b"X-Request-ID":
                rid = v.decode("latin-1")
                break
        self.log_error(status, fwd.service, fwd.release, f"{fwd.host}:{fwd.port}", kind, rid)
        return respond_json(
            status,
            {"error": msg, "kind": kind, "service": fwd.service, "release": fwd.release},
            fwd.response_headers,
        )

    def _health(self, path: str) -> Respond:
        vh = [(b"X-App-Version", self.version_b), *_JSON]
        if path == "/healthz":
            if self.draining:
                return Respond(503, b'{"status":"draining"}', vh)
            return Respond(200, b'{"status":"ok"}', vh)
        if self.ready():
            return Respond(200, b'{"status":"ready"}', vh)
        return Respond(503, b'{"status":"not ready"}', vh)


class _Forward(Forward):
    """The Forward of one proxied request, and the accounting of its end.

    `done` (engine.api.Forward) does what ends an exchange: balancer counts,
    passive health, the tally. One object per request where a Forward and a
    separate `on_done` callable were two: the fast engine calls `done` as a
    method (a native call when compiled), and `on_done` still reads as a
    callable (the bound `done`) for the aiohttp engine and tests.
    """

    __slots__ = (
        "h",
        "slot",
        "pool",
        "start",
        "tally",
        "span_done",
        "log_fields",
        "key",
        "retries",
        "retrying",
        "release_tls",
    )

    def __init__(
        self,
        h: ProxyHandler,
        slot: Slot,
        pool: Pool,
        start: float,
        tally: Tally,
        span_done: Callable[[int, str | None], None] | None,
        sv: ServiceView,
        rv: ReleaseView,
        service: str,
        release: str,
        fields: bytes,
        resp_fields: bytes,
        target: bytes | None,
        key: str | None,
    ) -> None:
        release_tls = rv.tls
        super().__init__(
            slot.host, slot.port, None, None, service, release, sv.connect_timeout,
            sv.read_timeout, None, target, sv.total_timeout, None,
            release_tls if slot.tls else None, fields, resp_fields,
        )  # fmt: skip
        self.h = h
        self.slot = slot
        self.pool = pool
        self.start = start
        self.tally = tally
        self.span_done = span_done
        self.log_fields: dict[str, object] | None = None
        self.key = key  # the sticky key, for the hash balancer's next choice
        self.retries = sv.retries  # failover attempts allowed after the first (config `retries`)
        self.retrying: _Retrying | None = None  # made on the first retry only
        self.release_tls = release_tls  # the release's, for its https:// endpoints

    def failover(self, kind: str) -> bool:
        """engine.api.Retry for this request (`_Failover`): another live endpoint, if allowed.

        Bounded by `retries`, `timeouts.total` and the release's retry budget
        (gateway/retry.py); the failed endpoint's passive health counts the
        failure as a finished exchange would.
        """
        h = self.h
        now = h.clock()
        r = self.retrying
        total = self.total_timeout
        left = total - (now - self.start) if total else None
        if not may_retry(kind, 0 if r is None else len(r.tried) - 1, self.retries, left):
            return False
        old = self.slot
        pool = self.pool
        nxt = pool.pick_other((old,) if r is None else r.tried, self.key, now)
        if nxt is None:
            return False
        if r is None:
            r = self.retrying = _Retrying(old)
        if r.budget is None and kind != ERR_CONNECT:
            # A refused connection cost no upstream any work, so moving on
            # multiplies nothing; a request that was sent (or a connect timeout,
            # which may be an overloaded listener) needs a budget token.
            budget = h.budget(self.service, self.release)
            if not budget.admit(sum(s.outstanding for s in pool.slots)):
                return False
            r.budget = budget
        r.tried.append(nxt)
        old.outstanding -= 1
        if kind == ERR_CONNECT or kind == ERR_TIMEOUT:
            pool.eject(old, now)
        nxt.outstanding += 1
        self.slot = nxt
        self.host = nxt.host
        self.port = nxt.port
        self.tls = self.release_tls if nxt.tls else None
        if h.metrics is not None:
            h.metrics.retried(self.service, self.release, kind)
        if self.log_fields is not None:
            self.log_fields["upstream"] = nxt.endpoint.address
            self.log_fields["retries"] = len(r.tried) - 1
        return True

    def done(self, status: int, error: str | None) -> None:
        slot = self.slot
        slot.outstanding -= 1
        r = self.retrying
        if r is not None and r.budget is not None:
            r.budget.release()
        h = self.h
        end = h.clock()
        elapsed = end - self.start
        if error is None:
            if status >= 500:
                self.pool.server_error(slot, end)  # outlier ejection (balancer.Pool)
            elif slot.fails or slot.errors:
                slot.succeeded()
        elif error == ERR_CONNECT or error == ERR_TIMEOUT or error == ERR_TLS:
            self.pool.eject(slot, end)
        h.finished(self.tally, status, elapsed, error)
        if self.span_done is not None:
            self.span_done(status, error)
        fields = self.log_fields
        if fields is not None:
            fields["status"] = status
            fields["error"] = error
            fields["duration_ms"] = round(elapsed * 1000, 3)
            log.info(json.dumps(fields, separators=(",", ":")))


class _Failover:
    """`Forward.retry` of a handler's requests: asks the request's own `_Forward.failover`.

    Stateless (the state is the request's), so one per handler serves every request and
    no request refers to itself (a Forward that was its own `retry` would be a
    reference cycle, freed only by the cyclic GC).
    """

    __slots__ = ()

    def again(self, fwd: Forward, kind: str) -> bool:
        return isinstance(fwd, _Forward) and fwd.failover(kind)


class _Last:
    """What the handler's last request looked up: its snapshot's service view, release, tally.

    Why: most requests go to the service and release the one before went to, and
    two pointer compares (the snapshot, the name object the matcher or the weight
    table gave) cost less than a dict lookup by name. A new snapshot or service
    forgets the release.
    """

    __slots__ = ("snap", "service", "sv", "release", "rv", "tally")

    def __init__(self) -> None:
        self.snap: Snapshot | None = None
        self.service = ""
        self.sv: ServiceView | None = None
        self.release = ""
        self.rv: ReleaseView | None = None
        self.tally = Tally("", "")

    def new_service(self, snap: Snapshot, service: str, sv: ServiceView) -> None:
        self.snap = snap
        self.service = service
        self.sv = sv
        self.rv = None

    def new_release(self, release: str, rv: ReleaseView, tally: Tally) -> None:
        self.release = release
        self.rv = rv
        self.tally = tally


class _Retrying:
    """A request's failover state: the endpoints tried, in order, and its budget token if any."""

    __slots__ = ("budget", "tried")

    def __init__(self, first: Slot) -> None:
        self.budget: RetryBudget | None = None
        self.tried: list[Slot] = [first]
