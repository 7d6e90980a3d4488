"""Streaming multipart/related (RFC 2046, RFC 2387) for DICOMweb (PS3.18).

STOW-RS uploads can be larger than 1 GB, so the reader never holds a whole part:
it keeps at most one incoming chunk plus a delimiter's length of lookahead, and
hands body bytes out as soon as they cannot be the start of a delimiter.

Reading::

    reader = MultipartReader(request.stream(), multipart_boundary(content_type))
    async for part in reader:            # parts come strictly in order
        sink = open_file(part.headers)   # header names are lower-cased
        async for chunk in part:         # body bytes, exactly as sent
            sink.write(chunk)

Moving to the next part discards whatever is left of the current one. Errors are
``MultipartError`` (a ``ValueError``) with a message fit to show the client. The
callback form ``read_multipart(chunks, boundary, open_part, close_part)`` wraps the
same reader for callers that prefer it.

Writing (WADO-RS responses): ``iter_multipart`` / ``aiter_multipart`` yield the
delimiters, part headers and body chunks in order, ready for a StreamingResponse;
``multipart_content_type`` builds the matching Content-Type value.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Protocol, TypeVar

from dicomshare.web.accept import format_media_type, is_token, parse_media_type

MAX_BOUNDARY_LENGTH = 70  # RFC 2046 section 5.1.1


class MultipartError(ValueError):
    """Malformed multipart body; message is a precise human reason."""


class PartSink(Protocol):
    def write(self, data: bytes) -> None: ...


S = TypeVar("S", bound=PartSink)
Body = bytes | bytearray | memoryview | Iterable[bytes]
AsyncBody = Body | AsyncIterable[bytes]


# ---------------------------------------------------------------- media types


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Media type and parameters of a Content-Type, failing as a MultipartError.

    ``'multipart/related; type="application/dicom"; boundary=abc'`` gives
    ``('multipart/related', {'type': 'application/dicom', 'boundary': 'abc'})``.
    """
    try:
        return parse_media_type(value)
    except ValueError as exc:
        raise MultipartError(f"invalid Content-Type {value!r}: {exc}") from exc


def _check_boundary(boundary: str) -> bytes:
    if not boundary:
        raise MultipartError("boundary parameter is empty")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise MultipartError(
            f"boundary is {len(boundary)} characters long; at most "
            f"{MAX_BOUNDARY_LENGTH} are allowed"
        )
    if not boundary.isascii() or any(c in "\r\n" for c in boundary):
        raise MultipartError("boundary must be ASCII without line breaks")
    return boundary.encode("ascii")


def multipart_boundary(content_type: str) -> str:
    """The validated boundary of a multipart Content-Type, or a MultipartError."""
    media, params = parse_content_type(content_type)
    if not media.startswith("multipart/"):
        raise MultipartError(f"media type {media!r} is not multipart")
    if "boundary" not in params:
        raise MultipartError("Content-Type has no boundary parameter")
    _check_boundary(params["boundary"])
    return params["boundary"]


def multipart_content_type(boundary: str, part_type: str | None = None) -> str:
    """Content-Type header value for a multipart/related body built with ``boundary``."""
    params = {"type": part_type} if part_type else {}
    params["boundary"] = boundary
    return format_media_type("multipart/related", params)


# -------------------------------------------------------------------- reading


class Part:
    """One body part; iterate it (once) for its body chunks."""

    def __init__(self, reader: MultipartReader, headers: dict[str, str], index: int) -> None:
        self._reader = reader
        self.headers = headers
        self.index = index  # 1-based, for error messages and logs

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._reader._current is not self:
            raise StopAsyncIteration
        chunk = await self._reader._next_body_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """Whole body in memory: only for parts known to be small (e.g. JSON metadata)."""
        return b"".join([chunk async for chunk in self])


class MultipartReader:
    """Async iterator of ``Part`` over a chunked multipart body."""

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        boundary: str,
        *,
        max_header_bytes: int = 16384,
    ) -> None:
        if max_header_bytes <= 0:
            raise ValueError("max_header_bytes must be positive")
        self._delim = b"\r\n--" + _check_boundary(boundary)
        self._source = chunks.__aiter__()
        # A virtual CRLF lets a delimiter at the very start of the body match like any other.
        self._buf = bytearray(b"\r\n")
        self._eof = False
        self._max_header = max_header_bytes
        self._state = "preamble"  # preamble | headers | body | done
        self._current: Part | None = None
        self.parts_read = 0

    def __aiter__(self) -> AsyncIterator[Part]:
        return self

    async def __anext__(self) -> Part:
        if self._state == "body":
            while await self._next_body_chunk() is not None:
                pass
        self._current = None
        if self._state == "preamble":
            await self._skip_preamble()
            await self._after_delimiter()
        if self._state == "done":
            if self.parts_read == 0:
                raise MultipartError("multipart body contains no parts")
            raise StopAsyncIteration
        headers = await self._read_headers()
        self.parts_read += 1
        self._state = "body"
        self._current = Part(self, headers, self.parts_read)
        return self._current

    async def _next_chunk(self) -> bytes | None:
        """The next non-empty input chunk; None once input is exhausted."""
        while not self._eof:
            try:
                chunk = await self._source.__anext__()
            except StopAsyncIteration:
                self._eof = True
                break
            if chunk:
                return chunk
        return None

    async def _fill(self) -> bool:
        """Append the next non-empty chunk to the buffer; False once input is exhausted."""
        chunk = await self._next_chunk()
        if chunk is None:
            return False
        self._buf += chunk
        return True

    def _take(self, size: int) -> bytes:
        """The first ``size`` buffered bytes, copied once."""
        with memoryview(self._buf) as view:
            data = bytes(view[:size])
        del self._buf[:size]
        return data

    def _scan(self, chunk: bytes) -> bytes | None:
        """Body bytes of a chunk that arrives with an empty buffer, without copying the
        common case (no delimiter, no CR near the end); the rest is buffered."""
        idx = chunk.find(self._delim)
        if idx < 0:
            idx = chunk.find(b"\r", max(0, len(chunk) - len(self._delim) + 1))
            if idx < 0:
                return chunk
        self._buf += chunk[idx:]
        return chunk[:idx] if idx else None

    def _truncated(self, where: str) -> MultipartError:
        return MultipartError(
            f"body ended {where}; the closing boundary delimiter is missing (truncated upload?)"
        )

    async def _skip_preamble(self) -> None:
        keep = len(self._delim) - 1
        while (idx := self._buf.find(self._delim)) < 0:
            if len(self._buf) > keep:
                del self._buf[:-keep]
            if not await self._fill():
                raise MultipartError(
                    "body contains no parts: the boundary delimiter never occurs "
                    "(wrong boundary parameter?)"
                )
        del self._buf[:idx]

    async def _after_delimiter(self) -> None:
        """Consume a delimiter and what follows: '--' (close) or padding plus a line break.

        Runs before a part is reported complete, so a truncated body fails while the
        caller can still discard that part.
        """
        del self._buf[: len(self._delim)]
        while len(self._buf) < 2:
            if not await self._fill():
                raise self._truncated("right after a boundary delimiter")
        if self._buf.startswith(b"--"):
            self._state = "done"
            return
        while True:
            pos = 0
            while pos < len(self._buf) and self._buf[pos] in b" \t":
                pos += 1
            if pos > self._max_header:
                raise MultipartError("transport padding after a boundary delimiter is too long")
            rest = bytes(self._buf[pos : pos + 2])
            if rest.startswith(b"\n") or rest == b"\r\n":
                del self._buf[: pos + (1 if rest.startswith(b"\n") else 2)]
                self._state = "headers"
                return
            if rest not in (b"", b"\r"):
                raise MultipartError(
                    f"unexpected data after boundary delimiter {self.parts_read + 1} "
                    "(does the boundary string occur inside a part body?)"
                )
            if not await self._fill():
                raise self._truncated("right after a boundary delimiter")

    async def _read_headers(self) -> dict[str, str]:
        index = self.parts_read + 1
        headers: dict[str, str] = {}
        last: str | None = None
        consumed = 0
        scan = 0
        while True:
            nl = self._buf.find(b"\n", scan)
            if nl < 0:
                if consumed + len(self._buf) > self._max_header:
                    raise MultipartError(f"headers of part {index} exceed {self._max_header} bytes")
                scan = len(self._buf)
                if not await self._fill():
                    raise self._truncated(f"inside the headers of part {index}")
                continue
            consumed += nl + 1
            if consumed > self._max_header:
                raise MultipartError(f"headers of part {index} exceed {self._max_header} bytes")
            raw = bytes(self._buf[:nl]).removesuffix(b"\r")
            del self._buf[: nl + 1]
            scan = 0
            if not raw:
                return headers
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
            if line[0] in " \t":  # obsolete line folding: continue the previous header
                if last is None:
                    raise MultipartError(f"part {index} headers start with a continuation line")
                headers[last] = f"{headers[last]} {line.strip()}"
                continue
            name, colon, val = line.partition(":")
            name = name.strip().lower()
            if not colon or not is_token(name):
                raise MultipartError(f"malformed header line in part {index}: {line!r}")
            val = val.strip()
            headers[name] = f"{headers[name]}, {val}" if name in headers else val
            last = name

    async def _next_body_chunk(self) -> bytes | None:
        if self._state != "body":
            return None
        while True:
            if not self._buf:
                chunk = await self._next_chunk()
                if chunk is None:
                    raise self._truncated(f"inside part {self.parts_read}")
                data = self._scan(chunk)
                if data is not None:
                    return data
                continue
            idx = self._buf.find(self._delim)
            if idx > 0:
                return self._take(idx)
            if idx == 0:
                await self._after_delimiter()
                return None
            # Only a tail starting with CR can be the beginning of a delimiter.
            cr = self._buf.find(b"\r", max(0, len(self._buf) - len(self._delim) + 1))
            safe = len(self._buf) if cr < 0 else cr
            if safe:
                return self._take(safe)
            if not await self._fill():
                raise self._truncated(f"inside part {self.parts_read}")


async def read_multipart(
    chunks: AsyncIterable[bytes],
    boundary: str,
    open_part: Callable[[dict[str, str]], S],
    close_part: Callable[[S], Awaitable[None] | None],
    max_header_bytes: int = 16384,
) -> int:
    """Callback form of MultipartReader; returns the number of parts.

    ``close_part`` runs only for complete parts: when a MultipartError escapes, the
    sink of the part being written was not closed and its content must be discarded.
    """
    reader = MultipartReader(chunks, boundary, max_header_bytes=max_header_bytes)
    async for part in reader:
        sink = open_part(part.headers)
        async for data in part:
            sink.write(data)
        result = close_part(sink)
        if inspect.isawaitable(result):
            await result
    return reader.parts_read


# -------------------------------------------------------------------- writing


def new_boundary() -> str:
    """Random boundary; 128 bits make a collision with body content negligible."""
    return f"dicomshare-{secrets.token_hex(16)}"


def _encode_headers(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, val in headers.items():
        if not is_token(name):
            raise ValueError(f"invalid part header name {name!r}")
        if any(c in "\r\n\0" for c in val):  # guards against header injection
            raise ValueError(f"line break or NUL in value of part header {name!r}")
        lines.append(f"{name}: {val}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8")


def _part_start(delim: bytes, first: bool, headers: Mapping[str, str]) -> bytes:
    return (delim[2:] if first else delim) + b"\r\n" + _encode_headers(headers)


def iter_multipart(
    parts: Iterable[tuple[Mapping[str, str], Body]], boundary: str
) -> Iterator[bytes]:
    """Serialise parts lazily; bodies may be bytes or iterables of chunks."""
    delim = b"\r\n--" + _check_boundary(boundary)
    count = 0
    for headers, body in parts:
        yield _part_start(delim, count == 0, headers)
        count += 1
        if isinstance(body, bytes | bytearray | memoryview):
            if body:
                yield bytes(body)
            continue
        for chunk in body:
            if chunk:
                yield bytes(chunk)
    if count == 0:
        raise ValueError("a multipart body needs at least one part")
    yield delim + b"--\r\n"


async def aiter_multipart(
    parts: Iterable[tuple[Mapping[str, str], AsyncBody]]
    | AsyncIterable[tuple[Mapping[str, str], AsyncBody]],
    boundary: str,
) -> AsyncIterator[bytes]:
    """Async twin of iter_multipart, for parts or bodies read from async storage."""
    delim = b"\r\n--" + _check_boundary(boundary)
    count = 0

    async def each_part() -> AsyncIterator[tuple[Mapping[str, str], AsyncBody]]:
        if isinstance(parts, AsyncIterable):
            async for item in parts:
                yield item
        else:
            for item in parts:
                yield item

    async for headers, body in each_part():
        yield _part_start(delim, count == 0, headers)
        count += 1
        if isinstance(body, bytes | bytearray | memoryview):
            if body:
                yield bytes(body)
        elif isinstance(body, AsyncIterable):
            async for chunk in body:
                if chunk:
                    yield bytes(chunk)
        else:
            for chunk in body:
                if chunk:
                    yield bytes(chunk)
    if count == 0:
        raise ValueError("a multipart body needs at least one part")
    yield delim + b"--\r\n"
