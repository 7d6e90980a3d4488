"""Streaming multipart/related reader and writer (dicomshare.web.multipart)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomshare.web.multipart import (
    AsyncBody,
    Body,
    MultipartError,
    MultipartReader,
    aiter_multipart,
    iter_multipart,
    multipart_boundary,
    multipart_content_type,
    new_boundary,
    parse_content_type,
    read_multipart,
)

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _split_at(data: bytes, cuts: Iterable[int]) -> AsyncIterator[bytes]:
    prev = 0
    for cut in sorted(cuts):
        yield data[prev:cut]
        prev = cut
    yield data[prev:]


async def _collect_async(chunks: AsyncIterator[bytes], boundary: str) -> list[tuple[dict, bytes]]:
    parts = []
    async for part in MultipartReader(chunks, boundary):
        parts.append((part.headers, b"".join([c async for c in part])))
    return parts


def collect(body: bytes, boundary: str, chunk_size: int | None = None) -> list[tuple[dict, bytes]]:
    """Parse ``body`` fed in ``chunk_size`` pieces into [(headers, body)]."""
    return asyncio.run(_collect_async(_chunks(body, chunk_size or len(body) or 1), boundary))


def toolbelt_style(boundary: str, parts: list[tuple[dict[str, str], bytes]]) -> bytes:
    """Body laid out as requests_toolbelt's MultipartEncoder does (no preamble CRLF)."""
    out = b""
    for headers, data in parts:
        out += b"--" + boundary.encode() + b"\r\n"
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


# ----------------------------------------------------------- Content-Type parsing


def test_parse_content_type_dicomweb_stow_header() -> None:
    media, params = parse_content_type('Multipart/Related; type="application/dicom"; boundary=abc')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "abc"}


def test_parse_content_type_quoting_whitespace_and_escapes() -> None:
    media, params = parse_content_type(
        "  multipart/related ;TYPE = application/dicom ;  "
        'Boundary="a;b \\"c\\" d=e"; start="<1@x>" ;'
    )
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": 'a;b "c" d=e', "start": "<1@x>"}


@pytest.mark.parametrize(
    "value",
    [
        "multipart",
        "multipart/related; boundary",
        'multipart/related; boundary="abc',
        "multipart/related; boundary=a; boundary=b",
        "multi part/related",
    ],
)
def test_parse_content_type_rejects_malformed(value: str) -> None:
    with pytest.raises(MultipartError):
        parse_content_type(value)


def test_boundary_quoted_and_unquoted_agree() -> None:
    assert multipart_boundary('multipart/related; boundary="xyz-1"') == "xyz-1"
    assert multipart_boundary("multipart/related; boundary=xyz-1") == "xyz-1"


def test_missing_boundary_is_reported() -> None:
    with pytest.raises(MultipartError, match="no boundary parameter"):
        multipart_boundary('multipart/related; type="application/dicom"')


def test_non_multipart_content_type_is_reported() -> None:
    with pytest.raises(MultipartError, match="not multipart"):
        multipart_boundary("application/dicom; boundary=x")


def test_boundary_longer_than_70_chars_is_rejected() -> None:
    with pytest.raises(MultipartError, match="70"):
        multipart_boundary("multipart/related; boundary=" + "a" * 71)
    with pytest.raises(MultipartError, match="70"):
        MultipartReader(_chunks(b"", 1), "a" * 71)
    assert multipart_boundary("multipart/related; boundary=" + "a" * 70) == "a" * 70


# ------------------------------------------------------------------------ reading


def test_toolbelt_style_body_with_preamble_padding_and_epilogue() -> None:
    body = (
        b"This is a preamble; ignore me.\r\n"
        b"--frontier \t\r\n"  # transport padding after the delimiter
        b"Content-Type: application/dicom\r\n"
        b"Content-Location: /studies/1\r\n"
        b"\r\n"
        b"first\r\nbody\r\n"
        b"--frontier\r\n"
        b"\r\n"  # a part with no headers at all
        b"second"
        b"\r\n--frontier--  \r\n"
        b"epilogue, also ignored --frontier\r\n"
    )
    parts = collect(body, "frontier")
    assert parts == [
        (
            {"content-type": "application/dicom", "content-location": "/studies/1"},
            b"first\r\nbody",
        ),
        ({}, b"second"),
    ]


def test_bare_lf_in_part_headers_is_tolerated() -> None:
    body = b"--b\nContent-Type: application/dicom\nX-Note: folded\n  line\n\npayload\r\n--b--"
    assert collect(body, "b") == [
        ({"content-type": "application/dicom", "x-note": "folded line"}, b"payload")
    ]


def test_urllib3_form_data_body() -> None:
    urllib3 = pytest.importorskip("urllib3")
    body, content_type = urllib3.encode_multipart_formdata(
        {"file": ("ct.dcm", CT_SMALL, "application/dicom"), "comment": "hello"}
    )
    parts = collect(body, multipart_boundary(content_type), chunk_size=1000)
    assert [data for _, data in parts] == [CT_SMALL, b"hello"]
    assert parts[0][0]["content-type"] == "application/dicom"
    assert 'filename="ct.dcm"' in parts[0][0]["content-disposition"]


def test_dicomweb_client_stow_body_round_trips_ct_small_byte_exact() -> None:
    api = pytest.importorskip("dicomweb_client.api")
    content_type = 'multipart/related; type="application/dicom"; boundary=0123456789abcdef'
    other = b"DICM-ish second instance \r\n--0123456789abcde not a delimiter"
    body = api.DICOMwebClient._encode_multipart_message([CT_SMALL, other], content_type)
    for size in (1, 7, 8192, len(body)):
        parts = collect(body, multipart_boundary(content_type), size)
        assert [data for _, data in parts] == [CT_SMALL, other]
        assert all(h == {"content-type": "application/dicom"} for h, _ in parts)
    received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(parts[0][1]))
    assert received.SOPInstanceUID == pydicom.dcmread(io.BytesIO(CT_SMALL)).SOPInstanceUID


# Bodies full of near-delimiters and CRs, which stress the carry-over between chunks.
TRICKY = [
    b"",
    b"\r",
    b"\r\n",
    b"\r\n--",
    b"\r\n--bound",
    b"x\r\n--boundarx\r\n--boundar",
    b"--boundary",  # not at the start of a line, so not a delimiter
    bytes(range(256)) * 3,
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 13, 64, 100000])
def test_chunking_does_not_change_parts(chunk_size: int) -> None:
    parts = [
        ({"content-type": "application/octet-stream", "x-i": str(i)}, data)
        for i, data in enumerate(TRICKY + [CT_SMALL])
    ]
    body = toolbelt_style("boundary", parts)
    assert collect(body, "boundary", chunk_size) == parts


def test_random_chunk_boundaries_match_single_chunk() -> None:
    parts = [({"content-type": "application/dicom"}, data) for data in TRICKY + [CT_SMALL]]
    body = toolbelt_style("boundary", parts)
    reference = collect(body, "boundary")
    rng = random.Random(20240611)
    for _ in range(200):
        cuts = rng.sample(range(1, len(body)), rng.randint(1, 60))
        assert asyncio.run(_collect_async(_split_at(body, cuts), "boundary")) == reference


def test_reader_streams_instead_of_buffering_parts() -> None:
    """First body bytes must arrive long before the 4 MB part has been received."""
    payload = random.Random(1).randbytes(4 * 1024 * 1024)
    body = toolbelt_style("b" * 70, [({"content-type": "application/dicom"}, payload)])
    pulled = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal pulled
        async for chunk in _chunks(body, 65536):
            pulled += 1
            yield chunk

    async def run() -> tuple[int, int, str]:
        pulled_at_first: int | None = None
        largest = 0
        digest = hashlib.sha256()
        async for part in MultipartReader(source(), "b" * 70):
            async for chunk in part:
                if pulled_at_first is None:
                    pulled_at_first = pulled
                largest = max(largest, len(chunk))
                digest.update(chunk)
        assert pulled_at_first is not None
        return pulled_at_first, largest, digest.hexdigest()

    pulled_at_first, largest, digest = asyncio.run(run())
    assert pulled_at_first <= 2
    assert largest <= 65536 + 80
    assert digest == hashlib.sha256(payload).hexdigest()


def test_unread_part_is_skipped_when_moving_on() -> None:
    body = toolbelt_style("b", [({"n": "1"}, b"a" * 5000), ({"n": "2"}, b"wanted")])

    async def run() -> bytes:
        async for part in MultipartReader(_chunks(body, 100), "b"):
            if part.headers["n"] == "2":
                return await part.read()
        raise AssertionError("second part missing")

    assert asyncio.run(run()) == b"wanted"


# ------------------------------------------------------------------------- errors


def test_every_truncation_is_an_error() -> None:
    body = toolbelt_style("b", [({"content-type": "application/dicom"}, b"data\r\n-"), ({}, b"x")])
    closing = body.rindex(b"--b--") + len(b"--b--")
    for cut in range(closing):
        with pytest.raises(MultipartError):
            collect(body[:cut], "b", chunk_size=3)
    assert len(collect(body[:closing], "b")) == 2


def test_truncated_upload_message_and_sink_not_closed() -> None:
    body = toolbelt_style("b", [({}, b"complete"), ({}, CT_SMALL)])
    truncated = body[: len(body) // 2]
    closed: list[bytes] = []

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data += data

    def close(sink: Sink) -> None:
        closed.append(bytes(sink.data))

    with pytest.raises(MultipartError, match="truncated"):
        asyncio.run(read_multipart(_chunks(truncated, 512), "b", lambda h: Sink(), close))
    assert closed == [b"complete"]


def test_truncated_right_after_last_delimiter_fails_before_part_completes() -> None:
    body = b"--b\r\n\r\nlast instance\r\n--b"
    closed: list[str] = []

    class Sink:
        def write(self, data: bytes) -> None:
            pass

    with pytest.raises(MultipartError, match="truncated"):
        asyncio.run(
            read_multipart(
                _chunks(body, 4), "b", lambda h: Sink(), lambda s: closed.append("closed")
            )
        )
    assert closed == []


def test_body_without_any_delimiter() -> None:
    with pytest.raises(MultipartError, match="no parts"):
        collect(b"just some bytes, wrong boundary --other--\r\n", "b")


def test_close_delimiter_only_means_no_parts() -> None:
    with pytest.raises(MultipartError, match="no parts"):
        collect(b"preamble\r\n--b--\r\n", "b")


def test_empty_body() -> None:
    with pytest.raises(MultipartError, match="no parts"):
        asyncio.run(_collect_async(_chunks(b"", 1), "b"))


def test_oversized_header_block() -> None:
    body = b"--b\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\nbody\r\n--b--"
    with pytest.raises(MultipartError, match="exceed 16384 bytes"):
        collect(body, "b", 1024)
    many = b"--b\r\n" + b"X: y\r\n" * 3000 + b"\r\nbody\r\n--b--"
    with pytest.raises(MultipartError, match="exceed 16384 bytes"):
        collect(many, "b", 1)


@pytest.mark.parametrize("line", [b"no colon here", b"Bad Name: x", b": empty name"])
def test_malformed_header_line(line: bytes) -> None:
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\nok\r\n--b\r\n"
        + line
        + b"\r\n\r\nx\r\n--b--"
    )
    with pytest.raises(MultipartError, match="malformed header line in part 2"):
        collect(body, "b")


def test_boundary_text_inside_body_is_reported() -> None:
    with pytest.raises(MultipartError, match="boundary string occur inside"):
        collect(b"--b\r\n\r\nx\r\n--bogus\r\n--b--", "b")


# ------------------------------------------------------------------------ writing


def test_new_boundary_is_random_and_usable() -> None:
    boundaries = {new_boundary() for _ in range(100)}
    assert len(boundaries) == 100
    for b in boundaries:
        assert multipart_boundary(multipart_content_type(b, "application/dicom")) == b


def test_multipart_content_type_for_wado() -> None:
    value = multipart_content_type("abc", "application/dicom")
    assert value == 'multipart/related; type="application/dicom"; boundary=abc'


def test_writer_output_parsed_back_by_reader() -> None:
    boundary = new_boundary()
    location = "/studies/1.2/series/3/instances/4"
    parts: list[tuple[dict[str, str], Body]] = [
        ({"Content-Type": "application/dicom", "Content-Location": location}, CT_SMALL),
        ({"Content-Type": "application/octet-stream"}, iter([b"frame", b"", b" one", b"\r\n--"])),
        ({}, b""),
    ]
    body = b"".join(iter_multipart(parts, boundary))
    assert body.startswith(f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert collect(body, boundary, 997) == [
        ({"content-type": "application/dicom", "content-location": location}, CT_SMALL),
        ({"content-type": "application/octet-stream"}, b"frame one\r\n--"),
        ({}, b""),
    ]


def test_writer_output_decoded_by_dicomweb_client() -> None:
    requests = pytest.importorskip("requests")
    api = pytest.importorskip("dicomweb_client.api")
    boundary = new_boundary()
    response = requests.Response()
    response.status_code = 200
    response.headers["content-type"] = multipart_content_type(boundary, "application/dicom")
    response._content = b"".join(
        iter_multipart([({"Content-Type": "application/dicom"}, CT_SMALL)] * 2, boundary)
    )
    client = api.DICOMwebClient(url="http://localhost:1/dicomweb")
    assert [bytes(p) for p in client._decode_multipart_message(response, stream=False)] == [
        CT_SMALL,
        CT_SMALL,
    ]


def test_async_writer_matches_sync_writer() -> None:
    async def body_chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(CT_SMALL), 4096):
            yield CT_SMALL[i : i + 4096]

    async def parts() -> AsyncIterator[tuple[dict[str, str], AsyncBody]]:
        yield {"Content-Type": "application/dicom"}, body_chunks()
        yield {"Content-Type": "application/dicom"}, [CT_SMALL[:10], CT_SMALL[10:]]

    async def run() -> bytes:
        return b"".join([c async for c in aiter_multipart(parts(), "xyz")])

    whole = ({"Content-Type": "application/dicom"}, CT_SMALL)
    expected = b"".join(iter_multipart([whole, whole], "xyz"))
    assert asyncio.run(run()) == expected


def test_writer_rejects_header_injection_and_empty_bodies() -> None:
    with pytest.raises(ValueError, match="line break"):
        list(iter_multipart([({"Content-Location": "/x\r\nSet-Cookie: a=b"}, b"")], "b"))
    with pytest.raises(ValueError, match="at least one part"):
        list(iter_multipart([], "b"))


def test_streaming_response_round_trip_through_starlette() -> None:
    """STOW-style upload parsed from request.stream(), WADO-style multipart response back."""
    testclient = pytest.importorskip("starlette.testclient")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def echo(request: Request) -> StreamingResponse:
        boundary = multipart_boundary(request.headers["content-type"])
        stored: list[bytes] = []
        async for part in MultipartReader(request.stream(), boundary):
            stored.append(await part.read())
        out = new_boundary()
        return StreamingResponse(
            iter_multipart([({"Content-Type": "application/dicom"}, data) for data in stored], out),
            media_type=multipart_content_type(out, "application/dicom"),
        )

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    upload = b"".join(iter_multipart([({"Content-Type": "application/dicom"}, CT_SMALL)], "up"))
    with testclient.TestClient(app) as client:
        response = client.post(
            "/echo",
            content=upload,
            headers={"content-type": 'multipart/related; type="application/dicom"; boundary="up"'},
        )
    assert response.status_code == 200
    back = collect(response.content, multipart_boundary(response.headers["content-type"]))
    assert back == [({"content-type": "application/dicom"}, CT_SMALL)]
