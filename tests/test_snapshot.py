"""Snapshots (-e): the cache kept across a restart, in memg's own file format.

The format and the store's side run in this process (memg.save_snapshot,
memg.read_snapshot, Store.restore); restarts run real memg processes stopped by
SIGUSR1, SIGTERM and SIGINT, on the suite's engine; an embedded memg.Server saves
and loads while clients work.
"""

import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib

import pytest

import memg
from conftest import (ENGINE_ARGS, MEMG, Clock, RawClient, embedded, set_many, start_memg,
                      stats, wait_for)

KB = 1024
MB = 1024 * KB
STORED = b"STORED\r\n"


def filled_store(clock, **settings):
    """A store with an item of each kind a snapshot must keep, "plain" the most
    recently used."""
    store = memg.Store(clock=clock, **settings)
    store.store(memg.SET, b"flags", b"v", flags=0xFFFFFFFF)
    store.store(memg.SET, b"ttl", b"t" * 1000, exptime=100)
    store.store(memg.SET, b"empty", b"")
    store.store(memg.SET, b"binary\x00\xff", bytes(range(256)))
    store.store(memg.SET, b"plain", b"value")
    store.get(b"flags")                       # fetched, and more recent than "plain"
    clock.advance(5)
    store.store(memg.SET, b"plain", b"value 2")
    return store


def restored_from(store, path, **settings):
    memg.save_snapshot(store, str(path))
    restored = memg.Store(clock=store.clock, **settings)
    linked = restored.restore(*memg.read_snapshot(str(path)))
    return restored, linked


# -- the store's side ----------------------------------------------------------------------

def test_a_snapshot_brings_back_every_item_as_it_was(tmp_path):
    store = filled_store(Clock())
    restored, linked = restored_from(store, tmp_path / "snapshot")
    assert linked == 5
    # In the same order of use, each item whole: value, flags, CAS, expiry, last
    # access, whether it was fetched.
    assert list(restored.items) == list(store.items)
    assert restored.items == store.items
    assert restored.bytes == store.bytes


def test_the_cas_counter_goes_on_above_every_unique_restored(tmp_path):
    store = filled_store(Clock())
    restored, _ = restored_from(store, tmp_path / "snapshot")
    highest = max(memg.header(item).cas for item in store.items.values())
    _, item = restored.store(memg.SET, b"new", b"x")
    assert memg.header(item).cas > highest


def test_an_item_expired_while_the_server_was_down_is_left_out(tmp_path):
    clock = Clock()
    store = filled_store(clock)
    memg.save_snapshot(store, str(tmp_path / "snapshot"))
    clock.advance(94)                 # (filled_store's clock has moved 5 s already)
    restored = memg.Store(clock=clock)
    assert restored.restore(*memg.read_snapshot(str(tmp_path / "snapshot"))) == 5
    assert restored.ttl(restored.get(b"ttl", bump=False), clock.now) == 1
    clock.advance(1)
    restored = memg.Store(clock=clock)
    assert restored.restore(*memg.read_snapshot(str(tmp_path / "snapshot"))) == 4
    assert b"ttl" not in restored.items


def test_beyond_the_memory_limit_the_least_recently_used_are_left_out(tmp_path):
    clock = Clock()
    store = memg.Store(clock=clock, memory_limit=4 * MB)
    keys = [b"key%d" % number for number in range(1000)]
    for key in keys:
        store.store(memg.SET, key, b"v" * 2000)
    restored, linked = restored_from(store, tmp_path / "snapshot", memory_limit=1 * MB)
    assert 0 < linked < 1000
    assert list(restored.items) == keys[-linked:]
    assert restored.bytes <= 1 * MB
    assert restored.snapshot()["evictions"] == 0        # left out, not evicted
    # As many as fit: one more would not have.
    assert restored.bytes + memg.item_cost(keys[-linked - 1], 2000) > 1 * MB


def test_an_item_too_large_for_the_new_size_limit_is_left_out(tmp_path):
    restored, linked = restored_from(filled_store(Clock()), tmp_path / "snapshot",
                                     item_size_max=512)
    assert linked == 4
    assert b"ttl" not in restored.items


def test_loaded_items_join_those_there_as_the_most_recent(tmp_path):
    clock = Clock()
    memg.save_snapshot(filled_store(clock), str(tmp_path / "snapshot"))
    store = memg.Store(clock=clock)
    store.store(memg.SET, b"plain", b"old")
    store.store(memg.SET, b"other", b"kept")
    store.flush()                   # (a flush before the load hides none of them)
    store.store(memg.SET, b"after", b"kept")
    assert store.restore(*memg.read_snapshot(str(tmp_path / "snapshot"))) == 5
    assert list(store.items)[0] == b"after"
    assert store.get(b"plain")[memg.VALUE_START:] == b"value 2"
    assert store.get(b"flags") is not None and store.get(b"after") is not None


# -- the format ----------------------------------------------------------------------------

def format_1(items, cas_counter, written=1700000000, hash_power=0):
    """A snapshot of format version 1 made from its description (memg.py, "snapshots"),
    not from memg's code: a later memg must read it as it is.  items: (key, value,
    flags, cas, exptime, atime, fetched), most recently used first."""
    body = b"MEMGSNAP" + struct.pack(">HHq", 1, hash_power, written)
    for key, value, flags, cas, exptime, atime, fetched in items:
        body += struct.pack(">HIIQqqB", len(key), len(value), flags, cas, exptime, atime,
                            fetched) + key + value
    body += struct.pack(">QQ", len(items), cas_counter)
    return body + struct.pack(">I", zlib.crc32(body))


def test_a_file_of_format_1_reads_as_it_is_described(tmp_path):
    now = int(time.time())
    path = tmp_path / "snapshot"
    path.write_bytes(format_1([(b"recent", b"r", 7, 12, now + 60, now - 1, 1),
                               (b"older", b"", 0, 3, 0, now - 50, 0)], cas_counter=20))
    store = memg.Store()
    assert store.restore(*memg.read_snapshot(str(path))) == 2
    assert list(store.items) == [b"older", b"recent"]
    assert memg.unpack_item(store.items[b"recent"]) == (
        12, now + 60, now - 1, 7, memg.FETCHED | store.slabs.slab_class(6, 1, 7) << memg.CLASS_SHIFT,
        b"r")
    assert memg.unpack_item(store.items[b"older"]) == (
        3, 0, now - 50, 0, store.slabs.slab_class(5, 0, 0) << memg.CLASS_SHIFT, b"")
    assert store.last_cas == 20
    assert store.hash_power == 16          # (0: a file of a memg that did not keep it)
    path.write_bytes(format_1([], cas_counter=0, hash_power=20))
    store.restore(*memg.read_snapshot(str(path)))
    assert store.hash_power == 20


def test_what_memg_writes_is_format_1(tmp_path):
    clock = Clock()
    store = filled_store(clock)
    memg.save_snapshot(store, str(tmp_path / "snapshot"))
    written = (tmp_path / "snapshot").read_bytes()
    items = [(key, memg.unpack_item(item)) for key, item in reversed(store.items.items())]
    assert written == format_1(
        [(key, item.value, item.flags, item.cas, item.exptime, item.atime,
          item.state & memg.FETCHED) for key, item in items], store.last_cas,
        written=struct.unpack_from(">q", written, 12)[0], hash_power=16)


def a_snapshot(tmp_path):
    path = tmp_path / "snapshot"
    memg.save_snapshot(filled_store(Clock()), str(path))
    return path.read_bytes()


def refused(tmp_path, data):
    """The SnapshotError read_snapshot raises for a file holding data."""
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(memg.SnapshotError) as error:
        memg.read_snapshot(str(path))
    return str(error.value)


def test_a_truncated_snapshot_is_refused_whole(tmp_path):
    data = a_snapshot(tmp_path)
    for length in sorted({0, 1, 7, 8, 19, 20, 21, 40, len(data) // 2, len(data) - 21,
                          len(data) - 5, len(data) - 4, len(data) - 1}):
        refused(tmp_path, data[:length])


def test_a_snapshot_with_any_byte_changed_is_refused(tmp_path):
    data = a_snapshot(tmp_path)
    for position in range(len(data)):
        changed = bytearray(data)
        changed[position] ^= 0x41
        refused(tmp_path, bytes(changed))


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n" + bytes(100), pickle.dumps({"key": b"value"}),
    b"set key 0 0 5\r\nvalue\r\n", b"MEMGSNAP", b"MEMGSNAP" + bytes(100)],
    ids=["empty", "png", "pickle", "text", "magic-alone", "magic-then-zeros"])
def test_a_foreign_file_is_refused(tmp_path, data):
    refused(tmp_path, data)


def test_a_future_format_is_refused_by_name(tmp_path):
    body = b"MEMGSNAP" + struct.pack(">HHq", 2, 0, 0) + struct.pack(">QQ", 0, 0)
    assert "format version 2" in refused(tmp_path, body + struct.pack(">I", zlib.crc32(body)))


def test_claimed_lengths_and_counts_allocate_nothing(tmp_path):
    # Checksums that match, over items that claim more than the file holds.
    huge_value = b"MEMGSNAP" + struct.pack(">HHq", 1, 0, 0) + struct.pack(
        ">HIIQqqB", 3, 2 ** 32 - 1, 0, 1, 0, 0, 0) + b"key" + struct.pack(">QQ", 1, 1)
    huge_count = b"MEMGSNAP" + struct.pack(">HHq", 1, 0, 0) + struct.pack(">QQ", 2 ** 63, 1)
    for body in (huge_value, huge_count):
        tracemalloc.start()
        try:
            refused(tmp_path, body + struct.pack(">I", zlib.crc32(body)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * KB


# -- writing safely ----------------------------------------------------------------------------

def test_a_save_goes_to_a_private_file_renamed_over_the_last(tmp_path):
    path = tmp_path / "snapshot"
    path.write_bytes(b"the previous one")
    memg.save_snapshot(filled_store(Clock()), str(path))
    assert memg.read_snapshot(str(path))[0]
    assert os.listdir(tmp_path) == ["snapshot"]              # no temporary file left
    assert path.stat().st_mode & 0o077 == 0                  # the cache is no one else's


# -- restarts of the real server -------------------------------------------------------------

def stopped_by(server, signum):
    """Send server signum; (exit code, stderr) once it has exited."""
    server.process.send_signal(signum)
    _, err = server.process.communicate(timeout=30)
    return server.process.returncode, err


def metadump_keys(client):
    return [line.split()[0] for line in client.request(
        b"lru_crawler metadump all\r\n", b"END\r\n").splitlines()[:-1]]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGUSR1", "SIGTERM", "SIGINT"])
def test_a_restarted_server_serves_the_same_items(tmp_path, signum):
    # (A flat LRU, that the order of use is the metadump's while nothing moves; the
    # maintainer of a segmented one moves items between its parts as time passes.)
    path = str(tmp_path / "cache")
    server = start_memg("-e", path, "-o", "no_lru_maintainer")
    with server.connect() as client:
        assert client.request(b"set a 5 0 3\r\nabc\r\nset b 4294967295 100 2\r\nxy\r\n"
                              b"set c 0 0 0\r\n\r\n", STORED * 3) == STORED * 3
        set_many(client, [b"many%d" % number for number in range(2000)], b"m" * 100)
        assert client.request(b"get a\r\n", b"END\r\n").startswith(b"VALUE a")   # a: recent
        before = client.request(b"gets a b c many7\r\n", b"END\r\n")
        order = metadump_keys(client)
    assert stopped_by(server, signum) == (0, b"")
    server = start_memg("-e", path, "-o", "no_lru_maintainer")
    try:
        with server.connect() as client:
            assert client.request(b"gets a b c many7\r\n", b"END\r\n") == before
            assert metadump_keys(client) == order
            ttl = int(client.request(b"mg b t\r\n").split(b" t")[1])
            assert 95 <= ttl <= 100
            highest = max(int(line.split()[4]) for line in before.splitlines()
                          if line.startswith(b"VALUE"))
            reply = client.request(b"set new 0 0 1\r\nx\r\ngets new\r\n", b"END\r\n")
            assert int(reply.split(b"\r\n")[1].split()[4]) > highest
            assert stats(client)["curr_items"] == str(2000 + 4)
    finally:
        server.stop()


def test_a_corrupt_snapshot_starts_an_empty_server_with_one_warning(tmp_path):
    path = tmp_path / "cache"
    path.write_bytes(a_snapshot(tmp_path)[:-1])
    server = start_memg("-e", str(path))
    try:
        assert not path.exists()
        assert (tmp_path / "cache.unreadable").exists()
        with server.connect() as client:
            assert stats(client)["curr_items"] == "0"
            assert client.request(b"set k 0 0 1\r\nv\r\n") == STORED
    finally:
        code, err = server.stop()
    assert code == 0
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "moved to %s.unreadable" % path in lines[0], err
    # The server that started empty saved what it had at its stop.
    assert [key for key, _ in memg.read_snapshot(str(path))[0]] == [b"k"]


def limit_file_size(limit):
    """A preexec_fn: files written by the child may not grow beyond limit bytes (a
    disk that fills up), and writing past it is an error, not a signal."""
    def limit_it():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_it


def test_a_full_disk_mid_save_leaves_no_file_and_no_older_snapshot(tmp_path):
    """The snapshot read at start is gone (as memcached's metadata once read), so a
    save that fails leaves nothing, not the values of an earlier life."""
    path = str(tmp_path / "cache")
    server = start_memg("-e", path)
    with server.connect() as client:
        set_many(client, [b"first%d" % number for number in range(10)], b"f" * 100)
    assert stopped_by(server, signal.SIGTERM) == (0, b"")
    assert os.path.exists(path)
    server = start_memg("-e", path, preexec_fn=limit_file_size(256 * KB))
    assert not os.path.exists(path)
    with server.connect() as client:
        set_many(client, [b"more%d" % number for number in range(2000)], b"m" * 1000)
        set_many(client, [b"first0"], b"changed")
    code, err = stopped_by(server, signal.SIGTERM)
    assert code == 1
    assert err.decode().startswith("memg: cannot write %s: " % path)
    assert len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_a_server_killed_after_a_restart_starts_empty_not_stale(tmp_path):
    path = str(tmp_path / "cache")
    server = start_memg("-e", path)
    with server.connect() as client:
        set_many(client, [b"key"], b"old")
    assert stopped_by(server, signal.SIGTERM) == (0, b"")
    server = start_memg("-e", path)
    with server.connect() as client:
        assert client.request(b"get key\r\n", b"END\r\n") == b"VALUE key 0 3\r\nold\r\nEND\r\n"
        set_many(client, [b"key"], b"new")
    server.process.kill()
    server.process.wait()
    server = start_memg("-e", path)
    try:
        with server.connect() as client:
            assert client.request(b"get key\r\n", b"END\r\n") == b"END\r\n"
    finally:
        assert stopped_by(server, signal.SIGTERM) == (0, b"")


def test_the_hash_table_is_as_large_after_a_restart_as_before(tmp_path):
    """memcached's t/restart.t: its items gone, the table that grew for them stays."""
    path = str(tmp_path / "cache")
    server = start_memg("-e", path)
    with server.connect() as client:
        assert stats(client)["hash_power_level"] == "16"
        set_many(client, [b"k%d" % number for number in range(3 * 2 ** 16 // 2 + 1)], b"")
        wait_for(lambda: stats(client)["hash_power_level"] == "17",
                 what="the table's growth (checked once a second)")
        assert client.request(b"flush_all\r\n") == b"OK\r\n"
    assert stopped_by(server, signal.SIGUSR1) == (0, b"")
    server = start_memg("-e", path)
    try:
        with server.connect() as client:
            numbers = stats(client)
            assert (numbers["hash_power_level"], numbers["curr_items"]) == ("17", "0")
            assert numbers["hash_bytes"] == str(2 ** 17 * 8)
    finally:
        server.stop()


def test_memcacheds_restart_metadata_beside_the_file_is_refused_at_start(tmp_path):
    """memcached's -e writes FILE and FILE.meta: memg neither reads memcached's cache
    nor writes over it (and an empty FILE.meta fails memcached's start too)."""
    path = tmp_path / "cache"
    path.write_bytes(b"memcached's memory")
    (tmp_path / "cache.meta").write_bytes(b"")
    process = subprocess.run([sys.executable, MEMG] + ENGINE_ARGS + [
        "-p", "-1", "-e", str(path)], capture_output=True, text=True, timeout=10)
    assert process.returncode != 0
    assert process.stderr.startswith("memg: %s.meta is memcached's" % path), process.stderr
    assert len(process.stderr.splitlines()) == 1
    assert path.read_bytes() == b"memcached's memory"
    assert sorted(os.listdir(tmp_path)) == ["cache", "cache.meta"]


def test_stale_temporary_files_of_a_crashed_save_are_cleared(tmp_path):
    path = tmp_path / "cache"
    (tmp_path / "cache.x1y2z3.tmp").write_bytes(b"half a snapshot")
    (tmp_path / "other.tmp").write_bytes(b"someone else's")
    server = start_memg("-e", str(path))
    assert sorted(os.listdir(tmp_path)) == ["other.tmp"]
    server.stop()


@pytest.mark.parametrize("where, refusal", [
    ("no/such/folder/cache", "memg: cannot write the memory file's folder"),
    ("", "memg: cannot read the memory file"),                     # a folder
], ids=["no-folder", "a-folder"])
def test_a_memory_file_memg_cannot_use_is_refused_at_start(tmp_path, where, refusal):
    process = subprocess.run([sys.executable, MEMG] + ENGINE_ARGS + [
        "-p", "-1", "-e", str(tmp_path / where)], capture_output=True, text=True, timeout=10)
    assert process.returncode != 0
    assert process.stderr.startswith(refusal), process.stderr
    assert len(process.stderr.splitlines()) == 1
    assert os.path.isdir(tmp_path)                  # (a folder is never moved aside)


# -- the embedded server ---------------------------------------------------------------------

def test_an_embedded_server_saves_and_loads_while_clients_work(tmp_path):
    path = str(tmp_path / "snapshot")
    keys = [b"key%d" % number for number in range(100000)]
    with embedded() as server, embedded() as other:
        with RawClient(server.address) as client:
            set_many(client, keys, b"v" * 100)
        # A client keeps working while the snapshot is taken: it waits for a batch
        # at most, never for the whole save.
        rounds, stop = [], threading.Event()

        def work():
            with RawClient(server.address) as worker:
                while not stop.is_set():
                    assert worker.request(b"set w 0 0 1\r\nx\r\nget key7\r\n", b"END\r\n")
                    rounds.append(time.monotonic())

        thread = threading.Thread(target=work)
        thread.start()
        try:
            wait_for(lambda: rounds, what="the worker's first round")
            started = time.monotonic()
            assert server.save(path) >= len(keys)
            finished = time.monotonic()
        finally:
            stop.set()
            thread.join(10)
        assert any(started < when < finished for when in rounds)
        assert other.load(path) >= len(keys)
        with RawClient(other.address) as client:
            assert client.request(b"get key99999 w\r\n", b"END\r\n") == (
                b"VALUE key99999 0 100\r\n" + b"v" * 100 + b"\r\nVALUE w 0 1\r\nx\r\nEND\r\n")
