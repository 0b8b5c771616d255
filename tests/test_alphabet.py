import numpy as np
import pytest
from hypothesis import given, strategies as st

from charnn.data.alphabet import AlphabetError, alphabet_size, decode, encode, encode_text, unknown_fraction


def test_gorner98_table_matches_the_seed():
    codes = encode(b"\t\n A~")
    assert codes.tolist() == [1, 97, 2, 35, 96]
    assert codes.dtype == np.uint8


def test_line_endings_are_normalised_to_lf():
    assert encode(b"a\r\nb\rc\n").tolist() == encode(b"a\nb\nc\n").tolist()


def test_non_ascii_characters_are_one_unknown_code_each():
    codes = encode_text("é€a")
    assert codes.tolist() == [0, 0, ord("a") - 30]
    assert encode(b"\xff\xfea").tolist() == [0, 0, ord("a") - 30]  # invalid UTF-8 bytes are replaced


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\t\n")))
def test_gorner98_round_trip(text):
    assert decode(encode_text(text)) == text


@given(st.binary())
def test_bytes_alphabet_is_lossless(data):
    codes = encode(data, "bytes")
    assert codes.tobytes() == data
    assert codes.dtype == np.uint8


@given(st.binary())
def test_gorner98_codes_stay_in_range(data):
    codes = encode(data)
    assert codes.size <= len(data)
    assert codes.size == 0 or int(codes.max()) < 98


def test_unknown_fraction_flags_binary_data():
    assert unknown_fraction(encode(bytes(range(256)) * 4)) > 0.5
    assert unknown_fraction(encode_text("plain text\n")) == 0.0


def test_unknown_alphabet_is_a_clear_error():
    with pytest.raises(AlphabetError, match="unknown alphabet 'latin'"):
        alphabet_size("latin")


@given(st.binary(max_size=512), st.sampled_from(["gorner98", "bytes"]) | st.text(max_size=10))
def test_fuzz_encoder_only_raises_alphabet_error(data, alphabet):
    try:
        codes = encode(data, alphabet)
    except AlphabetError as e:
        assert "\n" not in str(e) and alphabet not in ("gorner98", "bytes")
    else:
        assert codes.dtype == np.uint8 and int(codes.max(initial=0)) < alphabet_size(alphabet)


def test_encode_bytes_is_what_the_document_cache_holds():
    from charnn.data.alphabet import encode_bytes

    raw = b"To be,\r\nor not\rto be \xe2\x80\x94 that\xff is"
    cached = encode_bytes(raw)
    assert isinstance(cached, bytes) and list(cached) == encode(raw).tolist()
    assert unknown_fraction(cached) == unknown_fraction(encode(raw)) == 2 / len(cached)


@given(st.binary(max_size=300) | st.text(max_size=100).map(lambda t: t.replace("x", "\r").encode()),
       st.lists(st.integers(0, 300), max_size=6), st.sampled_from(["gorner98", "bytes"]))
def test_a_document_fed_in_chunks_encodes_as_a_whole(data, cuts, alphabet):
    from charnn.data.alphabet import StreamEncoder, encode_bytes

    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    encoder = StreamEncoder(alphabet)
    chunked = b"".join(encoder.feed(data[a:b]) for a, b in zip(bounds, bounds[1:])) + encoder.feed(b"", final=True)
    assert chunked == encode_bytes(data, alphabet)


def test_chunk_edges_inside_a_crlf_and_a_utf8_character():
    from charnn.data.alphabet import StreamEncoder, encode_bytes

    raw = "a\r\nb\u2014c\r".encode()
    for cut in range(len(raw) + 1):
        encoder = StreamEncoder()
        assert encoder.feed(raw[:cut]) + encoder.feed(raw[cut:], final=True) == encode_bytes(raw), cut
