"""The engines move bytes between sockets and the protocol.

Every test runs against an embedded server on the suite's engine (conftest.ENGINE:
a thread per connection, or asyncio on uvloop or on the standard library's loop),
over real loopback sockets, with real clients that read, do not read, or go away
half-way: replies leave whole, in order and together; input in any pieces is
reassembled; an ending, an error or a stop closes what it must and only that; a
client that reads nothing costs a bounded amount; watchers and streamed dumps are
fed as their clients read.

Bounds on time tell "promptly" from "hangs", never fast from slow.
"""

import concurrent.futures
import contextlib
import os
import re
import socket
import struct
import time
import urllib.parse

import pytest

import memg
from conftest import ENGINE, PROMPTLY, RawClient, embedded, stats, wait_for


@pytest.fixture
def server():
    server = embedded().start()
    yield server
    server.stop()


def protocol_of(server, client):
    """The server's TextProtocol for a RawClient (once the engine has accepted it)."""
    name = client.sock.getsockname()
    return wait_for(lambda: next((protocol for protocol in list(server.service.connections)
                                  if protocol.peer == name), None),
                    what="the server to accept the client")


def server_socket(protocol):
    """A duplicate of the server's socket for a protocol's client: close it after use
    (the server's own stays open)."""
    return socket.socket(fileno=os.dup(protocol.fd))


# Where struct tcp_info (linux/tcp.h) keeps tcpi_segs_out: after 8 bytes of u8 fields,
# 24 u32s and 4 u64s.
TCP_INFO_SEGS_OUT = 8 + 24 * 4 + 4 * 8


def segments_sent(protocol):
    """TCP segments the kernel has sent on the server's socket for this client."""
    with server_socket(protocol) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, TCP_INFO_SEGS_OUT)[0]


def in_loop(server, function):
    """function() run in the asyncio engine's loop thread, where its connections
    live, and its result."""
    future = concurrent.futures.Future()

    def call():
        try:
            future.set_result(function())
        except BaseException as error:
            future.set_exception(error)

    # (start() returns before the engine's thread has made its loop.)
    wait_for(lambda: server.engine.loop, what="the engine's loop")
    server.engine.loop.call_soon_threadsafe(call)
    return future.result(PROMPTLY)


def write_buffered(server):
    """Bytes the asyncio engine's transports hold unsent, over every connection."""
    return in_loop(server, lambda: sum(connection.transport.get_write_buffer_size()
                                       for connection in server.engine.connections))


def value_reply(key, value):
    return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value)


# -- replies ----------------------------------------------------------------------

def test_replies_to_pipelined_commands_arrive_in_order(server):
    with RawClient(server.address) as client:
        client.send(b"set a 0 0 1\r\n1\r\n" + b"get a\r\nget nothing\r\n" * 50
                    + b"delete a\r\nget a\r\n")
        expected = (b"STORED\r\n" + (value_reply(b"a", b"1") + b"END\r\n") * 50
                    + b"DELETED\r\nEND\r\n")
        assert client.recv_exact(len(expected)) == expected


def test_replies_to_commands_that_arrived_together_leave_together(server):
    """A turn's replies (-R's commands in a row, 20) in one segment: the engine
    sends a batch's replies with one write, not one write per reply (as the TCP
    segments of the server's socket show; a pure ACK of the request may go first,
    so two at most)."""
    turn = server.settings.reqs_per_event
    with RawClient(server.address) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert client.request(b"set a 0 0 1\r\n1\r\n") == b"STORED\r\n"
        protocol = protocol_of(server, client)
        before = segments_sent(protocol)
        client.send(b"get a\r\n" * turn)
        assert client.recv_exact(turn * len(value_reply(b"a", b"1"))) == value_reply(
            b"a", b"1") * turn
        assert segments_sent(protocol) - before <= 2
        # Whereas replies to commands that come one at a time leave one at a time.
        before = segments_sent(protocol)
        for _ in range(5):
            assert client.request(b"get a\r\n", b"END\r\n") == value_reply(b"a", b"1")
        assert segments_sent(protocol) - before >= 5


def test_a_reply_larger_than_the_socket_holds_arrives_whole_and_in_order(server):
    value = bytes(range(256)) * 4096                  # 1 MiB, four times
    server.store.store(memg.SET, b"big", value)
    with RawClient(server.address, receive_buffer=4096) as client:
        client.send(b"get big\r\n" * 4 + b"version\r\n")
        time.sleep(0.2)                               # the server fills the socket, waits
        expected = value_reply(b"big", value) * 4
        assert client.recv_exact(len(expected)) == expected
        assert client.recv_until().startswith(b"VERSION ")


def test_a_send_takes_what_the_socket_holds_and_the_rest_waits(server):
    """Threads: the engine's send (the C library's, without waiting) takes what the
    socket holds and returns at once; sendall waits for the rest in the client's
    thread.  asyncio: the transport keeps the rest, the loop serves others."""
    if ENGINE == "threads":
        ours, theirs = socket.socketpair()
        with ours, theirs:
            data = b"x" * (8 * 1024 * 1024)           # more than a socket pair buffers
            sent = server.engine.send(theirs.fileno(), data, len(data),
                                      server.engine.send_flags)
            assert 0 < sent < len(data)
            assert server.engine.send(-1, data, len(data), server.engine.send_flags) <= 0
        return
    value = b"v" * 1000000
    server.store.store(memg.SET, b"big", value)
    # 8 MB: more than the kernel's buffers of a loopback connection hold.
    expected = b"VALUE big 0 %d\r\n%s\r\n" % (len(value), value) * 8 + b"END\r\n"
    with RawClient(server.address, receive_buffer=4096) as slow, \
            RawClient(server.address) as other:
        slow.send(b"get" + b" big" * 8 + b"\r\n")
        assert wait_for(lambda: write_buffered(server) > 0, what="a reply held back")
        assert other.request(b"version\r\n").startswith(b"VERSION ")
        assert slow.recv_exact(len(expected)) == expected
        assert wait_for(lambda: write_buffered(server) == 0, what="the rest sent")


# -- input --------------------------------------------------------------------------

def test_a_value_split_across_many_packets_is_reassembled(server):
    value = bytes(range(256)) * 1000
    with RawClient(server.address) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"set big 0 0 %d\r\n" % len(value))
        for start in range(0, len(value), 7001):
            client.send(value[start:start + 7001])
        client.send(b"\r\nget big\r\n")
        expected = b"STORED\r\n" + value_reply(b"big", value)
        assert client.recv_exact(len(expected)) == expected


def test_a_command_line_split_byte_by_byte_is_reassembled(server):
    with RawClient(server.address) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"set k 0 0 2\r\nab\r\nget k\r\n":
            client.send(bytes([byte]))
        expected = b"STORED\r\n" + value_reply(b"k", b"ab")
        assert client.recv_exact(len(expected)) == expected


def test_eof_in_the_middle_of_a_value_stores_nothing_and_ends_quietly(server, capfd):
    with RawClient(server.address) as client:
        assert client.request(b"version\r\n").startswith(b"VERSION ")
        client.send(b"set half 0 0 100\r\n" + b"x" * 50)
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_to_eof() == b""
    assert wait_for(lambda: not server.service.connections, what="the connection to end")
    assert server.store.get(b"half") is None
    assert capfd.readouterr().err == ""


def test_quit_closes_after_sending_earlier_replies(server):
    with RawClient(server.address) as client:
        client.send(b"set a 0 0 1\r\n1\r\nquit\r\nget a\r\n")
        assert client.read_to_eof() == b"STORED\r\n"
    assert wait_for(lambda: not server.service.connections, what="the connection to end")


def test_an_internal_error_closes_only_that_connection(server, monkeypatch, capfd):
    def broken(self, tokens):
        raise RuntimeError("a bug")

    monkeypatch.setitem(memg.TextProtocol.COMMANDS, b"version", (broken, 1, 1))
    with RawClient(server.address) as other, RawClient(server.address) as victim:
        assert other.request(b"set a 0 0 1\r\n1\r\n") == b"STORED\r\n"
        victim.send(b"get a\r\nversion\r\nget a\r\n")
        assert victim.read_to_eof() == value_reply(b"a", b"1") + memg.INTERNAL_ERROR
        assert other.request(b"get a\r\n", b"END\r\n") == value_reply(b"a", b"1")
        assert wait_for(lambda: len(server.service.connections) == 1,
                        what="the broken connection to end")
    err = capfd.readouterr().err
    assert "RuntimeError: a bug" in err and "Traceback" in err


def test_client_sockets_have_nagle_turned_off(server):
    with RawClient(server.address) as client:
        assert client.request(b"version\r\n").startswith(b"VERSION ")
        with server_socket(protocol_of(server, client)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# -- a client that does not read ----------------------------------------------------

def test_a_client_that_does_not_read_holds_a_bounded_amount(server, monkeypatch):
    value = b"v" * 10000
    reply = len(value_reply(b"big", value))
    with RawClient(server.address) as greedy, RawClient(server.address) as other:
        assert greedy.request(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) == (
            b"STORED\r\n")
        protocol = protocol_of(server, greedy)
        # The most output the protocol ever hands its engine at once: a recording
        # wrapper around what the engine takes, which changes nothing.
        largest = [0]

        def take_output(take=protocol.take_output):
            data = take()
            largest[0] = max(largest[0], len(data))
            return data

        monkeypatch.setattr(protocol, "take_output", take_output)
        # 7,000 pipelined gets: 70 MB of replies that the client never reads.
        greedy.send(b"get big\r\n" * 7000)

        # Until the server stops making replies for it.
        settled = None
        while settled != protocol.bytes_written:
            settled = protocol.bytes_written
            time.sleep(0.3)
        assert memg.OUTPUT_LIMIT < settled < 7000 * reply / 2
        assert 0 < largest[0] <= memg.OUTPUT_LIMIT + reply
        if ENGINE != "threads":
            # The transport stops taking replies over its high-water mark.
            assert write_buffered(server) <= 2 * memg.OUTPUT_LIMIT + reply
        assert other.request(b"version\r\n").startswith(b"VERSION ")
        stopping = time.monotonic()
        server.stop()
        assert time.monotonic() - stopping < PROMPTLY
        assert other.is_closed(PROMPTLY)


# -- watchers and streamed dumps ---------------------------------------------------------

def test_watchers_get_a_fetch_event_promptly_and_stop_ends_them(server):
    """Each watcher gets its own events, however the engine accepted them: these
    connect while a long multi-get (0.1 s of work) keeps the server busy, so that an
    event loop accepts them all in one go."""
    with RawClient(server.address) as client, contextlib.ExitStack() as watchers_open:
        line = b"get" + b"".join(b" key%06d" % index for index in range(100000)) + b"\r"
        client.send(line)
        assert wait_for(lambda: protocol_of(server, client).bytes_read == len(line),
                        what="the line to arrive")
        client.send(b"\n")
        watchers = [watchers_open.enter_context(RawClient(server.address))
                    for _ in range(4)]
        assert client.recv_until(b"END\r\n") == b"END\r\n"
        for watcher in watchers:
            assert watcher.request(b"watch fetchers\r\n") == b"OK\r\n"
        assert client.request(b"get watched\r\n") == b"END\r\n"
        for watcher in watchers:
            line = watcher.recv_until(b"\n").decode()
            assert re.fullmatch(r"ts=\d+\.\d+ gid=1 type=item_get key=watched "
                                r"status=not_found clsid=0 cfd=\d+ size=0\n", line), line
        stopping = time.monotonic()
        server.stop()
        assert time.monotonic() - stopping < PROMPTLY
        for watcher in watchers:
            assert watcher.is_closed(PROMPTLY)
    assert server.service.watchers.watchers == []


def fill(server, count, key_length=12):
    """count items stored directly; returns their keys (a few that need escaping)."""
    keys = [(b"k%d-" % index).ljust(key_length, b"x") + (b"%\xff" if index % 500 == 0 else b"")
            for index in range(count)]
    for index, key in enumerate(keys):
        server.store.store(memg.SET, key, b"%d" % index)
    return keys


METADUMP_LINE = re.compile(rb"key=(\S+) exp=-1 la=\d+ cas=\d+ fetch=no cls=1 size=(\d+)\n")


def test_a_metadump_of_thousands_of_items_streams_completely(server):
    keys = fill(server, 5000)
    with RawClient(server.address) as client:
        dump = client.request(b"lru_crawler metadump all\r\n", b"END\r\n")
        assert dump.endswith(b"\nEND\r\n")
        lines = dump[:-len(b"END\r\n")].splitlines(keepends=True)
        assert len(lines) == len(keys)
        dumped = {}
        for line in lines:
            match = METADUMP_LINE.fullmatch(line)
            assert match, line
            dumped[urllib.parse.unquote_to_bytes(match.group(1))] = int(match.group(2))
        assert dumped == {key: memg.item_cost(key, len(b"%d" % index))
                          for index, key in enumerate(keys)}
        # The crawler is free again, and the connection serves on.
        assert client.request(b"lru_crawler metadump all\r\n", b"END\r\n") == dump


def test_a_second_metadump_while_one_streams_is_busy(server):
    fill(server, 60000, key_length=200)              # a dump of 15 MB
    with RawClient(server.address, receive_buffer=4096) as first:
        first.send(b"lru_crawler metadump all\r\n")  # and reads nothing for now
        with RawClient(server.address) as second:
            assert wait_for(lambda: server.service.crawling, what="the first dump")
            assert second.request(b"lru_crawler metadump all\r\n") == memg.CRAWLER_BUSY
            assert second.request(b"lru_crawler crawl all\r\n") == memg.CRAWLER_BUSY
            # The first, read to its end, is complete, and frees the crawler.
            dump = first.recv_until(b"END\r\n")
            assert dump.endswith(b"\nEND\r\n") and dump.count(b"\n") == 60000 + 1
            assert second.request(b"lru_crawler metadump 2\r\n") == b"END\r\n"


def test_a_client_that_leaves_during_its_metadump_frees_the_crawler(server):
    fill(server, 60000, key_length=200)
    with RawClient(server.address, receive_buffer=4096) as first:
        first.send(b"lru_crawler metadump all\r\n")
        assert first.recv_exact(1000)                # under way
    with RawClient(server.address) as second:
        assert wait_for(lambda: second.request(b"lru_crawler metadump 2\r\n") == b"END\r\n",
                        what="the crawler to be free again")
    assert wait_for(lambda: len(server.service.connections) == 0,
                    what="the connections to end")


# -- stats conns ---------------------------------------------------------------------

def conns_by_fd(client):
    """``stats conns`` as {fd: {field: value}}."""
    rows = {}
    for name, value in stats(client, b"conns").items():
        fd, _, field = name.partition(":")
        rows.setdefault(int(fd), {})[field] = value
    return rows


def test_stats_conns_lists_the_listener_and_each_client(server):
    with RawClient(server.address) as first, RawClient(server.address) as second:
        second.send(b"set a 0 0 5\r\nab")          # waits for the rest of its value
        second_fd = protocol_of(server, second).fd

        def second_reading_its_value():
            rows = conns_by_fd(first)
            return rows if rows[second_fd]["state"] == "conn_nread" else None

        rows = wait_for(second_reading_its_value, what="the second client to wait for data")
        listener = "tcp:%s:%d" % server.address
        (listener_fd,) = [fd for fd, row in rows.items() if row["state"] == "conn_listening"]
        assert rows.pop(listener_fd) == {"addr": listener, "state": "conn_listening"}
        clients = {protocol_of(server, client).fd: client for client in (first, second)}
        assert set(rows) == set(clients)
        for fd, client in clients.items():
            assert rows[fd]["addr"] == "tcp:%s:%d" % client.sock.getsockname()
            assert rows[fd]["listen_addr"] == listener
            assert 0 <= int(rows[fd]["secs_since_last_cmd"]) < 60
        assert rows[protocol_of(server, first).fd]["state"] == "conn_parse_cmd"
