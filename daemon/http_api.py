"""HTTP ingest and status, served by aiohttp inside the daemon's event loop.

POST /v1/alerts            an alert (contract JSON; `?format=` picks another alert format);
                           503 + Retry-After while the backlog is full or the disk is
GET  /v1/alerts/{alert_id} its state and verdicts (`?box_id=` when several boxes used the id)
GET  /healthz              readiness and counters
With `[http] tokens_file`, every request but /healthz and the console's page needs
`Authorization: Bearer <token>` (401 otherwise).
Errors are JSON: {"error": "...", "field": "..."}.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from daemon.pipeline import Pipeline
from daemon.plugin_api import AlertError

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HealthProbe = Callable[[], Awaitable[dict[str, Any]]]
#: seconds a box is asked to wait before sending again while intake is paused
RETRY_AFTER_S = 5
#: a connection must send a request's headers within this many seconds of opening (or of its
#: previous answer), else it is closed: idle and half-sent requests do not hold sockets
HEADER_TIMEOUT_S = 20.0
#: a body gets this many seconds, plus one more per BODY_MIN_RATE bytes received (a box on a
#: slow link keeps going; a client that stops sending is answered 408)
BODY_GRACE_S = 20.0
BODY_MIN_RATE = 16 * 1024
#: at a stop, requests under way get this many seconds to end before they are cut off (a
#: half-sent upload would otherwise hold the stop, and the reviews' drain, for a minute); a
#: box cut off gets no 202 and sends again
STOP_LIMIT_S = 3.0
#: a connection whose answers wait unread this long, not one byte taken meanwhile, is closed
#: (looked at every WRITE_SWEEP_S)
WRITE_STALL_S = 30.0
WRITE_SWEEP_S = 5.0


def error(status: int, message: str, field: str | None = None, **headers: str) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers or None)


def busy(reason: str) -> web.Response:
    """503: nothing was taken; the box keeps the alert and sends it again later."""
    message = f"not taken now, try again later: {reason}"
    return error(503, message, **{"Retry-After": str(RETRY_AFTER_S)})


class BodyNotRead(Exception):
    """A request body that could not be read whole: answered `status`, the connection
    closed (what is left of the body may still be on its way)."""

    status = 400


class SlowBody(BodyNotRead):
    """A request body that stopped arriving (see BODY_GRACE_S)."""

    status = 408


class ClientLeft(BodyNotRead):
    """The client closed its connection before its request body was read."""

    def __init__(self) -> None:
        super().__init__("the connection was closed mid-request")


class UnreadableBody(BodyNotRead):
    """A request body that cannot be decoded as sent (a `Content-Encoding` it does not
    have, a chunked encoding broken off)."""


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The body, while it keeps coming: within BODY_GRACE_S plus a second per BODY_MIN_RATE
    bytes received (else SlowBody); over `max_bytes` (declared or sent): 413."""
    if (request.content_length or 0) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content_length)
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks: list[bytes] = []
    received = 0
    while True:
        left = start + BODY_GRACE_S + received / BODY_MIN_RATE - loop.time()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                chunk = await request.content.readany()
        except (RequestPayloadError, HttpProcessingError) as exc:
            # no more of it is read (aiohttp would read on after the answer, fail alike and
            # log that with a traceback)
            request.content.feed_eof()
            raise UnreadableBody(f"the request body cannot be read: {_reason(exc)}") from None
        except ConnectionResetError:
            raise ClientLeft from None
        except TimeoutError:
            waited = loop.time() - start
            raise SlowBody(
                f"request body not received in time: {received} bytes in {waited:.0f} s"
            ) from None
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=received)
        chunks.append(chunk)


def _reason(exc: Exception) -> str:
    """aiohttp's message for a request it cannot read, without its "400, message:"."""
    return re.sub(r"^\d+, message:\s*", "", str(exc)).strip()


class _OneLineForRequestsThatDoNotParse(logging.LoggerAdapter):
    """aiohttp's server logger, except for a request its HTTP parser refuses (a request line
    or header over 8,190 bytes, no Host header, bytes that are no HTTP). aiohttp answers it
    with a plain-text 400 naming the problem, before any handler, and would log a traceback;
    this logs one line instead, so that a scanner on the port does not fill the log."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else None
            log.info("http request that does not parse refused", error=_reason(exc_info), peer=peer)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


def body_limit(request: web.Request) -> int:
    """`[http] max_body_mb` in bytes."""
    return request.app._client_max_size


async def read_whole_body(request: web.Request) -> bytes:
    """The body within `[http] max_body_mb`, while it keeps coming (see `read_body`)."""
    return await read_body(request, body_limit(request))


def _too_large(request: web.Request) -> str:
    return f"request body over the limit of {body_limit(request)} bytes"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer is JSON, including aiohttp's own (404, 405, 413); only a request
    that does not parse as HTTP gets aiohttp's plain text (see the logger above)."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, _too_large(request), "payload")
    except BodyNotRead as exc:
        if isinstance(exc, ClientLeft):  # nobody to answer, nothing to fix
            log.info("http client went away mid-request", path=request.path)
        answer = error(exc.status, str(exc), "payload")
        answer.force_close()
        return answer
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = error(exc.status, exc.reason)
        for name, value in exc.headers.items():  # a 405's Allow, say
            if name.lower() not in ("content-type", "content-length"):
                answer.headers[name] = value
        return answer
    except Exception:
        log.exception("http handler failed", path=request.path)
        return error(500, "internal error")


#: what answers without a token: readiness, and the console's page (it holds no data and asks
#: for the token itself)
OPEN_PATHS = ("/healthz", "/console", "/console/")
OPEN_PREFIXES = ("/console/static/",)


def _token_bytes(token: str) -> bytes:
    # header bytes that are not UTF-8 arrive as surrogates: they compare, and never match
    return token.encode("utf-8", "surrogateescape")


class BearerTokens:
    """The tokens in force; `replace` swaps them (SIGHUP re-reads the tokens file)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.replace(tokens)

    def replace(self, tokens: Sequence[str]) -> None:
        self._expected = [_token_bytes(token) for token in tokens]

    def accepts(self, offered: str) -> bool:
        given = _token_bytes(offered)
        # every token compared, so the time taken does not tell which one nearly matched
        matches = [hmac.compare_digest(given, token) for token in self._expected]
        return any(matches)


def token_problem(request: web.Request, tokens: BearerTokens) -> str | None:
    """Why the request's bearer token is not taken, or None (also for the open paths)."""
    path = request.path
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return "a bearer token is required (Authorization: Bearer <token>)"
    if not tokens.accepts(given.strip()):
        return WRONG_TOKEN
    return None


WRONG_TOKEN = "the bearer token is not valid"


def bearer_auth(tokens: BearerTokens) -> Callable[[web.Request, Handler], Awaitable[Any]]:
    """Every other request needs `Authorization: Bearer <one of tokens>`, checked before its
    body is read; tokens are compared in constant time and never logged."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if problem := token_problem(request, tokens):
            if problem == WRONG_TOKEN:
                log.warning(
                    "http request with a wrong token", path=request.path, peer=request.remote
                )
            return _unauthorized(problem)
        return await handler(request)

    return check


def names_this_machine(host: str) -> bool:
    """A Host header naming this machine as its own users do: `localhost`, a loopback
    address or the machine's host name (with any port)."""
    name = host if host.endswith("]") else host.rsplit(":", 1)[0]
    name = name.strip("[]").rstrip(".").lower()
    if name in ("localhost", socket.gethostname().lower()) or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_problem(request: web.Request) -> tuple[str, str] | None:
    """Why a request to a daemon without tokens is refused (the header, the reason), or None."""
    if not names_this_machine(request.host):
        return "Host", f"the host {request.host!r} is not this machine's name"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return "Origin", f"requests from {origin!r} (another origin) are refused"
    return None


@web.middleware
async def local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Without tokens (a loopback address), what a browser's web page may send is refused:
    a request from another origin (CSRF: a form or a `fetch` posting to the daemon) and one
    naming another host (DNS rebinding: a site's name pointed at 127.0.0.1). With tokens,
    neither can carry the token."""
    if problem := origin_problem(request):
        header, reason = problem
        return error(403, reason, header)
    return await handler(request)


#: on every answer: no content sniffing (a snapshot is never read as a page), no framing
SAFETY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # the console loads its own script and style only; thumbnails are blob URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


async def _safety_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SAFETY_HEADERS.items():
        response.headers.setdefault(name, value)


def _unauthorized(message: str) -> web.Response:
    return error(401, message, **{"WWW-Authenticate": 'Bearer realm="secondlook"'})


def alert_url(alert_id: str, box_id: str) -> str:
    """Where `GET` answers the alert's state and verdicts (any id, `/`, `?` and `#` too;
    `.` and `..` as %2E, since clients resolve such path segments away)."""
    segment = quote(alert_id, safe="") if alert_id not in (".", "..") else "%2E" * len(alert_id)
    return f"/v1/alerts/{segment}?{urlencode({'box_id': box_id})}"


class HttpApi:
    def __init__(
        self,
        pipeline: Pipeline,
        health: HealthProbe,
        *,
        max_body_bytes: int,
        tokens: BearerTokens | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.health = health
        #: None: no tokens_file, no authentication (a loopback address)
        self.tokens = tokens
        middlewares = [json_errors, local_only if tokens is None else bearer_auth(tokens)]
        self.app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
        self.app.on_response_prepare.append(_safety_headers)
        self.add_routes(
            [
                web.post("/v1/alerts", self.post_alert),
                web.get("/v1/alerts/{alert_id:[^/]+}", self.get_alert),
                web.get("/healthz", self.healthz),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def add_routes(self, routes: Sequence[web.RouteDef]) -> None:
        """Add routes; those that take a body answer `Expect: 100-continue` by `_expect`."""
        self.app.add_routes(
            [
                web.route(r.method, r.path, r.handler, expect_handler=self._expect, **r.kwargs)
                if r.method in ("POST", "PUT")
                else r
                for r in routes
            ]
        )

    async def _expect(self, request: web.Request) -> None:
        """`Expect: 100-continue` (the client sends its body once told "100 Continue"): told
        only to a request whose body would be read (its token or origin, its declared size
        and, for an alert, the intake checked first); any other is answered at once by the
        middlewares and the handler, its body never asked for. (aiohttp calls this before
        any middleware, and its own handler tells every request to go on.)"""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return None  # an expectation not known: ignored
        refused = (
            origin_problem(request) if self.tokens is None else token_problem(request, self.tokens)
        )
        too_large = (request.content_length or 0) > body_limit(request)
        busy = request.path == "/v1/alerts" and self.pipeline.busy_reason()
        if not (refused or too_large or busy) and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not begun (as aiohttp's)
        return None

    async def start(self, host: str, port: int) -> None:
        # aiohttp's keep-alive timer also closes a connection whose first request's headers
        # have not all arrived by then
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            logger=_OneLineForRequestsThatDoNotParse(logging.getLogger("aiohttp.server")),
            keepalive_timeout=HEADER_TIMEOUT_S,
            shutdown_timeout=STOP_LIMIT_S,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self._sweeper = asyncio.create_task(self._close_stalled_writes(self._runner.server))
        log.info("http listening", host=host, port=port)

    async def _close_stalled_writes(self, server: web.Server | None) -> None:
        """Close the connections whose answers have not moved for WRITE_STALL_S: a client
        that stops reading (pipelining requests it never reads the answers of) would hold
        its connection, and the handler writing to it, for ever."""
        stalled: dict[asyncio.BaseTransport, tuple[int, float]] = {}
        while server is not None:
            await asyncio.sleep(WRITE_SWEEP_S)
            now = time.monotonic()
            waiting: dict[asyncio.BaseTransport, tuple[int, float]] = {}
            for handler in server.connections:
                transport = handler.transport
                if not isinstance(transport, asyncio.WriteTransport):
                    continue
                size = transport.get_write_buffer_size()
                if not size:
                    continue
                before = stalled.get(transport)
                since = before[1] if before is not None and size >= before[0] else now
                waiting[transport] = (size, since)
                if now - since >= WRITE_STALL_S:
                    log.info("http client stopped reading its answers: connection closed")
                    transport.abort()
            stalled = waiting

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def post_alert(self, request: web.Request) -> web.Response:
        if request.content_type not in ("application/json", "application/octet-stream", ""):
            refused = AlertError(
                "Content-Type", f"expected application/json, got {request.content_type}"
            )
            await self.pipeline.refuse(refused, b"", source="http")
            return error(415, refused.message, refused.field)
        if reason := self.pipeline.busy_reason():
            return busy(reason)  # before reading a body that would not be taken
        try:
            body = await read_whole_body(request)
        except web.HTTPRequestEntityTooLarge:
            refused = AlertError("payload", _too_large(request))
            await self.pipeline.refuse(refused, b"", source="http")
            return error(413, refused.message, refused.field)
        except (SlowBody, UnreadableBody) as exc:
            refused = AlertError("payload", str(exc))
            await self.pipeline.refuse(refused, b"", source="http")
            answer = error(exc.status, refused.message, refused.field)
            answer.force_close()  # the rest of the body may still be on its way
            return answer
        result = await self.pipeline.ingest(
            body, source="http", fmt=request.query.get("format", "canonical")
        )
        if result.status == "refused":
            assert result.error is not None
            return error(400, result.error.message, result.error.field)
        if result.status == "busy":
            return busy(result.busy_reason or "busy")
        if result.alert is None:  # consumed: a payload that carries no alert of its own
            return web.json_response({"status": result.status}, status=202)
        alert = result.alert
        return web.json_response(
            {
                "alert_id": alert.alert_id,
                "box_id": alert.box_id,
                "status": result.status,
                "url": alert_url(alert.alert_id, alert.box_id),
            },
            status=202,
        )

    async def get_alert(self, request: web.Request) -> web.Response:
        alert_id = request.match_info["alert_id"]
        # an empty box_id names no box, as on the feedback routes
        box_id = request.query.get("box_id") or None
        found = await self.pipeline.journal.find_alerts(alert_id, box_id)
        if not found:
            return error(404, f"no alert {alert_id!r}", "alert_id")
        if len(found) > 1:
            boxes = ", ".join(item["box_id"] for item in found)
            return error(
                409, f"alert {alert_id!r} came from several boxes ({boxes}); add ?box_id=", "box_id"
            )
        return web.json_response(found[0])

    async def healthz(self, request: web.Request) -> web.Response:
        report = await self.health()
        return web.json_response(report, status=200 if report["status"] == "ok" else 503)
