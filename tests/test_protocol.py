"""memg.TextProtocol byte for byte, without sockets.

Each script is handed to a TextProtocol as received bytes, then the end of the
input; every reply it makes (conftest.converse) is compared with the exact bytes
memcached 1.6 sends (checked against
memcached 1.6.18; the meta features it lacks -- md x, ms/ma E, ms N -- follow
the protocol spec).  Where memg differs on purpose, the test says so: its
version string, statistics and item sizes.  The sections
follow memg.py's TextProtocol: dispatch and input, retrieval, storage, delete/incr/
decr/touch, the meta commands, and everything else.
"""

import base64
import time

import pytest

import memg
from conftest import Clock, converse

BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
MB = 1024 * 1024


class Session:
    """One memg server (never started: no sockets) with a fake clock.  Each
    send() is one connection: a fresh TextProtocol handed the script, then the end
    of its input."""

    def __init__(self, **settings):
        self.server = memg.Server(port=0, **settings)
        self.clock = Clock()
        self.server.store.clock = self.clock

    def connect(self):
        return self.server.service.new_protocol()

    def send(self, script, *more):
        self.protocol = self.connect()
        return converse(self.protocol, script, *more)

    def advance(self, seconds):
        self.clock.advance(seconds)


def run(script, **settings):
    """The whole reply to script, sent on one connection to a new server."""
    return Session(**settings).send(script)


def check(script, expected, **settings):
    assert run(script, **settings) == expected


# --------------------------------------------------------------------------
# Dispatch and input: lines, tokens, unknown commands
# --------------------------------------------------------------------------

def test_seed_transcript():
    check(b"set greeting 0 0 11\r\nHello World\r\nget greeting\r\n",
          b"STORED\r\nVALUE greeting 0 11\r\nHello World\r\nEND\r\n")


def test_replies_come_back_from_the_bytes_that_complete_their_commands():
    proto = Session().connect()
    assert proto.receive_data(b"mn\r\nm") == b"MN\r\n"
    assert proto.receive_data(b"n\r") == b""
    assert proto.receive_data(b"\nmn\r\nmn\r\n") == b"MN\r\nMN\r\nMN\r\n"
    assert not proto.pending and not proto.closing
    assert proto.receive_data(b"") == b""
    assert proto.closing


def test_a_command_has_no_effect_before_its_data_block_has_all_come():
    session = Session()
    proto = session.connect()
    assert proto.receive_data(b"set k 0 0 10\r\n01234") == b""
    assert session.server.store.get(b"k") is None
    assert proto.receive_data(b"56789\r") == b""
    assert session.server.store.get(b"k") is None
    assert proto.receive_data(b"\nget k\r\n") == b"STORED\r\nVALUE k 0 10\r\n0123456789\r\nEND\r\n"


def test_input_ending_inside_a_data_block_stores_nothing():
    session = Session()
    assert session.send(b"set k 0 0 10\r\n01234") == b""
    assert session.server.store.get(b"k") is None
    assert session.protocol.closing


def test_a_value_over_the_limit_is_discarded_as_it_arrives():
    session = Session(item_size_max=1024)
    proto = session.connect()
    # Refused at once, as memcached refuses it, then discarded as it comes.
    assert proto.receive_data(b"set k 0 0 100000\r\n" + b"x" * 50000) == TOO_LARGE
    assert proto.block.parts is None           # nothing of it is held
    assert proto.receive_data(b"x" * 50000 + b"\r\nmn\r\n") == b"MN\r\n"


def test_replies_beyond_the_output_bound_wait_for_the_engine():
    session = Session(reqs_per_event=2000)
    session.send(b"set k 0 0 1000\r\n" + b"x" * 1000 + b"\r\n")
    proto = session.connect()
    requests = b"get k\r\n" * 1000
    first = proto.receive_data(requests)
    assert memg.OUTPUT_LIMIT <= len(first) < memg.OUTPUT_LIMIT + 2000
    assert proto.pending
    rest = b""
    while proto.pending:
        step = proto.data_to_send()
        assert len(step) < memg.OUTPUT_LIMIT + 2000
        rest += step
    reply = b"VALUE k 0 1000\r\n" + b"x" * 1000 + b"\r\nEND\r\n"
    assert first + rest == reply * 1000


def test_after_reqs_per_event_commands_the_rest_wait_for_the_engine():
    session = Session(reqs_per_event=2)
    proto = session.connect()
    assert proto.receive_data(b"set k 0 0 1\r\nv\r\nmn\r\nget k\r\nmn\r\nm") == (
        b"STORED\r\nMN\r\n")
    assert proto.pending and proto.yielded
    assert proto.data_to_send() == b"VALUE k 0 1\r\nv\r\nEND\r\nMN\r\n"
    assert proto.pending and proto.yielded            # (the rest of a line waits)
    assert proto.data_to_send() == b""
    assert not proto.pending and not proto.yielded
    assert proto.receive_data(b"n\r\n") == b"MN\r\n"
    # A yield is a turn given up with input waiting: the last one was not.
    assert dict(session.server.service.general_stats())["conn_yields"] == 2


@pytest.mark.parametrize("line", [b"", b"   ", b"foo", b"g", b"GET k", b"sett k 0 0 1", b"getx k"],
                         ids=["empty", "spaces", "foo", "one-letter", "uppercase", "sett", "getx"])
def test_unknown_commands(line):
    check(line + b"\r\nmn\r\n", b"ERROR\r\nMN\r\n")


def test_lines_may_end_with_newline_only():
    check(b"set k 0 0 1\nx\r\nget k\nmn\n", b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\nMN\r\n")


def test_extra_spaces_between_tokens():
    check(b"set  k  0 0  1 \r\nx\r\n  get   k  \r\n", b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n")


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"POST /index.html HTTP/1.0", b"HTTP/1.1", b"xy HTTP/1.0",
    b"mfoo / HTTP/1.1", b"flush / HTTP/1.1",
])
def test_http_request_closes_silently(line):
    check(line + b"\r\nHost: x\r\n\r\nmn\r\n", b"")


@pytest.mark.parametrize("line, expected", [
    (b"get / HTTP/1.1", b"END\r\n"),
    (b"gx / HTTP/1.1", b"ERROR\r\n"),
    (b"mx / HTTP/1.1", b"ERROR\r\n"),
    (b"version HTTP/1.1", b"VERSION %s\r\n" % memg.VERSION.encode()),
])
def test_http_like_lines_of_known_command_families(line, expected):
    check(line + b"\r\nmn\r\n", expected + b"MN\r\n")


def test_http_request_closes_at_once():
    proto = Session().connect()
    assert proto.receive_data(b"GET / HTTP/1.1\r\nmn\r\n") == b""
    assert proto.closing


# memcached reads up to 16 KiB at a time; a line with no newline in there and more
# than 2048 bytes closes the connection, unless it is a get or gets.
LONG = 20000


def test_long_line_without_newline_closes():
    proto = Session().connect()
    assert proto.receive_data(b"x" * LONG) == b""
    assert proto.closing


def test_a_short_line_waits_for_its_newline():
    proto = Session().connect()
    assert proto.receive_data(b"x" * 2000) == b""
    assert not proto.closing
    assert proto.receive_data(b"\r\nmn\r\n") == b"ERROR\r\nMN\r\n"


def test_long_set_line_closes():
    check(b"set " + b"k" * LONG + b" 0 0 1\r\nx\r\nmn\r\n", b"")


def test_long_line_whose_newline_is_buffered_is_a_command():
    check(b"set " + b"k" * 3000 + b" 0 0 1\r\nx\r\nmn\r\n", BAD_FORMAT + b"ERROR\r\nMN\r\n")


def test_line_just_under_the_limit_is_a_command():
    check(b"get " + b"k" * 250 + b" " * (2046 - 254) + b"\r\nmn\r\n", b"END\r\nMN\r\n")


@pytest.mark.parametrize("command", [b"get", b"gets"])
def test_long_get_line_is_served(command):
    keys = [b"key%04d" % i for i in range(2500)]
    script = (b"set key0007 3 0 2\r\nhi\r\nset key2499 0 0 1\r\nx\r\n"
              + command + b" " + b" ".join(keys) + b"\r\nmn\r\n")
    if command == b"get":
        values = b"VALUE key0007 3 2\r\nhi\r\nVALUE key2499 0 1\r\nx\r\n"
    else:
        values = b"VALUE key0007 3 2 1\r\nhi\r\nVALUE key2499 0 1 2\r\nx\r\n"
    check(script, b"STORED\r\nSTORED\r\n" + values + b"END\r\nMN\r\n")


def test_long_get_line_after_many_spaces_closes():
    keys = b" ".join(b"key%04d" % i for i in range(2500))
    check(b" " * 101 + b"get " + keys + b"\r\nmn\r\n", b"")


def test_incomplete_last_line_is_ignored():
    check(b"mn\r\nget k", b"MN\r\n")


def test_a_first_byte_of_0x80_makes_the_connection_binary():
    # A binary GET (magic 0x80, opcode 0x00, opaque 0x01020304) of a missing key: a
    # binary reply with status 0x01 (not found) and the opaque echoed; what follows
    # is read as binary too.
    request = bytes([0x80, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]) + bytes(8) + b"k"
    proto = Session().connect()
    reply = proto.receive_data(request)
    assert isinstance(proto, memg.BinaryProtocol)
    assert reply[:2] == b"\x81\x00"
    assert reply[6:8] == b"\x00\x01"
    assert reply[12:16] == b"\x01\x02\x03\x04"
    assert reply[24:] == b"Not found"
    assert proto.receive_data(b"mn\r\n") == b""          # not a binary header yet
    assert not proto.closing


@pytest.mark.parametrize("protocol", ["ascii", "binary"])
def test_a_set_protocol_is_not_negotiated(protocol):
    proto = Session(protocol=protocol).connect()
    assert isinstance(proto, memg.TextProtocol if protocol == "ascii" else memg.BinaryProtocol)
    reply = proto.receive_data(b"mn\r\n" + bytes(20))
    if protocol == "ascii":
        assert reply == b"MN\r\n"
    else:
        assert reply == b"" and proto.closing              # bad magic: closed, as memcached


# --------------------------------------------------------------------------
# Retrieval: get gets gat gats
# --------------------------------------------------------------------------

def test_get_miss():
    check(b"get nope\r\n", b"END\r\n")


def test_get_many_keys_in_request_order():
    check(b"set a 1 0 1\r\nA\r\nset b 2 0 2\r\nBB\r\nset c 3 0 3\r\nCCC\r\n"
          b"get c miss1 a miss2 b\r\n",
          b"STORED\r\nSTORED\r\nSTORED\r\n"
          b"VALUE c 3 3\r\nCCC\r\nVALUE a 1 1\r\nA\r\nVALUE b 2 2\r\nBB\r\nEND\r\n")


def test_get_duplicate_keys():
    check(b"set a 0 0 1\r\nA\r\nget a a nope a\r\n",
          b"STORED\r\n" + b"VALUE a 0 1\r\nA\r\n" * 3 + b"END\r\n")


def test_gets_many_keys():
    check(b"set a 0 0 1\r\nA\r\nset b 5 0 1\r\nB\r\ngets b nope a\r\n",
          b"STORED\r\nSTORED\r\nVALUE b 5 1 2\r\nB\r\nVALUE a 0 1 1\r\nA\r\nEND\r\n")


def test_get_value_with_crlf_inside():
    check(b"set k 0 0 8\r\none\r\ntwo\r\nget k\r\n",
          b"STORED\r\nVALUE k 0 8\r\none\r\ntwo\r\nEND\r\n")


@pytest.mark.parametrize("script", [b"get\r\n", b"gets\r\n", b"get \r\n", b"gat\r\n",
                                    b"gats\r\n"])
def test_retrieval_without_keys(script):
    check(script + b"mn\r\n", b"ERROR\r\nMN\r\n")


@pytest.mark.parametrize("script", [b"gat 100\r\n", b"gats 100\r\n"])
def test_gat_without_keys(script):
    check(b"set 100 0 0 1\r\nx\r\n" + script, b"STORED\r\nEND\r\n")


def test_get_key_of_250_bytes():
    key = b"k" * 250
    check(b"set " + key + b" 0 0 1\r\nx\r\nget " + key + b"\r\n",
          b"STORED\r\nVALUE " + key + b" 0 1\r\nx\r\nEND\r\n")


@pytest.mark.parametrize("command", [b"get", b"gets", b"gat 0"])
def test_get_key_of_251_bytes_in_the_middle(command):
    session = Session()
    assert session.send(b"set a 0 0 1\r\nx\r\nset b 0 0 1\r\ny\r\n") == b"STORED\r\nSTORED\r\n"
    reply = session.send(command + b" a " + b"k" * 251 + b" b\r\nmn\r\n")
    assert reply == BAD_FORMAT + b"MN\r\n"


def test_gat_touches_and_returns():
    session = Session()
    session.send(b"set a 4 10 2\r\nhi\r\n")
    assert session.send(b"gat 100 a nope\r\n") == b"VALUE a 4 2\r\nhi\r\nEND\r\n"
    session.advance(50)
    assert session.send(b"get a\r\n") == b"VALUE a 4 2\r\nhi\r\nEND\r\n"
    session.advance(50)
    assert session.send(b"get a\r\n") == b"END\r\n"


def test_gats_returns_cas_and_keeps_it():
    check(b"set a 4 0 2\r\nhi\r\ngats 100 a\r\ngets a\r\n",
          b"STORED\r\nVALUE a 4 2 1\r\nhi\r\nEND\r\nVALUE a 4 2 1\r\nhi\r\nEND\r\n")


def test_gat_zero_removes_expiry():
    check(b"set a 0 10 1\r\nx\r\ngat 0 a\r\nmg a t\r\n",
          b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nHD t-1\r\n")


def test_gat_negative_expires():
    check(b"set a 0 0 1\r\nx\r\ngat -1 a\r\nget a\r\n",
          b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nEND\r\n")


@pytest.mark.parametrize("exptime", [b"abc", b"1.5", b"1x"])
def test_gat_bad_exptime(exptime):
    check(b"gat " + exptime + b" a b\r\nmn\r\n",
          b"CLIENT_ERROR invalid exptime argument\r\nMN\r\n")


# --------------------------------------------------------------------------
# Storage: set add replace append prepend cas
# --------------------------------------------------------------------------

@pytest.mark.parametrize("command, exists, reply, value", [
    (b"set", False, b"STORED", b"VALUE k 7 3\r\nnew\r\n"),
    (b"set", True, b"STORED", b"VALUE k 7 3\r\nnew\r\n"),
    (b"add", False, b"STORED", b"VALUE k 7 3\r\nnew\r\n"),
    (b"add", True, b"NOT_STORED", b"VALUE k 1 3\r\nold\r\n"),
    (b"replace", False, b"NOT_STORED", b""),
    (b"replace", True, b"STORED", b"VALUE k 7 3\r\nnew\r\n"),
    (b"append", False, b"NOT_STORED", b""),
    (b"append", True, b"STORED", b"VALUE k 1 6\r\noldnew\r\n"),
    (b"prepend", False, b"NOT_STORED", b""),
    (b"prepend", True, b"STORED", b"VALUE k 1 6\r\nnewold\r\n"),
])
def test_storage_commands(command, exists, reply, value):
    setup, setup_reply = (b"set k 1 0 3\r\nold\r\n", b"STORED\r\n") if exists else (b"", b"")
    check(setup + command + b" k 7 0 3\r\nnew\r\nget k\r\n",
          setup_reply + reply + b"\r\n" + value + b"END\r\n")
    check(setup + command + b" k 7 0 3 noreply\r\nnew\r\nget k\r\n",
          setup_reply + value + b"END\r\n")


def test_noreply_is_case_sensitive():
    check(b"set k 0 0 1 NOREPLY\r\nx\r\n", b"STORED\r\n")


def test_sixth_token_not_noreply_is_ignored():
    check(b"set k 0 0 1 foo\r\nx\r\nget k\r\n", b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n")


def test_noreply_lasts_one_command():
    check(b"set k 0 0 1 noreply\r\nx\r\nget k\r\n", b"VALUE k 0 1\r\nx\r\nEND\r\n")


def test_append_prepend_keep_flags_and_expiry():
    session = Session()
    reply = session.send(b"set k 5 10 1\r\nb\r\nappend k 9 0 1\r\nc\r\n"
                         b"prepend k 9 0 1\r\na\r\nget k\r\n")
    assert reply == b"STORED\r\nSTORED\r\nSTORED\r\nVALUE k 5 3\r\nabc\r\nEND\r\n"
    session.advance(10)
    assert session.send(b"get k\r\n") == b"END\r\n"


def test_empty_value():
    check(b"set k 0 0 0\r\n\r\nget k\r\n", b"STORED\r\nVALUE k 0 0\r\n\r\nEND\r\n")


@pytest.mark.parametrize("flags, shown", [
    (b"0", b"0"), (b"4294967295", b"4294967295"), (b"65536", b"65536"), (b"007", b"7"),
    (b"+5", b"5"),
])
def test_flags(flags, shown):
    check(b"set k " + flags + b" 0 1\r\nx\r\nget k\r\n",
          b"STORED\r\nVALUE k " + shown + b" 1\r\nx\r\nEND\r\n")


def test_binary_value_round_trip():
    value = bytes(range(256))
    check(b"set k 0 0 256\r\n" + value + b"\r\nget k\r\n",
          b"STORED\r\nVALUE k 0 256\r\n" + value + b"\r\nEND\r\n")


def test_high_bytes_in_keys_are_allowed():
    check(b"set caf\xc3\xa9 0 0 1\r\nx\r\nget caf\xc3\xa9\r\n",
          b"STORED\r\nVALUE caf\xc3\xa9 0 1\r\nx\r\nEND\r\n")


def test_relative_and_absolute_exptime():
    session = Session()
    absolute = int(session.clock()) + 100
    reply = session.send(b"set a 0 10 1\r\nx\r\nset b 0 %d 1\r\ny\r\n" % absolute)
    assert reply == b"STORED\r\n" * 2
    session.advance(10)
    assert session.send(b"get a b\r\n") == b"VALUE b 0 1\r\ny\r\nEND\r\n"
    session.advance(90)
    assert session.send(b"get a b\r\n") == b"END\r\n"


@pytest.mark.parametrize("exptime", [b"-1", b"2592001", b"1000000000", b"99999999999"])
def test_exptime_already_expired(exptime):
    check(b"set k 0 0 3\r\nold\r\nset k 0 " + exptime + b" 1\r\nx\r\nget k\r\n",
          b"STORED\r\nSTORED\r\nEND\r\n")


def test_exptime_thirty_days_is_relative():
    check(b"set k 0 2592000 1\r\nx\r\nmg k t\r\n", b"STORED\r\nHD t2592000\r\n")


@pytest.mark.parametrize("line", [
    b"set k 0 0", b"set k", b"set", b"set k 0 0 1 noreply extra", b"set k 0 0 1 a b",
    b"add k 0 0", b"replace k 0", b"append k", b"prepend k 0 0 1 noreply extra",
    b"cas k 0 0 1", b"cas k 0 0 1 1 noreply extra", b"cas",
], ids=lambda line: line.decode())
def test_storage_wrong_token_count(line):
    # The data line is then read as a command: "mn" answers.
    check(line + b"\r\nmn\r\n", b"ERROR\r\nMN\r\n")


@pytest.mark.parametrize("line", [
    b"set k abc 0 1", b"set k 0 abc 1", b"set k 0 0 abc", b"set k 0 0 -1", b"set k 5x 0 1",
    b"set k 0 0 1x", b"set k -1 0 1", b"set k 0 0 0x1",
    b"set k 0 0 2147483647", b"set k 0 0 2147483646",
    b"cas k 0 0 1 abc", b"cas k 0 0 1 -1", b"cas k 0 0 1 18446744073709551616",
    b"add k abc 0 1", b"append k 0 0 -5",
], ids=lambda line: line.decode())
def test_storage_bad_numbers(line):
    check(line + b"\r\nx\r\nmn\r\n", BAD_FORMAT + b"ERROR\r\nMN\r\n")


def test_storage_bad_numbers_noreply():
    check(b"set k abc 0 1 noreply\r\nx\r\nmn\r\n", b"ERROR\r\nMN\r\n")


@pytest.mark.parametrize("script, expected", [
    # 3 bytes are read for "x\r\n"; what follows them is the next command line.
    (b"xyz\r\nmn\r\nget k\r\n", b"ERROR\r\nMN\r\nEND\r\n"),
    (b"x\nmn\r\nget k\r\n", b"ERROR\r\nEND\r\n"),
    (b"xy\r\nmn\r\nget k\r\n", b"ERROR\r\nMN\r\nEND\r\n"),
    (b"xyversion\r\nget k\r\n", b"ERROR\r\nEND\r\n"),
], ids=["two-bytes-long", "newline-only", "one-byte-long", "garbage"])
def test_bad_data_chunk(script, expected):
    check(b"set k 0 0 1\r\n" + script, b"CLIENT_ERROR bad data chunk\r\n" + expected)


def test_bad_data_chunk_keeps_old_value():
    check(b"set k 0 0 1\r\na\r\nset k 0 0 1\r\nxyz\r\nget k\r\n",
          b"STORED\r\nCLIENT_ERROR bad data chunk\r\nERROR\r\nVALUE k 0 1\r\na\r\nEND\r\n")


def test_bad_data_chunk_newline_only_terminator():
    check(b"set k 0 0 3\r\nabc\nget k\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n")


def test_bad_data_chunk_noreply():
    check(b"set k 0 0 1 noreply\r\nxyz\r\nmn\r\n", b"ERROR\r\nMN\r\n")


def test_data_shorter_than_announced_waits():
    check(b"set k 0 0 9\r\nabc\r\nmn\r\n\r\nget k\r\n",
          b"STORED\r\nVALUE k 0 9\r\nabc\r\nmn\r\n\r\nEND\r\n")


def test_connection_ends_inside_data():
    check(b"mn\r\nset k 0 0 10\r\nabc", b"MN\r\n")


# The largest value memcached stores under -I 1m with key "k": 1048576 minus its
# item header (48), CAS (8), key and terminators; flags other than 0 cost 4 bytes.
LARGEST = 1048516


def big_set(flags, nbytes, tail=b"mg k s f\r\n"):
    return b"set k %d 0 %d\r\n" % (flags, nbytes) + b"v" * nbytes + b"\r\n" + tail


def test_largest_value_is_stored():
    check(big_set(0, LARGEST), b"STORED\r\nHD s%d f0\r\n" % LARGEST)


def test_value_one_byte_too_large():
    check(big_set(0, LARGEST + 1), TOO_LARGE + b"EN\r\n")


def test_largest_value_with_flags_is_stored():
    check(big_set(1, LARGEST - 4), b"STORED\r\nHD s%d f1\r\n" % (LARGEST - 4))


@pytest.mark.parametrize("nbytes", [LARGEST - 3, LARGEST])
def test_value_too_large_with_flags(nbytes):
    # Non-zero client flags take 4 more bytes of memcached's item.
    check(big_set(1, nbytes), TOO_LARGE + b"EN\r\n")


def test_too_large_swallows_data_even_if_it_looks_like_commands():
    data = (b"get k\r\n" * 200000)[:1100000]
    check(b"set k 0 0 1100000\r\n" + data + b"\r\nmn\r\n", TOO_LARGE + b"MN\r\n")


def test_too_large_noreply():
    check(b"set k 0 0 1100000 noreply\r\n" + b"v" * 1100000 + b"\r\nmn\r\n", b"MN\r\n")


def test_too_large_set_drops_old_value():
    check(b"set k 0 0 1\r\nx\r\n" + big_set(0, 1100000, b"get k\r\n"),
          b"STORED\r\n" + TOO_LARGE + b"END\r\n")


@pytest.mark.parametrize("command", [b"add", b"replace", b"append", b"prepend"])
def test_too_large_other_commands_keep_old_value(command):
    check(b"set k 0 0 1\r\nx\r\n" + command + b" k 0 0 1100000\r\n" + b"v" * 1100000
          + b"\r\nget k\r\n", b"STORED\r\n" + TOO_LARGE + b"VALUE k 0 1\r\nx\r\nEND\r\n")


def test_too_large_with_smaller_limit():
    check(b"set k 0 0 2000\r\n" + b"v" * 2000 + b"\r\nget k\r\n",
          TOO_LARGE + b"END\r\n", item_size_max=2048)


def test_append_beyond_the_size_limit_is_not_stored():
    check(b"set k 0 0 1000000\r\n" + b"v" * 1000000 + b"\r\nappend k 0 0 100000\r\n"
          + b"w" * 100000 + b"\r\nmg k s\r\n", b"STORED\r\nNOT_STORED\r\nHD s1000000\r\n")


def small_session(evict, **settings):
    """Room for three items of key "x" and a 1000-byte value (memg charges each item
    memg.item_cost)."""
    limit = 3 * memg.item_cost(b"x", 1000) + 100
    return Session(memory_limit=limit, item_size_max=limit // 2, evict=evict, **settings)


def fill(session):
    script = b"".join(b"set %s 0 0 1000\r\n%s\r\n" % (key, b"v" * 1000)
                      for key in (b"a", b"b", b"c"))
    assert session.send(script) == b"STORED\r\n" * 3


def test_full_flat_cache_evicts_least_recently_used():
    session = small_session(evict=True, lru_maintainer=False)      # -o no_lru_maintainer
    fill(session)
    assert session.send(b"get a\r\n").startswith(b"VALUE a ")
    assert session.send(b"set d 0 0 1000\r\n" + b"v" * 1000 + b"\r\nget b\r\n") == \
        b"STORED\r\nEND\r\n"
    assert parse_stats(session.send(b"stats\r\n"))["evictions"] == "1"


def test_full_segmented_cache_keeps_what_was_read_twice():
    # The segmented LRU: an item read once is evicted as soon as one never read; one
    # read twice is active, and moves up to WARM instead of down to COLD.
    session = small_session(evict=True)
    fill(session)
    assert session.send(b"get a\r\nget b\r\nget b\r\n").count(b"VALUE") == 3
    assert session.send(b"set d 0 0 1000\r\n" + b"v" * 1000 + b"\r\nmn\r\n") == \
        b"STORED\r\nMN\r\n"
    assert session.send(b"set e 0 0 1000\r\n" + b"v" * 1000 + b"\r\nmn\r\n") == \
        b"STORED\r\nMN\r\n"
    assert session.send(b"get a b c\r\n").count(b"VALUE") == 1          # b
    stats = parse_stats(session.send(b"stats\r\n"))
    assert (stats["evictions"], stats["moves_to_warm"]) == ("2", "1")


def test_full_cache_without_eviction_refuses():
    session = small_session(evict=False)
    fill(session)
    assert session.send(b"set d 0 0 1000\r\n" + b"v" * 1000 + b"\r\nget d\r\nmn\r\n") == \
        b"SERVER_ERROR out of memory storing object\r\nEND\r\nMN\r\n"
    assert session.send(b"ms d 1000 T0\r\n" + b"v" * 1000 + b"\r\nmn\r\n") == \
        b"SERVER_ERROR out of memory storing object\r\nMN\r\n"
    assert session.send(b"get a b c\r\n").count(b"VALUE") == 3


def test_out_of_memory_set_drops_old_value():
    # memcached: "Avoid stale data persisting in cache because we failed alloc."
    session = small_session(evict=False)
    fill(session)
    assert session.send(b"set a 0 0 1200\r\n" + b"w" * 1200 + b"\r\nget a\r\n") == \
        b"SERVER_ERROR out of memory storing object\r\nEND\r\n"


def test_key_of_251_bytes_is_refused():
    # The data line is not swallowed: it is read as a command.
    check(b"set " + b"k" * 251 + b" 0 0 2\r\nmn\r\nget k\r\n", BAD_FORMAT + b"MN\r\nEND\r\n")


@pytest.mark.parametrize("key", [b"a\x01b", b"a\tb", b"a\x7fb", b"\x1b"],
                         ids=["soh", "tab", "del", "esc"])
def test_keys_with_control_characters_are_stored(key):
    # As memcached: only space separates tokens.  memcaslap's keys start with \x10s.
    check(b"set " + key + b" 0 0 1\r\nx\r\nget " + key + b"\r\nmg " + key + b" v\r\n",
          b"STORED\r\nVALUE " + key + b" 0 1\r\nx\r\nEND\r\nVA 1\r\nx\r\n")


def test_nul_ends_the_command_line():
    # memcached handles the line as a C string: it ends at the NUL.
    check(b"set a\x00b 0 0 1\r\nx\r\nget a\x00b\r\nmn\r\n", b"ERROR\r\nERROR\r\nEND\r\nMN\r\n")


def test_cas_outcomes():
    check(b"cas k 0 0 1 1\r\nx\r\n"
          b"set k 0 0 1\r\na\r\n"
          b"cas k 0 0 1 99\r\nb\r\n"
          b"gets k\r\n"
          b"cas k 3 0 1 1\r\nc\r\n"
          b"cas k 0 0 1 1\r\nd\r\n"
          b"gets k\r\n",
          b"NOT_FOUND\r\nSTORED\r\nEXISTS\r\nVALUE k 0 1 1\r\na\r\nEND\r\n"
          b"STORED\r\nEXISTS\r\nVALUE k 3 1 2\r\nc\r\nEND\r\n")


def test_cas_unique_zero_never_matches():
    check(b"set k 0 0 1\r\nx\r\ncas k 0 0 1 0\r\ny\r\nget k\r\n",
          b"STORED\r\nEXISTS\r\nVALUE k 0 1\r\nx\r\nEND\r\n")


def test_cas_noreply_hides_every_outcome():
    check(b"cas k 0 0 1 1 noreply\r\nx\r\nset k 0 0 1\r\na\r\n"
          b"cas k 0 0 1 99 noreply\r\nb\r\ncas k 0 0 1 1 noreply\r\nc\r\ngets k\r\n",
          b"STORED\r\nVALUE k 0 1 2\r\nc\r\nEND\r\n")


def test_cas_seventh_token_not_noreply():
    check(b"set k 0 0 1\r\nx\r\ncas k 0 0 1 1 foo\r\ny\r\nget k\r\n",
          b"STORED\r\nSTORED\r\nVALUE k 0 1\r\ny\r\nEND\r\n")


def test_cas_unique_changes_on_each_modification():
    check(b"set k 0 0 1\r\n1\r\ngets k\r\nappend k 0 0 1\r\n0\r\ngets k\r\n"
          b"prepend k 0 0 1\r\n1\r\ngets k\r\nincr k 1\r\ngets k\r\ndecr k 1\r\ngets k\r\n"
          b"touch k 100\r\ngets k\r\n",
          b"STORED\r\nVALUE k 0 1 1\r\n1\r\nEND\r\n"
          b"STORED\r\nVALUE k 0 2 2\r\n10\r\nEND\r\n"
          b"STORED\r\nVALUE k 0 3 3\r\n110\r\nEND\r\n"
          b"111\r\nVALUE k 0 3 4\r\n111\r\nEND\r\n"
          b"110\r\nVALUE k 0 3 5\r\n110\r\nEND\r\n"
          b"TOUCHED\r\nVALUE k 0 3 5\r\n110\r\nEND\r\n")


# --------------------------------------------------------------------------
# delete, incr, decr, touch
# --------------------------------------------------------------------------

@pytest.mark.parametrize("line, reply, gone", [
    (b"delete k", b"DELETED\r\n", True),
    (b"delete k 0", b"DELETED\r\n", True),
    (b"delete k noreply", b"", True),
    (b"delete k 0 noreply", b"", True),
    (b"delete k 1", b"CLIENT_ERROR bad command line format.  "
                    b"Usage: delete <key> [noreply]\r\n", False),
    (b"delete k 0 0", b"CLIENT_ERROR bad command line format.  "
                      b"Usage: delete <key> [noreply]\r\n", False),
    (b"delete k 1 noreply", b"", False),
    (b"delete k a b c", b"ERROR\r\n", False),
    (b"delete", b"ERROR\r\n", False),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_delete(line, reply, gone):
    check(b"set k 0 0 1\r\nx\r\n" + line + b"\r\nget k\r\n",
          b"STORED\r\n" + reply + (b"END\r\n" if gone else b"VALUE k 0 1\r\nx\r\nEND\r\n"))


def test_delete_missing():
    check(b"delete k\r\ndelete k 0\r\ndelete k noreply\r\nmn\r\n",
          b"NOT_FOUND\r\nNOT_FOUND\r\nMN\r\n")


def test_delete_long_key():
    check(b"delete " + b"k" * 251 + b"\r\n", BAD_FORMAT)


@pytest.mark.parametrize("value, line, reply, stored", [
    (b"0", b"incr k 1", b"1", b"1"),
    (b"99", b"incr k 1", b"100", b"100"),
    (b"18446744073709551615", b"incr k 1", b"0", b"0" + b" " * 19),
    (b"18446744073709551615", b"incr k 2", b"1", b"1" + b" " * 19),
    (b"1", b"incr k 18446744073709551615", b"0", b"0"),
    (b"10", b"decr k 3", b"7", b"7 "),
    (b"100", b"decr k 1", b"99", b"99 "),
    (b"10", b"decr k 100", b"0", b"0 "),
    (b"0", b"decr k 1", b"0", b"0"),
    (b"007", b"incr k 1", b"8", b"8  "),
    (b" 12", b"incr k 1", b"13", b"13 "),
    (b"5", b"incr k 0", b"5", b"5"),
], ids=lambda v: v.decode().strip() if isinstance(v, bytes) else None)
def test_incr_decr(value, line, reply, stored):
    check(b"set k 3 0 %d\r\n%s\r\n%s\r\nget k\r\n" % (len(value), value, line),
          b"STORED\r\n" + reply + b"\r\nVALUE k 3 %d\r\n%s\r\nEND\r\n" % (len(stored), stored))


@pytest.mark.parametrize("value, reply, stored", [
    (b"12 34", b"13", b"13   "),
    (b"+5", b"6", b"6 "),
    (b"12\r\n", b"13", b"13  "),
    (b"12\t", b"13", b"13 "),
    (b"0" * 25 + b"1", b"2", b"2" + b" " * 25),
    (b"1" + b" " * 29, b"2", b"2" + b" " * 29),
], ids=["space-inside", "plus", "crlf", "tab", "long-zeros", "long-padding"])
def test_incr_accepts_what_memcached_accepts(value, reply, stored):
    # memcached reads the value with strtoull: leading whitespace, a sign and
    # anything after the first whitespace are allowed.
    check(b"set k 0 0 %d\r\n%s\r\nincr k 1\r\nget k\r\n" % (len(value), value),
          b"STORED\r\n" + reply + b"\r\nVALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(stored), stored))


@pytest.mark.parametrize("value", [b"abc", b"12abc", b"-5", b"1.5", b"", b"18446744073709551616"])
@pytest.mark.parametrize("command", [b"incr", b"decr"])
def test_incr_decr_non_numeric(command, value):
    check(b"set k 0 0 %d\r\n%s\r\n%s k 1\r\nget k\r\n" % (len(value), value, command),
          b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
          b"VALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(value), value))


@pytest.mark.parametrize("delta", [b"abc", b"-1", b"18446744073709551616", b"1x"])
def test_incr_invalid_delta(delta):
    check(b"set k 0 0 1\r\n1\r\nincr k " + delta + b"\r\ndecr k " + delta + b"\r\n",
          b"STORED\r\n" + b"CLIENT_ERROR invalid numeric delta argument\r\n" * 2)


def test_incr_decr_missing():
    check(b"incr k 1\r\ndecr k 1\r\n", b"NOT_FOUND\r\nNOT_FOUND\r\n")


def test_incr_decr_noreply():
    check(b"set k 0 0 1\r\n5\r\nincr k 10 noreply\r\ndecr k 3 noreply\r\nincr nope 1 noreply\r\n"
          b"get k\r\n", b"STORED\r\nVALUE k 0 2\r\n12\r\nEND\r\n")


def test_incr_fourth_token_not_noreply():
    check(b"set k 0 0 1\r\n1\r\nincr k 1 2\r\ndecr k 1 2\r\n", b"STORED\r\n2\r\n1\r\n")


@pytest.mark.parametrize("line", [b"incr k", b"decr k", b"incr", b"incr k 1 noreply x"])
def test_incr_decr_wrong_token_count(line):
    check(line + b"\r\n", b"ERROR\r\n")


def test_incr_long_key():
    check(b"incr " + b"k" * 251 + b" 1\r\n", BAD_FORMAT)


def test_touch():
    session = Session()
    assert session.send(b"touch k 10\r\nset k 0 10 1\r\nx\r\ntouch k 100\r\n") == \
        b"NOT_FOUND\r\nSTORED\r\nTOUCHED\r\n"
    session.advance(50)
    assert session.send(b"get k\r\n") == b"VALUE k 0 1\r\nx\r\nEND\r\n"
    session.advance(50)
    assert session.send(b"get k\r\n") == b"END\r\n"


def test_touch_noreply_and_negative():
    check(b"set k 0 0 1\r\nx\r\ntouch k -1 noreply\r\ntouch j 5 noreply\r\nget k\r\n",
          b"STORED\r\nEND\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"touch k abc", b"CLIENT_ERROR invalid exptime argument\r\n"),
    (b"touch k", b"ERROR\r\n"),
    (b"touch", b"ERROR\r\n"),
    (b"touch k 1 noreply x", b"ERROR\r\n"),
    (b"touch " + b"k" * 251 + b" 1", BAD_FORMAT),
], ids=["bad-exptime", "no-exptime", "no-key", "too-many", "long-key"])
def test_touch_errors(line, reply):
    check(line + b"\r\nmn\r\n", reply + b"MN\r\n")


# --------------------------------------------------------------------------
# Meta commands: mn mg ms md ma me
# --------------------------------------------------------------------------

def b64(key):
    return base64.b64encode(key)


def test_mn():
    check(b"mn\r\nmn extra\r\n", b"MN\r\nMN\r\n")


@pytest.mark.parametrize("flags, reply", [
    (b"", b"HD\r\n"),
    (b"v", b"VA 3\r\nabc\r\n"),
    (b"k", b"HD kk\r\n"),
    (b"f", b"HD f5\r\n"),
    (b"s", b"HD s3\r\n"),
    (b"c", b"HD c1\r\n"),
    (b"t", b"HD t-1\r\n"),
    (b"h", b"HD h0\r\n"),
    (b"l", b"HD l0\r\n"),
    (b"O123", b"HD O123\r\n"),
    (b"q", b"HD\r\n"),
    (b"u v", b"VA 3\r\nabc\r\n"),
    (b"P L", b"HD\r\n"),
    (b"k v f s", b"VA 3 kk f5 s3\r\nabc\r\n"),
    (b"s v f t c k O1 h l", b"VA 3 s3 f5 t-1 c1 kk O1 h0 l0\r\nabc\r\n"),
    (b"O9 k c", b"HD O9 kk c1\r\n"),
    (b"q v k", b"VA 3 kk\r\nabc\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_mg_flags(flags, reply):
    check(b"set k 5 0 3\r\nabc\r\nmg k " + flags + b"\r\n", b"STORED\r\n" + reply)


@pytest.mark.parametrize("flags, reply", [
    (b"", b"EN\r\n"), (b"v", b"EN\r\n"), (b"q", b""), (b"v q", b""), (b"k O1", b"EN kk O1\r\n"),
    (b"O1 s v k", b"EN O1 kk\r\n"), (b"q k O1", b""),
])
def test_mg_miss(flags, reply):
    check(b"mg k " + flags + b"\r\nmn\r\n", reply + b"MN\r\n")


def test_mg_ttl_and_touch():
    session = Session()
    assert session.send(b"set k 0 100 1\r\nx\r\nmg k t\r\n") == b"STORED\r\nHD t100\r\n"
    session.advance(30)
    assert session.send(b"mg k t\r\nmg k T50\r\nmg k t\r\n") == b"HD t70\r\nHD\r\nHD t50\r\n"
    session.advance(50)
    assert session.send(b"mg k\r\n") == b"EN\r\n"


def test_mg_touch_does_not_change_cas():
    check(b"set k 0 0 1\r\nx\r\nmg k T30 c\r\nmg k c t\r\n",
          b"STORED\r\nHD c1\r\nHD c1 t30\r\n")


def test_mg_hit_before_and_last_access():
    # Segmented, as memcached: a first read marks the item fetched, a second marks it
    # active, and only that stamps its last access.
    session = Session()
    session.send(b"set k 0 0 1\r\nx\r\n")
    session.advance(5)
    assert session.send(b"mg k h l\r\n") == b"HD h0 l5\r\n"
    session.advance(3)
    assert session.send(b"mg k h l\r\nmg k h l\r\n") == b"HD h1 l8\r\nHD h1 l0\r\n"


def test_mg_hit_before_and_last_access_in_a_flat_lru():
    session = Session(lru_maintainer=False)
    session.send(b"set k 0 0 1\r\nx\r\n")
    session.advance(5)
    assert session.send(b"mg k h l\r\n") == b"HD h0 l5\r\n"
    session.advance(3)
    assert session.send(b"mg k h l\r\nmg k h l\r\n") == b"HD h1 l3\r\nHD h1 l0\r\n"


def test_mg_no_bump_leaves_hit_and_access_alone():
    session = Session()
    session.send(b"set k 0 0 1\r\nx\r\n")
    session.advance(4)
    assert session.send(b"mg k u v\r\nmg k h l\r\n") == b"VA 1\r\nx\r\nHD h0 l4\r\n"


def test_mg_vivify():
    check(b"mg k N30 v c t\r\nmg k N30 v c t\r\nmg k v\r\n",
          b"VA 0 c1 t30 W\r\n\r\nVA 0 c1 t30 Z\r\n\r\nVA 0 Z\r\n\r\n")


def test_mg_vivify_quiet_still_answers():
    check(b"mg k N30 q\r\nmg k N30 q\r\nmn\r\n", b"HD W\r\nHD Z\r\nMN\r\n")


def test_mg_vivify_then_set_clears_win():
    check(b"mg k N30\r\nset k 0 0 1\r\nx\r\nmg k N30 v\r\n", b"HD W\r\nSTORED\r\nVA 1\r\nx\r\n")


def test_mg_recache():
    session = Session()
    session.send(b"set k 0 100 1\r\nx\r\n")
    assert session.send(b"mg k R30 v\r\n") == b"VA 1\r\nx\r\n"
    session.advance(80)
    assert session.send(b"mg k R30 v\r\nmg k R30 v\r\n") == b"VA 1 W\r\nx\r\nVA 1 Z\r\nx\r\n"


def test_mg_recache_never_wins_without_ttl():
    check(b"set k 0 0 1\r\nx\r\nmg k R30\r\n", b"STORED\r\nHD\r\n")


def test_mg_stale_after_invalidate():
    check(b"set k 0 0 1\r\nx\r\nmd k I\r\nmg k v c\r\nmg k v c\r\nset k 0 0 1\r\ny\r\nmg k v\r\n",
          b"STORED\r\nHD\r\nVA 1 c2 X W\r\nx\r\nVA 1 c2 Z X\r\nx\r\nSTORED\r\nVA 1\r\ny\r\n")


def test_mg_base64_key():
    check(b"ms " + b64(b"bin\x00key") + b" 2 b\r\nhi\r\nmg " + b64(b"bin\x00key") + b" b v k\r\n",
          b"HD\r\nVA 2 k" + b64(b"bin\x00key") + b" b\r\nhi\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"mg", b"ERROR\r\n"),
    (b"mg " + b"k" * 251 + b" v", BAD_FORMAT),
    (b"mg k zz", b"CLIENT_ERROR invalid flag\r\n"),
    (b"mg k v v", b"CLIENT_ERROR duplicate flag\r\n"),
    (b"mg k vv", b"VA 1\r\nx\r\n"),
    (b"mg k Tabc", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg k Nabc", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg k R", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg k b", b"CLIENT_ERROR error decoding key\r\n"),
    (b"mg !!! b", b"CLIENT_ERROR error decoding key\r\n"),
    (b"mg k O" + b"x" * 33, b"CLIENT_ERROR opaque token too long\r\n"),
    (b"mg k " + b" ".join([b"v"] * 30), b"CLIENT_ERROR options flags are too long\r\n"),
    (b"mg k q zz", b"CLIENT_ERROR invalid flag\r\n"),
], ids=["no-key", "long-key", "unknown-flag", "duplicate", "long-v", "bad-T",
        "bad-N", "empty-R", "bad-base64", "bad-base64-2", "long-opaque", "too-many-flags",
        "quiet-error"])
def test_mg_errors(line, reply):
    check(b"set k 0 0 1\r\nx\r\n" + line + b"\r\nmn\r\n", b"STORED\r\n" + reply + b"MN\r\n")


def test_mg_opaque_of_32_bytes():
    opaque = b"O" + b"x" * 31
    check(b"mg k " + opaque + b"\r\n", b"EN " + opaque + b"\r\n")


@pytest.mark.parametrize("flags, reply", [
    (b"", b"HD"),
    (b"q", b""),
    (b"c", b"HD c1"),
    (b"k", b"HD kk"),
    (b"O9", b"HD O9"),
    (b"F5 T0 O9 k", b"HD O9 kk"),
    (b"c O1 k", b"HD c1 O1 kk"),
    (b"O1 k c", b"HD O1 kk c1"),
    (b"k c O1", b"HD kk c1 O1"),
    (b"P L", b"HD"),
    (b"s v f t h l u", b"HD"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_ms_replies(flags, reply):
    check(b"ms k 2 " + flags + b"\r\nhi\r\nmn\r\n", reply + (b"\r\n" if reply else b"") + b"MN\r\n")


def test_ms_stores_flags_and_ttl():
    check(b"ms k 2 F5 T100\r\nhi\r\nmg k v f t\r\nms k 3\r\nbye\r\nmg k v f t\r\n",
          b"HD\r\nVA 2 f5 t100\r\nhi\r\nHD\r\nVA 3 f0 t-1\r\nbye\r\n")


def test_ms_negative_ttl_expires():
    check(b"ms k 2 T-1\r\nhi\r\nmg k v\r\n", b"HD\r\nEN\r\n")


@pytest.mark.parametrize("flags, exists, reply, value", [
    (b"MS", False, b"HD", b"VA 2\r\nhi\r\n"),
    (b"MS", True, b"HD", b"VA 2\r\nhi\r\n"),
    (b"ME", False, b"HD", b"VA 2\r\nhi\r\n"),
    (b"ME", True, b"NS", b"VA 1\r\nx\r\n"),
    (b"MR", False, b"NS", b"EN\r\n"),
    (b"MR", True, b"HD", b"VA 2\r\nhi\r\n"),
    (b"MA", False, b"NS", b"EN\r\n"),
    (b"MA", True, b"HD", b"VA 3\r\nxhi\r\n"),
    (b"MP", False, b"NS", b"EN\r\n"),
    (b"MP", True, b"HD", b"VA 3\r\nhix\r\n"),
    (b"MA N30", False, b"HD", b"VA 2\r\nhi\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_ms_modes(flags, exists, reply, value):
    setup, setup_reply = (b"set k 0 0 1\r\nx\r\n", b"STORED\r\n") if exists else (b"", b"")
    check(setup + b"ms k 2 " + flags + b"\r\nhi\r\nmg k v\r\n",
          setup_reply + reply + b"\r\n" + value)


def test_ms_append_keeps_flags():
    check(b"set k 3 0 1\r\nx\r\nms k 2 MA F9\r\nab\r\nms k 2 MP F9\r\ncd\r\nmg k v f\r\n",
          b"STORED\r\nHD\r\nHD\r\nVA 5 f3\r\ncdxab\r\n")


def test_ms_append_vivify_uses_n_ttl():
    check(b"ms k 2 MA N30 T100\r\nhi\r\nmg k v t\r\n", b"HD\r\nVA 2 t30\r\nhi\r\n")


def test_ms_quiet_hides_only_success():
    check(b"ms k 2 q\r\nhi\r\nms k 2 q ME\r\nho\r\nms j 2 q MR\r\nhi\r\n"
          b"ms k 2 q C99\r\nhu\r\nmn\r\n",
          b"NS\r\nNS\r\nEX\r\nMN\r\n")


def test_ms_cas():
    check(b"ms k 2 c\r\nhi\r\nms k 2 C1 c\r\nho\r\nms k 2 C1\r\nhu\r\nms z 2 C5 c\r\nhu\r\n"
          b"mg k v c\r\n",
          b"HD c1\r\nHD c2\r\nEX\r\nNF c0\r\nVA 2 c2\r\nho\r\n")


def test_ms_failed_returns_c0():
    check(b"ms k 2 MR c k\r\nhi\r\nms k 2 ME c O1\r\nhi\r\nms k 2 C99 c\r\nhi\r\n",
          b"NS c0 kk\r\nHD c1 O1\r\nEX c0\r\n")


def test_ms_explicit_cas_zero_is_compared():
    check(b"ms k 2 C0\r\nhi\r\nms k 2\r\nhi\r\nms k 2 C0\r\nho\r\nmg k v\r\n",
          b"NF\r\nHD\r\nEX\r\nVA 2\r\nhi\r\n")


def test_ms_append_with_cas():
    check(b"ms k 2\r\nhi\r\nms k 2 C9 MA\r\nhu\r\nms k 2 C1 MA\r\nho\r\nmg k v c\r\n",
          b"HD\r\nEX\r\nHD\r\nVA 4 c2\r\nhiho\r\n")


def test_ms_new_cas():
    check(b"ms k 2 E77\r\nhi\r\nmg k c\r\nms k 2 C77 E88 c\r\nho\r\nmg k c v\r\n",
          b"HD\r\nHD c77\r\nHD c88\r\nVA 2 c88\r\nho\r\n")


def test_ms_invalidate_with_older_cas():
    check(b"ms k 2\r\nhi\r\nms k 2\r\nho\r\nms k 2 C1 I\r\nhu\r\nmg k v c\r\nmg k v c\r\n",
          b"HD\r\nHD\r\nHD\r\nVA 2 c3 X W\r\nhu\r\nVA 2 c3 Z X\r\nhu\r\n")


def test_ms_invalidate_without_cas_is_a_set():
    check(b"ms k 2 I\r\nhi\r\nmg k v\r\n", b"HD\r\nVA 2\r\nhi\r\n")


def test_ms_base64_key():
    check(b"ms " + b64(b"k") + b" 2 b k c\r\nhi\r\nmg k v\r\n",
          b"HD k" + b64(b"k") + b" b c1\r\nVA 2\r\nhi\r\n")


def test_ms_empty_value():
    check(b"ms k 0\r\n\r\nmg k v s\r\n", b"HD\r\nVA 0 s0\r\n\r\n")


def test_ms_flags_limits():
    check(b"ms k 2 F4294967295\r\nhi\r\nmg k f\r\n", b"HD\r\nHD f4294967295\r\n")


@pytest.mark.parametrize("line, data, reply", [
    (b"ms k", b"", BAD_FORMAT),
    (b"ms", b"", b"ERROR\r\n"),
    (b"ms k abc", b"hi\r\n", BAD_FORMAT + b"ERROR\r\n"),
    (b"ms k -1", b"hi\r\n", BAD_FORMAT + b"ERROR\r\n"),
    (b"ms " + b"k" * 251 + b" 2", b"hi\r\n", BAD_FORMAT + b"ERROR\r\n"),
    (b"ms k 2 zz", b"hi\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    (b"ms k 2 c c", b"hi\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    (b"ms k 2 Tabc", b"hi\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"ms k 2 Cabc", b"hi\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"ms k 2 Fabc", b"hi\r\n", BAD_FORMAT),
    (b"ms k 2 MX", b"hi\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    (b"ms k 2 MZ q", b"hi\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    (b"ms k 2 Mxx", b"hi\r\n", b"CLIENT_ERROR incorrect length for M token\r\n"),
    (b"ms k 2 M", b"hi\r\n", b"CLIENT_ERROR incorrect length for M token\r\n"),
    (b"ms k 2 b", b"hi\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    (b"ms k 2 O" + b"x" * 33, b"hi\r\n", b"CLIENT_ERROR opaque token too long\r\n"),
    (b"ms k 2 " + b" ".join([b"c"] * 30), b"hi\r\n",
     b"CLIENT_ERROR options flags too long\r\nERROR\r\n"),
    (b"ms k 2", b"hiya\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
    (b"ms k 2 q", b"hiya\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
], ids=["no-length", "no-key", "bad-length", "negative-length", "long-key", "unknown-flag",
        "duplicate", "bad-T", "bad-C", "bad-F", "bad-mode", "bad-mode-quiet", "long-mode",
        "empty-mode", "bad-base64", "long-opaque", "too-many-flags", "bad-chunk",
        "bad-chunk-quiet"])
def test_ms_errors(line, data, reply):
    check(line + b"\r\n" + data + b"mg k v\r\n", reply + b"EN\r\n")


def test_ms_too_large():
    check(b"ms k 1100000 T0\r\n" + b"v" * 1100000 + b"\r\nmn\r\n", TOO_LARGE + b"MN\r\n")


def test_ms_too_large_quiet_still_answers():
    check(b"ms k 1100000 q\r\n" + b"v" * 1100000 + b"\r\nmn\r\n", TOO_LARGE + b"MN\r\n")


@pytest.mark.parametrize("mode", [b"", b"MS", b"MA", b"MP", b"MR", b"ME"])
def test_ms_too_large_drops_old_value(mode):
    check(b"set k 0 0 1\r\nx\r\nms k 1100000 " + mode + b"\r\n" + b"v" * 1100000
          + b"\r\nmg k v\r\n", b"STORED\r\n" + TOO_LARGE + b"EN\r\n")


def test_md():
    check(b"md k\r\nset k 0 0 1\r\nx\r\nmd k\r\nmd k\r\nmg k\r\n",
          b"NF\r\nSTORED\r\nHD\r\nNF\r\nEN\r\n")


def test_md_quiet_hides_only_success():
    check(b"set k 0 0 1\r\nx\r\nmd k q\r\nmd k q\r\nset k 0 0 1\r\nx\r\nmd k q C99\r\nmn\r\n",
          b"STORED\r\nNF\r\nSTORED\r\nEX\r\nMN\r\n")


def test_md_echoes_key_and_opaque():
    check(b"set k 0 0 1\r\nx\r\nmd k k O5\r\nmd k O6 k\r\n", b"STORED\r\nHD kk O5\r\nNF O6 kk\r\n")


def test_md_cas():
    check(b"set k 0 0 1\r\nx\r\nmd k C99\r\nmd k C0\r\nmg k\r\nmd k C1\r\nmg k\r\n",
          b"STORED\r\nEX\r\nEX\r\nHD\r\nHD\r\nEN\r\n")


def test_md_invalidate():
    check(b"set k 0 0 1\r\nx\r\nmd k I q\r\nmg k v c\r\nmd k I C2\r\nmg k c\r\n",
          b"STORED\r\nVA 1 c2 X W\r\nx\r\nHD\r\nHD c3 X W\r\n")


def test_md_invalidate_with_ttl():
    check(b"set k 0 0 1\r\nx\r\nmd k I T30\r\nmg k t\r\n", b"STORED\r\nHD\r\nHD t30 X W\r\n")


def test_md_ttl_without_invalidate_deletes():
    check(b"set k 0 0 1\r\nx\r\nmd k T30\r\nmg k\r\n", b"STORED\r\nHD\r\nEN\r\n")


def test_md_remove_value():
    check(b"set k 1 100 3\r\nabc\r\nmd k x\r\nmg k v f t s\r\nmd nope x\r\n",
          b"STORED\r\nHD\r\nVA 0 f1 t100 s0\r\n\r\nNF\r\n")


def test_md_base64_key():
    check(b"md " + b64(b"k") + b" b k\r\nset k 0 0 1\r\nx\r\nmd " + b64(b"k") + b" b\r\nmg k\r\n",
          b"NF k" + b64(b"k") + b" b\r\nSTORED\r\nHD\r\nEN\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"md", b"ERROR\r\n"),
    (b"md " + b"k" * 251, BAD_FORMAT),
    (b"md k zz", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"md k Cabc", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"md k q q", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"md k O" + b"x" * 33, b"CLIENT_ERROR opaque token too long\r\n"),
    (b"md k " + b" ".join([b"q"] * 30), b"CLIENT_ERROR options flags too long\r\n"),
], ids=["no-key", "long-key", "unknown-flag", "bad-C", "duplicate", "long-opaque",
        "too-many-flags"])
def test_md_errors(line, reply):
    check(b"set k 0 0 1\r\nx\r\n" + line + b"\r\nmg k v\r\n",
          b"STORED\r\n" + reply + b"VA 1\r\nx\r\n")


def test_ma_basic():
    check(b"ma k\r\nma k q\r\nset k 0 0 2\r\n10\r\nma k\r\nma k v\r\nma k MD v\r\n"
          b"ma k M- D100 v\r\nma k M+ D5 v\r\nma k MI v\r\nmg k v\r\n",
          b"NF\r\nNF\r\nSTORED\r\nHD\r\nVA 2\r\n12\r\nVA 2\r\n11\r\nVA 1\r\n0\r\nVA 1\r\n5\r\n"
          b"VA 1\r\n6\r\nVA 2\r\n6 \r\n")


def test_ma_quiet():
    check(b"set k 0 0 2\r\n10\r\nma k q\r\nma k v q\r\nma nope q\r\nmn\r\nmg k v\r\n",
          b"STORED\r\nNF\r\nMN\r\nVA 2\r\n12\r\n")


def test_ma_vivify():
    check(b"ma k N0 J42 v\r\nma k N0 J42 v\r\nma j N30 v t c\r\n",
          b"VA 2\r\n42\r\nVA 2\r\n43\r\nVA 1 t30 c3\r\n0\r\n")


def test_ma_ttl_and_cas():
    check(b"set k 0 0 1\r\n5\r\nma k t v c\r\nma k T30 t v\r\nma k C99 v\r\nma k C3 v c\r\n"
          b"ma k C0 v\r\n",
          b"STORED\r\nVA 1 t-1 c2\r\n6\r\nVA 1 t30\r\n7\r\nEX\r\nVA 1 c4\r\n8\r\nVA 1\r\n9\r\n")


def test_ma_new_cas():
    check(b"set k 0 0 1\r\n5\r\nma k E77 c\r\nmg k c\r\n", b"STORED\r\nHD c77\r\nHD c77\r\n")


@pytest.mark.parametrize("flags, reply", [
    (b"k O1 v", b"VA 1 kk O1\r\n6\r\n"),
    (b"O2 k", b"HD O2 kk\r\n"),
    (b"O3", b"HD O3\r\n"),
    (b"k", b"HD kk\r\n"),
    (b"c O4 t k", b"HD c2 O4 t-1 kk\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_ma_echoes_key_and_opaque_once(flags, reply):
    check(b"set k 0 0 1\r\n5\r\nma k " + flags + b"\r\n", b"STORED\r\n" + reply)


def test_ma_wraps_and_stops_at_zero():
    check(b"set k 0 0 20\r\n18446744073709551615\r\nma k v\r\nmg k v\r\nma k MD D5 v\r\n",
          b"STORED\r\nVA 1\r\n0\r\nVA 20\r\n0                   \r\nVA 1\r\n0\r\n")


def test_ma_base64_key():
    check(b"set k 0 0 1\r\n5\r\nma " + b64(b"k") + b" b v k\r\n",
          b"STORED\r\nVA 1 k" + b64(b"k") + b" b\r\n6\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"ma", b"ERROR\r\n"),
    (b"ma " + b"k" * 251, BAD_FORMAT),
    (b"ma k Dabc", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k D-1", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k Jabc N0", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k MX", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    (b"ma k Mxx", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k zz", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k Md", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    (b"ma k v v", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma k " + b" ".join([b"v"] * 30), b"CLIENT_ERROR options flags too long\r\n"),
    (b"ma s q", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
], ids=["no-key", "long-key", "bad-D", "negative-D", "bad-J", "bad-mode", "long-mode",
        "unknown-flag", "lowercase-mode", "duplicate", "too-many-flags",
        "non-numeric"])
def test_ma_errors(line, reply):
    check(b"set k 0 0 1\r\n5\r\nset s 0 0 1\r\nx\r\n" + line + b"\r\nmg k v\r\n",
          b"STORED\r\nSTORED\r\n" + reply + b"VA 1\r\n5\r\n")


def test_me():
    size = memg.item_cost(b"k", 1)
    check(b"me k\r\nset k 0 0 1\r\nx\r\nme k\r\nget k\r\nme k\r\n",
          b"EN\r\nSTORED\r\n"
          b"ME k exp=-1 la=0 cas=1 fetch=no cls=1 size=%d\r\n"
          b"VALUE k 0 1\r\nx\r\nEND\r\n"
          b"ME k exp=-1 la=0 cas=1 fetch=yes cls=1 size=%d\r\n" % (size, size))


def test_me_does_not_bump():
    check(b"set k 0 0 1\r\nx\r\nme k\r\nmg k h\r\n",
          b"STORED\r\nME k exp=-1 la=0 cas=1 fetch=no cls=1 size=%d\r\nHD h0\r\n"
          % memg.item_cost(b"k", 1))


@pytest.mark.parametrize("line", [b"me", b"me " + b"k" * 251, b"me !!! b"],
                         ids=["no-key", "long-key", "bad-base64"])
def test_me_errors(line):
    check(line + b"\r\nmn\r\n", BAD_FORMAT + b"MN\r\n")


# --------------------------------------------------------------------------
# Access control: -Y, memcached's ASCII authentication
# --------------------------------------------------------------------------

AUTH = b"set any 0 0 12\r\nalice secret\r\n"


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "auth"
    path.write_bytes(b"alice:secret\nbob:pass:word\r\n")
    return str(path)


@pytest.mark.parametrize("line", [
    b"get k", b"version", b"stats", b"mn", b"quit", b"bogus", b"add k 0 0 12",
    b"set k 0 0", b"set k 0 0 x", b"set k 0 0 -1", b"GET / HTTP/1.1", b""])
def test_every_command_before_authenticating_is_refused(auth_file, line):
    check(line + b"\r\n", b"CLIENT_ERROR unauthenticated\r\n", auth_file=auth_file)


def test_a_set_carrying_user_and_password_authenticates(auth_file):
    check(AUTH + b"set k 0 0 1\r\nv\r\nget k\r\nget any\r\n",
          b"STORED\r\nSTORED\r\nVALUE k 0 1\r\nv\r\nEND\r\nEND\r\n", auth_file=auth_file)


@pytest.mark.parametrize("line", [
    b"set any 0 0 12 noreply", b"  set x y z 12", b"set x 0 0 +12", b"set x 0 0 12 extra"])
def test_only_the_length_of_the_authenticating_set_matters(auth_file, line):
    check(line + b"\r\nalice secret\r\nmn\r\n", b"STORED\r\nMN\r\n", auth_file=auth_file)


def test_each_connection_authenticates_for_itself(auth_file):
    session = Session(auth_file=auth_file)
    assert session.send(AUTH + b"mn\r\n") == b"STORED\r\nMN\r\n"
    assert session.send(b"mn\r\n") == b"CLIENT_ERROR unauthenticated\r\n"


@pytest.mark.parametrize("payload, expected", [
    (b"alice wrong!", b"CLIENT_ERROR authentication failure\r\n"),
    (b"alice secret extra", b"STORED\r\n"),
    (b"alice  secret ", b"STORED\r\n"),
    (b"bob pass:word", b"STORED\r\n"),             # a password may hold colons
    (b"bob pass", b"CLIENT_ERROR authentication failure\r\n"),
    (b"carol secret", b"CLIENT_ERROR authentication failure\r\n"),
    (b"alice", b"CLIENT_ERROR bad authentication token format\r\n"),
    (b"alice:secret", b"CLIENT_ERROR bad authentication token format\r\n"),
    (b"alice\tsecret", b"CLIENT_ERROR bad authentication token format\r\n"),
    (b"alice\0secret", b"CLIENT_ERROR bad authentication token format\r\n"),
    (b"", b"CLIENT_ERROR bad authentication token format\r\n"),
], ids=["wrong-password", "extra-token", "spaces", "colon-in-password", "prefix",
        "unknown-user", "no-password", "colon", "tab", "nul", "empty"])
def test_credentials(auth_file, payload, expected):
    check(b"set k 0 0 %d\r\n%s\r\n" % (len(payload), payload), expected,
          auth_file=auth_file)


def test_failure_leaves_the_connection_unauthenticated_but_open(auth_file):
    check(b"set k 0 0 5\r\nalice\r\nmn\r\n" + AUTH + b"mn\r\n",
          b"CLIENT_ERROR bad authentication token format\r\n"
          b"CLIENT_ERROR unauthenticated\r\nSTORED\r\nMN\r\n", auth_file=auth_file)


def test_credentials_must_end_with_crlf(auth_file):
    check(b"set k 0 0 12\r\nalice secretXXmn\r\n",
          b"CLIENT_ERROR bad command line termination\r\nCLIENT_ERROR unauthenticated\r\n",
          auth_file=auth_file)


@pytest.mark.parametrize("length", [16 * 1024, 4294967295])
def test_credentials_longer_than_memcached_reads_close_the_connection(auth_file, length):
    check(b"set k 0 0 %d\r\n" % length + b"a" * 20000, b"", auth_file=auth_file)


def test_authentications_are_counted(auth_file):
    session = Session(auth_file=auth_file)
    session.send(b"set k 0 0 9\r\nalice bad\r\n")
    reply = session.send(AUTH + b"stats\r\nstats settings\r\n")
    assert b"STAT auth_cmds 2\r\n" in reply
    assert b"STAT auth_errors 1\r\n" in reply
    assert b"STAT auth_enabled_ascii %s\r\n" % auth_file.encode() in reply


def test_stats_reset_zeroes_every_counter_and_leaves_the_gauges(auth_file):
    session = Session(auth_file=auth_file)
    watcher = session.connect()
    assert converse(watcher, AUTH + b"watch fetchers\r\n", end=False) == b"STORED\r\nOK\r\n"
    session.send(b"set k 0 0 9\r\nalice bad\r\n")
    session.send(AUTH + b"get k\r\nlru_crawler crawl all\r\n")
    counters = ("auth_cmds", "auth_errors", "lru_crawler_starts", "log_worker_written",
                "log_watcher_sent", "cmd_get", "get_misses")
    login = len(b"STORED\r\n")
    before = parse_stats(session.send(AUTH + b"stats\r\n")[login:])
    # (two crawls: the maintainer's first, as the server starts, and the one asked for)
    assert [before[name] for name in counters] == ["4", "1", "2", "1", "1", "1", "1"]
    after = parse_stats(session.send(AUTH + b"stats reset\r\nstats\r\n")[login + 7:])
    assert [after[name] for name in counters] == ["0"] * len(counters)
    assert after["log_watchers"] == "1"


def test_stats_conns_counts_the_seconds_ticked_since_the_last_command():
    # As memcached's clock, which ticks once a second: a command just before the
    # last tick was a second ago, though less than a second has passed (t/stats-conns.t
    # sleeps a second between a command and stats conns, and expects at least 1).
    session = Session()
    protocol = session.connect()
    assert session.server.service.open_connection(protocol)
    protocol.last_command = int(time.monotonic()) - 0.001
    rows = dict(session.server.service.connection_stats())
    assert rows["%d:secs_since_last_cmd" % protocol.fd] == 1


def test_without_an_auth_file_a_set_of_credentials_is_just_a_set():
    check(AUTH + b"get any\r\n", b"STORED\r\nVALUE any 0 12\r\nalice secret\r\nEND\r\n")


@pytest.mark.parametrize("content, message", [
    (b"alice\n", "line 1: expected user:password"),
    (b"alice:x\n\nbob:y\n", "line 2: expected user:password"),
    (b":nouser\n", "line 1: expected user:password"),
    (b"", "has no user:password line"),
])
def test_unusable_auth_files_are_refused(tmp_path, content, message):
    path = tmp_path / "auth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        memg.Server(port=0, auth_file=str(path))


def test_missing_auth_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read the auth file"):
        memg.Server(port=0, auth_file=str(tmp_path / "missing"))


# --------------------------------------------------------------------------
# Everything else: flush_all version verbosity cache_memlimit quit shutdown stats
# lru_crawler
# --------------------------------------------------------------------------

def test_flush_all():
    check(b"set k 0 0 1\r\nx\r\nflush_all\r\nget k\r\nset k 0 0 1\r\ny\r\nget k\r\n",
          b"STORED\r\nOK\r\nEND\r\nSTORED\r\nVALUE k 0 1\r\ny\r\nEND\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"flush_all 0", b"OK\r\n"),
    (b"flush_all -1", b"OK\r\n"),
    (b"flush_all noreply", b""),
    (b"flush_all 0 noreply", b""),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_flush_all_now(line, reply):
    check(b"set k 0 0 1\r\nx\r\n" + line + b"\r\nget k\r\n", b"STORED\r\n" + reply + b"END\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"flush_all abc", b"CLIENT_ERROR invalid exptime argument\r\n"),
    (b"flush_all abc noreply", b""),
    (b"flush_all 1 2 3", b"ERROR\r\n"),
    (b"flush_all 10 2", b"OK\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_flush_all_errors(line, reply):
    check(b"set k 0 0 1\r\nx\r\n" + line + b"\r\nget k\r\n",
          b"STORED\r\n" + reply + b"VALUE k 0 1\r\nx\r\nEND\r\n")


def test_flush_all_delayed():
    session = Session()
    assert session.send(b"set a 0 0 1\r\nx\r\nflush_all 10\r\nget a\r\n") == \
        b"STORED\r\nOK\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
    session.advance(10)
    assert session.send(b"get a\r\nset b 0 0 1\r\ny\r\n") == b"END\r\nSTORED\r\n"
    session.advance(100)
    assert session.send(b"get b\r\n") == b"VALUE b 0 1\r\ny\r\nEND\r\n"


def test_flush_all_delayed_noreply():
    session = Session()
    assert session.send(b"set a 0 0 1\r\nx\r\nflush_all 10 noreply\r\nget a\r\n") == \
        b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
    session.advance(10)
    assert session.send(b"get a\r\n") == b"END\r\n"


def test_flush_all_disabled():
    check(b"set k 0 0 1\r\nx\r\nflush_all\r\nget k\r\n",
          b"STORED\r\nCLIENT_ERROR flush_all not allowed\r\nVALUE k 0 1\r\nx\r\nEND\r\n",
          flush_enabled=False)


def test_version():
    check(b"version\r\nversion x\r\n", b"VERSION %s\r\n" % memg.VERSION.encode() * 2)


@pytest.mark.parametrize("line, reply, level", [
    (b"verbosity 1", b"OK\r\n", 1),
    (b"verbosity 0", b"OK\r\n", 0),
    (b"verbosity 1 2", b"OK\r\n", 1),
    (b"verbosity 1 noreply", b"", 1),
    (b"verbosity noreply", b"", 0),
    (b"verbosity abc", BAD_FORMAT, 0),
    (b"verbosity -1", BAD_FORMAT, 0),
    (b"verbosity abc noreply", b"", 0),
    (b"verbosity", b"ERROR\r\n", 0),
    (b"verbosity 1 2 3", b"ERROR\r\n", 0),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_verbosity(line, reply, level):
    session = Session()
    assert session.send(line + b"\r\nmn\r\n") == reply + b"MN\r\n"
    assert session.server.settings.verbose == level


@pytest.mark.parametrize("line, reply", [
    (b"cache_memlimit 100", b"OK\r\n"),
    (b"cache_memlimit 100 noreply", b""),
    (b"cache_memlimit 7", b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"),
    (b"cache_memlimit 10000000000",
     b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"),
    (b"cache_memlimit abc", b"ERROR\r\n"),
    (b"cache_memlimit", b"ERROR\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_cache_memlimit(line, reply):
    check(line + b"\r\nmn\r\n", reply + b"MN\r\n")


def test_cache_memlimit_changes_the_limit():
    session = Session()
    session.send(b"cache_memlimit 100\r\n")
    assert session.server.store.memory_limit == 100 * MB


@pytest.mark.parametrize("line", [b"quit", b"quit now"])
def test_quit(line):
    proto = Session().connect()
    assert proto.receive_data(b"mn\r\n" + line + b"\r\nmn\r\n") == b"MN\r\n"
    assert proto.closing


@pytest.mark.parametrize("line", [b"shutdown", b"shutdown graceful", b"shutdown foo"])
def test_shutdown_not_enabled(line):
    session = Session()
    assert session.send(line + b"\r\nmn\r\n") == b"ERROR: shutdown not enabled\r\nMN\r\n"
    assert not session.server.engine.stopping


@pytest.mark.parametrize("line", [b"shutdown", b"shutdown graceful"])
def test_shutdown(line):
    session = Session(enable_shutdown=True)
    assert session.send(line + b"\r\nmn\r\n") == b""
    assert session.server.engine.stopping


def test_shutdown_bad_mode():
    session = Session(enable_shutdown=True)
    assert session.send(b"shutdown foo\r\nmn\r\n") == \
        b"CLIENT_ERROR invalid shutdown mode\r\nMN\r\n"
    assert not session.server.engine.stopping


def parse_stats(reply):
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""]
    stats = {}
    for line in lines[:-2]:
        word, name, value = line.split(b" ", 2)
        assert word == b"STAT"
        stats[name.decode()] = value.decode()
    return stats


def test_stats():
    session = Session()
    session.send(b"set a 0 0 1\r\nx\r\nset b 0 0 2\r\nyy\r\nget a nope\r\nincr a 1\r\n")
    stats = parse_stats(session.send(b"stats\r\n"))
    assert stats["version"] == memg.VERSION
    assert int(stats["pid"]) > 0
    expected = {"cmd_get": "2", "cmd_set": "2", "get_hits": "1", "get_misses": "1",
                "incr_misses": "0", "incr_hits": "0", "curr_items": "2", "total_items": "2",
                "limit_maxbytes": str(64 * MB), "evictions": "0", "threads": "4",
                "bytes": str(memg.item_cost(b"a", 1) + memg.item_cost(b"b", 2))}
    assert {name: stats[name] for name in expected} == expected
    assert list(stats)[:4] == ["pid", "uptime", "time", "version"]


def test_stats_reset():
    session = Session()
    session.send(b"set a 0 0 1\r\nx\r\nget a\r\n")
    assert session.send(b"stats reset\r\n") == b"RESET\r\n"
    stats = parse_stats(session.send(b"stats\r\n"))
    assert (stats["cmd_get"], stats["get_hits"], stats["cmd_set"]) == ("0", "0", "0")
    assert stats["curr_items"] == "1"


def test_stats_settings():
    stats = parse_stats(run(b"stats settings\r\n", memory_limit=32 * MB, item_size_max=2 * MB))
    assert stats["maxbytes"] == str(32 * MB)
    assert stats["item_size_max"] == str(2 * MB)
    assert stats["evictions"] == "on"
    assert stats["cas_enabled"] == "yes"
    assert list(stats)[:2] == ["maxbytes", "maxconns"]


# Items in three slab classes: two of 1 (96-byte chunks), one of 4 (192), one large
# item of 700,000 bytes in class 39, whose chunks are a header in class 2 (120), a
# 512 KB chunk and the rest in class 35 (202,152: five to a page).
ITEMS_IN_CLASSES = (b"set a 0 0 1\r\nx\r\nset b 5 0 10\r\n0123456789\r\n"
                    b"set c 0 0 100\r\n" + b"c" * 100 + b"\r\n"
                    b"set big 1 0 700000\r\n" + b"x" * 700000 + b"\r\n")


def test_stats_items():
    assert run(b"stats items\r\n") == b"END\r\n"
    session = Session(lru_maintainer=False)          # (one LRU: no sub-LRUs' figures)
    session.send(ITEMS_IN_CLASSES)
    session.advance(3)
    session.send(b"get a\r\n")
    assert session.send(b"stats items\r\n") == b"".join(
        b"STAT items:%d:%s %d\r\n" % (slab, name, value)
        for slab, number, age, requested in [
            (1, 2, 3, 48 + 2 + 3 + 8 + 48 + 2 + 4 + 12 + 8), (4, 1, 3, 48 + 2 + 102 + 8),
            (39, 1, 3, 700066)]
        for name, value in [
            (b"number", number), (b"age", age), (b"mem_requested", requested),
            (b"evicted", 0), (b"evicted_nonzero", 0), (b"evicted_time", 0),
            (b"outofmemory", 0), (b"tailrepairs", 0), (b"reclaimed", 0),
            (b"expired_unfetched", 0), (b"evicted_unfetched", 0), (b"crawler_reclaimed", 0),
            (b"crawler_items_checked", 0), (b"lrutail_reflocked", 0)]) + b"END\r\n"


def test_stats_items_count_evictions_per_class_until_a_reset():
    # t/issue_22.t's items, in memg's memory: 66,560 bytes are class 31's
    session = Session(memory_limit=2 * MB, item_size_max=1 * MB)
    value = b"B" * 66560
    for i in range(40):
        assert session.send(b"set key%d 0 0 66560\r\n%s\r\n" % (i, value)) == b"STORED\r\n"
    stats = parse_stats(session.send(b"stats items\r\n"))
    kept = int(stats["items:31:number"])
    assert int(stats["items:31:evicted"]) == 40 - kept > 0
    assert stats["items:31:evicted_unfetched"] == stats["items:31:evicted"]
    assert session.send(b"stats reset\r\n") == b"RESET\r\n"
    stats = parse_stats(session.send(b"stats items\r\n"))
    assert (stats["items:31:number"], stats["items:31:evicted"]) == (str(kept), "0")
    for i in range(40, 50):
        session.send(b"set key%d 0 0 66560\r\n%s\r\n" % (i, value))
    assert parse_stats(session.send(b"stats items\r\n"))["items:31:evicted"] == "10"


def test_stats_slabs():
    assert run(b"stats slabs\r\n") == b"STAT active_slabs 0\r\nSTAT total_malloced 0\r\nEND\r\n"
    reply = run(ITEMS_IN_CLASSES + b"stats slabs\r\n")
    assert reply.startswith(b"STORED\r\n" * 4)
    # The pages memcached would take for these chunks, one at least per class.
    assert reply[len(b"STORED\r\n" * 4):] == b"".join(
        b"STAT %d:%s %d\r\n" % (slab, name, value)
        for slab, size, used, sets in [(1, 96, 2, 2), (2, 120, 1, 0), (4, 192, 1, 1),
                                       (35, 202152, 1, 0), (39, 524288, 1, 1)]
        for name, value in [
            (b"chunk_size", size), (b"chunks_per_page", MB // size), (b"total_pages", 1),
            (b"total_chunks", MB // size), (b"used_chunks", used),
            (b"free_chunks", MB // size - used), (b"free_chunks_end", 0),
            (b"get_hits", 0), (b"cmd_set", sets)] + [
            (name, 0) for name in (b"delete_hits", b"incr_hits", b"decr_hits", b"cas_hits",
                                   b"cas_badval", b"touch_hits")]
    ) + b"STAT active_slabs 5\r\nSTAT total_malloced %d\r\nEND\r\n" % (5 * MB)


def test_stats_slabs_count_the_pages_items_fill():
    session = Session()
    # class 31: 82,792-byte chunks, 12 to a page
    for i in range(25):
        session.send(b"set key%d 0 0 66560\r\n%s\r\n" % (i, b"B" * 66560))
    stats = parse_stats(session.send(b"stats slabs\r\n"))
    assert (stats["31:total_pages"], stats["31:total_chunks"], stats["31:used_chunks"],
            stats["31:free_chunks"]) == ("3", "36", "25", "11")
    assert stats["total_malloced"] == str(3 * MB)
    for i in range(13):
        session.send(b"delete key%d\r\n" % i)
    stats = parse_stats(session.send(b"stats slabs\r\n"))    # memg frees as items go
    assert (stats["31:total_pages"], stats["31:used_chunks"]) == ("1", "12")
    assert stats["total_malloced"] == str(MB)


def test_stats_sizes():
    check(b"stats sizes\r\n", b"STAT sizes_status disabled\r\nEND\r\n")


@pytest.mark.parametrize("line, reply", [
    (b"stats foo", b"ERROR\r\n"),
    (b"stats detail", b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"),
    (b"stats cachedump", b"CLIENT_ERROR bad command line\r\n"),
    (b"stats cachedump 1", b"CLIENT_ERROR bad command line\r\n"),
    (b"stats cachedump a b", BAD_FORMAT),
    (b"stats cachedump 64 0", b"CLIENT_ERROR Illegal slab id\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_stats_errors(line, reply):
    check(line + b"\r\nmn\r\n", reply + b"MN\r\n")


def test_stats_detail_counts_per_prefix_while_on():
    # memcached 1.6.18's t/stats-detail.t, in one conversation.
    session = Session()
    assert session.send(b"stats detail dump\r\nstats detail on\r\n") == b"END\r\nOK\r\n"
    session.send(b"set foo:123 0 0 6\r\nfooval\r\nset bar 0 0 1\r\nx\r\n"
                 b"get foo:123 foo:124 bar\r\ndelete foo:125\r\n")
    assert session.send(b"stats detail dump\r\n") == (
        b"PREFIX foo get 2 hit 1 set 1 del 1\r\nEND\r\n")       # bar: no prefix
    assert parse_stats(session.send(b"stats settings\r\n"))["detail_enabled"] == "yes"
    assert session.send(b"stats reset\r\nstats detail dump\r\n") == b"RESET\r\nEND\r\n"
    assert session.send(b"stats detail off\r\nget foo:1\r\nstats detail dump\r\n") == (
        b"OK\r\nEND\r\nEND\r\n")


def test_stats_detail_delimiter_is_a_setting():
    session = Session(detail_delimiter="/", detail_enabled=True)
    session.send(b"set a/b 0 0 1\r\nx\r\nset a:b 0 0 1\r\nx\r\n")
    assert session.send(b"stats detail dump\r\n") == b"PREFIX a get 0 hit 0 set 1 del 0\r\nEND\r\n"


def test_stats_cachedump():
    # A class's items in COLD, most recently used first: all of them in a flat LRU.
    check(b"set a 0 0 1\r\nx\r\nset b 0 0 3\r\nxyz\r\nset c 0 0 100\r\n" + b"c" * 100 +
          b"\r\nset d 0 0 1\r\nx\r\nstats cachedump 1 0\r\nstats cachedump 1 2\r\n"
          b"stats cachedump 4 0\r\nstats cachedump 2 0\r\n",
          b"STORED\r\n" * 4 + b"ITEM d [1 b; 0 s]\r\nITEM b [3 b; 0 s]\r\nITEM a [1 b; 0 s]\r\n"
          b"END\r\nITEM d [1 b; 0 s]\r\nITEM b [3 b; 0 s]\r\nEND\r\n"
          b"ITEM c [100 b; 0 s]\r\nEND\r\nEND\r\n", lru_maintainer=False)


def test_stats_cachedump_lists_cold_items_alone():
    # As memcached's: in the segmented LRU, new items are in HOT until they cool.
    session = Session()
    session.send(b"set a 0 0 1\r\nx\r\nset b 0 0 1\r\ny\r\n")
    assert session.send(b"stats cachedump 1 0\r\n") == b"END\r\n"
    session.advance(2)
    session.server.service.sweep()      # the maintainer: idle in HOT, COLD empty
    assert session.send(b"stats cachedump 1 0\r\n") == (
        b"ITEM b [1 b; 0 s]\r\nITEM a [1 b; 0 s]\r\nEND\r\n")


def test_stats_cachedump_disabled():
    check(b"stats cachedump 1 0\r\n", b"CLIENT_ERROR stats cachedump not allowed\r\n",
          dump_enabled=False)


@pytest.mark.parametrize("line, reply", [
    (b"lru_crawler crawl all", b"OK\r\n"),
    (b"lru_crawler crawl 1,2", b"OK\r\n"),
    (b"lru_crawler crawl 99", b"BADCLASS invalid class id\r\n"),
    (b"lru_crawler crawl x", b"BADCLASS invalid class id\r\n"),
    (b"lru_crawler sleep 100", b"OK\r\n"),
    (b"lru_crawler sleep x", BAD_FORMAT),
    (b"lru_crawler sleep 2000000", b"CLIENT_ERROR sleep must be one second or less\r\n"),
    (b"lru_crawler tocrawl 5", b"OK\r\n"),
    (b"lru_crawler disable", b"OK\r\n"),
    (b"lru_crawler metadump 99", b"BADCLASS invalid class id\r\n"),
    (b"lru_crawler metadump 2", b"END\r\n"),
    (b"lru_crawler foo", b"ERROR\r\n"),
    (b"lru_crawler", b"ERROR\r\n"),
], ids=lambda v: v.decode() if isinstance(v, bytes) else None)
def test_lru_crawler(line, reply):
    check(line + b"\r\nmn\r\n", reply + b"MN\r\n")


def test_lru_crawler_crawl_reclaims_expired_items():
    session = Session()
    session.send(b"set a 0 5 1\r\nx\r\nset b 0 0 1\r\ny\r\n")
    session.advance(5)
    assert session.send(b"lru_crawler crawl all\r\n") == b"OK\r\n"
    assert list(session.server.store.items) == [b"b"]
    assert parse_stats(session.send(b"stats\r\n"))["crawler_reclaimed"] == "1"


def test_lru_crawler_metadump():
    session = Session()
    now = int(session.clock())
    session.send(b"set caf\xc3\xa9 0 100 1\r\nx\r\nset b 0 0 2\r\nyy\r\nget b\r\n"
                 b"set c 0 0 100\r\n" + b"c" * 100 + b"\r\n")
    small = (b"key=b exp=-1 la=%d cas=2 fetch=yes cls=1 size=%d\n"
             b"key=caf%%C3%%A9 exp=%d la=%d cas=1 fetch=no cls=1 size=%d\n" % (
                 now, memg.item_cost(b"b", 2), now + 100, now, memg.item_cost(b"caf\xc3\xa9", 1)))
    large = b"key=c exp=-1 la=%d cas=3 fetch=no cls=4 size=%d\n" % (
        now, memg.item_cost(b"c", 100))
    assert session.send(b"lru_crawler metadump all\r\n") == large + small + b"END\r\n"
    assert session.send(b"lru_crawler metadump 1\r\n") == small + b"END\r\n"
    assert session.send(b"lru_crawler metadump 2,4\r\n") == large + b"END\r\n"


def test_lru_crawler_metadump_disabled():
    check(b"lru_crawler metadump all\r\n", b"ERROR metadump not allowed\r\n",
          dump_enabled=False)


# --------------------------------------------------------------------------
# memcached-debug's commands (--debug-commands), which its test harness sends
# --------------------------------------------------------------------------

def test_debugtime_moves_the_clock_ahead_under_debug_commands():
    check(b"set k 0 3 1\r\nv\r\ndebugtime 2\r\nget k\r\ndebugtime 1\r\nget k\r\n"
          b"debugtime x\r\n",
          b"STORED\r\nOK\r\nVALUE k 0 1\r\nv\r\nEND\r\nOK\r\nEND\r\nERROR\r\n",
          debug_commands=True)


def test_debugtime_is_unknown_without_debug_commands():
    check(b"set k 0 3 1\r\nv\r\ndebugtime 5\r\nget k\r\n",
          b"STORED\r\nERROR\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
