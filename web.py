"""What serve.py and review.py share as HTTP servers (FastAPI on uvicorn): refusals as JSON errors, a body read
within a limit, and a uvicorn server that exits 0 when stopped as asked. No torch here: serve.py runs without it.
"""
import contextlib
import json
import signal


class Refused(Exception):
    """An answer other than 200: status, message, extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status, message, headers=None, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def read_body(request, limit, *, flag=""):
    """The whole body, refused with 413 as soon as it is known to pass limit: by its Content-Length before a byte
    is read, else (chunked) by counting while it streams in. flag: the option that sets the limit, for the
    message."""
    from starlette.requests import ClientDisconnect

    named = f" ({flag})" if flag else ""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, "Content-Length is not a number")
        if int(length) > limit:
            raise Refused(413, f"the request body is {int(length)} bytes, more than the limit of {limit}{named}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the request body is more than the limit of {limit} bytes{named}")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer; counted as a 400, not as a server error
        raise Refused(400, "the client went away before sending the whole body") from None
    return b"".join(chunks)


async def read_json(request, limit):
    """The JSON object of a POST body: application/json only (a form that a foreign page could post is refused),
    at most limit bytes."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, f"content type {kind or '(none)'} not accepted; send application/json")
    body = await read_body(request, limit)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, "the body must be a JSON object")
    return value


def install_errors(app):
    """Every error as a JSON {"error": ...}: the framework's 404 and 405, a Refused, and anything unexpected (a
    500 of one line; uvicorn logs its traceback)."""
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Refused)
    async def refused(request, e):
        # The body may be unread (refused on its headers): the connection cannot carry another request after it.
        return error_response(e.status, e.message, {**e.headers, "Connection": "close"})

    @app.exception_handler(Exception)
    async def internal(request, e):
        return error_response(500, "internal error")


def add_pages(app, files, policy):
    """GET routes for a page's files, {path: (file name beside this one, media type)}, read once now, each served
    with the Content-Security-Policy."""
    import os

    from fastapi.responses import Response

    folder = os.path.dirname(os.path.abspath(__file__))
    pages = {}
    for path, (name, kind) in files.items():
        with open(os.path.join(folder, name), "rb") as f:
            pages[path] = (f.read(), kind)

    def page(content, kind):
        async def serve_page():
            return Response(content, media_type=kind,
                            headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"})

        return serve_page

    for path, (content, kind) in pages.items():
        app.add_api_route(path, page(content, kind), methods=["GET"])


def server_class():
    """uvicorn's Server, but a server stopped by SIGTERM or Ctrl-C, as asked, exits 0 (uvicorn re-raises the signal
    after its graceful shutdown)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server
