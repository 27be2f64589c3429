"""Real memcached clients against a real memg process.

Each of pylibmc (in the text and in the binary protocol), pymemcache and
python-memcached (``import memcache``) is used the way an application uses it, and
must see what it sees against memcached 1.6: the same values (its own serialisation
round-trips through the flags), the same hits, misses and refusals, the same
errors.  Where pylibmc's binary mode reports an outcome differently from its text
mode, memcached is asked too.  python-binary-memcached (``import bmemcached``)
speaks the binary protocol only, with SASL when given credentials: against memg,
an embedded memg.Server and memcached requiring it (-S), and against plain ones.
"""

import functools
import os
import subprocess
import threading
import time
import types

import bmemcached
import memcache
import pylibmc
import pytest
from bmemcached.exceptions import MemcachedException
from pymemcache import serde
from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from conftest import (PYTHON_VALUES, Point, RawClient, embedded, require_tool,
                      start_memcached, start_memg)
from test_binary import Op, Status, failure, request
from test_seed import TIMING_LINE, load_seed

# pylibmc speaks either protocol: every test of it runs in both.
PYLIBMC = ["pylibmc", "pylibmc-binary"]
CLIENTS = PYLIBMC + ["pymemcache", "python-memcached"]

# The largest value memcached stores by default is a little under 1 MB (-I 1m counts
# the item header and key too); these are safely either side of it.
NEAR_LIMIT = 1024 * 1024 - 1024
OVER_LIMIT = 1024 * 1024 + 1


def connect(kind, address, **options):
    """A client of the given kind for one server, configured as an application would
    (pymemcache with its pickle serde, pylibmc with CAS on, python-memcached caching
    CAS ids).  pymemcache waits for replies unless told otherwise."""
    if kind in PYLIBMC:
        behaviors = {"cas": True}
        behaviors.update(options.pop("behaviors", {}))
        return pylibmc.Client(["%s:%d" % address], binary=kind == "pylibmc-binary",
                              behaviors=behaviors, **options)
    if kind == "pymemcache":
        options.setdefault("default_noreply", False)
        return PymemcacheClient(address, serde=serde.pickle_serde, connect_timeout=5,
                                timeout=5, **options)
    if kind == "python-memcached":
        return memcache.Client(["%s:%d" % address], cache_cas=True, socket_timeout=5,
                               **options)
    raise ValueError(kind)


def close(client):
    if isinstance(client, (PymemcacheClient, PooledClient, HashClient)):
        client.close()
    else:
        client.disconnect_all()


@pytest.fixture(params=CLIENTS)
def kind(request):
    return request.param


@pytest.fixture
def mc(kind, memg):
    """A client of each kind connected to the (flushed) shared memg."""
    client = connect(kind, memg.address)
    yield client
    close(client)


def raw_get_many(address, keys):
    """{key: (flags, data)} of the keys that memg has, read with one raw get."""
    found = {}
    with RawClient(address) as raw:
        raw.send(b"get %s\r\n" % b" ".join(keys))
        reply = raw.sock.makefile("rb")
        while True:
            header = reply.readline()
            if header == b"END\r\n":
                return found
            word, name, flags, size = header.split()
            assert word == b"VALUE" and name in keys, header
            data = reply.read(int(size) + 2)
            assert data.endswith(b"\r\n")
            found[name] = int(flags), data[:-2]


def raw_get(address, key):
    """(flags, data) of key as memg sends it, or None on a miss."""
    return raw_get_many(address, [key]).get(key)


def raw_set(address, key, flags, data):
    with RawClient(address) as raw:
        reply = raw.request(b"set %s %d 0 %d\r\n%s\r\n" % (key, flags, len(data), data))
        assert reply == b"STORED\r\n"


def stats_of(kind, client):
    """The general stats of a single-server client, as str -> str."""
    if kind == "pymemcache":
        return {name.decode(): value.decode() if isinstance(value, bytes) else str(value)
                for name, value in client.stats().items()}
    (_, stats), = client.get_stats()
    return {name: value.decode() if isinstance(value, bytes) else value
            for name, value in stats.items()}


# -- values and their serialisation -------------------------------------------------

def test_values_round_trip_with_their_type(mc):
    for name, value in PYTHON_VALUES.items():
        assert mc.set(name, value), name
        got = mc.get(name)
        assert got == value, name
        assert type(got) is type(value), name


def test_serialisation_flags_are_stored_and_served_verbatim(mc, memg):
    samples = {"bytes": b"plain", "str": "text", "int": 12345, "object": Point(1, 2)}
    seen = {}
    for name, value in samples.items():
        assert mc.set(name, value)
        stored = raw_get(memg.address, name.encode())
        assert stored is not None, name
        seen[name] = stored
    flags = {name: stored[0] for name, stored in seen.items()}
    assert flags["bytes"] == 0
    assert len(set(flags.values())) == len(flags), flags
    # The same bytes and flags written by someone else decode the same way.
    for name, (flag, data) in seen.items():
        raw_set(memg.address, b"copy_" + name.encode(), flag, data)
        assert mc.get("copy_" + name) == samples[name], name


def test_large_flag_values_are_kept(memg):
    raw_set(memg.address, b"flagged", 2 ** 32 - 1, b"x")
    assert raw_get(memg.address, b"flagged") == (2 ** 32 - 1, b"x")


def test_compressed_values_round_trip(kind, memg):
    value = "compressible " * 2000
    if kind == "pymemcache":
        client = PymemcacheClient(memg.address, default_noreply=False, timeout=5,
                                  serde=serde.CompressedSerde(min_compress_len=100))
        stored = client.set("zipped", value)
    else:
        client = connect(kind, memg.address)
        stored = client.set("zipped", value, min_compress_len=100)
    try:
        assert stored
        flags, data = raw_get(memg.address, b"zipped")
        assert flags & 8             # every one of these clients marks zlib with 1 << 3
        assert len(data) < len(value) // 10
        assert client.get("zipped") == value
    finally:
        close(client)


def test_unicode_values(mc):
    values = ["héllo wörld", "✓ 日本語 🎉", "Ωμέγα\u2028line\u0000nul", "€" * 5000]
    for index, value in enumerate(values):
        assert mc.set("unicode%d" % index, value)
    for index, value in enumerate(values):
        assert mc.get("unicode%d" % index) == value


BINARY_VALUES = [
    b"",
    b"\r\n",
    b"a\r\nb",
    b"\x00",
    b"nul\x00inside\x00",
    b"END\r\n",
    b"\r\nEND\r\n",
    b"VALUE other 0 5\r\nhello\r\nEND\r\n",
    b"\r\n\r\n\x00\r\n",
    bytes(range(256)) * 4,
]


def test_binary_values(mc):
    for index, value in enumerate(BINARY_VALUES):
        assert mc.set("binary%d" % index, value)
    for index, value in enumerate(BINARY_VALUES):
        assert mc.get("binary%d" % index) == value, index


def test_binary_values_in_one_multi_get(mc):
    mapping = {"binary%d" % index: value for index, value in enumerate(BINARY_VALUES)}
    assert mc.set_multi(mapping) == []
    assert mc.get_multi(list(mapping)) == mapping


def test_value_near_the_size_limit_is_stored(mc):
    value = bytes(range(256)) * (NEAR_LIMIT // 256)
    assert len(value) == NEAR_LIMIT
    assert mc.set("large", value)
    assert mc.get("large") == value


def test_value_over_the_size_limit_is_refused(kind, mc, memg):
    value = b"x" * OVER_LIMIT
    assert mc.set("huge", b"old")
    if kind in PYLIBMC:
        with pytest.raises(pylibmc.TooBig):
            mc.set("huge", value)
    elif kind == "pymemcache":
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            mc.set("huge", value)
    else:
        assert not mc.set("huge", value)   # refused by the client: never sent
    # The connection is still in step.
    assert mc.set("after", "fine")
    assert mc.get("after") == "fine"
    if kind != "python-memcached":
        # As memcached: a set that was refused for size drops the old value.
        assert mc.get("huge") is None


def test_python_memcached_without_a_size_check_gets_the_server_refusal(memg):
    client = connect("python-memcached", memg.address, server_max_value_length=0)
    try:
        assert client.set("huge", b"old")
        assert client.set("huge", b"x" * OVER_LIMIT) is False
        assert client.get("huge") is None
        assert client.set("after", 1)
        assert client.get("after") == 1
    finally:
        close(client)


# -- keys ---------------------------------------------------------------------------

def test_missing_key(mc):
    assert mc.get("no_such_key") is None
    assert mc.get_multi(["no_such_key", "nor_this"]) == {}


@pytest.mark.parametrize("mapping_kind", PYLIBMC + ["pymemcache"])
def test_missing_key_raises_key_error_through_the_mapping_interface(mapping_kind, memg):
    client = connect(mapping_kind, memg.address)
    try:
        with pytest.raises(KeyError):
            client["absent"]
        client["present"] = "here"
        assert client["present"] == "here"
    finally:
        close(client)


def test_key_of_250_bytes(mc, memg):
    key = "k" * 250
    assert mc.set(key, "long key")
    assert mc.get(key) == "long key"
    assert mc.get_multi([key]) == {key: "long key"}
    assert raw_get(memg.address, key.encode()) is not None


def test_multi_set_and_get_of_many_keys(mc):
    mapping = {}
    for index in range(1000):
        mapping["key%d" % index] = [index, "text%d" % index, b"bytes%d" % index][index % 3]
    assert mc.set_multi(mapping) == []
    wanted = list(mapping) + ["missing%d" % index for index in range(50)]
    assert mc.get_multi(wanted) == mapping


def test_multi_get_of_many_long_keys(mc):
    # 400 keys of 250 bytes: one get line of about 100 KB.
    mapping = {"%03d" % index + "k" * 247: index for index in range(400)}
    assert mc.set_multi(mapping) == []
    assert mc.get_multi(list(mapping)) == mapping


# -- storage commands ---------------------------------------------------------------

def test_add_stores_only_a_new_key(mc):
    assert mc.add("added", "first")
    assert not mc.add("added", "second")
    assert mc.get("added") == "first"


def test_replace_stores_only_an_existing_key(kind, mc):
    if kind == "pylibmc-binary":
        # libmemcached raises the binary protocol's "not found" (as against
        # memcached: test_pylibmc_binary_mode_raises_where_text_mode_does_not).
        with pytest.raises(pylibmc.NotFound):
            mc.replace("replaced", "nothing there")
    else:
        assert not mc.replace("replaced", "nothing there")
    assert mc.get("replaced") is None
    assert mc.set("replaced", "old")
    assert mc.replace("replaced", "new")
    assert mc.get("replaced") == "new"


def test_append_and_prepend(mc):
    assert not mc.append("joined", "x")
    assert not mc.prepend("joined", "x")
    assert mc.get("joined") is None
    assert mc.set("joined", "b")
    assert mc.append("joined", "c")
    assert mc.prepend("joined", "a")
    assert mc.get("joined") == "abc"


def test_append_keeps_the_original_flags(mc):
    # The appended text is sent with the client's str flags; the item keeps the
    # int flags it was set with, so it still reads back as an int.
    assert mc.set("number", 12)
    assert mc.append("number", "5")
    assert mc.prepend("number", "9")
    assert mc.get("number") == 9125


def test_append_binary_data(mc):
    assert mc.set("joined", b"\x00bin")
    assert mc.append("joined", b"ary\r\n")
    assert mc.prepend("joined", b"\r\nEND\r\n")
    assert mc.get("joined") == b"\r\nEND\r\n\x00binary\r\n"


def test_delete(mc):
    assert mc.set("doomed", 1)
    assert mc.delete("doomed")
    assert mc.get("doomed") is None
    assert not mc.delete("doomed")


def test_flush_all(mc):
    assert mc.set_multi({"one": 1, "two": 2, "three": 3}) == []
    mc.flush_all()
    assert mc.get_multi(["one", "two", "three"]) == {}
    assert mc.set("one", "again")
    assert mc.get("one") == "again"


# -- incr and decr ------------------------------------------------------------------

def test_incr_and_decr(mc):
    assert mc.set("counter", 10)
    assert mc.incr("counter", 5) == 15
    assert mc.decr("counter", 3) == 12
    assert mc.get("counter") == 12
    assert mc.incr("counter", 1) == 13
    assert mc.decr("counter", 1) == 12


def test_incr_grows_and_decr_shrinks_the_number(mc):
    assert mc.set("counter", 99)
    assert mc.incr("counter", 1) == 100
    assert mc.get("counter") == 100
    assert mc.decr("counter", 91) == 9
    # memcached pads a shorter result with spaces; int flags still decode it.
    assert mc.get("counter") == 9


def test_decr_stops_at_zero(mc):
    assert mc.set("counter", 5)
    assert mc.decr("counter", 10) == 0
    assert mc.get("counter") == 0
    assert mc.decr("counter", 1) == 0


def test_incr_wraps_at_64_bits(mc):
    assert mc.set("counter", "18446744073709551615")
    assert mc.incr("counter", 1) == 0
    # As memcached: the shorter number is padded with spaces to the old length.
    assert mc.get("counter") == "0" + " " * 19
    assert mc.incr("counter", 2) == 2


def test_incr_by_a_64_bit_delta_wraps(kind, mc):
    if kind in PYLIBMC:
        delta = 2 ** 31 - 1            # the largest delta pylibmc accepts (a C int)
    else:
        delta = 2 ** 64 - 1
    assert mc.set("counter", str(2 ** 64 - 5))
    assert mc.incr("counter", delta) == (2 ** 64 - 5 + delta) % 2 ** 64


def test_incr_and_decr_of_a_missing_key(kind, mc):
    if kind in PYLIBMC:
        with pytest.raises(pylibmc.NotFound):
            mc.incr("absent", 1)
        with pytest.raises(pylibmc.NotFound):
            mc.decr("absent", 1)
    else:
        assert mc.incr("absent", 1) is None
        assert mc.decr("absent", 1) is None
    assert mc.get("absent") is None


def test_incr_of_a_non_number(kind, mc, memg):
    assert mc.set("word", "abc")
    errors = {"pylibmc": pylibmc.ClientError, "pymemcache": MemcacheClientError,
              # libmemcached fails to read the binary protocol's "non-numeric" reply
              # and takes the server for failed (as against memcached:
              # test_pylibmc_binary_mode_raises_where_text_mode_does_not).
              "pylibmc-binary": pylibmc.UnknownReadFailure,
              # python-memcached tries int() on the CLIENT_ERROR line.
              "python-memcached": ValueError}
    with pytest.raises(errors[kind]):
        mc.incr("word", 1)
    checker = connect(kind, memg.address)
    try:
        assert checker.get("word") == "abc"
    finally:
        close(checker)


# -- touch, cas, expiry -------------------------------------------------------------

def test_touch(mc):
    assert not mc.touch("absent", 10)
    assert mc.set("touched", "v")
    assert mc.touch("touched", 100)
    assert mc.get("touched") == "v"


def check_gets_and_cas(client):
    """The gets/cas round pylibmc and pymemcache share; returns the final unique."""
    assert client.gets("item") == (None, None)
    client.set("item", "first")
    value, unique = client.gets("item")
    assert value == "first"
    assert client.gets("item") == ("first", unique)
    assert client.cas("item", "second", unique) is True
    assert client.get("item") == "second"
    assert client.cas("item", "third", unique) is False     # EXISTS
    assert client.get("item") == "second"
    _, newer = client.gets("item")
    assert newer != unique
    return newer


@pytest.mark.parametrize("pylibmc_kind", PYLIBMC)
def test_cas_pylibmc(pylibmc_kind, memg):
    client = connect(pylibmc_kind, memg.address)
    try:
        newer = check_gets_and_cas(client)
        with pytest.raises(pylibmc.NotFound):
            client.cas("absent", "value", newer)
    finally:
        close(client)


def test_cas_pymemcache(memg):
    client = connect("pymemcache", memg.address)
    try:
        newer = check_gets_and_cas(client)
        assert client.cas("absent", "value", newer) is None     # NOT_FOUND
        many = client.gets_many(["item", "absent"])
        assert many == {"item": ("second", newer)}
    finally:
        close(client)


def test_cas_python_memcached(memg):
    client = connect("python-memcached", memg.address)
    other = connect("python-memcached", memg.address)
    try:
        assert client.gets("item") is None
        client.set("item", "first")
        assert client.gets("item") == "first"
        assert client.cas("item", "second") is True
        assert client.get("item") == "second"
        # The cached CAS id is now stale: the client's own write changed it.
        assert client.cas("item", "third") is False
        assert client.gets("item") == "second"
        other.set("item", "from elsewhere")
        assert client.cas("item", "lost update") is False
        assert client.get("item") == "from elsewhere"
    finally:
        close(client)
        close(other)


def test_cas_uniques_change_on_every_write(memg):
    client = connect("pymemcache", memg.address)
    try:
        uniques = []
        for value in ("a", "b", "c"):
            client.set("item", value)
            uniques.append(client.gets("item")[1])
        client.append("item", "d")
        uniques.append(client.gets("item")[1])
        client.set("number", 1)
        uniques.append(client.gets("number")[1])
        client.incr("number", 1)
        uniques.append(client.gets("number")[1])
        assert len(set(uniques)) == len(uniques), uniques
    finally:
        close(client)


def expire(kind, seconds):
    """The keyword argument that sets an expiry time in each client's API."""
    return {"expire": seconds} if kind == "pymemcache" else {"time": seconds}


def test_expiry_and_touch(memg):
    """The file's one wait: items set with time=1 are gone two seconds later, for
    every client; touch both lengthens and shortens a life."""
    clients = {kind: connect(kind, memg.address) for kind in CLIENTS}
    try:
        for kind, client in clients.items():
            one_second = expire(kind, 1)
            assert client.set(kind + "_short", "v", **one_second)
            assert client.get(kind + "_short") == "v"
            assert client.set(kind + "_kept", "v", **one_second)
            assert client.touch(kind + "_kept", 100)
            assert client.set(kind + "_shortened", "v")
            assert client.touch(kind + "_shortened", 1)
            assert client.add(kind + "_added", "v", **one_second)
            assert client.set_multi({kind + "_multi": "v"}, **one_second) == []
            assert client.set(kind + "_forever", "v")
        time.sleep(2.1)
        for kind, client in clients.items():
            for gone in ("_short", "_shortened", "_added", "_multi"):
                assert client.get(kind + gone) is None, kind + gone
            assert client.get(kind + "_kept") == "v", kind
            assert client.get(kind + "_forever") == "v", kind
            # An expired key is free for add again.
            assert client.add(kind + "_added", "again")
            assert client.get(kind + "_added") == "again"
    finally:
        for client in clients.values():
            close(client)


# -- stats --------------------------------------------------------------------------

def test_stats(kind):
    server = start_memg()      # fresh: nothing stored, nothing flushed
    client = connect(kind, server.address)
    try:
        assert client.set_multi({"one": 1, "two": 2, "three": 3}) == []
        before = stats_of(kind, client)
        assert before["curr_items"] == "3"
        assert before["total_items"] == "3"
        assert before["pid"] == str(server.process.pid)
        assert before["version"].startswith("1.6")
        assert int(before["limit_maxbytes"]) == 64 * 1024 * 1024
        assert int(before["bytes"]) > 0
        client.get("one")
        client.get("two")
        client.get("absent")
        after = stats_of(kind, client)
        assert int(after["get_hits"]) - int(before["get_hits"]) == 2
        assert int(after["get_misses"]) - int(before["get_misses"]) == 1
        assert int(after["cmd_get"]) - int(before["cmd_get"]) == 3
        assert after["curr_items"] == "3"
    finally:
        close(client)
        server.stop()


# -- noreply ------------------------------------------------------------------------

def test_pymemcache_noreply_by_default(memg):
    client = PymemcacheClient(memg.address, serde=serde.pickle_serde, timeout=5)
    try:
        assert client.default_noreply is True
        assert client.set("quiet", "one") is True
        assert client.set_many({"quiet%d" % index: index for index in range(100)}) == []
        assert client.add("quiet", "not stored") is True     # noreply: no verdict
        assert client.replace("absent", "not stored") is True
        assert client.append("quiet", "+two") is True
        assert client.set("count", 5) is True
        assert client.incr("count", 3, noreply=True) is None
        assert client.decr("count", 1, noreply=True) is None
        assert client.touch("quiet", 100) is True
        assert client.delete("quiet0") is True
        assert client.delete("absent") is True
        # The replies that did come are the ones asked for, in order.
        assert client.get("quiet") == "one+two"
        assert client.get("absent") is None
        assert client.get("count") == 7
        assert client.get_many(["quiet0", "quiet1", "quiet99"]) == {"quiet1": 1, "quiet99": 99}
        assert client.flush_all() is True
        assert client.get("quiet") is None
    finally:
        close(client)


def test_python_memcached_noreply(memg):
    client = connect("python-memcached", memg.address)
    try:
        assert client.set("quiet", 1, noreply=True)
        assert client.incr("quiet", 5, noreply=True) is None
        assert client.add("quiet", 9, noreply=True)
        assert client.set_multi({"a": 1, "b": "two"}, noreply=True) == []
        assert client.delete("a", noreply=True)
        assert client.touch("b", 100, noreply=True)
        assert client.get("quiet") == 6
        assert client.get_multi(["a", "b"]) == {"b": "two"}
    finally:
        close(client)


@pytest.mark.parametrize("pylibmc_kind", PYLIBMC)
def test_pylibmc_noreply_behavior(pylibmc_kind, memg):
    client = connect(pylibmc_kind, memg.address, behaviors={"_noreply": True})
    checker = connect(pylibmc_kind, memg.address)
    try:
        assert client.set("quiet", 5)
        assert client.set("gone", 1)
        assert client.delete("gone")
        assert client.add("quiet", 9)
        assert client.set_multi({"a": 1, "b": 2}) == []
        assert client.get("quiet") == 5
        assert client.get_multi(["quiet", "gone", "a", "b"]) == {"quiet": 5, "a": 1, "b": 2}
        assert checker.get("quiet") == 5
        assert checker.get("gone") is None
    finally:
        close(client)
        close(checker)


# -- client configurations ----------------------------------------------------------

@pytest.mark.parametrize("behaviors", [
    {"tcp_nodelay": True},
    {"tcp_nodelay": True, "no_block": True},
    {"tcp_nodelay": True, "ketama": True, "verify_keys": True},
], ids=["tcp_nodelay", "no_block", "ketama"])
@pytest.mark.parametrize("pylibmc_kind", PYLIBMC)
def test_pylibmc_behaviors(memg, pylibmc_kind, behaviors):
    servers = ["%s:%d" % memg.address]
    binary = pylibmc_kind == "pylibmc-binary"
    if binary and "verify_keys" in behaviors:
        # libmemcached has no key check for the binary protocol (keys are counted
        # there, not ended by a space): it refuses the behavior, before any server.
        with pytest.raises(pylibmc.Error, match="verify_keys"):
            pylibmc.Client(servers, binary=True, behaviors=behaviors)
        behaviors = {name: on for name, on in behaviors.items() if name != "verify_keys"}
    client = pylibmc.Client(servers, binary=binary, behaviors=behaviors)
    try:
        for name in behaviors:
            assert client.behaviors[name]
        assert client.set("plain", "value")
        assert client.get("plain") == "value"
        mapping = {"key%d" % index: index for index in range(200)}
        assert client.set_multi(mapping) == []
        assert client.get_multi(list(mapping) + ["absent"]) == mapping
        assert client.incr("key5", 10) == 15
        assert client.delete("key5")
        assert client.get("key5") is None
    finally:
        close(client)


def test_pymemcache_pooled_client_from_threads(memg):
    client = PooledClient(memg.address, serde=serde.pickle_serde, max_pool_size=8,
                          timeout=5, default_noreply=False)
    failures = []

    def work(worker):
        try:
            for index in range(50):
                key = "w%d_%d" % (worker, index)
                assert client.set(key, (worker, index))
                assert client.get(key) == (worker, index)
            assert client.incr("shared", 1) is not None
        except Exception as error:  # reported below, from the main thread
            failures.append(error)

    try:
        assert client.set("shared", 0)
        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == []
        assert client.get("shared") == 8
    finally:
        client.close()


# -- several servers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_memg_processes():
    servers = [start_memg(), start_memg()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def two_memgs(two_memg_processes):
    for server in two_memg_processes:
        with server.connect() as raw:
            assert raw.request(b"flush_all\r\n") == b"OK\r\n"
    return two_memg_processes


def connect_many(kind, addresses):
    servers = ["%s:%d" % address for address in addresses]
    if kind in PYLIBMC:
        return pylibmc.Client(servers, binary=kind == "pylibmc-binary")
    if kind == "pymemcache":
        return HashClient(addresses, serde=serde.pickle_serde, timeout=5,
                          default_noreply=False)
    return memcache.Client(servers, socket_timeout=5)


def test_keys_spread_over_two_servers(kind, two_memgs):
    addresses = [server.address for server in two_memgs]
    client = connect_many(kind, addresses)
    try:
        mapping = {"spread%d" % index: "value%d" % index for index in range(200)}
        assert client.set_multi(mapping) == []
        assert client.get_multi(list(mapping)) == mapping
        for key, value in list(mapping.items())[:20]:
            assert client.get(key) == value
        placed = {address: set(raw_get_many(address, [key.encode() for key in mapping]))
                  for address in addresses}
        first, second = placed.values()
        assert first and second, placed
        assert not first & second
        assert first | second == {key.encode() for key in mapping}
        for server in two_memgs:
            with server.connect() as raw:
                stats = raw.request(b"stats\r\n", b"END\r\n")
            assert b"STAT curr_items %d\r\n" % len(placed[server.address]) in stats
    finally:
        close(client)


# -- -Y: a client logs in with a set of "user password" -----------------------------

@pytest.fixture(scope="module")
def auth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth"
    path.write_text("alice:secret\n")
    return path


@pytest.fixture(scope="module")
def auth_memg(auth_file):
    server = start_memg("-Y", str(auth_file))
    yield server
    server.stop()


# -Y is the text protocol's (see test_a_binary_client_is_not_answered_under_ascii_auth).
@pytest.mark.parametrize("kind", ["pylibmc", "pymemcache", "python-memcached"])
def test_clients_log_in_with_a_set_then_work_normally(kind, auth_memg):
    client = connect(kind, auth_memg.address)
    try:
        assert client.set("login", "alice secret")
        assert client.set("k", "v")
        assert client.get("k") == "v"
    finally:
        close(client)


def test_a_client_that_has_not_logged_in_is_refused(auth_memg):
    client = connect("pymemcache", auth_memg.address)
    try:
        with pytest.raises(MemcacheClientError, match="unauthenticated"):
            client.get("k")
        with pytest.raises(MemcacheClientError, match="authentication failure"):
            client.set("login", "alice wrong")
    finally:
        close(client)


@pytest.mark.parametrize("start", [start_memcached, start_memg], ids=["memcached", "memg"])
def test_a_binary_client_is_not_answered_under_ascii_auth(start, auth_file):
    # With -Y memcached serves the text protocol alone, and memg too: a binary
    # request is read as the start of a line that never ends.
    server = start("-Y", str(auth_file))
    client = connect("pylibmc-binary", server.address, behaviors={"_poll_timeout": 500})
    try:
        with pytest.raises(pylibmc.Error, match="TIMEOUT"):
            client.set("login", "alice secret")
    finally:
        close(client)
        server.stop()


# -- pylibmc's binary mode, as against memcached ---------------------------------------

@pytest.fixture(params=["memcached", "memg"])
def either_server(request):
    """The shared memcached process, then the shared memg one, flushed: for what a
    client must see the same from both."""
    process = request.getfixturevalue(request.param + "_process")
    with process.connect() as client:
        assert client.request(b"flush_all\r\n") == b"OK\r\n"
    return process


def replace_a_missing_key(client):
    client.replace("absent", "value")


def incr_a_non_number(client):
    assert client.set("word", "abc")
    client.incr("word", 1)


@pytest.mark.parametrize("call, error", [
    (replace_a_missing_key, pylibmc.NotFound),
    # libmemcached cannot read the "non-numeric" reply in binary mode.
    (incr_a_non_number, pylibmc.UnknownReadFailure),
], ids=["replace-missing", "incr-non-number"])
def test_pylibmc_binary_mode_raises_where_text_mode_does_not(either_server, call, error):
    client = connect("pylibmc-binary", either_server.address)
    try:
        with pytest.raises(error):
            call(client)
    finally:
        close(client)


def test_seed_loop_in_the_binary_protocol(capsys):
    """test.py's main (a miss raises KeyError, CR LF round-trips, 10,000 sets and
    gets over one pylibmc client) with that client in binary mode, against a memg
    that speaks nothing else (-B binary)."""
    server = start_memg("-B", "binary")
    seed = load_seed()
    seed.pylibmc = types.SimpleNamespace(Client=functools.partial(pylibmc.Client, binary=True))
    checker = connect("pylibmc-binary", server.address)
    try:
        seed.main(10000, "127.0.0.1:%d" % server.port)
        assert TIMING_LINE.match(capsys.readouterr().out.strip()).groups() == (
            "10000", "10000")
        assert checker.get_multi(["crlf", "0", "9999"]) == {
            "crlf": "one\r\ntwo", "0": 0, "9999": 9999}
        (_, numbers), = checker.get_stats()
        assert (numbers["cmd_set"], numbers["get_hits"], numbers["get_misses"]) == (
            b"10001", b"10004", b"1")
    finally:
        close(checker)
        server.stop()


# -- python-binary-memcached, with and without SASL --------------------------------------

USER, PASSWORD = "alice", "secret"


@pytest.fixture(scope="module")
def sasl_servers(tmp_path_factory):
    """memcached, memg and an embedded memg.Server requiring SASL (-S), each knowing
    alice's password: memg from the user:password file MEMCACHED_SASL_PWDB names (the
    Server from its sasl_pwdb setting), Debian's memcached (built without that) from
    a Cyrus SASL database for its PLAIN mechanism."""
    directory = tmp_path_factory.mktemp("sasl")
    (directory / "pwdb").write_text("%s:%s\n" % (USER, PASSWORD))
    subprocess.run([require_tool("saslpasswd2"), "-p", "-c", "-a", "memcached", "-f",
                    str(directory / "sasldb2"), USER], input=PASSWORD.encode(), check=True)
    (directory / "memcached.conf").write_text(
        "mech_list: plain\nsasldb_path: %s\n" % (directory / "sasldb2"))
    servers = {
        "memcached": start_memcached("-S", env=dict(os.environ,
                                                    SASL_CONF_PATH=str(directory))),
        "memg": start_memg("-S", env=dict(os.environ,
                                          MEMCACHED_SASL_PWDB=str(directory / "pwdb"))),
        "embedded": embedded(sasl=True, sasl_pwdb=str(directory / "pwdb")).start()}
    yield servers
    for server in servers.values():
        server.stop()


def sasl_client(server, *credentials):
    return bmemcached.Client(["%s:%d" % server.address], *credentials, socket_timeout=5)


def as_alice(server, method, *args):
    """What a call on a client of its own, with alice's password, returns."""
    client = sasl_client(server, USER, PASSWORD)
    try:
        return getattr(client, method)(*args)
    finally:
        client.disconnect_all()


def auth_counts(server):
    """(auth_cmds, auth_errors): authentications tried, and failed."""
    (numbers,) = as_alice(server, "stats").values()
    return int(numbers["auth_cmds"]), int(numbers["auth_errors"])


# A little of everything, and what bmemcached returns for it from a server that
# serves it: set, get (a miss, a hit), incr (of a missing key: created with 0), set
# and get many, add (refused), delete, get.
WORKLOAD = [("set", ("k", "v")), ("get", ("absent",)), ("get", ("k",)), ("incr", ("n", 5)),
            ("incr", ("n", 5)), ("set_multi", ({"a": 1, "b": [2]},)),
            ("get_multi", (["a", "b", "k", "absent"],)), ("add", ("k", "w")),
            ("delete", ("k",)), ("get", ("k",))]
SERVED = [True, None, "v", 0, 5, [], {"a": 1, "b": [2], "k": "v"}, False, True, None]


def run_workload(server, *credentials):
    """What bmemcached returns for each call of WORKLOAD, ("refused", status) where
    it raises a refusal."""
    client = sasl_client(server, *credentials)
    outcomes = []
    try:
        for method, args in WORKLOAD:
            try:
                outcomes.append(getattr(client, method)(*args))
            except MemcachedException as refusal:
                outcomes.append(("refused", refusal.code))
    finally:
        client.disconnect_all()
    return outcomes


def sasl_workload(sasl_servers, *credentials):
    """WORKLOAD's outcomes with these credentials, the authentications it tried and
    those that failed, and whether it left anything stored, from each of
    sasl_servers (emptied first): the same from each."""
    seen = {}
    for name, server in sasl_servers.items():
        assert as_alice(server, "flush_all")
        before = auth_counts(server)
        outcomes = run_workload(server, *credentials)
        after = auth_counts(server)
        stored = as_alice(server, "get_multi", ["k", "n", "a", "b"])
        # (auth_counts authenticates once itself.)
        seen[name] = (outcomes, after[0] - before[0] - 1, after[1] - before[1], stored)
    assert seen["memg"] == seen["memcached"]
    assert seen["embedded"] == seen["memcached"]
    return seen["memg"]


def test_bmemcached_with_the_password_is_served(sasl_servers):
    outcomes, tried, failed, stored = sasl_workload(sasl_servers, USER, PASSWORD)
    assert outcomes == SERVED
    assert (tried, failed) == (1, 0)
    assert stored == {"n": "5", "a": 1, "b": [2]}       # a counter has no int flag


@pytest.mark.parametrize("user, password", [(USER, "wrong"), ("mallory", PASSWORD)],
                         ids=["wrong-password", "unknown-user"])
def test_bmemcached_with_wrong_credentials_is_refused(sasl_servers, user, password):
    outcomes, tried, failed, stored = sasl_workload(sasl_servers, user, password)
    # bmemcached takes status 0x08 for the refusal of its SASL request, not the
    # protocol's 0x20, so it raises it as any other failure, not as InvalidCredentials.
    assert outcomes[0] == ("refused", Status.AUTH_ERROR)
    assert "v" not in outcomes and {} not in outcomes
    # The server refuses the next request (unauthenticated) and closes; bmemcached
    # tries again on a new connection, each time with the same credentials.
    assert failed == tried > 1
    assert stored == {}


def test_bmemcached_without_credentials_is_refused(sasl_servers):
    outcomes, tried, failed, stored = sasl_workload(sasl_servers)
    assert outcomes[0] == ("refused", Status.AUTH_ERROR)
    assert "v" not in outcomes
    assert (tried, failed) == (0, 0)
    assert stored == {}


@pytest.fixture(params=["memcached", "memg", "embedded"])
def sasl_server(request, sasl_servers):
    return sasl_servers[request.param]


def test_a_request_before_authentication_gets_auth_error_and_a_close(sasl_server):
    with RawClient(sasl_server.address) as client:
        client.send(request(Op.GET, b"k"))
        assert client.read_to_eof() == failure(Op.GET, Status.AUTH_ERROR)


def test_a_text_command_under_sasl_is_closed_once_a_header_has_come(sasl_server):
    # -S serves the binary protocol alone: a text line is read as a request header,
    # and its first byte is not a request's magic.
    with RawClient(sasl_server.address) as client:
        client.send(b"get k\r\n")
        assert not client.is_closed(timeout=0.5)        # 7 bytes: not a header yet
        client.send(b"get kkkkkkkkkkkkkkkk\r\n")
        assert client.read_to_eof() == b""


@pytest.mark.parametrize("credentials", [(), (USER, PASSWORD)], ids=["plain", "credentials"])
def test_bmemcached_against_a_server_without_sasl(either_server, credentials):
    # With credentials, bmemcached first asks for the SASL mechanisms, and takes
    # "unknown command" for a server that needs no authentication.
    assert run_workload(either_server, *credentials) == SERVED
    client = sasl_client(either_server, *credentials)
    try:
        for name, value in PYTHON_VALUES.items():
            assert client.set(name, value), name
            assert client.get(name) == value, name
        assert client.set("word", "abc")
        with pytest.raises(MemcachedException) as refusal:
            client.incr("word", 1)
        assert refusal.value.code == Status.NON_NUMERIC
        assert client.decr("n", 1) == 4            # after the workload's increments
        assert client.delete_multi(["a", "b"])
        assert client.get_multi(["a", "b", "word"]) == {"word": "abc"}
    finally:
        client.disconnect_all()
