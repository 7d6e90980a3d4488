"""Accept parsing and content negotiation (dicomshare.web.accept)."""

from __future__ import annotations

import pytest

from dicomshare.web.accept import (
    MediaRange,
    accept_from_request,
    best_match,
    negotiate,
    parse_accept,
    parse_media_type,
)

DICOM_MULTIPART = 'multipart/related; type="application/dicom"'
OCTET_MULTIPART = 'multipart/related; type="application/octet-stream"'
JPEG_MULTIPART = 'multipart/related; type="image/jpeg"'
RETRIEVE_OFFERS = [DICOM_MULTIPART, OCTET_MULTIPART, "application/zip"]
RENDERED_OFFERS = ["image/jpeg", "image/png", "image/gif"]


def types(ranges: list[MediaRange]) -> list[str]:
    return [r.type for r in ranges]


# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("header", [None, "", "   ", " , "])
def test_missing_or_empty_accept_means_anything(header: str | None) -> None:
    assert parse_accept(header) == [MediaRange("*/*", {}, 1.0)]


def test_sorted_by_q_descending_and_stable() -> None:
    ranges = parse_accept("a/b;q=0.5, c/d, e/f;q=0.5, g/h;q=1.0, i/j;q=0.9")
    assert types(ranges) == ["c/d", "g/h", "i/j", "a/b", "e/f"]
    assert [r.q for r in ranges] == [1.0, 1.0, 0.9, 0.5, 0.5]


def test_q_zero_dropped_unless_refusals_kept() -> None:
    assert types(parse_accept("image/*, image/jp2;q=0")) == ["image/*"]
    kept = parse_accept("image/*, image/jp2;q=0.000", keep_refusals=True)
    assert types(kept) == ["image/*", "image/jp2"]
    assert kept[1].q == 0.0
    assert parse_accept("image/jp2;q=0") == []


def test_dicomweb_retrieve_forms() -> None:
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*, '
        "multipart/related; type=application/octet-stream; q=0.5, "
        "image/jpeg;q=0.3, Application/DICOM+JSON"
    )
    assert ranges == [
        MediaRange("multipart/related", {"type": "application/dicom", "transfer-syntax": "*"}, 1.0),
        MediaRange("application/dicom+json", {}, 1.0),
        MediaRange("multipart/related", {"type": "application/octet-stream"}, 0.5),
        MediaRange("image/jpeg", {}, 0.3),
    ]


def test_dicomweb_client_accept_header_parses() -> None:
    api = pytest.importorskip("dicomweb_client.api")
    header = api.DICOMwebClient._build_multipart_accept_header_field_value(
        (("application/dicom", "1.2.840.10008.1.2.1"), ("application/dicom", "*")),
        {"1.2.840.10008.1.2.1": "application/dicom", "*": "application/dicom"},
    )
    ranges = parse_accept(header)
    assert [r.params for r in ranges] == [
        {"type": "application/dicom", "transfer-syntax": "1.2.840.10008.1.2.1"},
        {"type": "application/dicom", "transfer-syntax": "*"},
    ]


def test_comma_inside_quoted_parameter_does_not_split() -> None:
    ranges = parse_accept('multipart/related; type="application/dicom"; x="a, b", image/png')
    assert types(ranges) == ["multipart/related", "image/png"]
    assert ranges[0].params["x"] == "a, b"
    escaped = parse_accept('multipart/related; x="say \\"a, b\\"", image/png')
    assert types(escaped) == ["multipart/related", "image/png"]
    assert escaped[0].params["x"] == 'say "a, b"'


def test_legacy_java_accept_header() -> None:
    ranges = parse_accept("text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2")
    assert types(ranges) == ["text/html", "image/gif", "image/jpeg", "*/*", "*/*"]
    assert ranges[-1].q == pytest.approx(0.2)


@pytest.mark.parametrize("q", ["abc", "1.5", "-1", "2", "0.5.1", "nan", "inf", '""', "1e-1"])
def test_malformed_q_is_rejected_with_reason(q: str) -> None:
    with pytest.raises(ValueError, match=r"q=.* is not in 0\.\.1"):
        parse_accept(f"image/jpeg;q={q}, image/png")


@pytest.mark.parametrize(
    "header, reason",
    [
        ("image/jpeg;q", "has no value"),
        ("image/jpeg;q=", "invalid value"),
        ("*/jpeg", "not allowed"),
        ("jpeg", "expected type/subtype"),
        ('multipart/related; type="application/dicom', "unterminated"),
        ("image/jpeg;q=0.5;q=0.7", "duplicate"),
    ],
)
def test_malformed_ranges_are_rejected_with_reason(header: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_accept(header)


def test_media_range_renders_back() -> None:
    (rng,) = parse_accept('multipart/related;type="application/dicom";q=0.5')
    assert str(rng) == 'multipart/related; type="application/dicom"; q=0.5'
    assert parse_media_type(str(rng))[1] == {"type": "application/dicom", "q": "0.5"}


# -------------------------------------------------------------------- negotiation


def test_anything_gets_the_servers_first_choice() -> None:
    assert negotiate(parse_accept(None), RETRIEVE_OFFERS) == DICOM_MULTIPART
    assert negotiate(parse_accept("*/*"), RENDERED_OFFERS) == "image/jpeg"


def test_subtype_wildcard() -> None:
    assert negotiate(parse_accept("image/*"), ["application/dicom", "image/png"]) == "image/png"
    assert negotiate(parse_accept("text/*"), ["application/dicom", "image/png"]) is None


def test_higher_q_wins_over_server_order() -> None:
    accepted = parse_accept("image/jpeg;q=0.4, image/png;q=0.8, */*;q=0.1")
    assert negotiate(accepted, RENDERED_OFFERS) == "image/png"


def test_type_parameter_must_agree() -> None:
    octet = parse_accept("multipart/related; type=application/octet-stream")
    assert negotiate(octet, RETRIEVE_OFFERS) == OCTET_MULTIPART
    assert negotiate(octet, [DICOM_MULTIPART]) is None
    # Parameter values are compared case-insensitively, quoted or not.
    loud = parse_accept('multipart/related; TYPE="Application/DICOM"')
    assert negotiate(loud, RETRIEVE_OFFERS) == DICOM_MULTIPART


def test_bare_multipart_related_accepts_any_part_type() -> None:
    assert negotiate(parse_accept("multipart/related"), [JPEG_MULTIPART]) == JPEG_MULTIPART


def test_transfer_syntax_is_left_to_the_caller() -> None:
    accepted = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    )
    match = best_match(accepted, RETRIEVE_OFFERS)
    assert match is not None
    offer, rng = match
    assert offer == DICOM_MULTIPART
    assert rng.params["transfer-syntax"] == "1.2.840.10008.1.2.4.50"


def test_explicit_match_beats_wildcard_at_equal_q() -> None:
    accepted = parse_accept("*/*, application/dicom+json")
    assert negotiate(accepted, ["application/json", "application/dicom+json"]) == (
        "application/dicom+json"
    )


def test_most_specific_range_sets_the_quality() -> None:
    accepted = parse_accept("image/*;q=0.9, image/jpeg;q=0.1")
    assert negotiate(accepted, RENDERED_OFFERS) == "image/png"


def test_refusal_excludes_an_offer_the_wildcard_would_allow() -> None:
    accepted = parse_accept("image/*, image/jpeg;q=0", keep_refusals=True)
    assert negotiate(accepted, RENDERED_OFFERS) == "image/png"
    assert negotiate(accepted, ["image/jpeg"]) is None


def test_client_order_breaks_ties() -> None:
    accepted = parse_accept("application/dicom, multipart/related")
    assert negotiate(accepted, [DICOM_MULTIPART, "application/dicom"]) == "application/dicom"


def test_nothing_acceptable_means_406() -> None:
    assert negotiate(parse_accept("application/pdf"), RETRIEVE_OFFERS) is None
    assert negotiate([], RETRIEVE_OFFERS) is None


def test_offers_must_be_concrete() -> None:
    with pytest.raises(ValueError, match="concrete"):
        negotiate(parse_accept(None), ["image/*"])


# ---------------------------------------------------------- accept query parameter


def test_query_parameter_takes_precedence_over_header() -> None:
    ranges = accept_from_request("application/dicom", "application/dicom+json")
    assert types(ranges) == ["application/dicom+json"]


def test_empty_query_parameter_falls_back_to_header() -> None:
    assert types(accept_from_request("image/png", "")) == ["image/png"]
    assert types(accept_from_request("image/png", [])) == ["image/png"]
    assert types(accept_from_request(None, None)) == ["*/*"]


def test_url_encoded_query_value() -> None:
    raw = "multipart%2Frelated%3B%20type%3D%22application%2Fdicom%22%3B%20transfer-syntax%3D%2A"
    (rng,) = accept_from_request(None, raw)
    assert rng == MediaRange(
        "multipart/related", {"type": "application/dicom", "transfer-syntax": "*"}, 1.0
    )


def test_query_values_as_decoded_by_starlette() -> None:
    datastructures = pytest.importorskip("starlette.datastructures")
    query = datastructures.QueryParams(
        "accept=application/dicom+json"
        "&accept=multipart%2Frelated%3B%20type%3D%22application%2Fdicom%22%3Bq%3D0.5"
    )
    # Form decoding turned the '+' into a space; it must still mean dicom+json.
    ranges = accept_from_request("image/png", query.getlist("accept"))
    assert types(ranges) == ["application/dicom+json", "multipart/related"]
    assert negotiate(ranges, ["application/dicom+json", DICOM_MULTIPART]) == (
        "application/dicom+json"
    )


def test_comma_separated_query_value() -> None:
    ranges = accept_from_request(None, "image/jpeg;q=0.5,image/png")
    assert negotiate(ranges, RENDERED_OFFERS) == "image/png"


def test_malformed_query_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="q="):
        accept_from_request("image/png", "image/jpeg;q=high")
