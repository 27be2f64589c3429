"""Real frameworks against a memg.Server embedded in the test process, on the
suite's engine (conftest.embedded).

What this file shows:

* Django's memcached cache backends, ``PyMemcacheCache`` and ``PyLibMCCache``, work
  against memg as Django documents them against memcached: values of any picklable
  type, defaults, add, incr/decr (ValueError for a missing key), the *_many
  methods, touch, delete, has_key, get_or_set, clear, versioned keys, and timeouts
  (a number of seconds expires in real time, None never expires, 0 expires at once,
  more than 30 days reaches the server as the absolute time memcached expects);
* aiomcache, an asyncio client, gets memcached's answers for every command it has,
  including many commands in flight at once over its connection pool.

Every expectation here was checked against memcached 1.6.18 with the same library.
What Django's memcached key validation refuses never reaches a server, so it is not
tested here.
"""

import asyncio
import pickle
import threading

import aiomcache
import django
import pylibmc
import pytest
from aiomcache.exceptions import ClientException
from django.conf import settings
from django.core.signals import request_finished
from pymemcache.exceptions import MemcacheServerError

from conftest import PYTHON_VALUES, RawClient, embedded, wait_for

BACKENDS = {
    "pymemcache": "django.core.cache.backends.memcached.PyMemcacheCache",
    "pylibmc": "django.core.cache.backends.memcached.PyLibMCCache",
}

# The largest value memg (as memcached) stores by default is a little under 1 MB.
OVER_LIMIT = 1024 * 1024 + 1

# What each library raises when the server refuses a value as too large.
TOO_LARGE = {"pymemcache": MemcacheServerError, "pylibmc": pylibmc.TooBig}

DAY = 24 * 60 * 60


@pytest.fixture(scope="module")
def server():
    with embedded() as server:
        yield server


def ttl(server, key):
    """The seconds key has left as the server reports them (meta get's t flag): -1
    for never, None if the server does not have it."""
    with RawClient(server.address) as raw:
        reply = raw.request(b"mg %s t\r\n" % key.encode())
    if reply == b"EN\r\n":
        return None
    word, flag = reply.split()
    assert word == b"HD" and flag.startswith(b"t"), reply
    return int(flag[1:])


# -- Django ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def django_caches(server):
    """django.core.cache.caches, configured once with one alias per backend, both
    pointing at the embedded server."""
    location = "%s:%d" % server.address
    settings.configure(CACHES={alias: {"BACKEND": backend, "LOCATION": location}
                               for alias, backend in BACKENDS.items()})
    django.setup()
    from django.core.cache import caches
    yield caches
    for alias in BACKENDS:
        caches[alias].close()


@pytest.fixture(params=list(BACKENDS))
def alias(request):
    return request.param


@pytest.fixture
def cache(alias, django_caches):
    """The Django cache of one backend, emptied."""
    cache = django_caches[alias]
    cache.clear()
    return cache


def test_django_values_round_trip_with_their_type(cache):
    for name, value in PYTHON_VALUES.items():
        cache.set(name, value)
    for name, value in PYTHON_VALUES.items():
        assert cache.get(name) == value, name
        assert type(cache.get(name)) is type(value), name


def test_django_get_of_a_missing_key_returns_the_default(cache):
    assert cache.get("absent") is None
    assert cache.get("absent", "fallback") == "fallback"
    # A stored None is a value, not a miss.
    cache.set("nothing", None)
    assert cache.get("nothing", "fallback") is None


def test_django_add_stores_only_a_new_key(cache):
    assert cache.add("key", "first") is True
    assert cache.add("key", "second") is False
    assert cache.get("key") == "first"


def test_django_incr_and_decr(cache):
    cache.set("counter", 10)
    assert cache.incr("counter") == 11
    assert cache.incr("counter", 5) == 16
    assert cache.decr("counter", 3) == 13
    assert cache.incr("counter", -2) == 11      # Django sends a negative delta as decr
    assert cache.get("counter") == 11           # still an int to Django
    # memcached counters do not go below zero.
    assert cache.decr("counter", 100) == 0
    assert cache.get("counter") == 0


@pytest.mark.parametrize("operation", ["incr", "decr"])
def test_django_incr_and_decr_of_a_missing_key_raise_value_error(cache, operation):
    with pytest.raises(ValueError, match="not found"):
        getattr(cache, operation)("absent")
    assert cache.get("absent") is None           # and do not create it


def test_django_many_at_once(cache):
    assert cache.set_many({"a": 1, "b": "two", "c": [3]}) == []
    assert cache.get_many(["a", "b", "c", "absent"]) == {"a": 1, "b": "two", "c": [3]}
    cache.delete_many(["a", "c", "absent"])
    assert cache.get_many(["a", "b", "c"]) == {"b": "two"}


def test_django_get_many_of_many_keys(cache):
    values = {"key%03d" % index: index for index in range(300)}
    assert cache.set_many(values) == []
    assert cache.get_many(list(values) + ["absent"]) == values


def test_django_touch(cache, server):
    cache.set("key", "value", timeout=10)
    assert cache.touch("key", 1000) is True
    assert 990 < ttl(server, cache.make_key("key")) <= 1000    # the new life counts
    assert cache.get("key") == "value"
    assert cache.touch("absent", 1000) is False


def test_django_delete_and_has_key(cache):
    cache.set("key", "value")
    assert cache.has_key("key")
    assert cache.delete("key") is True
    assert cache.delete("key") is False
    assert not cache.has_key("key")
    assert cache.get("key") is None


def test_django_get_or_set(cache):
    assert cache.get_or_set("key", "computed") == "computed"
    assert cache.get_or_set("key", "not used") == "computed"
    assert cache.get_or_set("other", lambda: "called") == "called"
    assert cache.get("other") == "called"


def test_django_clear_empties_the_cache(cache):
    cache.set_many({"a": 1, "b": 2})
    cache.clear()
    assert cache.get_many(["a", "b"]) == {}
    assert not cache.has_key("a")


def test_django_timeouts_expire_in_real_time(cache):
    """The file's one wait per backend: a one-second value goes, while values with
    the default timeout (300 s) or None stay."""
    cache.set("short", "v", timeout=1)
    cache.set("default", "v")
    cache.set("forever", "v", timeout=None)
    assert cache.get("short") == "v"
    assert wait_for(lambda: cache.get("short") is None)
    assert cache.get("default") == "v"
    assert cache.get("forever") == "v"
    assert cache.add("short", "again") is True      # an expired key is free for add


def test_django_timeouts_reach_the_server_as_memcached_reads_them(cache, server):
    cache.set("default", "v")
    cache.set("forever", "v", timeout=None)          # Django sends 0: never expires
    cache.set("long", "v", timeout=40 * DAY)        # Django sends an absolute time
    assert 290 < ttl(server, cache.make_key("default")) <= 300
    assert ttl(server, cache.make_key("forever")) == -1
    assert 40 * DAY - 10 < ttl(server, cache.make_key("long")) <= 40 * DAY


@pytest.mark.parametrize("operation", ["set", "add", "set_many"])
def test_django_timeout_zero_expires_at_once(cache, operation):
    # Django documents that a timeout of 0 expires the value immediately; for
    # memcached it sends the negative exptime memcached reads that way.
    if operation == "set_many":
        assert cache.set_many({"key": "v"}, timeout=0) == []
    else:
        getattr(cache, operation)("key", "v", timeout=0)
    assert cache.get("key") is None
    assert cache.add("key", "again") is True


def test_django_touch_with_timeout_zero_expires_at_once(cache):
    cache.set("key", "v")
    assert cache.touch("key", 0)
    assert cache.get("key") is None


def test_django_versions_are_separate_keys(cache):
    cache.set("key", "one")
    cache.set("key", "two", version=2)
    assert cache.get("key") == "one"
    assert cache.get("key", version=2) == "two"
    assert cache.get("key", version=3) is None
    cache.delete("key", version=2)
    assert cache.get("key") == "one"
    assert cache.incr_version("key") == 2            # moves version 1 to 2
    assert cache.get("key") is None
    assert cache.get("key", version=2) == "one"


def test_django_a_value_over_the_size_limit_is_refused_and_the_old_one_goes(cache, alias):
    cache.set("key", "old")
    with pytest.raises(TOO_LARGE[alias]):
        cache.set("key", b"x" * OVER_LIMIT)
    # memcached drops the old value rather than keep a stale one: Django relies on it.
    assert cache.get("key") is None


def test_django_counters_from_many_threads_lose_no_update(cache, alias, django_caches):
    cache.set("hits", 0)
    errors = []

    def count():
        # Each thread has its own backend instance and connection, as in a server.
        own = django_caches[alias]
        try:
            for _ in range(50):
                own.incr("hits")
        except Exception as error:          # reported in the main thread
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert cache.get("hits") == 8 * 50


def test_django_keeps_working_after_closing_its_caches_at_the_end_of_a_request(cache):
    cache.set("key", "value")
    request_finished.send(sender=None)      # Django closes every cache here
    assert cache.get("key") == "value"
    cache.set("key", "after")
    assert cache.get("key") == "after"


# -- aiomcache (asyncio) --------------------------------------------------------

@pytest.fixture
def flushed(server):
    with RawClient(server.address) as raw:
        assert raw.request(b"flush_all\r\n") == b"OK\r\n"
    return server


def run(server, scenario, client_class=aiomcache.Client, **options):
    """Run scenario(client) in a fresh event loop with an aiomcache client of
    server, closed afterwards; returns what scenario returns."""
    async def main():
        client = client_class(*server.address, **options)
        try:
            return await scenario(client)
        finally:
            await client.close()
    return asyncio.run(main())


def test_aiomcache_set_get_and_multi_get(flushed):
    async def scenario(mc):
        assert await mc.set(b"a", b"1") is True
        assert await mc.set(b"b", b"\x00\xff\r\nbinary") is True
        assert await mc.get(b"a") == b"1"
        assert await mc.get(b"absent") is None
        assert await mc.get(b"absent", b"default") == b"default"
        assert await mc.multi_get(b"a", b"absent", b"b") == (
            b"1", None, b"\x00\xff\r\nbinary")
    run(flushed, scenario)


def test_aiomcache_add_and_replace(flushed):
    async def scenario(mc):
        assert await mc.add(b"k", b"first") is True
        assert await mc.add(b"k", b"second") is False
        assert await mc.replace(b"k", b"third") is True
        assert await mc.replace(b"absent", b"x") is False
        assert await mc.get(b"k") == b"third"
        assert await mc.get(b"absent") is None
    run(flushed, scenario)


def test_aiomcache_append_and_prepend(flushed):
    async def scenario(mc):
        await mc.set(b"k", b"middle")
        assert await mc.append(b"k", b">>") is True
        assert await mc.prepend(b"k", b"<<") is True
        assert await mc.get(b"k") == b"<<middle>>"
        assert await mc.append(b"absent", b"x") is False
        assert await mc.prepend(b"absent", b"x") is False
        assert await mc.get(b"absent") is None
    run(flushed, scenario)


def test_aiomcache_incr_and_decr(flushed):
    async def scenario(mc):
        await mc.set(b"n", b"10")
        assert await mc.incr(b"n") == 11
        assert await mc.incr(b"n", 10) == 21
        assert await mc.decr(b"n", 5) == 16
        assert await mc.decr(b"n", 100) == 0        # memcached stops at zero
        assert await mc.incr(b"n", 2 ** 64 - 1) == 2 ** 64 - 1
        assert await mc.incr(b"n", 2) == 1          # and wraps at 64 bits
        with pytest.raises(ClientException, match="NOT_FOUND"):
            await mc.incr(b"absent")
        await mc.set(b"text", b"abc")
        with pytest.raises(ClientException, match="non-numeric"):
            await mc.decr(b"text")
    run(flushed, scenario)


def test_aiomcache_delete_and_touch(flushed):
    async def scenario(mc):
        await mc.set(b"k", b"v", exptime=10)
        assert await mc.touch(b"k", 1000) is True
        assert 990 < ttl(flushed, "k") <= 1000
        assert await mc.touch(b"absent", 1000) is False
        assert await mc.delete(b"k") is True
        assert await mc.delete(b"k") is False
        assert await mc.get(b"k") is None
    run(flushed, scenario)


def test_aiomcache_cas_via_gets(flushed):
    async def scenario(mc):
        assert await mc.gets(b"k") == (None, None)
        await mc.set(b"k", b"first")
        value, token = await mc.gets(b"k")
        assert value == b"first" and token > 0
        assert await mc.cas(b"k", b"second", token) is True
        assert await mc.cas(b"k", b"lost update", token) is False     # EXISTS
        assert await mc.get(b"k") == b"second"
        _, newer = await mc.gets(b"k")
        assert newer != token
        assert await mc.cas(b"absent", b"v", newer) is False         # NOT_FOUND
        assert await mc.get(b"absent") is None
    run(flushed, scenario)


def test_aiomcache_flush_all(flushed):
    async def scenario(mc):
        await mc.set(b"a", b"1")
        await mc.set(b"b", b"2")
        assert await mc.flush_all() is None
        assert await mc.multi_get(b"a", b"b") == (None, None)
    run(flushed, scenario)


def test_aiomcache_stats(flushed):
    async def scenario(mc):
        await mc.set(b"a", b"1")
        await mc.get(b"a")
        await mc.get(b"absent")
        general = await mc.stats()
        assert general[b"curr_items"] == b"1"
        assert int(general[b"get_hits"]) >= 1 and int(general[b"get_misses"]) >= 1
        assert general[b"version"] == await mc.version()
        assert (await mc.stats(b"settings"))[b"item_size_max"] == b"1048576"
    run(flushed, scenario)


def test_aiomcache_refuses_a_value_over_the_size_limit(flushed):
    async def scenario(mc):
        await mc.set(b"k", b"old")
        with pytest.raises(ClientException, match="object too large for cache"):
            await mc.set(b"k", b"x" * OVER_LIMIT)
        assert await mc.get(b"k") is None          # the old value is dropped too
        # The connection stays in step: the next command gets its own answer.
        assert await mc.set(b"k", b"fits") is True
        assert await mc.get(b"k") == b"fits"
    run(flushed, scenario)


def test_aiomcache_many_commands_in_flight_over_a_pool(flushed):
    async def scenario(mc):
        await mc.set(b"n", b"0")
        await asyncio.gather(*(mc.incr(b"n") for _ in range(200)))
        keys = [b"k%d" % index for index in range(50)]
        await asyncio.gather(*(mc.set(key, key) for key in keys))
        assert await mc.get(b"n") == b"200"
        assert await mc.multi_get(*keys) == tuple(keys)
    run(flushed, scenario, pool_size=4)


def test_aiomcache_flag_client_round_trips_python_objects(flushed):
    # With handlers, aiomcache stores non-bytes values under a flag of its choosing;
    # the server keeps the flag with the value and hands both back.
    async def dump(value):
        return pickle.dumps(value), 1

    async def load(data, flags):
        assert flags == 1
        return pickle.loads(data)

    async def scenario(mc):
        for name, value in PYTHON_VALUES.items():
            if not isinstance(value, bytes):
                assert await mc.set(name.encode(), value) is True
        for name, value in PYTHON_VALUES.items():
            if not isinstance(value, bytes):
                assert await mc.get(name.encode()) == value, name
    run(flushed, scenario, client_class=aiomcache.FlagClient,
        get_flag_handler=load, set_flag_handler=dump)
