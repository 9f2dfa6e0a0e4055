"""The sans-IO protocol, byte by byte: no sockets here."""

from __future__ import annotations

import random

import pytest
import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

from greentask.errors import (
    BadRequest,
    RemoteError,
    ShuttingDown,
    TaskError,
    TaskTimeout,
    UnknownFunction,
)
from greentask.protocol import (
    LineDecoder,
    Request,
    encode_error,
    encode_progress,
    encode_request,
    encode_result,
    parse_reply,
    parse_request,
)

STREAM = b'{"function":"a"}\n\r\n{"function":"b","id":1}\r\n\n{"function":"c","args":[1]}\n'
EXPECTED = [b'{"function":"a"}', b'{"function":"b","id":1}', b'{"function":"c","args":[1]}']


def feed_in_chunks(decoder: LineDecoder, data: bytes, sizes: list[int]) -> list[bytes]:
    lines, at = [], 0
    for size in sizes:
        lines += decoder.feed(data[at:at + size])
        at += size
    return lines + decoder.feed(data[at:])


def test_decoder_whole_stream():
    assert LineDecoder().feed(STREAM) == EXPECTED


def test_decoder_one_byte_at_a_time():
    decoder = LineDecoder()
    assert feed_in_chunks(decoder, STREAM, [1] * len(STREAM)) == EXPECTED


def test_decoder_random_chunks():
    rng = random.Random(7)
    for _ in range(200):
        sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 10))]
        assert feed_in_chunks(LineDecoder(), STREAM, sizes) == EXPECTED


def test_decoder_partial_line_waits_for_newline():
    decoder = LineDecoder()
    assert decoder.feed(b'{"function":') == []
    assert decoder.buffered == 12
    assert decoder.feed(b'"a"}\n') == [b'{"function":"a"}']
    assert decoder.buffered == 0


def test_decoder_line_of_exactly_max_line_is_accepted():
    decoder = LineDecoder(max_line=10)
    assert decoder.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    assert not decoder.too_large


def test_decoder_too_long_line_keeps_the_lines_before_it():
    decoder = LineDecoder(max_line=10)
    assert decoder.feed(b"ok\n" + b"x" * 11 + b"\nlater\n") == [b"ok"]
    assert decoder.too_large
    assert decoder.feed(b"more\n") == []
    assert "max_line (10 bytes)" in decoder.too_large_error().message


def test_decoder_holds_no_more_than_max_line_without_a_newline():
    decoder = LineDecoder(max_line=1000)
    for _ in range(100):
        decoder.feed(b"y" * 99)
        assert decoder.buffered <= 1000
        if decoder.too_large:
            break
    assert decoder.too_large
    assert decoder.buffered == 0


def test_decoder_limit_does_not_depend_on_chunking():
    line = b"z" * 9 + b"\r\n"  # 10 bytes before \n, counting \r
    assert LineDecoder(max_line=10).feed(line) == [b"z" * 9]
    decoder = LineDecoder(max_line=10)
    assert feed_in_chunks(decoder, line, [1] * len(line)) == [b"z" * 9]
    assert LineDecoder(max_line=9).feed(line) == []


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), max_line=st.integers(1, 40),
       cuts=st.lists(st.integers(1, 50), max_size=20))
def test_decoder_any_chunking_gives_the_same_lines(data, max_line, cuts):
    whole = LineDecoder(max_line)
    expected = whole.feed(data)
    chunked = LineDecoder(max_line)
    assert feed_in_chunks(chunked, data, cuts) == expected
    assert chunked.too_large == whole.too_large
    assert chunked.buffered <= max_line
    for line in expected:
        assert b"\n" not in line and line and len(line) <= max_line


def test_parse_full_request():
    request = parse_request(b'{"function": "send_mail", "args": {"to": "a@example.org"}, '
                            b'"id": 7, "progress": true, "timeout": 30}')
    assert request == Request("send_mail", {"to": "a@example.org"}, 7, True, 30.0)


def test_parse_minimal_request_has_no_arguments():
    assert parse_request(b'{"function":"echo"}') == Request("echo", [], None, False, None)


@pytest.mark.parametrize("line, message", [
    (b"not json", "not valid JSON"),
    (b'{"function": "x"', "not valid JSON"),
    (b'{"function": "\xff"}', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"echo"', "must be a JSON object, not a string"),
    (b"{}", '"function" is required'),
    (b'{"function": 3}', '"function" must be a string'),
    (b'{"function": ""}', '"function" is required'),
    (b'{"function": "x", "args": 3}', '"args" must be an object'),
    (b'{"function": "x", "args": "abc"}', '"args" must be an object'),
    (b'{"function": "x", "id": 1.5}', '"id" must be a string or an integer'),
    (b'{"function": "x", "id": true}', '"id" must be a string or an integer'),
    (b'{"function": "x", "progress": 1}', '"progress" must be true or false'),
    (b'{"function": "x", "timeout": -1}', '"timeout" must be a positive number'),
    (b'{"function": "x", "timeout": "5"}', '"timeout" must be a positive number'),
    (b'{"function": "x", "timeout": 1e999}', '"timeout" must be a positive number'),
    (b'{"function": "x", "arg": []}', "unknown request field(s) ['arg']"),
    (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
])
def test_bad_requests(line, message):
    with pytest.raises(BadRequest) as info:
        parse_request(line)
    assert message in info.value.message


def test_bad_request_keeps_a_readable_id():
    with pytest.raises(BadRequest) as info:
        parse_request(b'{"id": "abc", "function": 5}')
    assert info.value.request_id == "abc"
    with pytest.raises(BadRequest) as info:
        parse_request(b'{"id": [1], "function": "x"}')
    assert info.value.request_id is None


def test_huge_numbers_and_nan_decode_without_crashing():
    assert parse_request(b'{"function":"x","args":[' + b"9" * 500 + b"]}").args[0] > 10 ** 400
    assert parse_request(b'{"function":"x","args":[NaN]}').function == "x"


def test_encode_replies():
    assert ujson.loads(encode_result(7, {"a": 1})) == {"id": 7, "ok": True, "result": {"a": 1}}
    assert encode_result(None, 1) == b'{"ok":true,"result":1}\n'
    assert ujson.loads(encode_error("x", UnknownFunction("no"))) == {
        "id": "x", "ok": False, "error": {"type": "UnknownFunction", "message": "no"}}
    assert ujson.loads(encode_progress(7, {"done": 1})) == {"id": 7, "progress": {"done": 1}}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(request_id=st.none() | st.integers(-2 ** 62, 2 ** 62) | st.text(max_size=12),
       result=JSON_VALUES)
def test_a_result_line_is_the_bytes_ujson_makes_of_the_whole_reply(request_id, result):
    # encode_result writes the envelope itself: it must be exactly ujson's.
    reply = {"ok": True, "result": result}
    if request_id is not None:
        reply["id"] = request_id
    assert encode_result(request_id, result) == (ujson.dumps(reply) + "\n").encode()


def test_encode_rejects_values_that_are_not_json():
    for value in (object(), b"bytes", float("nan"), [float("inf")], {"x": float("-inf")}):
        for request_id in (1, "a", None):
            with pytest.raises((TypeError, OverflowError)):
                encode_result(request_id, value)


def test_request_round_trip():
    line = encode_request("f", {"a": 1}, 5, progress=True, timeout=2.5)
    assert line.endswith(b"\n")
    assert parse_request(line[:-1]) == Request("f", {"a": 1}, 5, True, 2.5)


def test_parse_replies():
    assert parse_reply(b'{"id":1,"ok":true,"result":[1]}').value == [1]
    progress = parse_reply(b'{"id":1,"progress":5}')
    assert (progress.kind, progress.id, progress.value) == ("progress", 1, 5)
    error = parse_reply(b'{"id":2,"ok":false,"error":{"type":"Timeout","message":"slow"}}')
    assert error.kind == "error" and isinstance(error.value, TaskTimeout)
    assert error.value.message == "slow"


def test_errors_come_back_as_the_same_class():
    for error in (TaskError("boom"), ShuttingDown("bye"), BadRequest("bad")):
        again = parse_reply(encode_error(1, error)).value
        assert type(again) is type(error) and again.message == error.message
    unknown = RemoteError.from_dict({"type": "Custom", "message": "m"})
    assert type(unknown) is RemoteError and unknown.type == "Custom"


def test_plain_text_server_replies_are_results():
    assert parse_reply(b'{"status": "sent"}').value == {"status": "sent"}
    assert parse_reply(b'"task done"').value == "task done"
    assert parse_reply(b"not json at all").value == "not json at all"


def outcome(line: bytes) -> object:
    try:
        return parse_request(line)
    except BadRequest as exc:
        return ("BadRequest", exc.message, exc.request_id)


CORPUS = [
    b'{"function":"echo","args":{"x":1},"id":1}', b"not json", b"[1, 2]", b'"echo"', b"{}",
    b'{"function": 3, "id": "a"}', b'{"function": "x", "args": 3}', b'{"function":"\xff"}',
    b'{"function": "x", "timeout": -1, "id": 9}', b'{"function":"s","progress":true,"id":2}',
    b"\x00\x01\x02", b'{"function":"x","args":[' + b"9" * 300 + b"]}", b"[" * 2000,
    b'{"function":"x","args":["\xc3\xa9"]}',
]


def test_every_request_kind_decodes_the_same_whole_bytewise_and_in_random_chunks():
    stream = b"\r\n".join(CORPUS) + b"\n"
    expected = [outcome(line) for line in LineDecoder().feed(stream)]
    assert len(expected) == len(CORPUS)
    assert sum(isinstance(item, Request) for item in expected) == 4
    bytewise = LineDecoder()
    assert [outcome(line) for line in feed_in_chunks(bytewise, stream, [1] * len(stream))] \
        == expected
    rng = random.Random(11)
    for _ in range(50):
        sizes = [rng.randint(1, 64) for _ in range(rng.randint(1, 40))]
        lines = feed_in_chunks(LineDecoder(), stream, sizes)
        assert [outcome(line) for line in lines] == expected


def test_nesting_is_capped_by_max_depth_and_brackets_in_strings_do_not_count():
    def nested(levels: int) -> bytes:  # the request object is level 1
        return b'{"function": "echo", "id": 9, "args": ' + b"[" * (levels - 1) + \
            b"]" * (levels - 1) + b"}"
    assert parse_request(nested(5), max_depth=5).function == "echo"
    with pytest.raises(BadRequest, match=r"more than 5 levels deep \(\[worker\] max_json_depth\)") \
            as info:
        parse_request(nested(6), max_depth=5)
    assert info.value.request_id == 9
    many_brackets = b'{"function": "echo", "args": ["[[[[[[{{{{{{", {"a": [1]}]}'
    assert parse_request(many_brackets, max_depth=4).args == ["[[[[[[{{{{{{", {"a": [1]}]
    with pytest.raises(BadRequest, match="levels deep"):
        parse_request(b'{"function": "echo", "args": {"a": {"b": {"c": 1}}}}', max_depth=3)
    assert parse_request(nested(64)).function == "echo"  # the default
    with pytest.raises(BadRequest, match="64 levels"):
        parse_request(nested(65))


@given(depth=st.integers(1, 12), max_depth=st.integers(1, 12))
def test_the_shortest_object_of_each_depth_is_judged_by_its_depth(depth, max_depth):
    # The length test before counting brackets must never clear a line that
    # is too deep: the shortest object of a depth is little but its brackets.
    line = b'{"":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    with pytest.raises(BadRequest) as info:
        parse_request(line, max_depth=max_depth)
    assert ("levels deep" in info.value.message) == (depth > max_depth), info.value.message
