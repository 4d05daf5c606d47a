"""What the demo's web server adds in front of Gradio: security headers on every response, and
request bodies bounded before Gradio reads them (the number of files in one upload, the bytes
of any request), so a client cannot fill the disk or the memory with one request."""

from __future__ import annotations

import re
from typing import Any

# The page's own scripts and styles only; nothing framed, embedded or posted elsewhere.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; object-src 'none'; base-uri 'self'; form-action 'self'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_NAMES = {name for name, _ in HEADERS}
_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}  # Gradio's units (gradio.utils.FileSize)


def parse_size(size: str | int) -> int:
    """``"2mb"`` -> 2097152, as Gradio reads ``max_file_size``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b)\s*", size.lower())
    if not match:
        raise ValueError(f"max_file_size must be like '2mb' (units b, kb, mb, gb), got {size!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


class GuardMiddleware:
    """ASGI middleware: security ``HEADERS`` on every HTTP response; a POST body larger than
    ``max_bytes`` is refused (413) and an upload (a path ending in ``/upload``) with more than
    ``max_files`` files too, before the application sees any of it."""

    def __init__(self, app: Any, max_files: int, max_bytes: int):
        self.app, self.max_files, self.max_bytes = app, max_files, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        if scope.get("method") != "POST":
            return await self.app(scope, receive, send_with_headers)
        body, refusal = await self._read(scope, receive)
        if refusal is not None:
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")] + HEADERS})
            await send({"type": "http.response.body", "body": refusal.encode()})
            return None
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # a disconnect, when it comes

        return await self.app(scope, replay, send_with_headers)

    async def _read(self, scope: dict, receive: Any) -> tuple[bytes, str | None]:
        """The whole body (at most ``max_bytes``), or the reason it is refused."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", "the request ended before its body"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", f"request body larger than {self.max_bytes} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"].rstrip("/").endswith("/upload"):
            boundary = _boundary(scope)
            if not boundary:
                return b"", "an upload must be multipart/form-data with a boundary"
            parts = body.count(b"--" + boundary) - 1
            if parts > self.max_files:
                return b"", f"at most {self.max_files} files per upload, got {parts}"
        return body, None


def _boundary(scope: dict) -> bytes | None:
    """The multipart boundary as Gradio's own parser reads the header (case-insensitive
    parameter names, the last value wins; the first header), so the count and Gradio see the same parts."""
    from python_multipart.multipart import parse_options_header

    values = [value for name, value in scope.get("headers", []) if name.lower() == b"content-type"]
    if not values:
        return None
    _, options = parse_options_header(values[0])  # Starlette reads the first header
    return options.get(b"boundary") or None
