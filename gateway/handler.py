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
from typing import Final, Protocol

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
from gateway.headers import Scanned, scan, set_authority, upstream_fields
from gateway.metrics import Metrics
from gateway.paths import BadTarget, origin_target
from gateway.ratelog import RateLimiter
from gateway.retry import RetryBudget, may_retry
from gateway.routing import REASON_FALLBACK, REASON_REJECT, Decision
from gateway.sampling import RequestSampler
from gateway.state import SnapshotHolder
from gateway.tally import Tally
from gateway.tls_config import UpstreamTLS

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
        self._dirty: list[Tally] = []  # tallies with exchanges since the last flush
        self._budgets: dict[tuple[str, str], RetryBudget] = {}  # (service, release) -> budget
        self._errlines = RateLimiter()  # one log line per 502/503/504, a few per second
        # What `scan` found and what `decide` chose, filled again by every request: `handle`
        # runs to its end before the next one starts, and nothing it returns holds either.
        self._scanned = Scanned([])
        self._decision = Decision("", "", None, "")
        self._peer = ""  # the last client address, and as the bytes X-Forwarded-For carries
        self._peer_b = b""

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
        # Checked as str: the compiled build has C calls for str `find`/`in`, while a
        # bytes `find` (or a bytes needle `in` bytes) is a Python method call.
        path = target.decode("latin-1")
        if "?" in path:  # `in` first: compiled, cheaper than a `find` in the common case, no query
            path = path[: path.find("?")]
        authority: bytes | None = None
        fwd_target: bytes | None = None
        if target[:1] != b"/" or "%" in path or ("." in path and "/." in path) or "//" in path:
            # The rare case: dot segments, `//`, `%` or a non-origin form (gateway/paths.py;
            # this is its `needs_normalizing`, inline: no call in the common case).
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
        sv = snap.services[svc_name]
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
        rv = sv.releases[dec.release]
        # None only when every release is out and all are probed (live_releases):
        # then pick as if no endpoint sat out (a time past every ejection).
        slot = rv.pool.pick(dec.key, now) or rv.pool.pick(dec.key, _PROBE)
        if slot is None:  # pragma: no cover - available implies endpoints
            return respond_json(503, {"error": "no healthy endpoint", "service": svc_name})
        slot.outstanding += 1
        pool = rv.pool

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
        if peer is not self._peer:  # the engine interns addresses: one compare while one repeats
            self._peer = peer
            self._peer_b = peer.encode("latin-1")
        fields = upstream_fields(
            s, raw, client_ip=self._peer_b, proto=head.scheme, lines=rv.lines,
            request_id=rid_b, trace=(trace_id, span_id, flags),
            trace_tail=trace_tail,
        )  # fmt: skip
        # To the client: the stage field and X-Request-ID, rendered as field lines.
        resp = b"%b%b\r\n" % (rv.lines.stage_rid, rid_b)
        if dec.reason == REASON_FALLBACK:
            resp += b"X-Release-Fallback: " + dec.chosen.encode() + b"\r\n"
        if dec.set_cookie is not None:
            resp += (
                f"Set-Cookie: {snap.user_cookie}={dec.set_cookie}; Path=/; Max-Age="
                f"{snap.routing.sticky_cookie_max_age}; HttpOnly; SameSite=Lax\r\n".encode()
            )

        start = now
        service, release = svc_name, dec.release
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

        t = self._tally_of.get(pool.group)
        if t is None:
            t = self._tally_of[pool.group] = self.tally(service, release)
        on_done = _Done(self, slot, pool, start, t, span_done)
        on_done.key = dec.key
        on_done.retries = sv.retries
        on_done.tls = rv.tls
        if self.access_log:
            on_done.log_fields = {
                "trace_id": trace_id.decode("latin-1"),
                "request_id": rid_b.decode("latin-1"),
                "service": service,
                "release": release,
                "reason": dec.reason,
                "upstream": slot.endpoint.address,
                "method": head.method.decode("latin-1"),
            }
            if s.request_id_replaced:
                on_done.log_fields["request_id_replaced"] = True
            if user_shown is not None:
                on_done.log_fields["user"] = user_shown

        return Forward(
            host=slot.host,
            port=slot.port,
            headers=None,
            fields=fields,
            response_headers=None,
            response_fields=resp,
            service=service,
            release=release,
            connect_timeout=sv.connect_timeout,
            read_timeout=sv.read_timeout,
            on_done=on_done,
            target=fwd_target,
            total_timeout=sv.total_timeout,
            retry=on_done if on_done.retries and len(pool) > 1 else None,
            tls=rv.tls if slot.tls else None,
        )

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


class _Done:
    """`Forward.on_done` for one request: balancer counts, passive health, accounting.

    A slotted object rather than a closure over `handle`'s locals: it holds only
    what the end of the exchange needs (a compiled closure keeps an environment
    object with every captured local alive until the exchange ends).
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
        "tls",
    )

    def __init__(
        self,
        h: ProxyHandler,
        slot: Slot,
        pool: Pool,
        start: float,
        tally: Tally,
        span_done: Callable[[int, str | None], None] | None,
    ) -> None:
        self.h = h
        self.slot = slot
        self.pool = pool
        self.start = start
        self.tally = tally
        self.span_done = span_done
        self.log_fields: dict[str, object] | None = None
        self.key: str | None = None  # the sticky key, for the hash balancer's next choice
        self.retries = 0  # failover attempts allowed after the first (config `retries`)
        self.retrying: _Retrying | None = None  # made on the first retry only
        self.tls: UpstreamTLS | None = None  # the release's, for its https:// endpoints

    def again(self, fwd: Forward, kind: str) -> bool:
        """engine.api.Retry: point `fwd` at another live endpoint of the release, if allowed.

        Bounded by `retries`, `timeouts.total` and the release's retry budget
        (gateway/retry.py); the failed endpoint's passive health counts the
        failure as a finished exchange would.
        """
        h = self.h
        now = h.clock()
        r = self.retrying
        total = fwd.total_timeout
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
            budget = h.budget(fwd.service, fwd.release)
            if not budget.admit(sum(s.outstanding for s in pool.slots)):
                return False
            r.budget = budget
        r.tried.append(nxt)
        old.outstanding -= 1
        if kind == ERR_CONNECT or kind == ERR_TIMEOUT:
            pool.eject(old, now)
        nxt.outstanding += 1
        self.slot = nxt
        fwd.host = nxt.host
        fwd.port = nxt.port
        fwd.tls = self.tls if nxt.tls else None
        if h.metrics is not None:
            h.metrics.retried(fwd.service, fwd.release, kind)
        if self.log_fields is not None:
            self.log_fields["upstream"] = nxt.endpoint.address
            self.log_fields["retries"] = len(r.tried) - 1
        return True

    def __call__(self, status: int, error: str | None) -> None:
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


class _Retrying:
    """A request's failover state: the endpoints tried, in order, and its budget token if any."""

    __slots__ = ("budget", "tried")

    def __init__(self, first: Slot) -> None:
        self.budget: RetryBudget | None = None
        self.tried: list[Slot] = [first]
