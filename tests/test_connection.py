"""The connection: one thread reads, dispatches and batches the replies.  Tested in
process over a socket pair, so that the sends themselves can be counted."""

import socket
import threading
import time

import pytest

import memg


@pytest.fixture
def sends(monkeypatch):
    """The replies connections send, one entry per send (memg.send_without_waiting,
    which every flush begins with)."""
    sent = []
    send = memg.send_without_waiting

    def recording(fileno, data, size, flags):
        sent.append(bytes(data))
        return send(fileno, data, size, flags)

    monkeypatch.setattr(memg, "send_without_waiting", recording)
    return sent


def serve_one(**settings):
    """A Connection on one end of a socket pair, served by its own thread."""
    server = memg.Server(port=0, **settings)
    ours, theirs = socket.socketpair()
    connection = memg.Connection(server, theirs, "test")
    thread = threading.Thread(target=connection.handle, daemon=True)
    thread.start()
    return server, ours, connection, thread


def read_to_eof(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_until(sock, terminator, count=1):
    data = b""
    while data.count(terminator) < count:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early; got %r" % data
        data += chunk
    return data



# --------------------------------------------------------------------------
# SocketReader: the connection's input buffer
# --------------------------------------------------------------------------

class Sender:
    """What SocketReader needs of a connection: its socket, its idle timeout (none),
    its count of bytes read, and the call it makes before each wait for input
    (counted here)."""

    idle_timeout = 0

    def __init__(self, sock):
        self.sock = sock
        self.bytes_read = 0
        self.waits = 0

    def flush(self):
        self.waits += 1


def reader_over(chunks, size=16, close=True):
    """A SocketReader with a small buffer over a socket pair whose other end has
    sent chunks, each as its own send, and then (if close) closed."""
    ours, theirs = socket.socketpair()
    reader = memg.SocketReader(Sender(theirs), size=size)

    def send():
        for chunk in chunks:
            ours.sendall(chunk)
            time.sleep(0.01)        # separate receives on the reader's side
        if close:
            ours.close()
    threading.Thread(target=send, daemon=True).start()
    return reader


def test_reader_lines_across_receives_and_longer_than_its_buffer():
    reader = reader_over([b"get a", b" b\r\nse", b"t " + b"k" * 40, b"\r\ntail"])
    assert reader.readline(100) == b"get a b\r\n"
    assert reader.readline(100) == b"set " + b"k" * 40 + b"\r\n"
    assert reader.readline(100) == b"tail"          # the input ended mid-line
    assert reader.readline(100) == b""


def test_reader_line_limit_stops_a_line_without_newline():
    reader = reader_over([b"x" * 50 + b"\r\nnext\r\n"])
    assert reader.readline(20) == b"x" * 20
    assert reader.readline(100) == b"x" * 30 + b"\r\n"
    assert reader.readline(100) == b"next\r\n"


def test_reader_reads_exact_counts_and_never_past_the_input():
    chunks = [b"set k 0 0 10\r\nabc", b"defghij\r\n" + b"v" * 40, b"end"]
    reader = reader_over(chunks)
    assert reader.readline(100) == b"set k 0 0 10\r\n"
    assert reader.read(12) == b"abcdefghij\r\n"
    assert reader.read(40) == b"v" * 40                # longer than the buffer
    assert reader.read(10) == b"end"                   # short: the input ended
    assert reader.read(10) == b""
    assert reader.connection.bytes_read == len(b"".join(chunks))   # all it received


def test_reader_peek_does_not_consume():
    reader = reader_over([b"\x80abc"])
    assert reader.peek(1)[:1] == b"\x80"
    assert reader.read(4) == b"\x80abc"


def test_reader_sends_replies_before_each_wait_for_input():
    reader = reader_over([b"a\r\n", b"b\r\n"], close=False)
    reader.readline(10)
    reader.readline(10)
    assert reader.connection.waits == 2


def test_reader_close_releases_its_buffer():
    reader = reader_over([b"a\r\n"])
    assert reader.readline(10) == b"a\r\n"
    reader.close()
    assert reader.buffer.closed

def test_replies_to_commands_that_arrived_together_leave_in_one_send(sends):
    _, sock, connection, thread = serve_one()
    sock.sendall(b"set a 0 0 1\r\n1\r\n" + b"get a\r\n" * 50)
    data = read_until(sock, b"END\r\n", 50)
    assert data == b"STORED\r\n" + b"VALUE a 0 1\r\n1\r\nEND\r\n" * 50
    assert sends == [data]
    sock.close()
    thread.join(5)


def test_replies_are_sent_before_waiting_for_more_input(sends):
    _, sock, connection, thread = serve_one()
    sock.sendall(b"version\r\n")
    assert read_until(sock, b"\r\n").startswith(b"VERSION ")
    sock.sendall(b"get nothing\r\n")
    assert read_until(sock, b"END\r\n") == b"END\r\n"
    assert len(sends) == 2
    sock.close()
    thread.join(5)


def test_value_split_across_many_packets_is_reassembled():
    _, sock, _, thread = serve_one()
    value = bytes(range(256)) * 1000
    sock.sendall(b"set big 0 0 %d\r\n" % len(value))
    for start in range(0, len(value), 7001):
        sock.sendall(value[start:start + 7001])
    sock.sendall(b"\r\nget big\r\n")
    expected = b"STORED\r\nVALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
    assert read_until(sock, b"END\r\n") == expected
    sock.close()
    thread.join(5)


def test_eof_in_the_middle_of_a_value_stores_nothing_and_ends_quietly(sends):
    server, sock, connection, thread = serve_one()
    sock.sendall(b"set half 0 0 100\r\n" + b"x" * 50)
    sock.close()
    thread.join(5)
    assert not thread.is_alive()
    assert server.store.get(b"half") is None
    assert sends == []


def test_send_without_waiting_takes_what_the_socket_holds_and_returns():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        data = b"x" * (8 * 1024 * 1024)      # more than a socket pair buffers
        sent = memg.send_without_waiting(theirs.fileno(), data, len(data), memg.SEND_FLAGS)
        assert 0 < sent < len(data)
        assert memg.send_without_waiting(-1, data, len(data), memg.SEND_FLAGS) <= 0


def test_a_reply_larger_than_the_socket_holds_arrives_whole_and_in_order():
    server, sock, _, thread = serve_one()
    value = bytes(range(256)) * 4096          # 1 MiB
    server.store.store(memg.SET, b"big", value)
    sock.sendall(b"get big\r\nget big\r\n")
    time.sleep(0.2)                            # the server fills the socket, then waits
    expected = b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
    assert read_until(sock, b"END\r\n", 2) == expected * 2
    sock.close()
    thread.join(5)


def test_quit_closes_after_sending_earlier_replies():
    _, sock, _, thread = serve_one()
    sock.sendall(b"set a 0 0 1\r\n1\r\nquit\r\nget a\r\n")
    data = read_to_eof(sock)
    assert data == b"STORED\r\n"
    thread.join(5)
    assert not thread.is_alive()


def test_an_internal_error_closes_only_that_connection_with_server_error(monkeypatch, capsys):
    def broken(self, tokens):
        raise RuntimeError("a bug")

    monkeypatch.setitem(memg.Protocol.COMMANDS, b"version", (broken, 1, 1))
    server, sock, _, thread = serve_one()
    sock.sendall(b"set a 0 0 1\r\n1\r\nversion\r\n")
    data = read_to_eof(sock)
    assert data == b"STORED\r\nSERVER_ERROR internal error\r\n"
    thread.join(5)
    assert "RuntimeError: a bug" in capsys.readouterr().err
    assert memg.unpack_item(server.store.get(b"a")).value == b"1"


def test_client_sockets_have_nagle_turned_off():
    server = memg.Server(port=0).start()
    try:
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"version\r\n")
            assert sock.recv(100).startswith(b"VERSION ")
            (connection,) = list(server.connections)
            assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.stop()


def test_a_client_that_does_not_read_holds_a_bounded_amount_of_replies():
    _, sock, connection, thread = serve_one()
    protocol, peak = connection.protocol, [0]

    def queue(data, queue=protocol.queue):          # record the most ever pending
        queue(data)
        peak[0] = max(peak[0], protocol.out_bytes)

    protocol.queue = queue
    value = b"v" * 10000
    sock.sendall(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value))
    assert read_until(sock, b"\r\n") == b"STORED\r\n"
    # 7,000 pipelined gets (70 MB of replies) that the client never reads.
    sender = threading.Thread(target=sock.sendall, args=(b"get big\r\n" * 7000,), daemon=True)
    sender.start()
    settled, deadline = None, time.monotonic() + 10
    while peak[0] != settled and time.monotonic() < deadline:
        settled = peak[0]
        time.sleep(0.3)                    # until the server stops queueing replies
    assert thread.is_alive()               # blocked sending to a client that reads nothing
    assert 0 < peak[0] <= 256 * 1024 + len(value) + 100      # memg.OUTPUT_LIMIT + one reply
    sock.close()
    thread.join(5)
