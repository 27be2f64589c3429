"""The server as a real ``python memg.py`` process on a free port: conformance with
libmemcached's memccapable in both protocols and its load generator memcslap in the
binary one (with SASL too), memory bounds, abrupt clients, concurrent clients."""

import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time

import bmemcached
import pytest

from conftest import RawClient, proc_status, require_tool, set_many, start_memg, stats, wait_for


# -- conformance ------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["-a", "-b"], ids=["ascii", "binary"])
def test_memccapable_passes_every_test(memg, protocol):
    result = subprocess.run(
        [require_tool("memccapable"), protocol, "-h", "127.0.0.1", "-p", str(memg.port)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All tests passed" in result.stdout
    assert "[fail]" not in result.stdout.lower()


def memcslap(server, test, *options, threads=4, repeat=2000):
    """Run libmemcached's memcslap in the binary protocol: each of threads does test
    (set, get or mget) over repeat keys.  Returns how many keys it reports done and
    what it wrote to stderr (each failed request is a "Fatal error" line there; its
    exit status does not tell)."""
    result = subprocess.run(
        [require_tool("memcslap"), "--binary", "--servers=127.0.0.1:%d" % server.port,
         "--test=" + test, "--concurrency=%d" % threads, "--execute-number=%d" % repeat]
        + list(options), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    done = re.search(r"Time to %s +(\d+) keys by +%d threads" % (test, threads),
                     result.stdout)
    assert done, result.stdout
    return int(done.group(1)), result.stderr


@pytest.mark.parametrize("test", ["set", "get", "mget"])
def test_memcslap_binary_load_has_no_errors(memg, test):
    assert memcslap(memg, test) == (4 * 2000, "")


def test_memcslap_binary_with_sasl_needs_the_password(tmp_path):
    (tmp_path / "pwdb").write_text("alice:secret\n")
    server = start_memg("-S", env=dict(os.environ, MEMCACHED_SASL_PWDB=str(tmp_path / "pwdb")))
    try:
        assert memcslap(server, "get", "--username=alice", "--password=secret",
                        threads=2, repeat=500) == (2 * 500, "")
        done, errors = memcslap(server, "set", "--username=alice", "--password=wrong",
                                threads=2, repeat=500)
        assert done == 0
        assert errors.count("AUTHENTICATION FAILURE") == 2, errors     # once a thread
        admin = bmemcached.Client(["127.0.0.1:%d" % server.port], "alice", "secret")
        (numbers,) = admin.stats().values()
        admin.disconnect_all()
        assert numbers["auth_errors"] == b"2"
    finally:
        server.stop()


def test_seed_telnet_transcript(client):
    client.send(b"set greeting 0 0 11\r\n")
    client.send(b"Hello World\r\n")
    assert client.recv_until(b"\r\n") == b"STORED\r\n"
    assert client.request(b"get greeting\r\n", b"END\r\n") == (
        b"VALUE greeting 0 11\r\nHello World\r\nEND\r\n")


# -- memory ----------------------------------------------------------------------------

# -m is a promise: after six times -m written, resident memory has grown by at most
# this much more than -m (the cache's items and index are charged as what they take;
# the rest is the server's own: its buffers, the allocators' slack).
RESIDENT_OVER_LIMIT = 1.15


@pytest.mark.parametrize("value_size", [100, 10000])
def test_six_times_the_memory_limit_written_grows_resident_memory_by_at_most_the_limit(
        value_size):
    limit = 8 * 1024 * 1024
    server = start_memg("-m", "8")
    try:
        pid = server.process.pid
        value = b"v" * value_size
        with server.connect() as client:
            set_many(client, (b"warm:%d" % i for i in range(100)), value)  # buffers made
            baseline = proc_status(pid, "VmRSS")
            count = 6 * limit // value_size
            keys = [b"key:%07d" % i for i in range(count)]
            set_many(client, keys, value, batch=min(5000, 1000000 // value_size))
            grown = proc_status(pid, "VmRSS") - baseline
            numbers = stats(client)
            assert int(numbers["evictions"]) > 0
            assert int(numbers["bytes"]) <= limit
            assert grown <= RESIDENT_OVER_LIMIT * limit, grown / limit
            for key in keys[-10:]:
                assert client.request(b"get %s\r\n" % key, b"END\r\n") == (
                    b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, value_size, value))
    finally:
        server.stop()


def test_expired_items_are_reclaimed_without_being_touched_and_evict_nothing():
    server = start_memg("-m", "8")
    try:
        with server.connect() as client:
            value = b"v" * 1000
            # (3 s: under load, 5,000 sets may take longer than one)
            set_many(client, (b"short:%d" % i for i in range(5000)), value, exptime=3)
            assert int(stats(client)["curr_items"]) == 5000
            wait_for(lambda: stats(client)["curr_items"] == "0", timeout=10,
                     what="the LRU maintainer (once a second) to reclaim them")
            # At HOT's tail, as memcached's maintainer does (its crawler's first run
            # was at the start, its next a minute on).
            assert (stats(client)["reclaimed"], stats(client)["crawler_reclaimed"]) == (
                "5000", "0")
            set_many(client, (b"long:%d" % i for i in range(5000)), value)
            assert stats(client)["evictions"] == "0"
            assert stats(client)["curr_items"] == "5000"
    finally:
        server.stop()


# -- the segmented LRU and its maintainer ----------------------------------------------

def test_the_maintainer_cools_hot_items_once_a_second():
    server = start_memg()
    try:
        with server.connect() as client:
            set_many(client, (b"k%d" % i for i in range(10)), b"v")
            juggles = int(stats(client)["lru_maintainer_juggles"])
            wait_for(lambda: int(stats(client, b"items")["items:1:number_cold"]) >= 8,
                     what="the maintainer to move HOT's surplus down to COLD")
            figures = stats(client, b"items")
            assert int(figures["items:1:number_hot"]) <= 2
            assert int(figures["items:1:moves_to_cold"]) >= 8
            assert int(stats(client)["lru_maintainer_juggles"]) > juggles
    finally:
        server.stop()


def test_items_in_the_temp_lru_are_never_evicted():
    # memcached's t/lru-maintainer.t: a temporary item outlives a cache's worth of
    # others, never read.
    server = start_memg("-m", "2", "-o", "temporary_ttl=61")
    value = b"B" * 66560
    try:
        with server.connect() as client:
            assert client.request(b"set canary 0 30 66560\r\n%s\r\n" % value) == b"STORED\r\n"
            for i in range(60):
                assert client.request(b"set k%d 0 3600 66560\r\n%s\r\n" % (i, value)) == (
                    b"STORED\r\n")
            figures = stats(client, b"items")
            assert int(figures["items:31:evicted"]) > 0
            assert figures["items:31:number_temp"] == "1"
            assert client.request(b"get canary\r\n", b"END\r\n").startswith(b"VALUE canary")
    finally:
        server.stop()


def test_lru_temp_ttl_and_mode_take_effect_for_new_items(memg):
    with memg.connect() as client:
        assert client.request(b"lru temp_ttl 30\r\nlru mode flat\r\n", b"OK\r\nOK\r\n") == (
            b"OK\r\nOK\r\n")
        settings = stats(client, b"settings")
        assert (settings["temp_lru"], settings["temporary_ttl"], settings["lru_segmented"]) == (
            "yes", "30", "no")
        assert client.request(b"set t 0 20 1\r\nx\r\nset f 0 0 1\r\ny\r\n",
                              b"STORED\r\nSTORED\r\n") == b"STORED\r\nSTORED\r\n"
        figures = stats(client, b"items")
        assert (figures["items:1:number_temp"], figures["items:1:number_cold"]) == ("1", "1")
        assert client.request(b"lru temp_ttl -1\r\nlru mode segmented\r\n",
                              b"OK\r\nOK\r\n") == b"OK\r\nOK\r\n"
        assert stats(client, b"settings")["temp_lru"] == "no"
        assert "items:1:number_temp" not in stats(client, b"items")


# -- abrupt and concurrent clients ---------------------------------------------------------

def test_reset_in_the_middle_of_a_value_is_quiet_and_stores_nothing(memg):
    sock = socket.create_connection(memg.address)
    sock.sendall(b"set torn 0 0 100\r\n" + b"x" * 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()                                  # RST, not FIN
    with memg.connect() as client:
        assert client.request(b"get torn\r\n", b"END\r\n") == b"END\r\n"
        assert client.request(b"version\r\n").startswith(b"VERSION ")


def run_in_threads(work, count):
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_incr_loses_no_update(memg):
    with memg.connect() as client:
        assert client.request(b"set n 0 0 1\r\n0\r\n") == b"STORED\r\n"

    def work():
        with memg.connect() as client:
            for _ in range(300):
                assert client.request(b"incr n 1\r\n").rstrip().isdigit()

    run_in_threads(work, 16)
    with memg.connect() as client:
        assert client.request(b"get n\r\n", b"END\r\n") == b"VALUE n 0 4\r\n4800\r\nEND\r\n"


def test_concurrent_gets_cas_increments_lose_no_update(memg):
    with memg.connect() as client:
        assert client.request(b"set c 0 0 1\r\n0\r\n") == b"STORED\r\n"

    def work():
        with memg.connect() as client:
            done = 0
            while done < 100:
                header = client.request(b"gets c\r\n", b"END\r\n").split(b"\r\n")
                _, _, _, _, unique = header[0].split()
                number = int(header[1]) + 1
                data = b"%d" % number
                reply = client.request(b"cas c 0 0 %d %s\r\n%s\r\n" % (len(data), unique, data))
                assert reply in (b"STORED\r\n", b"EXISTS\r\n")
                done += reply == b"STORED\r\n"

    run_in_threads(work, 8)
    with memg.connect() as client:
        assert client.request(b"get c\r\n", b"END\r\n") == b"VALUE c 0 3\r\n800\r\nEND\r\n"


def test_many_clients_at_once_are_all_served(memg):
    clients = [memg.connect() for _ in range(200)]
    try:
        for i, client in enumerate(clients):
            client.send(b"set k%d 0 0 %d\r\n%d\r\n" % (i, len(b"%d" % i), i))
        for client in clients:
            assert client.recv_until() == b"STORED\r\n"
        for i, client in enumerate(clients):
            assert client.request(b"get k%d\r\n" % i, b"END\r\n") == (
                b"VALUE k%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(b"%d" % i), i))
        with memg.connect() as probe:
            assert int(stats(probe)["curr_connections"]) >= 201
    finally:
        for client in clients:
            client.close()


def test_stats_count_commands_and_bytes(memg):
    with memg.connect() as client:
        client.request(b"stats reset\r\n")
        client.request(b"set a 0 0 1\r\n1\r\n")
        client.request(b"get a b\r\n", b"END\r\n")
        numbers = stats(client)
        assert (numbers["cmd_set"], numbers["cmd_get"]) == ("1", "2")
        assert (numbers["get_hits"], numbers["get_misses"]) == ("1", "1")
        assert numbers["curr_items"] == "1"
        assert int(numbers["bytes_read"]) > 0
        assert int(numbers["bytes_written"]) > 0
        assert numbers["limit_maxbytes"] == str(64 * 1024 * 1024)


def test_stats_items_and_slabs_show_memcacheds_classes_while_clients_write():
    server = start_memg("-m", "3", "-o", "no_lru_maintainer")    # (cachedump: all in COLD)
    try:
        with server.connect() as client:
            # 66,560-byte values fill class 31 (82,792-byte chunks, 12 a page) and
            # evict; a 700,000-byte value is chunked; small ones fill class 1.
            set_many(client, (b"big:%d" % i for i in range(60)), b"B" * 66560)
            set_many(client, [b"huge"], b"H" * 700000)
            set_many(client, (b"s:%d" % i for i in range(100)), b"s")
            writer = threading.Thread(target=set_many, args=(
                server.connect(), (b"w:%d" % i for i in range(2000)), b"w" * 100))
            writer.start()
            while writer.is_alive():                 # walked while another client writes
                stats(client, b"items")
                stats(client, b"slabs")
            writer.join()
            items, slabs, numbers = stats(client, b"items"), stats(client, b"slabs"), stats(client)
            classes = sorted({int(name.split(":")[1]) for name in items})
            assert {1, 31} <= set(classes) and classes[-1] == 39      # (and the w: items')
            assert sum(int(items["items:%d:number" % c]) for c in classes) == int(
                numbers["curr_items"])
            assert sum(int(items["items:%d:evicted" % c]) for c in classes) == int(
                numbers["evictions"]) > 0
            assert int(items["items:31:evicted"]) > 0
            dump = client.request(b"stats cachedump 31 0\r\n", b"END\r\n").splitlines()[:-1]
            assert len(dump) == int(items["items:31:number"])
            # memcached's size: its 48-byte header, key and NUL, value and CRLF, CAS
            assert items["items:31:mem_requested"] == str(sum(
                48 + len(line.split()[1]) + 1 + 66560 + 2 + 8 for line in dump))
            for c in classes:
                assert int(slabs["%d:used_chunks" % c]) >= int(items["items:%d:number" % c])
            pages = sum(int(value) for name, value in slabs.items()
                        if name.endswith(":total_pages"))
            assert slabs["total_malloced"] == str(pages * 1024 * 1024)
            assert int(slabs["31:total_pages"]) == -(-int(slabs["31:used_chunks"]) // 12)
            assert client.request(b"stats reset\r\n") == b"RESET\r\n"
            assert stats(client, b"items")["items:31:evicted"] == "0"
    finally:
        code, err = server.stop()
    assert code == 0 and b"Traceback" not in err


# -- -R: commands in a row before a connection yields ------------------------------------

def test_a_pipelining_client_yields_every_reqs_per_event_commands():
    """memcached's t/issue_61.t, counted exactly: a turn given up with commands
    waiting is a yield, whatever the engine."""
    sets = b"set foobar 0 0 5\r\nBubba\r\n" * 6
    for limit, yields in ((1, 5), (2, 2), (6, 0)):
        server = start_memg("-R", str(limit))
        try:
            with server.connect() as client:
                assert client.request(sets, b"STORED\r\n" * 6) == b"STORED\r\n" * 6
                assert stats(client)["conn_yields"] == str(yields)
                assert stats(client, b"settings")["reqs_per_event"] == str(limit)
                assert client.request(b"stats reset\r\n") == b"RESET\r\n"
                assert stats(client)["conn_yields"] == "0"
        finally:
            server.stop()


def test_a_long_pipeline_is_answered_whole_and_in_order_while_others_are_served():
    server = start_memg("-R", "1")
    try:
        with server.connect() as pipelining, server.connect() as other:
            requests = b"".join(b"set k%d 0 0 %d\r\n%d\r\nget k%d\r\n" % (
                number, len(b"%d" % number), number, number) for number in range(3000))
            expected = b"".join(b"STORED\r\nVALUE k%d 0 %d\r\n%d\r\nEND\r\n" % (
                number, len(b"%d" % number), number) for number in range(3000))
            pipelining.send(requests)
            assert other.request(b"mn\r\n") == b"MN\r\n"
            assert pipelining.recv_exact(len(expected)) == expected
            assert int(stats(other)["conn_yields"]) > 3000
    finally:
        server.stop()


def test_server_never_sends_a_traceback():
    server = start_memg()
    try:
        with server.connect() as client:
            garbage = bytes(range(256)) * 4 + b"\r\n"
            reply = client.converse(b"set x 0 0 5\r\nabc\r\n\r\n" + garbage + b"mg \xff\xfe v\r\n")
            assert b"Traceback" not in reply
        with server.connect() as client:
            assert client.request(b"version\r\n").startswith(b"VERSION ")
    finally:
        code, err = server.stop()
    assert b"Traceback" not in err
    assert code == 0


# -- watch ----------------------------------------------------------------------------

def read_lines(sock, count, timeout=5.0):
    """The first count log lines a watcher receives."""
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, "watcher closed early after %r" % data
        data += chunk
    return data.decode().splitlines()[:count]


def fields(line):
    return dict(part.split("=", 1) for part in line.split())


def client_events(sock, timeout=5.0):
    """The events a watcher sees from the next client's conn_new to its conn_close,
    leaving out other connections' comings and goings."""
    sock.settimeout(timeout)
    data, events, client = b"", [], None
    while True:
        while b"\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "watcher closed early after %r" % events
            data += chunk
        line, data = data.split(b"\n", 1)
        event = fields(line.decode())
        if event["type"] == "conn_new" and client is None:
            client = event["cfd"]
        elif event["type"] in ("conn_new", "conn_close") and event["cfd"] != client:
            continue
        if client is not None:
            events.append(event)
            if event["type"] == "conn_close":
                return events


def test_watchers_see_fetches_stores_deletions_evictions_and_connections():
    server = start_memg("-m", "2")
    try:
        with server.connect() as watcher:
            watcher.send(b"watch fetchers mutations deletions evictions connevents\r\n")
            assert watcher.recv_exact(4) == b"OK\r\n"     # log lines may follow at once
            with server.connect() as client:
                client.request(b"set a/b 0 0 3\r\nabc\r\n")
                client.request(b"get a/b nope\r\n", b"END\r\n")
                client.request(b"delete a/b\r\n")
                value = b"v" * 900000
                for i in range(3):               # 2 MB of items: the first is evicted
                    client.request(b"set big%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
            events = client_events(watcher.sock)
        types = [(event["type"], event.get("key"), event.get("status")) for event in events]
        # As memcached's, every lookup logs an item_get: a set's and a delete's too.
        assert types == [
            ("conn_new", None, None),
            ("item_get", "a%2Fb", "not_found"), ("item_store", "a%2Fb", "stored"),
            ("item_get", "a%2Fb", "found"), ("item_get", "nope", "not_found"),
            ("item_get", "a%2Fb", "found"), ("deleted", "a%2Fb", None),
            ("item_get", "big0", "not_found"), ("item_store", "big0", "stored"),
            ("item_get", "big1", "not_found"), ("item_store", "big1", "stored"),
            ("item_get", "big2", "not_found"), ("eviction", "big0", None),
            ("item_store", "big2", "stored"),
            ("conn_close", None, None)]
        assert [int(event["gid"]) for event in events] == sorted(int(e["gid"]) for e in events)
        assert events[2]["cmd"] == "set" and events[2]["size"] == "3"
        assert events[3]["size"] == "3" and events[1]["size"] == "0"
        assert events[12]["fetch"] == "no"
        # cfd: the client's descriptor (stats conns shows the same), on every line.
        assert {event["cfd"] for event in events[1:-1] if "cfd" in event} == {events[0]["cfd"]}
    finally:
        code, err = server.stop()
    assert code == 0 and b"Traceback" not in err


def test_a_watcher_that_falls_behind_is_told_how_many_lines_it_missed():
    """-o watcher_logbuf_size bounds what a watcher may fall behind by; the lines
    beyond it are missed, and counted in a "skipped=N" line once it has room."""
    server = start_memg("-o", "watcher_logbuf_size=4")
    keys = [b"key%05d%s" % (i, b"x" * 150) for i in range(4000)]
    try:
        watcher = RawClient(server.address, receive_buffer=4096)
        watcher.send(b"watch\r\n")
        assert watcher.recv_exact(4) == b"OK\r\n"
        with server.connect() as client:
            for start in range(0, len(keys), 100):   # 4000 item_get lines, none read
                client.request(b"get " + b" ".join(keys[start:start + 100]) + b"\r\n",
                               b"END\r\n")
            watcher.sock.settimeout(5)
            data, asked = b"", len(keys)
            while b"key=last " not in data:       # a line for the watcher once it has room
                client.request(b"get last\r\n", b"END\r\n")
                asked += 1
                chunk = watcher.sock.recv(65536)
                assert chunk
                data += chunk
            client.request(b"get final\r\n", b"END\r\n")   # after every line before it
            while b"key=final " not in data:
                data += watcher.sock.recv(65536)
            counted = stats(client)
        lines = data.decode().splitlines()
        skipped = sum(int(line[len("skipped="):]) for line in lines if line.startswith("skipped="))
        seen = sum(" type=item_get " in line for line in lines)
        assert skipped > 0 and seen + skipped == asked + 1
        assert int(counted["log_watcher_skipped"]) == skipped
        watcher.close()
    finally:
        code, err = server.stop()
    assert code == 0 and b"Traceback" not in err


def test_watchers_are_told_why_each_connection_closed():
    """connevents' reason, as memcached's: normal when the client ends it (quit, or
    its end of input), error when memg closes on a protocol error (an HTTP request),
    idle_timeout under -o idle_timeout."""
    server = start_memg("-o", "idle_timeout=1")
    try:
        with server.connect() as watcher:
            watcher.send(b"watch connevents\r\n")
            assert watcher.recv_exact(4) == b"OK\r\n"
            reasons = []
            for ending in (b"quit\r\n", None, b"GET / HTTP/1.1\r\n", b""):
                with server.connect() as client:
                    client.request(b"version\r\n")
                    if ending is None:
                        client.sock.shutdown(socket.SHUT_WR)
                    elif ending:
                        client.send(ending)
                    assert client.is_closed(timeout=5)
                    events = client_events(watcher.sock)
                assert [event["type"] for event in events] == ["conn_new", "conn_close"]
                assert events[0]["transport"] == "tcp" and events[0]["rip"] == "127.0.0.1"
                reasons.append(events[1]["reason"])
        assert reasons == ["normal", "normal", "error", "idle_timeout"]
    finally:
        code, err = server.stop()
    assert code == 0 and b"Traceback" not in err


def test_a_watcher_that_fell_behind_gets_new_lines_once_it_reads_again():
    # Its lines back up in the socket, then in memg (it misses some), until it reads
    # all it was sent; the lines of later events must then come, after a skipped=N.
    server = start_memg("-o", "watcher_logbuf_size=8")
    try:
        with RawClient(server.address, receive_buffer=4096) as watcher, \
                server.connect() as client:
            assert watcher.request(b"watch fetchers\r\n") == b"OK\r\n"
            for _ in range(30):
                client.request(b"".join(b"get k%06d%s\r\n" % (i, b"x" * 180)
                                        for i in range(1000)), b"END\r\n" * 1000)
            watcher.sock.settimeout(1.0)
            with contextlib.suppress(socket.timeout):
                while watcher.sock.recv(65536):
                    pass
            client.request(b"get marker\r\n", b"END\r\n")
            lines = read_lines(watcher.sock, 2)
            assert lines[0].startswith("skipped=") and "key=marker" in lines[1]
    finally:
        server.stop()


def test_watch_refuses_unknown_kinds_and_stops_with_the_server():
    server = start_memg()
    with server.connect() as client:
        assert client.request(b"watch nonsense\r\n") == b"ERROR\r\n"
        client.send(b"watch\r\n")                            # fetchers, by default
        assert client.recv_exact(4) == b"OK\r\n"
        with server.connect() as other:
            other.request(b"get k\r\n", b"END\r\n")
        assert fields(read_lines(client.sock, 1)[0])["type"] == "item_get"
        started = time.monotonic()
        code, err = server.stop()
        assert time.monotonic() - started < 3
        assert client.is_closed()
    assert code == 0 and b"Traceback" not in err
