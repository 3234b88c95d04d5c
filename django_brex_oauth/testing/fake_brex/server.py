"""The fake's HTTP server: it listens on loopback, records each request, applies the fault
rules (:mod:`.faults`) and sends the answer; and the controls tests set those rules with."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import traceback
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from .base import FakeBrexBase
from .faults import UNSET, Failure, HeldAnswers, Tamper, retry_after_header
from .messages import FORM, Headers, Request, Response, api_error, flatten


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "FakeBrex/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read :attr:`FakeBrex.requests` instead."""

    def _serve(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: Serving) -> None:
        self.fake = fake
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that went away; handler errors are kept in :attr:`FakeBrex.errors`."""


def _read_request(handler: _Handler) -> Request:
    split = urllib.parse.urlsplit(handler.path)
    headers = Headers(handler.headers.items())
    try:
        length = int(headers.get("Content-Length") or 0)
    except ValueError:
        length = 0
    body = handler.rfile.read(length) if length > 0 else b""
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    form: dict[str, list[str]] = {}
    if content_type == FORM:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return Request(
        method=handler.command,
        path=split.path,
        query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
        form=form,
        headers=headers,
        body=body,
        content_type=content_type,
    )


def _send(handler: _Handler, response: Response) -> None:
    try:
        handler.send_response(response.status)
        for key, value in response.headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(response.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(response.body)
    except (BrokenPipeError, ConnectionResetError):
        pass


_Self = TypeVar("_Self", bound="Serving")


class Serving(FakeBrexBase):
    """Starting and stopping the server, answering each request, and the fault controls."""

    _server: _Server | None = None
    _thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- lifecycle

    def start(self: _Self) -> _Self:
        """Bind the port (``0`` picks a free one) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeBrex is already running")
        server = _Server((self.host, self.port), self)
        self.port = int(server.server_address[1])
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"FakeBrex:{self.port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the server thread."""
        self.webhooks.stop()
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    # ---------------------------------------------------------------------------- controls

    def fail_next(
        self,
        path: str,
        *,
        status: int = 503,
        times: int = 1,
        body: Any = None,
        delay: float = 0.0,
        retry_after: float | datetime | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path ends with ``path`` with ``status``.

        ``body`` may be a dict/list (sent as JSON) or a str/bytes (sent as text); by default it is
        an error in the style of the endpoint (OAuth ``{"error": ...}`` under the issuer, Brex
        ``{"type": ..., "message": ...}`` elsewhere). ``delay`` seconds pass before the answer.
        ``retry_after`` adds a ``Retry-After`` header: seconds (delta-seconds), a datetime (an
        HTTP-date) or a raw string; ``headers`` adds any others.
        The request is not processed. Rules queue up in the order they were added.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = retry_after_header(retry_after)
        with self._lock:
            self._faults.failures.append(Failure(path, status, times, body, delay, extra))

    def rate_limit(
        self,
        limit: int | None,
        *,
        per: float = 60.0,
        path: str = "/v1/token",
        retry_after: bool = True,
    ) -> None:
        """Enforce a rate limit, as Brex does (1,000 requests per 60 s per client and account):
        beyond ``limit`` requests whose path ends with ``path`` in a fixed window of ``per``
        seconds, answer 429 (with ``Retry-After``: the rest of the window, unless
        ``retry_after`` is False), without processing the request. Each 429 counts in
        ``stats["rate_limited"]``. ``limit=None`` removes the limit on ``path``.
        """
        with self._lock:
            self._faults.set_rate_limit(path, limit, per, retry_after)

    def tamper_next(
        self, path: str, *, times: int = 1, body: Any = UNSET, **fields: Any
    ) -> None:
        """Process the next ``times`` requests whose path ends with ``path`` as usual, then
        spoil their JSON answer before it is sent.

        Each of ``fields`` is set in the answer (:data:`DROP` removes it); ``body`` replaces
        the whole answer with any JSON value (``[]``, ``None``, ...). Unlike
        :meth:`fail_next`, the request has its effect: a refresh token sent to the token
        endpoint is rotated, and the client gets a spoilt answer instead of the new one.
        :data:`MALFORMED_TOKEN_ANSWERS` names the usual ways.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.tampers.append(Tamper(path, times, body, dict(fields)))

    def hold_next(self, path: str, *, times: int = 1, timeout: float = 60.0) -> HeldAnswers:
        """Process the next ``times`` requests whose path ends with ``path`` at once, but hold
        their answers back until the returned :class:`HeldAnswers` is released.

        For races: ``held.wait()`` returns once Brex has done the work (a refresh token was
        rotated, say); the test then does something else meanwhile and calls
        ``held.release()`` (or uses it as a context manager). An answer is sent after
        ``timeout`` seconds anyway.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        held = HeldAnswers(path, times, timeout)
        with self._lock:
            self._faults.holds.append(held)
        return held

    def clear_failures(self) -> None:
        """Forget every pending :meth:`fail_next` and :meth:`tamper_next` rule, every rate
        limit and every latency, and release every held answer."""
        with self._lock:
            holds = self._faults.clear()
        for held in holds:
            held.release()

    def set_latency(self, seconds: float, path: str | None = None) -> None:
        """Hold back every response (or those for paths ending with ``path``) by ``seconds``.

        The request is processed at once; only the answer is late, as when a client times out on
        a request the server completed. A path-specific latency replaces the global one;
        ``0`` removes it.
        """
        with self._lock:
            self._faults.set_latency(seconds, path)

    # ---------------------------------------------------------------------------- serving

    def _dispatch(self, request: Request) -> Response:
        """The endpoint's answer to ``request``, called under the lock."""
        raise NotImplementedError

    def _handle(self, handler: _Handler) -> None:
        request = _read_request(handler)
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": flatten(request.query),
            "form": flatten(request.form),
            "headers": request.headers,
            "body": request.body.decode("utf-8", "replace"),
            "time": time.time(),
            "status": None,
        }
        with self._lock:
            self.requests.append(entry)
            failure = self._faults.failure_for(request.path)
            latency = self._faults.latency_for(request.path)

        held = None
        if failure is not None:
            time.sleep(failure.delay)
            response = failure.response(request.path)
        else:
            response, held = self._process(request)
        if latency > 0:
            time.sleep(latency)
        if held is not None:
            held._hold(response)
        entry["status"] = response.status
        _send(handler, response)

    def _process(self, request: Request) -> tuple[Response, HeldAnswers | None]:
        """The endpoint's answer, spoilt if a rule says so, and the hold it is subject to."""
        held = None
        try:
            with self._lock:
                response = self._dispatch(request)
                tamper = self._faults.tamper_for(request.path)
                held = self._faults.hold_for(request.path)
            if tamper is not None:
                response = tamper.apply(response)
        except Exception:
            self.errors.append(traceback.format_exc())
            response = api_error(500, "Internal error in FakeBrex")
        return response, held

