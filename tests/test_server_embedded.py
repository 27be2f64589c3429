"""memg.Server embedded in the test process, as a program or a test suite uses it.

Every server here is made by conftest.embedded, so that the suite runs on each
engine (conftest.ENGINE: threads, or asyncio on uvloop or the standard library's
loop).  What this file shows:

* ``engine`` (and ``event_loop``) choose what serves;
* ``Server(port=0).start()`` and ``with Server(port=0) as server:`` bind a free port,
  ``.address`` is the (host, port) actually bound, and real clients (pymemcache) are
  served there;
* every setting is a keyword argument that reaches the server and takes effect:
  the memory limit evicts (or, with ``evict=False``, refuses), ``item_size_max``
  refuses larger values, ``max_connections`` turns clients away with memcached's
  error, ``use_cas=False`` disables CAS as memcached's -C does, ``idle_timeout``
  closes idle clients, ``auth_file`` demands a login; a bad setting raises
  ValueError before anything is bound, and a port that cannot be bound raises
  OSError from ``start()`` without leaving sockets behind;
* servers in one process are independent of each other;
* ``stop()`` closes every connection at once (whatever the client is doing: waiting
  for a reply, half-way through a value, not reading its replies), joins every
  thread the server started, frees the port for a new server, and may be called
  again.

Bounds on time are generous: they tell "promptly" from "hangs", never fast from slow.
"""

import gc
import socket
import threading
import time
import warnings

import pytest
import uvloop
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheServerError

import memg
from conftest import (ENGINE, ENGINE_SETTINGS, PROMPTLY, RawClient, embedded, stats,
                      wait_for)

KB = 1024
MB = 1024 * KB


def connect(server):
    """A pymemcache client for server that waits for every reply."""
    return Client(server.address, connect_timeout=5, timeout=5, default_noreply=False)


def threads_since(baseline):
    """The threads running now that were not in baseline (a set of threads)."""
    return [thread for thread in threading.enumerate() if thread not in baseline]


class Reader(threading.Thread):
    """A client blocked in recv in a thread of its own: records what recv returned
    (or raised) and when."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.result = None
        self.at = None

    def run(self):
        self.sock.settimeout(10)
        try:
            self.result = self.sock.recv(1)
        except OSError as error:     # a reset counts as closed; a timeout does not
            self.result = error
        self.at = time.monotonic()

    def saw_close(self):
        return self.result == b"" or isinstance(self.result, ConnectionResetError)


# -- life cycle -----------------------------------------------------------------

def test_the_engine_setting_chooses_what_serves():
    with embedded() as server:
        assert type(server.engine) is memg.ENGINES[ENGINE_SETTINGS["engine"]]
        with RawClient(server.address) as client:
            assert client.request(b"version\r\n").startswith(b"VERSION ")
        (serving,) = [thread for thread in threading.enumerate()
                      if thread.name == "memg-" + ENGINE_SETTINGS["engine"]]
        assert serving is server.engine.thread and serving.is_alive()
        if ENGINE_SETTINGS["engine"] == "asyncio":
            assert isinstance(server.engine.loop, uvloop.Loop) == (
                ENGINE_SETTINGS["event_loop"] == "uvloop")


def test_start_binds_a_free_port_and_serves_real_clients():
    server = embedded()
    assert server.address is None                 # nothing is bound before start()
    assert server.start() is server
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port != 0
        client = connect(server)
        assert client.set("greeting", b"hello")
        assert client.get("greeting") == b"hello"
        client.close()
    finally:
        server.stop()


def test_context_manager_serves_inside_the_block_and_stops_after_it():
    with embedded() as server:
        address = server.address
        client = connect(server)
        assert client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()
    # Nobody listens on the port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_context_manager_stops_the_server_when_the_block_raises():
    baseline = set(threading.enumerate())
    with pytest.raises(RuntimeError):
        with embedded() as server:
            address = server.address
            raise RuntimeError("the code under test failed")
    assert threads_since(baseline) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_servers_in_one_process_are_independent():
    with embedded() as first, embedded() as second:
        assert first.address != second.address
        a, b = connect(first), connect(second)
        assert a.set("shared-name", b"first's")
        assert b.get("shared-name") is None
        assert b.set("shared-name", b"second's")
        assert a.get("shared-name") == b"first's"
        # Emptying or stopping one leaves the other as it was.
        b.flush_all()
        assert a.get("shared-name") == b"first's"
        b.close()
        second.stop()
        assert a.get("shared-name") == b"first's"
        a.close()


# -- settings -------------------------------------------------------------------

@pytest.mark.parametrize("setting, stat, shown", [
    ({"memory_limit": 8 * MB}, "maxbytes", "8388608"),
    ({"item_size_max": 512 * KB}, "item_size_max", "524288"),
    ({"max_connections": 7}, "maxconns", "7"),
    ({"evict": False}, "evictions", "off"),
    ({"use_cas": False}, "cas_enabled", "no"),
    ({"idle_timeout": 30}, "idle_timeout", "30"),
    ({"flush_enabled": False}, "flush_enabled", "no"),
    ({"threads": 9}, "num_threads", "9"),
])
def test_each_setting_reaches_the_server(setting, stat, shown):
    with embedded(**setting) as server:
        assert stats(server, b"settings")[stat] == shown


def test_a_small_memory_limit_evicts_the_oldest_items():
    value = b"x" * (50 * KB)
    with embedded(memory_limit=2 * MB, item_size_max=64 * KB) as server:
        client = connect(server)
        for index in range(100):                  # 5 MB into 2 MB
            assert client.set("item%d" % index, value)
        stats = client.stats()
        assert stats[b"evictions"] > 0
        assert stats[b"bytes"] <= 2 * MB
        assert client.get("item0") is None        # least recently used: gone
        assert client.get("item99") == value      # the newest is kept
        client.close()


def test_without_eviction_a_full_cache_refuses_new_items():
    value = b"x" * (50 * KB)
    with embedded(memory_limit=2 * MB, item_size_max=64 * KB, evict=False) as server:
        client = connect(server)
        with pytest.raises(MemcacheServerError, match="out of memory storing object"):
            for index in range(100):
                client.set("item%d" % index, value)
        assert index > 0
        assert client.get("item0") == value       # nothing was evicted to make room
        assert client.stats()[b"evictions"] == 0
        client.close()


def test_item_size_max_refuses_a_larger_value():
    with embedded(item_size_max=64 * KB) as server:
        client = connect(server)
        assert client.set("fits", b"x" * (60 * KB))
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            client.set("too-big", b"x" * (70 * KB))
        assert client.get("too-big") is None
        assert client.get("fits") == b"x" * (60 * KB)
        client.close()


def test_max_connections_turns_further_clients_away_until_a_slot_frees():
    with embedded(max_connections=1) as server:
        first = RawClient(server.address)
        assert first.request(b"version\r\n").startswith(b"VERSION ")
        with RawClient(server.address) as second:
            # memcached's words, then the close.
            assert second.read_to_eof() == b"ERROR Too many open connections\r\n"
        first.close()

        def admitted():
            with RawClient(server.address) as third:
                return third.request(b"version\r\n").startswith(b"VERSION ")

        # The slot comes back once the server has seen the first client leave.
        assert wait_for(admitted)


def test_use_cas_false_disables_cas_as_memcached_minus_capital_c():
    with embedded(use_cas=False) as server:
        client = connect(server)
        assert client.set("k", b"1")
        value, token = client.gets("k")
        assert (value, token) == (b"1", b"0")     # no CAS unique: memcached sends 0
        # Items carry no CAS unique, so no cas can match, not even with the 0 that
        # gets reported: memcached -C (1.6.18) answers EXISTS, and keeps the value.
        assert client.cas("k", b"2", token) is False
        assert client.get("k") == b"1"
        client.close()


def test_idle_timeout_closes_a_client_that_says_nothing():
    with embedded(idle_timeout=1) as server:
        with RawClient(server.address) as idle:
            assert idle.request(b"version\r\n").startswith(b"VERSION ")
            assert idle.is_closed(timeout=5)
        with RawClient(server.address) as other:
            stats = other.request(b"stats\r\n", b"END\r\n")
        assert b"STAT idle_kicks 1\r\n" in stats


def test_auth_file_demands_a_login_before_anything_else(tmp_path):
    path = tmp_path / "auth"
    path.write_text("alice:secret\n")
    with embedded(auth_file=str(path)) as server:
        with RawClient(server.address) as raw:
            assert raw.request(b"get x\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
            assert (raw.request(b"set x 0 0 11\r\nalice wrong\r\n")
                    == b"CLIENT_ERROR authentication failure\r\n")
            assert raw.request(b"set x 0 0 12\r\nalice secret\r\n") == b"STORED\r\n"
            # Logged in: an ordinary client from here on (the login stored nothing).
            assert raw.request(b"get x\r\n") == b"END\r\n"
            assert raw.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
            assert raw.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_a_unix_socket_server_serves_at_its_path_and_removes_it(tmp_path):
    path = str(tmp_path / "m.sock")
    with embedded(unix_socket=path) as server:
        assert server.address == path
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"version\r\n")
            assert sock.recv(100).startswith(b"VERSION ")
    assert not (tmp_path / "m.sock").exists()


@pytest.mark.parametrize("setting", [
    {"port": 70000},
    {"port": -1},
    {"max_connections": 0},
    {"threads": 0},
    {"backlog": 0},
    {"item_size_max": 512},                              # below memcached's 1k
    {"memory_limit": 1 * MB, "item_size_max": 1 * MB},   # over half the memory
    {"udp_port": 70000},
    {"udp_port": 0, "sasl": True, "sasl_pwdb": "/dev/null"},  # UDP cannot authenticate
], ids=lambda setting: ",".join("%s=%s" % item for item in setting.items()))
def test_a_bad_setting_raises_value_error_before_binding(setting):
    baseline = set(threading.enumerate())
    with pytest.raises(ValueError):
        embedded(**setting)
    assert threads_since(baseline) == []


def test_a_start_that_cannot_bind_raises_and_leaves_no_socket_open():
    gc.collect()                  # what earlier tests left is not this test's business
    with embedded() as running:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(OSError):
                with embedded(port=running.address[1]):     # the port is taken
                    pass
            # What start() opened and did not close, the collector now reports.
            gc.collect()
    assert [str(warning.message) for warning in caught
            if issubclass(warning.category, ResourceWarning)] == []


# -- stop() ---------------------------------------------------------------------

def test_stop_closes_every_open_connection_promptly():
    server = embedded().start()
    readers = []
    for _ in range(3):
        sock = socket.create_connection(server.address, timeout=5)
        sock.sendall(b"version\r\n")
        assert sock.recv(100).startswith(b"VERSION ")
        readers.append(Reader(sock))
    for reader in readers:
        reader.start()
    time.sleep(0.2)                                   # let them block in recv
    stopped = time.monotonic()
    server.stop()
    for reader in readers:
        reader.join(PROMPTLY + 1)
        assert reader.saw_close(), reader.result
        assert reader.at - stopped < PROMPTLY
        reader.sock.close()


def test_stop_joins_every_thread_the_server_started():
    baseline = set(threading.enumerate())
    server = embedded().start()
    clients = [RawClient(server.address) for _ in range(3)]
    for client in clients:
        assert client.request(b"version\r\n").startswith(b"VERSION ")
    # Threads: the accept loop, the sweeper and one thread per client; asyncio: the
    # event loop's thread, which serves every client.  All are named memg-*.
    started = threads_since(baseline)
    assert len(started) == (2 + len(clients) if ENGINE == "threads" else 1)
    assert all(thread.name.startswith("memg-") for thread in started)
    server.stop()
    assert threads_since(baseline) == []
    assert threading.active_count() == len(baseline)
    for client in clients:
        client.close()


def test_stop_frees_the_port_for_a_new_server():
    first = embedded().start()
    host, port = first.address
    # While first listens the port is taken, so the rebinding below means something.
    busy = embedded(port=port)
    with pytest.raises(OSError):
        busy.start()
    busy.stop()
    with RawClient(first.address) as client:          # a connection open at the stop
        assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        first.stop()
    with embedded(port=port) as second:
        assert second.address == (host, port)
        client = connect(second)
        assert client.get("k") is None                # a new server, a new cache
        assert client.set("k", b"again")
        assert client.get("k") == b"again"
        client.close()


def test_stop_does_not_wait_for_a_client_in_the_middle_of_a_value():
    baseline = set(threading.enumerate())
    server = embedded().start()
    with RawClient(server.address) as client:
        assert client.request(b"version\r\n").startswith(b"VERSION ")
        client.send(b"set half 0 0 100\r\n" + b"x" * 50)    # 50 bytes never come
        time.sleep(0.2)                                     # let the server wait for them
        stopped = time.monotonic()
        server.stop()
        assert time.monotonic() - stopped < PROMPTLY
        assert client.is_closed(timeout=PROMPTLY)
    assert threads_since(baseline) == []
    assert server.store.get(b"half") is None                # half a value stores nothing


def test_stop_does_not_wait_for_a_client_that_does_not_read_its_replies():
    baseline = set(threading.enumerate())
    server = embedded().start()
    value = b"v" * (500 * KB)
    with RawClient(server.address) as client:
        reply = client.request(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value))
        assert reply == b"STORED\r\n"
        # 100 MB of replies that are never read: the server's thread blocks in send.
        client.send(b"get big\r\n" * 200)
        time.sleep(0.5)
        stopped = time.monotonic()
        server.stop()
        assert time.monotonic() - stopped < PROMPTLY
    assert threads_since(baseline) == []


def test_stop_twice_is_harmless():
    server = embedded().start()
    address = server.address
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_stop_of_a_server_never_started_is_harmless():
    baseline = set(threading.enumerate())
    embedded().stop()
    assert threads_since(baseline) == []
