"""atheris (libFuzzer) harness for the sans-IO protocol.

    python tests/fuzz/fuzz_protocol.py -runs=200000 -max_total_time=30 [CORPUS_DIR...]

An input's first byte picks ``max_line`` (1 to 1021), its second the size of
each read (1 to 64); the rest is the byte stream, so seeds can be plain
request lines (``tests/test_fuzz.py`` seeds with ``tests/data/bad/``). The
stream, cut into those reads, goes through a ``LineDecoder``; every line
goes through ``parse_request``, ``parse_hello`` and ``parse_reply``. The
only exception allowed out is ``BadRequest`` from ``parse_request``; the
decoder never holds more than ``max_line`` bytes and never returns a line
longer than that, nor one with a newline in it. Anything else is a crash, reported with the input.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from greentask.errors import BadRequest
    from greentask.protocol import LineDecoder, parse_hello, parse_reply, parse_request


def check_one_input(data: bytes) -> None:
    """libFuzzer's entry point: fail (raise) on anything the protocol does not document."""
    if len(data) < 2:
        return
    max_line, read_size, stream = 1 + data[0] * 4, 1 + data[1] % 64, data[2:]
    decoder = LineDecoder(max_line)
    for start in range(0, len(stream), read_size):
        for line in decoder.feed(stream[start:start + read_size]):
            assert line and b"\n" not in line and len(line) <= max_line, line
            try:
                parse_request(line)
            except BadRequest:
                pass
            parse_hello(line)
            parse_reply(line)
        assert decoder.buffered <= max_line


def main() -> None:
    atheris.Setup(sys.argv, check_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
