"""memcached's UDP framing (-U), over raw datagrams, against memg on the suite's engine.

A UDP request is one datagram: an 8-byte frame (request id, sequence number, how
many datagrams the request has, a reserved field), then commands in either protocol
(the first byte chooses).  memcached answers each response of a request (a get's
values one apiece) in datagrams of its own, each with at most 1,392 bytes of data
after a frame that echoes the request id and gives the datagram's sequence number
in the response and the response's count of datagrams; a response with nothing in
it (a quiet binary command's) is a bare frame with a count of 0, unless a datagram
went before it.  It drops a datagram of 8 bytes or less, or whose count is not 1.

What this file shows, each over a real socket: text and binary commands answered
with memcached's frames; a multi-get's responses; a value split over several
datagrams (sequence numbers, the count in every frame, full pieces, reassembly);
quiet binary commands' bare frames; noreply, quit, metadump and watch; the drop
rules; a command a datagram leaves unfinished is forgotten; the datagrams' bytes
counted by ``stats``; ``stats settings`` and ``stats conns`` showing the UDP
socket; an embedded memg.Server with ``udp_port=0``.  test_differential.py sends
the same kind of datagrams to memcached, test_server_hostile.py hostile ones.

The DatagramClient ends each request with a sentinel (``mn`` under a request id of
its own) and takes as the request's replies the datagrams that come before the
sentinel's answer: a server answers the datagrams of one client in the order they
arrive, so a request dropped or answered with nothing shows as no datagram at all.
"""

import os
import re
import socket
import struct

import pytest

from conftest import PROMPTLY, RawClient, embedded, parse_stats, start_memg, stats, wait_for
from test_binary import Op, Status, counter, parse, request, response, store

KB = 1024
MB = 1024 * KB

# A datagram's frame: request id, sequence number, datagrams in all, reserved.
FRAME = struct.Struct(">HHHH")
# The most data a reply datagram carries after its frame (memcached's UDP_DATA_SIZE).
DATA_MAX = 1392
SENTINEL = b"mn\r\n"
NOOP = request(Op.NOOP)


def frame(payload, request_id, sequence=0, count=1, reserved=0):
    """A request datagram: payload behind a frame (by default one of a request of
    one datagram, as memcached takes them)."""
    return FRAME.pack(request_id, sequence, count, reserved) + payload


def bare(request_id):
    """memcached's datagram for an empty response: a frame alone, count 0."""
    return FRAME.pack(request_id, 0, 0, 0)


class DatagramClient:
    """A UDP socket that sends memcached UDP requests to 127.0.0.1:port and reads the
    datagrams that answer each (see the module's docstring); counts the bytes sent
    and received, frames included."""

    def __init__(self, port, timeout=PROMPTLY):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for a reply of a few hundred datagrams before it is read (the system
        # caps this at net.core.rmem_max).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MB)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.last_id = 0x8000          # (its ids run from 0x8001: tests pick lower ones)
        self.sent = self.received = 0

    def new_id(self):
        """A request id this client has not used lately."""
        self.last_id = self.last_id % 0xFFFF + 1
        return self.last_id

    def send(self, datagram):
        self.sock.send(datagram)
        self.sent += len(datagram)

    def receive(self):
        datagram = self.sock.recv(65536)
        self.received += len(datagram)
        return datagram

    def exchange(self, datagram):
        """Send datagram as it is, then the sentinel; the datagrams that answer it."""
        sentinel_id = self.new_id()
        self.send(datagram)
        self.send(frame(SENTINEL, sentinel_id))
        replies = []
        while True:
            reply = self.receive()
            if reply == frame(b"MN\r\n", sentinel_id):
                return replies
            replies.append(reply)

    def ask(self, payload, request_id=None, **fields):
        """The datagrams that answer payload, framed with request_id (a new one by
        default) and fields (sequence, count, reserved)."""
        return self.exchange(frame(payload, self.new_id() if request_id is None
                                   else request_id, **fields))

    def responses(self, payload):
        """The responses to payload (a request of one datagram), each reassembled,
        once their frames have been checked (see ``responses``)."""
        request_id = self.new_id()
        return responses(self.ask(payload, request_id), request_id)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def responses(datagrams, request_id):
    """The responses that datagrams (the answer to one request) carry, each
    reassembled; b"" for a bare frame.  Fails unless every datagram is framed as
    memcached frames it: the request's id, reserved 0, and in each response
    sequence numbers 0, 1, 2 ... up to the count that every frame of it gives, all
    pieces but the last DATA_MAX bytes, none more."""
    found, pieces, count = [], [], None
    for datagram in datagrams:
        assert len(datagram) >= FRAME.size, datagram
        echoed, sequence, total, reserved = FRAME.unpack_from(datagram)
        data = datagram[FRAME.size:]
        assert (echoed, reserved) == (request_id, 0), datagram[:FRAME.size]
        if total == 0:
            assert (sequence, data, pieces) == (0, b"", []), datagram[:40]
            found.append(b"")
            continue
        assert sequence == len(pieces), "datagram %d of a response came as %d" % (
            len(pieces), sequence)
        assert count in (None, total), "the count changed within a response"
        assert 0 < len(data) <= DATA_MAX, len(data)
        count = total
        pieces.append(data)
        if len(pieces) == total:
            assert {len(piece) for piece in pieces[:-1]} <= {DATA_MAX}
            found.append(b"".join(pieces))
            pieces, count = [], None
    assert pieces == [], "a response cut short after %d datagrams" % len(pieces)
    return found


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def udp_port(server):
    """The UDP port a server (a process, or an embedded memg.Server) serves, as its
    ``stats settings`` gives it."""
    return int(stats(server, b"settings")["udpport"])


@pytest.fixture(scope="module")
def udp_server():
    """memg with TCP on a free port and UDP on another (-U -1); at the end it must
    stop cleanly, having said nothing on stderr."""
    server = start_memg("-U", "-1")
    server.udp_port = udp_port(server)
    yield server
    assert server.stop() == (0, b"")


@pytest.fixture
def udp(udp_server):
    """A DatagramClient of the module's server, emptied first."""
    with udp_server.connect() as client:
        assert client.request(b"flush_all\r\n") == b"OK\r\n"
    with DatagramClient(udp_server.udp_port) as client:
        yield client


def tcp_get(server, key):
    """get key over TCP from server (a process or an embedded memg.Server)."""
    with RawClient(server.address) as client:
        return client.request(b"get %s\r\n" % key, b"END\r\n")


# -- the text protocol -------------------------------------------------------------

def test_a_request_is_answered_under_its_id_in_one_datagram(udp):
    request_id = udp.new_id()
    assert udp.ask(b"set k 5 0 3\r\nabc\r\n", request_id) == [frame(b"STORED\r\n", request_id)]
    for request_id in (0, 1, 0x1234, 0xFFFF):
        assert udp.ask(b"get k\r\n", request_id) == [
            frame(b"VALUE k 5 3\r\nabc\r\nEND\r\n", request_id)]


@pytest.mark.parametrize("payload, expected", [
    (b"get k\r\n", [b"VALUE k 5 3\r\nabc\r\nEND\r\n"]),
    (b"get nope\r\n", [b"END\r\n"]),
    (b"add k 0 0 1\r\nx\r\n", [b"NOT_STORED\r\n"]),
    (b"append k 0 0 1\r\nd\r\n", [b"STORED\r\n"]),
    (b"touch k 100\r\n", [b"TOUCHED\r\n"]),
    (b"gat 0 k\r\n", [b"VALUE k 5 3\r\nabc\r\nEND\r\n"]),
    (b"delete k\r\n", [b"DELETED\r\n"]),
    (b"delete nope\r\n", [b"NOT_FOUND\r\n"]),
    (b"set n 0 0 2\r\n10\r\nincr n 5\r\ndecr n 100\r\nincr nope 1\r\n",
     [b"STORED\r\n", b"15\r\n", b"0\r\n", b"NOT_FOUND\r\n"]),
    (b"mg k v\r\nmn\r\n", [b"VA 3\r\nabc\r\n", b"MN\r\n"]),
    (b"bogus\r\n", [b"ERROR\r\n"]),
    (b"set k 0 0 1\r\nabc\r\n", [b"CLIENT_ERROR bad data chunk\r\n", b"ERROR\r\n"]),
], ids=["get", "get-miss", "add", "append", "touch", "gat", "delete", "delete-miss",
        "incr-decr", "meta", "unknown", "bad-chunk"])
def test_text_commands_answer_a_response_each(udp, payload, expected):
    assert udp.responses(b"set k 5 0 3\r\nabc\r\n") == [b"STORED\r\n"]
    assert udp.responses(payload) == expected


def test_gets_gives_the_cas_unique_of_the_value(udp):
    assert udp.responses(b"set k 0 0 1\r\na\r\n") == [b"STORED\r\n"]
    (reply,) = udp.responses(b"gets k\r\n")
    unique = re.fullmatch(rb"VALUE k 0 1 (\d+)\r\na\r\nEND\r\n", reply).group(1)
    assert udp.responses(b"cas k 0 0 1 %s\r\nb\r\ncas k 0 0 1 %s\r\nc\r\n" % (
        unique, unique)) == [b"STORED\r\n", b"EXISTS\r\n"]


def test_noreply_sends_no_datagram(udp, udp_server):
    assert udp.ask(b"set k 0 0 1 noreply\r\nv\r\n") == []
    assert tcp_get(udp_server, b"k") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    assert udp.ask(b"incr k 1 noreply\r\ndelete k noreply\r\nflush_all noreply\r\n") == []
    assert tcp_get(udp_server, b"k") == b"END\r\n"


def test_quit_is_answered_with_a_bare_frame_and_ends_the_datagram(udp, udp_server):
    request_id = udp.new_id()
    assert udp.ask(b"quit\r\nset b 0 0 1\r\n2\r\n", request_id) == [bare(request_id)]
    # (A bare frame only where no datagram went before it.)
    assert udp.responses(b"set a 0 0 1\r\n1\r\nquit\r\nset b 0 0 1\r\n2\r\n") == [
        b"STORED\r\n"]
    assert tcp_get(udp_server, b"b") == b"END\r\n"
    assert udp.responses(b"get a\r\n") == [b"VALUE a 0 1\r\n1\r\nEND\r\n"]


@pytest.mark.parametrize("payload", [b"lru_crawler metadump all\r\n", b"watch\r\n",
                                     b"watch fetchers mutations\r\n"],
                         ids=["metadump", "watch", "watch-kinds"])
def test_metadump_and_watch_send_nothing_and_hold_nothing(udp, udp_server, payload):
    assert udp.responses(b"set k 0 0 1\r\nv\r\n") == [b"STORED\r\n"]
    assert udp.ask(payload) == []
    # Nothing is left running: the crawler is free, and no watcher is counted.
    with udp_server.connect() as client:
        assert client.request(b"lru_crawler metadump all\r\n", b"END\r\n").startswith(
            b"key=k ")
        assert stats(client)["log_watchers"] == "0"


# -- a multi-get ----------------------------------------------------------------------

@pytest.mark.parametrize("keys, expected", [
    (b"a b", [b"VALUE a 1 1\r\n1\r\n", b"VALUE b 2 1\r\n2\r\nEND\r\n"]),
    (b"a nope b", [b"VALUE a 1 1\r\n1\r\n", b"VALUE b 2 1\r\n2\r\nEND\r\n"]),
    (b"nope a", [b"", b"VALUE a 1 1\r\n1\r\nEND\r\n"]),
    (b"a a a", [b"VALUE a 1 1\r\n1\r\n"] * 2 + [b"VALUE a 1 1\r\n1\r\nEND\r\n"]),
    # The END of the last key's response, even when that key missed; an empty first
    # response, a bare frame, even when all missed.
    (b"a nope", [b"VALUE a 1 1\r\n1\r\n", b"END\r\n"]),
    (b"nope other", [b"", b"END\r\n"]),
], ids=["hits", "miss-between", "miss-first", "same-key", "miss-last", "all-miss"])
def test_a_multi_get_answers_each_value_found_in_a_response_of_its_own(udp, keys, expected):
    assert udp.responses(b"set a 1 0 1\r\n1\r\nset b 2 0 1\r\n2\r\n") == [b"STORED\r\n"] * 2
    assert udp.responses(b"get " + keys + b"\r\n") == expected


def test_a_multi_get_of_many_keys_answers_each_found(udp):
    keys = [b"key%d" % number for number in range(100)]
    assert udp.ask(b"".join(b"set %s 0 0 %d noreply\r\n%s\r\n" % (key, len(key), key)
                            for key in keys[::2])) == []
    found = [b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(key), key) for key in keys[::2]]
    assert udp.responses(b"get " + b" ".join(keys[:-1]) + b"\r\n") == (
        found[:-1] + [found[-1] + b"END\r\n"])


# -- replies larger than a datagram ------------------------------------------------------

def reply_of_length(length):
    """(value, the reply to ``get big``) such that the reply has length bytes."""
    size = length - len(b"VALUE big 0 \r\n\r\nEND\r\n")
    size -= len(str(size - len(str(size))))
    value = os.urandom(size).hex().encode()[:size]
    reply = b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (size, value)
    assert len(reply) == length
    return value, reply


# A reply that just fits a datagram, one a byte too long, udp.t's 20,000 bytes, more.
@pytest.mark.parametrize("length", [DATA_MAX, DATA_MAX + 1, 20000, 100000])
def test_a_reply_larger_than_a_datagram_is_split(udp, udp_server, length):
    value, expected = reply_of_length(length)
    with udp_server.connect() as client:
        assert client.request(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) == b"STORED\r\n"
    request_id = udp.new_id()
    datagrams = udp.ask(b"get big\r\n", request_id)
    count = -(-len(expected) // DATA_MAX)
    assert [FRAME.unpack_from(datagram) for datagram in datagrams] == [
        (request_id, sequence, count, 0) for sequence in range(count)]
    assert [len(datagram) for datagram in datagrams[:-1]] == [FRAME.size + DATA_MAX] * (count - 1)
    assert b"".join(datagram[FRAME.size:] for datagram in datagrams) == expected
    assert responses(datagrams, request_id) == [expected]


def test_each_value_of_a_multi_get_is_split_on_its_own(udp, udp_server):
    value = b"v" * 5000
    with udp_server.connect() as client:
        assert client.request(b"set big 0 0 5000\r\n%s\r\nset small 0 0 1\r\ns\r\n"
                              % value, b"STORED\r\nSTORED\r\n") == b"STORED\r\nSTORED\r\n"
    block = b"VALUE big 0 5000\r\n%s\r\n" % value
    assert udp.responses(b"get big small big\r\n") == [
        block, b"VALUE small 0 1\r\ns\r\n", block + b"END\r\n"]


# -- the binary protocol ---------------------------------------------------------------

def packet(udp, payload):
    """The one response packet that answers payload, in one response."""
    (reply,) = udp.responses(payload)
    (answer,) = parse(reply)
    return answer


def test_binary_commands_are_answered_in_binary(udp):
    stored = packet(udp, store(Op.SET, b"k", b"value", flags=5, opaque=9))
    assert (stored.opcode, stored.status, stored.opaque) == (Op.SET, Status.SUCCESS, 9)
    assert stored.cas != 0
    assert udp.responses(request(Op.GET, b"k", opaque=3)) == [response(
        Op.GET, extras=struct.pack(">I", 5), value=b"value", opaque=3, cas=stored.cas)]
    assert packet(udp, request(Op.GET, b"nope")).status == Status.NOT_FOUND
    assert packet(udp, store(Op.SET, b"n", b"10")).status == Status.SUCCESS
    assert packet(udp, counter(Op.INCREMENT, b"n", 5)).value == struct.pack(">Q", 15)
    assert packet(udp, counter(Op.DECREMENT, b"n", 100)).value == struct.pack(">Q", 0)
    assert packet(udp, request(Op.DELETE, b"n")).status == Status.SUCCESS
    assert packet(udp, request(Op.DELETE, b"n")).status == Status.NOT_FOUND
    assert udp.responses(request(Op.NOOP, opaque=4)) == [response(Op.NOOP, opaque=4)]


def test_binary_packets_in_a_datagram_answer_a_response_each(udp):
    replies = udp.responses(store(Op.SET, b"a", b"1") + request(Op.GETK, b"a")
                            + request(Op.GETK, b"nope") + request(Op.NOOP))
    assert [(packet.opcode, packet.status) for reply in replies for packet in parse(reply)] == [
        (Op.SET, Status.SUCCESS), (Op.GETK, Status.SUCCESS), (Op.GETK, Status.NOT_FOUND),
        (Op.NOOP, Status.SUCCESS)]
    assert len(replies) == 4


def test_a_binary_value_larger_than_a_datagram_is_split(udp):
    value = os.urandom(15000)
    assert udp.responses(store(Op.SETQ, b"big", value)) == [b""]
    found = packet(udp, request(Op.GET, b"big"))
    assert (found.status, found.value) == (Status.SUCCESS, value)


@pytest.mark.parametrize("packets, expected", [
    ([store(Op.SETQ, b"q", b"v")], ["bare"]),
    ([request(Op.GETQ, b"nope")], ["bare"]),
    ([request(Op.GETQ, b"nope"), request(Op.GETKQ, b"other"), store(Op.SETQ, b"q", b"v")],
     ["bare"]),
    ([request(Op.GETQ, b"nope"), request(Op.NOOP)], ["bare", Op.NOOP]),
    ([request(Op.GETQ, b"k"), request(Op.GETQ, b"nope")], [Op.GETQ]),
    ([request(Op.GETQ, b"nope"), request(Op.GETQ, b"k")], ["bare", Op.GETQ]),
    ([request(Op.DELETEQ, b"k"), request(Op.GETQ, b"k"), request(Op.NOOP)],
     ["bare", Op.NOOP]),
    ([counter(Op.INCREMENTQ, b"n", initial=3), request(Op.GET, b"n")], ["bare", Op.GET]),
], ids=["setq", "getq-miss", "quiet-misses", "miss-then-noop", "hit-then-miss",
        "miss-then-hit", "deleteq", "incrq"])
def test_quiet_binary_commands_send_a_bare_frame_first(udp, packets, expected):
    assert udp.responses(b"set k 0 0 1\r\nv\r\n") == [b"STORED\r\n"]
    request_id = udp.new_id()
    datagrams = udp.ask(b"".join(packets), request_id)
    shapes = ["bare" if datagram == bare(request_id) else parse(datagram[FRAME.size:])[0].opcode
              for datagram in datagrams]
    assert shapes == expected
    responses(datagrams, request_id)        # (and each is framed as memcached frames it)


def test_binary_quit_ends_the_datagram(udp, udp_server):
    assert [parse(reply)[0].opcode if reply else "bare" for reply in udp.responses(
        store(Op.SET, b"a", b"1") + request(Op.QUIT) + store(Op.SET, b"b", b"2"))] == [
        Op.SET, Op.QUIT]
    assert udp.responses(request(Op.QUITQ)) == [b""]
    assert tcp_get(udp_server, b"b") == b"END\r\n"


@pytest.mark.parametrize("protocol", ["ascii", "binary"])
def test_each_datagram_chooses_its_protocol_whatever_b_says(protocol):
    # As memcached: -B does not apply to UDP.
    port = free_udp_port()
    with embedded(protocol=protocol, udp_port=port):
        with DatagramClient(port) as client:
            assert client.responses(b"get k\r\n") == [b"END\r\n"]
            assert parse(b"".join(client.responses(request(Op.GET, b"k"))))[0].status == (
                Status.NOT_FOUND)


# -- what is dropped --------------------------------------------------------------------

@pytest.mark.parametrize("datagram", [b""] + [frame(b"", 1)[:length] for length in range(1, 9)],
                         ids=lambda datagram: "%d-bytes" % len(datagram))
def test_a_datagram_of_a_frame_or_less_is_dropped(udp, datagram):
    assert udp.exchange(datagram) == []


@pytest.mark.parametrize("count", [0, 2, 3, 0xFFFF])
@pytest.mark.parametrize("sequence", [0, 1])
def test_a_datagram_whose_count_is_not_1_is_dropped_unread(udp, udp_server, count, sequence):
    assert udp.ask(b"set k 0 0 1\r\nv\r\nget k\r\n", count=count, sequence=sequence) == []
    assert udp.ask(request(Op.GET, b"k"), count=count, sequence=sequence) == []
    assert tcp_get(udp_server, b"k") == b"END\r\n"


def test_the_sequence_and_reserved_fields_of_a_request_are_not_checked(udp):
    request_id = udp.new_id()
    assert udp.ask(b"get k\r\n", request_id, sequence=7, reserved=0xABCD) == [
        frame(b"END\r\n", request_id)]


@pytest.mark.parametrize("payload", [
    b"mn\r\nset k 0 0 10\r\nabc", b"mn\r\nget k", b"mn\r\nset k 0 0 5",
    NOOP + store(Op.SET, b"k", b"value")[:-2], NOOP + request(Op.GET, b"key")[:26],
    NOOP + NOOP[:20]],
    ids=["text-value", "text-line", "text-line-of-a-set", "binary-value", "binary-key",
         "binary-header"])
def test_a_command_left_unfinished_is_forgotten_with_its_datagram(udp, udp_server, payload):
    assert udp.responses(payload) == [b"MN\r\n" if payload.startswith(b"mn") else
                                      response(Op.NOOP)]
    # Nothing of it waits for the next datagram, which is read on its own.
    assert udp.responses(b"defgh\r\n") == [b"ERROR\r\n"]
    assert udp.responses(b"\r\n") == [b"ERROR\r\n"]
    assert tcp_get(udp_server, b"k") == b"END\r\n"


# -- what the server reports ---------------------------------------------------------------

def test_stats_count_the_datagrams_bytes_and_their_commands(udp, udp_server):
    def alone(client):
        """A stats reply once this client is the only one (so that no client that
        closed just before, the fixture's, is counted in between); else None."""
        reply = client.request(b"stats\r\n", b"END\r\n")
        return reply if parse_stats(reply)["curr_connections"] == "1" else None

    with udp_server.connect() as client:
        first = wait_for(lambda: alone(client), what="the other clients to close")
        before = parse_stats(first)
        udp.sent = udp.received = 0
        assert udp.responses(b"set k 0 0 3000\r\n" + b"x" * 3000 + b"\r\nget nope k\r\n"
                             b"mn\r\n") == [b"STORED\r\n", b"VALUE k 0 3000\r\n"
                                            + b"x" * 3000 + b"\r\nEND\r\n", b"MN\r\n"]
        after = stats(client)
    # Each datagram whole, frames included, as memcached counts them; the TCP
    # client's second stats line and first stats reply are counted too.
    assert int(after["bytes_read"]) - int(before["bytes_read"]) == udp.sent + len(b"stats\r\n")
    assert int(after["bytes_written"]) - int(before["bytes_written"]) == (
        udp.received + len(first))
    for name, more in (("cmd_get", 2), ("get_hits", 1), ("get_misses", 1), ("cmd_set", 1),
                       ("curr_connections", 0)):
        assert int(after[name]) - int(before[name]) == more, name


def test_stats_show_the_udp_port(udp_server):
    with udp_server.connect() as client:
        settings = stats(client, b"settings")
        conns = stats(client, b"conns")
    assert (settings["tcpport"], settings["udpport"]) == (
        str(udp_server.port), str(udp_server.udp_port))
    (udp_fd,) = [name.split(":")[0] for name, value in conns.items() if value == "UDP"]
    assert {name.split(":")[1]: value for name, value in conns.items()
            if name.startswith(udp_fd + ":")} == {
        "UDP": "UDP", "addr": "udp:127.0.0.1:%d" % udp_server.udp_port, "state": "conn_read",
        "secs_since_last_cmd": "0"}


def test_stats_over_udp_are_split_as_one_response(udp):
    (reply,) = udp.responses(b"stats\r\n")
    assert parse_stats(reply)["pid"]
    (reply,) = udp.responses(b"stats settings\r\n")
    assert parse_stats(reply)["udpport"] == str(udp.sock.getpeername()[1])


# -- an embedded server -------------------------------------------------------------------

def test_an_embedded_server_serves_udp_on_a_free_port_until_stopped():
    with embedded(udp_port=0) as server:
        port = udp_port(server)
        assert port != 0
        with DatagramClient(port) as client:
            assert client.responses(b"set k 0 0 1\r\nv\r\n") == [b"STORED\r\n"]
        assert tcp_get(server, b"k") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    # Stopped: the port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
