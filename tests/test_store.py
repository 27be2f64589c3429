"""memg.Store on its own: no sockets, no protocol, and a fake clock for time.

The sections follow memg.py's Store: time, memory accounting and the LRU,
retrieval, storage (and CAS uniques), delete and invalidate, arithmetic, meta get,
whole-cache operations, the slab classes stats report items in; then counters, and
threads.
"""

import gc
import random
import sys
import threading

import pytest

import memg
from conftest import Clock
from memg import (ADD, APPEND, CAS, EXISTS, NO_MEMORY, NON_NUMERIC, NOT_FOUND,
                  NOT_STORED, PREPEND, REPLACE, SET, STORED, unpack_item)

# memcached's slab classes with its defaults, which a Store counts items in.
CLASSES = memg.SlabClasses()

START = 1_700_000_000.0
DAY = 24 * 60 * 60


@pytest.fixture
def clock():
    return Clock(START)


@pytest.fixture
def store(clock):
    return memg.Store(clock=clock)


def cost(key, value):
    return memg.item_cost(key, len(value))


def value_of(store, key):
    item = store.get(key)
    return None if item is None else unpack_item(item).value


# --------------------------------------------------------------------------
# Time: exptime conversion
# --------------------------------------------------------------------------

def test_exptime_zero_never_expires(store, clock):
    store.store(SET, b"k", b"v", exptime=0)
    clock.advance(10 * 365 * DAY)
    assert value_of(store, b"k") == b"v"


def test_relative_exptime(store, clock):
    store.store(SET, b"k", b"v", exptime=10)
    clock.advance(9)
    assert value_of(store, b"k") == b"v"
    clock.advance(1)
    assert store.get(b"k") is None


def test_thirty_days_is_still_relative(store, clock):
    store.store(SET, b"k", b"v", exptime=memg.MAX_RELATIVE_EXPTIME)
    clock.advance(memg.MAX_RELATIVE_EXPTIME - 1)
    assert value_of(store, b"k") == b"v"
    clock.advance(1)
    assert store.get(b"k") is None


def test_more_than_thirty_days_is_absolute_unix_time(store, clock):
    store.store(SET, b"k", b"v", exptime=int(START) + 100)
    clock.advance(99)
    assert value_of(store, b"k") == b"v"
    clock.advance(1)
    assert store.get(b"k") is None


def test_absolute_exptime_before_start_is_already_expired(store):
    assert store.store(SET, b"k", b"v", exptime=int(START) - 100)[0] == STORED
    assert store.get(b"k") is None


def test_absolute_exptime_just_past_is_already_expired(store, clock):
    clock.advance(1000)
    store.store(SET, b"k", b"v", exptime=int(START) + 500)
    assert store.get(b"k") is None


def test_smallest_absolute_exptime_is_in_1970(store):
    store.store(SET, b"k", b"v", exptime=memg.MAX_RELATIVE_EXPTIME + 1)
    assert store.get(b"k") is None


@pytest.mark.parametrize("exptime", [-1, -1000])
def test_negative_exptime_is_already_expired(store, exptime):
    store.store(SET, b"k", b"v", exptime=exptime)
    assert store.get(b"k") is None


def test_negative_exptime_replaces_old_value(store):
    store.store(SET, b"k", b"old")
    store.store(SET, b"k", b"new", exptime=-1)
    assert store.get(b"k") is None


def test_ttl(store, clock):
    _, forever = store.store(SET, b"a", b"v")
    _, soon = store.store(SET, b"b", b"v", exptime=100)
    clock.advance(40)
    assert store.ttl(forever, clock()) == -1
    assert store.ttl(soon, clock()) == 60


# --------------------------------------------------------------------------
# Memory accounting and the LRU
# --------------------------------------------------------------------------

def small_store(clock, items=3, evict=True, **options):
    """A store with room for exactly `items` items of key k<digit> and a 10-byte value."""
    return memg.Store(memory_limit=items * cost(b"k0", b"0123456789"), evict=evict,
                      clock=clock, **options)


def test_bytes_returns_to_zero(store):
    for i in range(20):
        store.store(SET, b"key%d" % i, b"x" * i)
    store.store(APPEND, b"key3", b"more")
    store.store(PREPEND, b"key4", b"more")
    store.store(SET, b"key5", b"replaced")
    store.store(SET, b"n", b"1")
    store.arithmetic(b"n", 1000)
    assert store.bytes == sum(cost(k, unpack_item(i).value) for k, i in store.items.items())
    for key in list(store.items):
        assert store.delete(key) == STORED
    assert store.bytes == 0


def test_bytes_after_expiry_on_access(store, clock):
    store.store(SET, b"k", b"v", exptime=1)
    clock.advance(1)
    store.get(b"k")
    assert store.bytes == 0


def test_memory_limit_never_exceeded(clock):
    store = memg.Store(memory_limit=10 * memg.KB, clock=clock)
    for i in range(500):
        store.store(SET, b"k%d" % (i % 37), b"v" * ((i * 53) % 900))
        if i % 3 == 0:
            store.store(APPEND, b"k%d" % (i % 11), b"a" * 100)
        assert store.bytes <= store.memory_limit
        assert store.bytes == sum(cost(k, unpack_item(it).value) for k, it in store.items.items())


def index_of(store):
    """What the store's four dicts' tables really take."""
    return sum(sys.getsizeof(items) - memg.EMPTY_DICT for items in store.segments)


@pytest.mark.parametrize("segmented", [False, True])
def test_the_index_is_charged_as_the_tables_it_has_under_any_mix(clock, segmented):
    """Every insertion takes an entry of a dict's table (a new item, a move between
    sub-LRUs or within one): the store makes each table a new one before CPython
    would, so that what it charges is the tables there are."""
    store = memg.Store(memory_limit=1500 * cost(b"key:0000", b"v" * 50), clock=clock,
                       segmented=segmented)
    store.hash_power = 0        # (charged beyond memcached's table: here, all of it)
    choices = random.Random(18)
    for i in range(30000):
        key = b"key:%04d" % choices.randrange(4000)
        step = choices.randrange(10)
        if step < 5:
            store.store(SET, key, b"v" * (i % 100))
            assert store.bytes + store.index_charge <= store.memory_limit
        elif step < 8:
            store.get(key)
            clock.advance(0.25)              # reads in a later second move the item
        elif step < 9:
            store.delete(key)
        else:
            store.store(APPEND, key, b"a")
        if i % 1000 == 999:
            store.juggle(20, 40, 0.2, 2.0)   # the maintainer's moves, HOT and WARM to COLD
        assert store.index_bytes == index_of(store)
    numbers = store.snapshot()
    assert numbers["evictions"] > 0 and numbers["get_hits"] > 1000 and store.index_charge > 0


def test_the_index_is_charged_beyond_memcacheds_hash_table_for_as_many_keys(clock):
    store = memg.Store(clock=clock)
    for i in range(100000):
        store.store(SET, b"key:%07d" % i, b"v")
    charged = store.index_charge
    assert charged == store.index_bytes - (memg.HASH_BUCKET_SIZE << 16) > 0
    store.grow_hash_table()                  # memcached's table doubles: 2 ** 17 buckets
    store.grow_hash_table()                  # (not again for 100,000 keys)
    assert store.snapshot()["hash_power_level"] == 17
    assert store.index_charge == charged - (memg.HASH_BUCKET_SIZE << 16)


def test_replacing_the_least_recently_used_item_of_a_full_store_keeps_the_index_charged(clock):
    """A larger value for the oldest key of a full store takes that key out of the
    LRU first (so that everything else is evicted before it), puts it back, then
    replaces it: two entries of the table for one store."""
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.store(SET, b"k0", b"0123456789" + MORE)[0] == STORED
    assert store.index_bytes == index_of(store)


@pytest.mark.parametrize("segmented", [False, True])
def test_under_churn_with_memory_short_the_index_is_about_half_what_cpython_makes(
        clock, segmented):
    """Storing new keys into a full cache evicts as many: CPython's own dict would
    make itself a table for three times its keys, the store's are for a quarter
    more."""
    limit = 4 * memg.MB
    store = memg.Store(memory_limit=limit, clock=clock, segmented=segmented)
    store.hash_power = 0        # (charged beyond memcached's table: here, all of it)
    plain = {}                               # as many keys, as CPython keeps them
    for i in range(150000):
        key = b"key:%07d" % i
        store.store(SET, key, b"v" * 100)
        plain[key] = None
        while len(plain) > sum(map(len, store.segments)):
            del plain[next(iter(plain))]
    assert store.snapshot()["evictions"] > 120000
    assert index_of(store) <= 0.6 * (sys.getsizeof(plain) - memg.EMPTY_DICT)
    assert store.bytes + store.index_charge <= limit


def test_lru_evicts_least_recently_used(clock):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.store(SET, b"k3", b"0123456789")[0] == STORED
    assert store.get(b"k0") is None
    assert [value_of(store, b"k%d" % i) is not None for i in (1, 2, 3)] == [True] * 3
    assert store.snapshot()["evictions"] == 1
    assert store.bytes <= store.memory_limit


def test_get_protects_an_item_from_eviction(clock):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.get(b"k0")
    store.store(SET, b"k3", b"0123456789")
    assert store.get(b"k1") is None
    assert value_of(store, b"k0") == b"0123456789"


def test_a_read_moves_an_item_up_once_a_second(clock):
    # As memcached moves an item up at most once a minute: a read in the second the
    # item was last read leaves it where it was; a read in a later second moves it.
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.get(b"k0")
    store.get(b"k1")
    store.get(b"k0")                           # the same second: k0 stays behind k1
    assert list(store.items) == [b"k2", b"k0", b"k1"]
    clock.advance(1)
    store.get(b"k0")
    assert list(store.items) == [b"k2", b"k1", b"k0"]
    assert unpack_item(store.get(b"k0")).atime == int(clock())


def test_get_without_bump_does_not_protect(clock):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.get(b"k0", bump=False)
    store.store(SET, b"k3", b"0123456789")
    assert store.get(b"k0") is None


def test_overwrite_moves_to_most_recent(clock):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.store(SET, b"k0", b"9876543210")
    store.store(SET, b"k3", b"0123456789")
    assert store.get(b"k1") is None
    assert value_of(store, b"k0") == b"9876543210"


# 16 bytes more: an item's object takes a block of a multiple of 16 bytes.
MORE = b"abcdefghijklmnop"


@pytest.mark.parametrize("mode, value", [
    (SET, b"0123456789" + MORE), (APPEND, b"0123456789" + MORE), (PREPEND, MORE + b"0123456789"),
])
def test_growing_the_least_recently_used_item_when_full(clock, mode, value):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    data = MORE if mode != SET else value
    assert store.store(mode, b"k0", data)[0] == STORED
    assert value_of(store, b"k0") == value
    assert store.get(b"k1") is None
    assert value_of(store, b"k2") == b"0123456789"
    assert store.bytes <= store.memory_limit
    assert store.bytes == sum(cost(k, unpack_item(it).value) for k, it in store.items.items())


def test_eviction_counters(clock):
    store = small_store(clock)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.get(b"k1")
    store.store(SET, b"k3", b"0123456789")      # evicts k0, never fetched
    store.store(SET, b"k4", b"0123456789")      # evicts k2, never fetched
    store.store(SET, b"k5", b"0123456789")      # evicts k1, fetched
    c = store.snapshot()
    assert (c["evictions"], c["evicted_unfetched"], c["reclaimed"]) == (3, 2, 0)


def test_expired_item_at_lru_tail_is_reclaimed(clock):
    store = small_store(clock)
    store.store(SET, b"k0", b"0123456789", exptime=5)
    store.store(SET, b"k1", b"0123456789")
    store.store(SET, b"k2", b"0123456789")
    clock.advance(5)
    assert store.store(SET, b"k3", b"0123456789")[0] == STORED
    assert (store.snapshot()["reclaimed"], store.snapshot()["evictions"]) == (1, 0)
    assert value_of(store, b"k1") is not None


def test_no_evict_gives_no_memory(clock):
    store = small_store(clock, evict=False)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.store(SET, b"k3", b"0123456789") == (NO_MEMORY, None)
    assert store.get(b"k3") is None
    assert all(store.get(b"k%d" % i) is not None for i in range(3))
    assert store.snapshot()["evictions"] == 0
    assert store.snapshot()["store_no_memory"] == 1


def test_no_evict_append_beyond_limit(clock):
    store = small_store(clock, evict=False)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.store(APPEND, b"k0", MORE)[0] == NO_MEMORY
    assert value_of(store, b"k0") == b"0123456789"


def test_growing_within_the_block_an_item_takes_costs_nothing(clock):
    store = small_store(clock, evict=False)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert cost(b"k0", b"0123456789x") == cost(b"k0", b"0123456789")
    assert store.store(APPEND, b"k0", b"x")[0] == STORED
    assert store.bytes == store.memory_limit


def test_no_evict_still_reclaims_expired(clock):
    store = small_store(clock, evict=False)
    store.store(SET, b"k0", b"0123456789", exptime=5)
    store.store(SET, b"k1", b"0123456789")
    store.store(SET, b"k2", b"0123456789")
    clock.advance(5)
    assert store.store(SET, b"k3", b"0123456789")[0] == STORED
    assert store.snapshot()["reclaimed"] == 1


def test_same_size_overwrite_fits_when_full(clock):
    store = small_store(clock, evict=False)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.store(SET, b"k1", b"abcdefghij")[0] == STORED
    assert store.bytes == store.memory_limit


def test_lowering_memory_limit_evicts(clock):
    store = small_store(clock, items=4)
    for i in range(4):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.set_memory_limit(2 * cost(b"k0", b"0123456789"))
    assert list(store.items) == [b"k2", b"k3"]
    assert store.bytes == store.memory_limit


def test_the_garbage_collector_never_walks_the_items(store):
    """Items are plain bytes and the store's dicts hold nothing else, so none is
    tracked: a full collection does not stop every thread to walk the whole cache."""
    for i in range(10):
        store.store(SET, b"k%d" % i, b"v", flags=i)
    store.get(b"k1")
    store.store(APPEND, b"k2", b"w")
    store.meta_get(b"k3", exptime=5, recache=10)
    store.invalidate(b"k4")
    store.arithmetic(b"n", 1, vivify=0)
    assert not any(gc.is_tracked(items) for items in store.segments)
    assert not any(gc.is_tracked(item) for item in store.items.values())


def test_the_hash_table_grows_as_memcacheds_a_power_a_check_and_never_shrinks(store):
    assert store.snapshot()["hash_power_level"] == 16
    for number in range(3 * 2 ** 16 // 2):
        store.store(SET, b"k%d" % number, b"")
    store.grow_hash_table()
    assert store.snapshot()["hash_power_level"] == 16         # not more than half over
    store.store(SET, b"one more", b"")
    store.grow_hash_table()
    assert store.snapshot()["hash_power_level"] == 17
    store.grow_hash_table()
    assert store.snapshot()["hash_power_level"] == 17
    store.flush()
    store.grow_hash_table()
    assert store.snapshot()["hash_power_level"] == 17


# --------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------

def test_set_get_round_trip_bytes_and_flags(store):
    value = bytes(range(256)) + b"\r\n\x00end"
    outcome, item = store.store(SET, b"k", value, flags=0xFFFFFFFF)
    assert outcome == STORED
    got, item = unpack_item(store.get(b"k")), unpack_item(item)
    assert (got.value, got.flags, got.cas) == (value, 0xFFFFFFFF, item.cas)
    assert (item.fetched, got.fetched) == (False, True)     # items never change


def test_get_missing(store):
    assert store.get(b"nope") is None


def test_empty_value(store):
    store.store(SET, b"k", b"")
    assert value_of(store, b"k") == b""


def test_set_overwrites_value_and_flags(store):
    store.store(SET, b"k", b"one", flags=1)
    store.store(SET, b"k", b"two!", flags=2)
    item = unpack_item(store.get(b"k"))
    assert (item.value, item.flags) == (b"two!", 2)


def test_get_with_exptime_sets_expiry(store, clock):
    store.store(SET, b"k", b"v", exptime=10)
    assert unpack_item(store.get(b"k", exptime=100)).value == b"v"
    clock.advance(50)
    assert value_of(store, b"k") == b"v"
    clock.advance(50)
    assert store.get(b"k") is None


def test_get_with_exptime_zero_removes_expiry(store, clock):
    store.store(SET, b"k", b"v", exptime=10)
    store.get(b"k", exptime=0)
    clock.advance(DAY)
    assert value_of(store, b"k") == b"v"


def test_get_with_negative_exptime_expires(store):
    store.store(SET, b"k", b"v")
    assert store.get(b"k", exptime=-1) is not None
    assert store.get(b"k") is None


def test_touch_on_missing_key(store):
    assert store.get(b"k", exptime=10) is None


# --------------------------------------------------------------------------
# Storage: set add replace append prepend cas
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode, exists, outcome, value", [
    (SET, False, STORED, b"new"),
    (SET, True, STORED, b"new"),
    (ADD, False, STORED, b"new"),
    (ADD, True, NOT_STORED, b"old"),
    (REPLACE, False, NOT_STORED, None),
    (REPLACE, True, STORED, b"new"),
    (APPEND, False, NOT_STORED, None),
    (APPEND, True, STORED, b"oldnew"),
    (PREPEND, False, NOT_STORED, None),
    (PREPEND, True, STORED, b"newold"),
])
def test_storage_outcomes(store, mode, exists, outcome, value):
    if exists:
        store.store(SET, b"k", b"old")
    assert store.store(mode, b"k", b"new")[0] == outcome
    assert value_of(store, b"k") == value


def test_store_returns_the_stored_item(store):
    outcome, item = store.store(SET, b"k", b"v", flags=3)
    assert outcome == STORED
    item = unpack_item(item)
    assert (item.value, item.flags) == (b"v", 3)
    assert store.store(ADD, b"k", b"w") == (NOT_STORED, None)


def test_add_over_expired_item(store, clock):
    store.store(SET, b"k", b"old", exptime=5)
    clock.advance(5)
    assert store.store(ADD, b"k", b"new")[0] == STORED
    assert value_of(store, b"k") == b"new"


def test_cas_outcomes(store):
    assert store.store(CAS, b"k", b"v", cas=1)[0] == NOT_FOUND
    _, item = store.store(SET, b"k", b"one")
    assert store.store(CAS, b"k", b"two", cas=unpack_item(item).cas + 1)[0] == EXISTS
    assert value_of(store, b"k") == b"one"
    assert store.store(CAS, b"k", b"two", flags=9, cas=unpack_item(item).cas)[0] == STORED
    assert value_of(store, b"k") == b"two"
    assert unpack_item(store.get(b"k")).flags == 9
    assert store.store(CAS, b"k", b"three", cas=unpack_item(item).cas)[0] == EXISTS
    assert value_of(store, b"k") == b"two"


def test_cas_sets_new_exptime(store, clock):
    _, item = store.store(SET, b"k", b"one")
    store.store(CAS, b"k", b"two", exptime=10, cas=unpack_item(item).cas)
    clock.advance(10)
    assert store.get(b"k") is None


@pytest.mark.parametrize("mode, value", [(APPEND, b"midend"), (PREPEND, b"endmid")])
def test_append_prepend_keep_flags_and_expiry(store, clock, mode, value):
    store.store(SET, b"k", b"mid", flags=7, exptime=100)
    assert store.store(mode, b"k", b"end", flags=1, exptime=0)[0] == STORED
    item = unpack_item(store.get(b"k"))
    assert (item.value, item.flags) == (value, 7)
    clock.advance(100)
    assert store.get(b"k") is None


@pytest.mark.parametrize("mode", [APPEND, PREPEND])
def test_append_prepend_check_cas(store, mode):
    _, item = store.store(SET, b"k", b"a")
    assert store.store(mode, b"k", b"b", cas=unpack_item(item).cas + 1)[0] == EXISTS
    assert value_of(store, b"k") == b"a"
    assert store.store(mode, b"k", b"b", cas=unpack_item(item).cas)[0] == STORED
    assert value_of(store, b"k") == b"ab"[::1 if mode == APPEND else -1]


@pytest.mark.parametrize("mode", [APPEND, PREPEND])
def test_append_prepend_vivify_on_miss(store, clock, mode):
    outcome, item = store.store(mode, b"k", b"seed", exptime=5, vivify=50)
    assert outcome == STORED
    assert unpack_item(item).value == b"seed"
    clock.advance(49)
    assert value_of(store, b"k") == b"seed"
    clock.advance(1)
    assert store.get(b"k") is None


def test_new_cas_replaces_generated_cas(store):
    _, item = store.store(SET, b"k", b"v", new_cas=12345)
    assert unpack_item(item).cas == 12345
    assert unpack_item(store.get(b"k")).cas == 12345


def test_cas_invalidate_accepts_older_cas_and_marks_stale(store):
    _, first = store.store(SET, b"k", b"one")
    _, second = store.store(SET, b"k", b"two")
    outcome, item = store.store(CAS, b"k", b"three", cas=unpack_item(first).cas, invalidate=True)
    assert outcome == STORED
    assert unpack_item(item).stale
    assert value_of(store, b"k") == b"three"


def test_cas_invalidate_refuses_newer_cas(store):
    _, item = store.store(SET, b"k", b"one")
    newer = unpack_item(item).cas + 5
    assert store.store(CAS, b"k", b"two", cas=newer, invalidate=True)[0] == EXISTS
    assert value_of(store, b"k") == b"one"


@pytest.mark.parametrize("mode", [APPEND, PREPEND])
def test_append_prepend_beyond_the_size_limit(clock, mode):
    store = memg.Store(item_size_max=2 * memg.KB, clock=clock)
    store.store(SET, b"k", b"v" * 1000)
    assert store.store(mode, b"k", b"w" * 1000)[0] == NOT_STORED
    assert value_of(store, b"k") == b"v" * 1000


def test_refuse_set_drops_old_value(store):
    store.store(SET, b"k", b"old")
    store.refuse_too_large(b"k", drop_old=True)
    assert store.get(b"k") is None
    assert store.bytes == 0
    assert store.counters["store_too_large"] == 1


def test_refuse_without_drop_keeps_old_value(store):
    store.store(SET, b"k", b"old")
    store.refuse_too_large(b"k", drop_old=False)
    assert value_of(store, b"k") == b"old"
    assert store.counters["store_too_large"] == 1


@pytest.mark.parametrize("nbytes, expected", [
    (1 * memg.MB - memg.ITEM_HEADER_SIZE - 1, False),
    (1 * memg.MB - memg.ITEM_HEADER_SIZE, True),
])
def test_too_large(store, nbytes, expected):
    assert store.too_large(b"k", nbytes) is expected


# --------------------------------------------------------------------------
# CAS uniques
# --------------------------------------------------------------------------

def cas_of(store, key):
    return unpack_item(store.get(key)).cas


@pytest.mark.parametrize("modify", [
    lambda s, c: s.store(SET, b"k", b"2"),
    lambda s, c: s.store(APPEND, b"k", b"2"),
    lambda s, c: s.store(PREPEND, b"k", b"2"),
    lambda s, c: s.store(REPLACE, b"k", b"2"),
    lambda s, c: s.store(CAS, b"k", b"2", cas=c),
    lambda s, c: s.arithmetic(b"k", 1, incr=True),
    lambda s, c: s.arithmetic(b"k", 1, incr=False),
    lambda s, c: s.invalidate(b"k"),
], ids=["set", "append", "prepend", "replace", "cas", "incr", "decr", "invalidate"])
def test_cas_unique_changes_on_modification(store, modify):
    store.store(SET, b"k", b"1")
    before = cas_of(store, b"k")
    modify(store, before)
    after = cas_of(store, b"k")
    assert after != before


@pytest.mark.parametrize("read", [
    lambda s: s.get(b"k"),
    lambda s: s.get(b"k", exptime=100),
    lambda s: s.get(b"k", bump=False),
    lambda s: s.meta_get(b"k"),
    lambda s: s.meta_get(b"k", exptime=100),
    lambda s: s.store(ADD, b"k", b"x"),
], ids=["get", "touch", "get-nobump", "meta_get", "meta_get-touch", "failed-add"])
def test_cas_unique_kept_on_read_and_touch(store, read):
    store.store(SET, b"k", b"1")
    before = cas_of(store, b"k")
    read(store)
    assert cas_of(store, b"k") == before


def test_cas_uniques_are_unique_across_keys(store):
    uniques = {unpack_item(store.store(SET, b"k%d" % i, b"v")[1]).cas for i in range(50)}
    assert len(uniques) == 50


def test_cas_disabled_gives_zero(clock):
    store = memg.Store(use_cas=False, clock=clock)
    _, item = store.store(SET, b"k", b"v")
    assert unpack_item(item).cas == 0


# --------------------------------------------------------------------------
# Delete and invalidate
# --------------------------------------------------------------------------

def test_delete(store):
    store.store(SET, b"k", b"v")
    assert store.delete(b"k") == STORED
    assert store.get(b"k") is None
    assert store.delete(b"k") == NOT_FOUND


def test_delete_expired_is_not_found(store, clock):
    store.store(SET, b"k", b"v", exptime=1)
    clock.advance(1)
    assert store.delete(b"k") == NOT_FOUND


def test_delete_with_cas(store):
    _, item = store.store(SET, b"k", b"v")
    assert store.delete(b"k", cas=unpack_item(item).cas + 1) == EXISTS
    assert value_of(store, b"k") == b"v"
    assert store.delete(b"k", cas=unpack_item(item).cas) == STORED
    assert store.get(b"k") is None


def test_invalidate_marks_stale_and_keeps_value(store):
    _, old = store.store(SET, b"k", b"v", flags=4)
    assert store.invalidate(b"k") == STORED
    item = unpack_item(store.get(b"k"))
    assert (item.value, item.flags, item.stale) == (b"v", 4, True)
    assert item.cas != unpack_item(old).cas


def test_invalidate_with_exptime(store, clock):
    store.store(SET, b"k", b"v")
    store.invalidate(b"k", exptime=30)
    clock.advance(30)
    assert store.get(b"k") is None


def test_invalidate_keeps_exptime_without_one(store, clock):
    store.store(SET, b"k", b"v", exptime=30)
    store.invalidate(b"k")
    clock.advance(29)
    assert store.get(b"k") is not None
    clock.advance(1)
    assert store.get(b"k") is None


def test_invalidate_new_cas(store):
    store.store(SET, b"k", b"v")
    store.invalidate(b"k", new_cas=777)
    assert cas_of(store, b"k") == 777


def test_invalidate_drop_value(store):
    store.store(SET, b"k", b"value", flags=2)
    assert store.invalidate(b"k", drop_value=True) == STORED
    item = unpack_item(store.get(b"k"))
    assert (item.value, item.flags, item.stale) == (b"", 2, False)
    assert store.bytes == cost(b"k", b"")


def test_invalidate_missing_and_cas_mismatch(store):
    assert store.invalidate(b"k") == NOT_FOUND
    _, item = store.store(SET, b"k", b"v")
    assert store.invalidate(b"k", cas=unpack_item(item).cas + 1) == EXISTS
    assert not unpack_item(store.get(b"k")).stale


def test_set_clears_stale(store):
    store.store(SET, b"k", b"v")
    store.invalidate(b"k")
    store.store(SET, b"k", b"w")
    assert not unpack_item(store.get(b"k")).stale


# --------------------------------------------------------------------------
# Arithmetic: incr and decr
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value, delta, incr, result", [
    (b"0", 1, True, b"1"),
    (b"99", 1, True, b"100"),
    (b"5", 18446744073709551610, True, b"18446744073709551615"),
    (b"18446744073709551615", 1, True, b"0" + b" " * 19),
    (b"18446744073709551615", 2, True, b"1" + b" " * 19),
    (b"10", 3, False, b"7 "),
    (b"100", 1, False, b"99 "),
    (b"10", 100, False, b"0 "),
    (b"5", 5, False, b"0"),
    (b"0", 1, False, b"0"),
    (b"007", 1, True, b"8  "),
    (b"12  ", 1, True, b"13  "),
])
def test_arithmetic_results(store, value, delta, incr, result):
    store.store(SET, b"k", value)
    outcome, item = store.arithmetic(b"k", delta, incr=incr)
    assert outcome == STORED
    assert unpack_item(item).value == result
    assert value_of(store, b"k") == result


def test_incr_wraps_at_two_to_the_64(store):
    store.store(SET, b"k", b"18446744073709551615")
    _, item = store.arithmetic(b"k", 10)
    assert int(unpack_item(item).value) == 9


def test_padded_value_can_be_incremented_again(store):
    store.store(SET, b"k", b"100")
    store.arithmetic(b"k", 95, incr=False)
    assert value_of(store, b"k") == b"5  "
    _, item = store.arithmetic(b"k", 1)
    assert unpack_item(item).value == b"6  "


@pytest.mark.parametrize("value", [
    b"", b"abc", b"12abc", b"-5", b"1.5", b"18446744073709551616",
    b"99999999999999999999",
])
def test_arithmetic_non_numeric(store, value):
    store.store(SET, b"k", value)
    assert store.arithmetic(b"k", 1) == (NON_NUMERIC, None)
    assert value_of(store, b"k") == value


def test_arithmetic_missing(store):
    assert store.arithmetic(b"k", 1) == (NOT_FOUND, None)
    assert store.arithmetic(b"k", 1, incr=False) == (NOT_FOUND, None)


def test_arithmetic_keeps_flags_and_expiry(store, clock):
    store.store(SET, b"k", b"1", flags=42, exptime=10)
    _, item = store.arithmetic(b"k", 1)
    assert unpack_item(item).flags == 42
    clock.advance(10)
    assert store.get(b"k") is None


def test_arithmetic_with_cas(store):
    _, item = store.store(SET, b"k", b"1")
    assert store.arithmetic(b"k", 1, cas=unpack_item(item).cas + 1) == (EXISTS, None)
    outcome, new = store.arithmetic(b"k", 1, cas=unpack_item(item).cas)
    assert (outcome, unpack_item(new).value) == (STORED, b"2")


def test_arithmetic_vivify(store, clock):
    outcome, item = store.arithmetic(b"k", 5, vivify=20, initial=42)
    item = unpack_item(item)
    assert (outcome, item.value, item.flags) == (STORED, b"42", 0)
    _, item = store.arithmetic(b"k", 5, vivify=20, initial=42)
    assert unpack_item(item).value == b"47"
    clock.advance(20)
    assert store.get(b"k") is None


def test_arithmetic_new_exptime_and_cas(store, clock):
    store.store(SET, b"k", b"1")
    _, item = store.arithmetic(b"k", 1, new_cas=99, exptime=10)
    assert unpack_item(item).cas == 99
    clock.advance(10)
    assert store.get(b"k") is None


# --------------------------------------------------------------------------
# Meta get
# --------------------------------------------------------------------------

def view_of(found):
    item, view = found
    return view._asdict()


def test_meta_get_miss(store):
    assert store.meta_get(b"k") is None
    assert store.get(b"k") is None


def test_meta_get_hit_before_and_last_access(store, clock):
    store.store(SET, b"k", b"v")
    first = view_of(store.meta_get(b"k"))
    assert (first["hit_before"], first["last_access"]) == (False, 0)
    clock.advance(7)
    second = view_of(store.meta_get(b"k"))
    assert (second["hit_before"], second["last_access"]) == (True, 7)
    third = view_of(store.meta_get(b"k"))
    assert third["last_access"] == 0


def test_meta_get_without_bump_does_not_mark_hit(store, clock):
    store.store(SET, b"k", b"v")
    clock.advance(3)
    store.meta_get(b"k", bump=False)
    view = view_of(store.meta_get(b"k"))
    assert (view["hit_before"], view["last_access"]) == (False, 3)


def test_meta_get_ttl(store, clock):
    store.store(SET, b"a", b"v")
    store.store(SET, b"b", b"v", exptime=100)
    clock.advance(30)
    assert view_of(store.meta_get(b"a"))["ttl"] == -1
    assert view_of(store.meta_get(b"b"))["ttl"] == 70


def test_meta_get_with_exptime_touches(store, clock):
    store.store(SET, b"k", b"v", exptime=10)
    assert view_of(store.meta_get(b"k", exptime=300))["ttl"] == 300
    clock.advance(200)
    assert store.get(b"k") is not None


def test_meta_get_vivify_on_miss(store, clock):
    item, _ = found = store.meta_get(b"k", vivify=30)
    view = view_of(found)
    assert unpack_item(item).value == b""
    assert (view["won"], view["token_sent"], view["ttl"]) == (True, False, 30)
    again = view_of(store.meta_get(b"k", vivify=30))
    assert (again["won"], again["token_sent"]) == (False, True)
    clock.advance(30)
    assert store.get(b"k") is None


def test_meta_get_vivify_ignored_on_hit(store):
    store.store(SET, b"k", b"v")
    item, _ = found = store.meta_get(b"k", vivify=30)
    assert unpack_item(item).value == b"v"
    assert view_of(found)["won"] is False


def test_meta_get_recache(store, clock):
    store.store(SET, b"k", b"v", exptime=100)
    assert view_of(store.meta_get(b"k", recache=30))["won"] is False
    clock.advance(80)
    view = view_of(store.meta_get(b"k", recache=30))
    assert (view["won"], view["token_sent"]) == (True, False)
    view = view_of(store.meta_get(b"k", recache=30))
    assert (view["won"], view["token_sent"]) == (False, True)


def test_meta_get_recache_never_for_items_without_expiry(store):
    store.store(SET, b"k", b"v")
    assert view_of(store.meta_get(b"k", recache=30))["won"] is False


def test_meta_get_stale_item_wins_once(store):
    store.store(SET, b"k", b"v")
    store.invalidate(b"k")
    first = view_of(store.meta_get(b"k"))
    assert (first["stale"], first["won"], first["token_sent"]) == (True, True, False)
    second = view_of(store.meta_get(b"k"))
    assert (second["stale"], second["won"], second["token_sent"]) == (True, False, True)


def test_set_after_win_clears_token(store):
    store.meta_get(b"k", vivify=30)
    store.store(SET, b"k", b"fresh")
    item, _ = found = store.meta_get(b"k", vivify=30)
    view = view_of(found)
    assert unpack_item(item).value == b"fresh"
    assert (view["won"], view["token_sent"], view["stale"]) == (False, False, False)


def test_meta_get_counts_gets_and_touches(store):
    store.store(SET, b"k", b"v")
    store.meta_get(b"k")
    store.meta_get(b"nope")
    store.meta_get(b"k", exptime=5)
    store.meta_get(b"nope", exptime=5)
    c = store.snapshot()
    assert (c["cmd_get"], c["get_hits"], c["get_misses"]) == (2, 1, 1)
    assert (c["cmd_touch"], c["touch_hits"], c["touch_misses"]) == (2, 1, 1)


# --------------------------------------------------------------------------
# The segmented LRU (memcached's HOT, WARM, COLD and TEMP) and its maintainer
# --------------------------------------------------------------------------

def where(store, key):
    """The sub-LRU that holds key: HOT, WARM, COLD or TEMP."""
    return next(name for name, items in zip(("HOT", "WARM", "COLD", "TEMP"), store.segments)
                if key in items)


def juggle(store):
    """A run of the maintainer with memcached's default tuning."""
    return store.juggle(20, 40, 0.2, 2.0)


@pytest.fixture
def segmented(clock):
    return memg.Store(clock=clock, segmented=True)


@pytest.mark.parametrize("options", [
    {}, {"growth_factor": 2, "chunk_size": 100, "slab_chunk_max": 65536}, {"use_cas": False},
    {"slab_chunk_max": memg.MB, "whole_pages": False}, {"slab_chunk_max": 1001},
    {"growth_factor": 1.01}], ids=str)
def test_the_class_table_the_set_path_reads_agrees_with_bisection(options):
    classes = memg.SlabClasses(**options)
    sizes = list(range(0, min(70000, classes.table_max), 7)) + list(
        range(classes.table_max - 100, classes.table_max + 1))
    assert [classes.class_of_eights[size + 7 >> 3] for size in sizes] == [
        classes.class_for(size) for size in sizes]
    assert classes.slab_class(250, 4 * memg.MB, 1) == classes.largest


def test_new_items_enter_hot_or_in_a_flat_lru_cold(segmented, store):
    segmented.store(SET, b"k", b"v")
    store.store(SET, b"k", b"v")
    assert (where(segmented, b"k"), where(store, b"k")) == ("HOT", "COLD")


def test_items_with_a_short_ttl_enter_temp(clock):
    store = memg.Store(clock=clock, segmented=True, temp_ttl=61)
    store.store(SET, b"short", b"v", exptime=61)
    store.store(SET, b"long", b"v", exptime=62)
    store.store(SET, b"never", b"v")
    assert [where(store, key) for key in (b"short", b"long", b"never")] == [
        "TEMP", "HOT", "HOT"]


def test_a_second_read_marks_an_item_active_and_stamps_its_access(segmented, clock):
    segmented.store(SET, b"k", b"v")
    clock.advance(5)
    first = unpack_item(segmented.get(b"k"))
    assert (first.fetched, first.state & memg.ACTIVE, first.atime) == (True, 0, START)
    clock.advance(5)
    second = unpack_item(segmented.get(b"k"))
    assert (second.state & memg.ACTIVE, second.atime) == (memg.ACTIVE, START + 10)
    assert where(segmented, b"k") == "HOT"                 # reads move nothing in HOT


def test_a_second_read_in_cold_moves_the_item_up_to_warm(segmented, clock):
    segmented.store(SET, b"k", b"v")
    clock.advance(2)
    juggle(segmented)                                      # idle in HOT, COLD empty
    assert where(segmented, b"k") == "COLD"
    segmented.get(b"k")
    assert where(segmented, b"k") == "COLD"
    segmented.get(b"k")
    assert where(segmented, b"k") == "WARM"
    figures = segmented.class_stats()[CLASSES.slab_class(1, 1, 0)]
    assert (figures["moves_to_cold"], figures["moves_to_warm"]) == (1, 1)
    assert (figures["hits_to_cold"], figures["get_hits"]) == (2, 2)


def test_the_maintainer_keeps_hot_to_its_share(segmented):
    for i in range(10):
        segmented.store(SET, b"k%d" % i, b"v")
    assert juggle(segmented) > 0
    # 20 % of the bytes stay in HOT: its two most recent items; the rest cooled,
    # least recently used first.
    assert [key for key in segmented.items if where(segmented, key) == "HOT"] == [
        b"k8", b"k9"]
    assert list(segmented.segments[memg.COLD]) == [b"k%d" % i for i in range(8)]
    assert segmented.snapshot()["moves_to_cold"] == 8


def test_the_maintainer_rescues_active_items_to_warm(segmented):
    for i in range(5):
        segmented.store(SET, b"k%d" % i, b"v")
    segmented.get(b"k0")
    segmented.get(b"k0")                                   # active
    juggle(segmented)
    assert where(segmented, b"k0") == "WARM"
    assert not unpack_item(segmented.items[b"k0"]).state & memg.ACTIVE
    segmented.get(b"k0")                                   # active again, in WARM
    juggle(segmented)
    assert where(segmented, b"k0") == "WARM"
    c = segmented.snapshot()
    assert (c["moves_to_warm"], c["moves_within_lru"]) == (1, 1)


def test_items_idle_past_their_share_of_cold_s_age_cool(segmented, clock):
    # HOT under its share, but idle longer than 0.2 times COLD's tail: it cools.
    segmented.store(SET, b"old", b"v" * 1000)
    clock.advance(2)
    juggle(segmented)                                      # COLD empty: any idle cools
    segmented.store(SET, b"new", b"v")
    clock.advance(10)
    segmented.store(SET, b"newest", b"v")
    juggle(segmented)                                      # COLD's tail idle 12 s
    assert where(segmented, b"new") == "COLD"              # idle 10 > 2.4
    assert where(segmented, b"newest") == "HOT"


def test_a_flat_lru_drains_hot_and_warm_into_cold(segmented):
    for i in range(3):
        segmented.store(SET, b"k%d" % i, b"v")
    segmented.get(b"k0")
    segmented.get(b"k0")
    segmented.segmented = False                            # lru mode flat
    segmented.store(SET, b"flat", b"v")
    assert where(segmented, b"flat") == "COLD"
    juggle(segmented)
    assert not segmented.segments[memg.HOT] and not segmented.segments[memg.WARM]


def test_eviction_takes_cold_then_cools_hot(clock):
    store = small_store(clock, segmented=True)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789")
    store.get(b"k1")
    store.get(b"k1")                                       # active: rescued to WARM
    clock.advance(1)
    juggle(store)                                          # k1 to WARM, k0 and k2 cool
    store.store(SET, b"k3", b"0123456789")                 # evicts COLD's tail, k0
    assert store.get(b"k0", bump=False) is None
    store.store(SET, b"k4", b"0123456789")                 # then k2
    store.store(SET, b"k5", b"0123456789")                 # COLD empty: HOT's tail, k3
    assert sorted(store.items) == [b"k1", b"k4", b"k5"]
    figures = store.class_stats()[CLASSES.slab_class(2, 10, 0)]
    assert (figures["evicted"], figures["evicted_unfetched"]) == (3, 3)
    assert figures["direct_reclaims"] >= 3


def test_temp_items_are_never_evicted(clock):
    store = small_store(clock, segmented=True, temp_ttl=61)
    for i in range(3):
        store.store(SET, b"k%d" % i, b"0123456789", exptime=30)
    assert store.store(SET, b"k3", b"0123456789") == (NO_MEMORY, None)
    assert store.store(SET, b"k4", b"0123456789", exptime=30) == (NO_MEMORY, None)
    assert sorted(store.items) == [b"k0", b"k1", b"k2"]
    figures = store.class_stats()[CLASSES.slab_class(2, 10, 0)]
    assert (figures["outofmemory"], figures["number_temp"]) == (2, 3)
    assert store.snapshot()["store_no_memory"] == 2


def test_the_maintainer_reclaims_expired_tails_of_every_class(clock):
    # memcached's maintainer reclaims at the tail of each class's LRU: in memg's
    # shared TEMP, a live item of one class holds up none of another's.
    store = memg.Store(clock=clock, segmented=True, temp_ttl=61)
    for i in range(20):
        store.store(SET, b"short%d" % i, b"v", exptime=1)
        store.store(SET, b"long%d" % i, b"v" * 500, exptime=30)
    store.get(b"short0")
    clock.advance(1)
    juggle(store)
    assert sorted(store.items) == sorted(b"long%d" % i for i in range(20))
    small = store.class_stats()[CLASSES.slab_class(7, 1, 0)]
    assert (small["reclaimed"], small["expired_unfetched"], small["number"]) == (20, 19, 0)
    assert store.snapshot()["crawler_reclaimed"] == 0


def test_class_stats_count_each_class_in_each_sub_lru(segmented, clock):
    segmented.store(SET, b"a", b"v")
    segmented.store(SET, b"b", b"v" * 1000)
    clock.advance(3)
    juggle(segmented)                                      # both idle: to COLD
    segmented.store(SET, b"c", b"v")
    clock.advance(1)
    classes = segmented.class_stats()
    small, large = classes[CLASSES.slab_class(1, 1, 0)], classes[CLASSES.slab_class(1, 1000, 0)]
    assert (small["number"], small["number_hot"], small["number_cold"]) == (2, 1, 1)
    assert (small["age_hot"], small["age"]) == (1, 4)
    assert (large["number"], large["number_cold"], large["age"]) == (1, 1, 4)
    assert small["mem_requested"] == cost(b"a", b"v") + cost(b"c", b"v")
    segmented.delete(b"b")
    assert segmented.class_stats()[CLASSES.slab_class(1, 1000, 0)]["number"] == 0


# --------------------------------------------------------------------------
# Whole-cache operations: flush, sweep, dump
# --------------------------------------------------------------------------

def test_flush_now(store):
    for i in range(10):
        store.store(SET, b"k%d" % i, b"v")
    store.flush()
    assert all(store.get(b"k%d" % i) is None for i in range(10))
    assert store.bytes == 0
    assert store.snapshot()["curr_items"] == 0


def test_a_lookup_of_a_flushed_key_counts_get_flushed_once(store):
    # As memcached's: its flush leaves items linked, and the lookup that finds one
    # counts it and unlinks it; memg's flush drops them, but keeps them at hand.
    store.store(SET, b"k", b"v")
    store.store(SET, b"other", b"v")
    store.flush()
    assert store.get(b"k") is None
    assert store.get(b"k") is None
    assert store.get(b"never") is None
    c = store.snapshot()
    assert (c["get_flushed"], c["get_misses"], c["curr_items"], c["bytes"]) == (1, 3, 0, 0)


def test_storing_over_a_flushed_key_counts_its_lookup(segmented):
    segmented.store(SET, b"k", b"old")
    segmented.flush()
    assert segmented.store(SET, b"k", b"new")[0] == STORED    # (memcached's do_store_item
    assert segmented.counters["get_flushed"] == 1            # looks it up first)
    assert value_of(segmented, b"k") == b"new"
    assert segmented.delete(b"k") == STORED
    assert segmented.get(b"k") is None
    assert segmented.counters["get_flushed"] == 1


def test_a_delayed_flush_counts_get_flushed_too(store, clock):
    store.store(SET, b"k", b"v")
    store.flush(10)
    clock.advance(10)
    assert store.get(b"k") is None
    assert store.counters["get_flushed"] == 1


def test_what_a_flush_dropped_is_let_go_after_a_while_as_reclaimed(store, clock):
    store.store(SET, b"k", b"v")
    store.flush()
    store.release_flushed()
    assert store.flushed_bytes == cost(b"k", b"v")
    assert store.snapshot()["reclaimed"] == 0
    clock.advance(memg.FLUSHED_KEPT)
    store.release_flushed()
    assert (store.flushed, store.flushed_bytes) == ((), 0)
    assert store.snapshot()["reclaimed"] == 1
    assert store.get(b"k") is None
    assert store.counters["get_flushed"] == 0


def test_what_a_flush_dropped_counts_under_the_limit_until_room_is_needed(clock):
    store = memg.Store(memory_limit=20 * cost(b"k00", b"v" * 100), clock=clock)
    for i in range(15):
        store.store(SET, b"k%02d" % i, b"v" * 100)
    store.flush()
    assert store.flushed_bytes == 15 * cost(b"k00", b"v" * 100)
    for i in range(15, 25):
        assert store.store(SET, b"k%02d" % i, b"v" * 100)[0] == STORED
        assert store.bytes + store.flushed_bytes <= store.memory_limit
    assert store.flushed_bytes == 0
    assert store.snapshot()["evictions"] == 0     # what was flushed went first
    assert store.snapshot()["curr_items"] == 10


def test_flush_negative_delay_is_immediate(store):
    store.store(SET, b"k", b"v")
    store.flush(-1)
    assert store.get(b"k") is None


def test_delayed_flush(store, clock):
    store.store(SET, b"before", b"v")
    store.flush(10)
    assert value_of(store, b"before") == b"v"
    clock.advance(5)
    store.store(SET, b"during", b"v")
    clock.advance(2)
    assert value_of(store, b"before") == b"v"
    assert value_of(store, b"during") == b"v"
    clock.advance(3)
    assert store.get(b"before") is None
    assert store.get(b"during") is None


def test_items_stored_after_delayed_flush_deadline_survive(store, clock):
    store.store(SET, b"before", b"v")
    store.flush(10)
    clock.advance(11)
    store.store(SET, b"after", b"v")
    clock.advance(100)
    assert value_of(store, b"after") == b"v"
    assert store.get(b"before") is None


def test_delayed_flush_with_absolute_time(store, clock):
    store.store(SET, b"k", b"v")
    store.flush(int(START) + 60)
    clock.advance(50)
    assert value_of(store, b"k") == b"v"
    clock.advance(10)
    assert store.get(b"k") is None



def test_an_item_linked_in_the_deadline_second_is_hidden(store, clock):
    # flush_all 1: the deadline is this very second, so a set right after it is
    # flushed too (memcached's item_is_flushed compares whole seconds).
    store.flush(1)
    store.store(SET, b"k", b"v")
    assert store.get(b"k") is None
    clock.advance(1)
    store.store(SET, b"k", b"v")
    assert value_of(store, b"k") == b"v"


def test_delayed_flush_hides_what_is_linked_in_its_last_second(store, clock):
    store.flush(10)
    clock.advance(9)
    store.store(SET, b"k", b"v")
    assert store.get(b"k") is None
    clock.advance(1)
    store.store(SET, b"k", b"v")
    assert value_of(store, b"k") == b"v"


def test_without_cas_an_immediate_flush_hides_the_rest_of_its_second(clock):
    store = memg.Store(clock=clock, use_cas=False)
    store.store(SET, b"before", b"v")
    store.flush()
    store.store(SET, b"after", b"v")
    assert store.get(b"before") is None
    assert store.get(b"after") is None
    clock.advance(1)
    store.store(SET, b"later", b"v")
    assert value_of(store, b"later") == b"v"


def test_without_cas_a_past_deadline_hides_only_older_items(clock):
    store = memg.Store(clock=clock, use_cas=False)
    store.store(SET, b"old", b"v")
    clock.advance(10)
    store.store(SET, b"new", b"v")
    store.flush(int(START) + 5)
    assert store.get(b"old") is None
    assert value_of(store, b"new") == b"v"


def crawled(store, **options):
    """Run a crawl to its end; returns the size of each batch it looked at."""
    return list(store.crawl(**options))


def test_crawl_drops_items_hidden_by_the_deadline_second(store):
    store.flush(1)
    store.store(SET, b"k", b"v")
    crawled(store)
    assert len(store.items) == 0
    assert store.bytes == 0


def test_flush_counts(store):
    store.flush()
    store.flush(10)
    assert store.counters["cmd_flush"] == 2


def test_flush_counts_the_items_it_drops_as_reclaimed(store, clock):
    # memcached reclaims the items a flush hides when it comes upon them at the LRU
    # tails; memg drops them at once, and counts them so, in their classes, as it
    # lets them go (a lookup before counts get_flushed instead).
    store.store(SET, b"small", b"v")
    store.store(SET, b"large", b"v" * 1000)
    store.store(SET, b"also small", b"w")
    store.store(SET, b"looked up", b"w")
    store.get(b"small")
    store.flush()
    assert store.get(b"looked up") is None
    clock.advance(memg.FLUSHED_KEPT)
    store.release_flushed()
    assert store.counters["get_flushed"] == 1
    classes = store.class_stats()
    small, large = classes[CLASSES.slab_class(5, 1, 0)], classes[CLASSES.slab_class(5, 1000, 0)]
    assert (small["reclaimed"], large["reclaimed"]) == (2, 1)
    assert (small["expired_unfetched"], large["expired_unfetched"]) == (1, 1)
    assert small["number"] == large["number"] == 0


def test_a_set_after_a_flush_in_a_flat_lru_reclaims_before_it_looks_up(store):
    # memcached's t/issue_183.t: memcached's flat LRU makes the new item, pulling
    # COLD's tail where the flushed item is, before it looks the key up.
    store.store(SET, b"key", b"1")
    store.flush()
    assert store.store(SET, b"key", b"1")[0] == STORED
    assert (store.snapshot()["reclaimed"], store.counters["get_flushed"]) == (1, 0)


def test_crawl_removes_expired_items(store, clock):
    store.store(SET, b"short", b"v", exptime=5)
    store.store(SET, b"long", b"v", exptime=50)
    store.store(SET, b"forever", b"v")
    clock.advance(5)
    found = {}
    crawled(store, found=found)
    assert list(store.items) == [b"long", b"forever"]
    assert store.bytes == cost(b"long", b"v") + cost(b"forever", b"v")
    c = store.snapshot()
    assert (c["crawler_reclaimed"], c["crawler_items_checked"], c["expired_unfetched"]) == (
        1, 3, 1)
    assert c["reclaimed"] == 0
    assert (found["seen"], found["noexp"], found["minutes"][0]) == (2, 1, 1)


def test_crawl_in_batches(store, clock):
    for i in range(10):
        store.store(SET, b"k%d" % i, b"v", exptime=1)
    clock.advance(1)
    steps = store.crawl(batch=4)
    assert next(steps) == 4
    assert not store.lock.locked()
    assert len(store.items) == 6
    assert list(steps) == [4, 2]
    assert len(store.items) == 0
    assert store.bytes == 0


def test_a_crawl_under_way_keeps_no_evicted_key_alive(clock):
    """A crawl goes on from a position, not from a list of the keys it has yet to
    look at, which would keep every key evicted meanwhile alive."""
    store = small_store(clock)
    key = b"k%d" % 0                       # an object of its own, to count references to
    for k in (key, b"k1", b"k2"):
        store.store(SET, k, b"0123456789")
    crawl = store.crawl(batch=1)
    assert next(crawl) == 1                # under way: two keys left to look at
    for i in range(3, 6):
        store.store(SET, b"k%d" % i, b"0123456789")
    assert store.get(key) is None
    assert sys.getrefcount(key) == 2       # ours, and getrefcount's argument


def test_crawl_of_some_classes(store, clock):
    store.store(SET, b"small", b"v", exptime=1)
    store.store(SET, b"large", b"v" * 1000, exptime=1)
    clock.advance(1)
    crawled(store, classes={CLASSES.slab_class(5, 1000, 0)})
    assert list(store.items) == [b"small"]
    assert store.snapshot()["crawler_items_checked"] == 1


def test_crawl_looks_at_tocrawl_items_of_each_class_at_most(store, clock):
    for i in range(5):
        store.store(SET, b"k%d" % i, b"v", exptime=1)
    store.store(SET, b"large", b"v" * 1000, exptime=1)
    clock.advance(1)
    crawled(store, tocrawl=2)
    assert list(store.items) == [b"k2", b"k3", b"k4"]       # the least recent first
    assert store.snapshot()["crawler_items_checked"] == 3


def test_crawl_applies_delayed_flush(store, clock):
    store.store(SET, b"k", b"v")
    store.flush(10)
    clock.advance(10)
    crawled(store)
    assert len(store.items) == 0
    assert store.bytes == 0


def walked(store, batch=memg.WALK_BATCH):
    return [pair for pairs in store.walk(batch=batch) for pair in pairs]


def test_walk_most_recent_first(store):
    store.store(SET, b"a", b"1")
    store.store(SET, b"b", b"22")
    store.store(SET, b"c", b"333")
    store.get(b"a")
    assert [(key, unpack_item(item).value) for key, item in walked(store)] == [
        (b"a", b"1"), (b"c", b"333"), (b"b", b"22")]


def test_walk_holds_the_lock_a_batch_at_a_time(store):
    for i in range(10):
        store.store(SET, b"k%d" % i, b"v")
    walk = store.walk(batch=4)
    assert [key for key, _ in next(walk)] == [b"k9", b"k8", b"k7", b"k6"]
    assert not store.lock.locked()
    store.delete(b"k5")                       # gone since the walk began: left out
    store.store(SET, b"k4", b"changed")       # changed since: as it now is
    store.store(SET, b"new", b"v")            # linked since: not in this walk
    rest = [pair for pairs in walk for pair in pairs]
    assert [(key, unpack_item(item).value) for key, item in rest] == [
        (b"k4", b"changed"), (b"k3", b"v"), (b"k2", b"v"), (b"k1", b"v"), (b"k0", b"v")]


def test_walk_leaves_out_expired_and_flushed_items(store, clock):
    store.store(SET, b"short", b"v", exptime=5)
    store.store(SET, b"long", b"v", exptime=50)
    clock.advance(10)
    assert [key for key, _ in walked(store)] == [b"long"]


# --------------------------------------------------------------------------
# Slab classes: where memcached would keep each item
# --------------------------------------------------------------------------

# memcached 1.6.18's classes by default, as memcached -vv lists them.
MEMCACHED_CHUNK_SIZES = [
    96, 120, 152, 192, 240, 304, 384, 480, 600, 752, 944, 1184, 1480, 1856, 2320, 2904, 3632,
    4544, 5680, 7104, 8880, 11104, 13880, 17352, 21696, 27120, 33904, 42384, 52984, 66232,
    82792, 103496, 129376, 161720, 202152, 252696, 315872, 394840, 524288]


@pytest.mark.parametrize("options, sizes", [
    ({}, MEMCACHED_CHUNK_SIZES),
    # -f 2 -n 100
    ({"growth_factor": 2, "chunk_size": 100}, [152, 304, 608, 1216, 2432, 4864, 9728,
                                               19456, 38912, 77824, 155648, 524288]),
    # -o slab_chunk_max=4096: the classes stop a factor short of it
    ({"slab_chunk_max": 4096}, MEMCACHED_CHUNK_SIZES[:16] + [4096]),
    # -o no_modern: a whole page
    ({"slab_chunk_max": memg.MB}, MEMCACHED_CHUNK_SIZES[:-1] + [493552, 616944, 771184,
                                                                memg.MB]),
    # -f 1.01: 96 * 1.01 rounds back down to 96, up to memcached's 63 classes
    ({"growth_factor": 1.01}, [96] * 62 + [524288]),
], ids=["default", "-f 2 -n 100", "slab_chunk_max=4096", "no_modern", "-f 1.01"])
def test_slab_classes_are_memcacheds(options, sizes):
    classes = memg.SlabClasses(**options)
    assert classes.chunk_sizes == sizes
    assert classes.largest == len(sizes)
    assert classes.per_page(1) == memg.MB // sizes[0]
    assert classes.slab_class(1, 1, 0) == 1


def test_equal_classes_fill_the_first_of_them():
    classes = memg.SlabClasses(growth_factor=1.01)
    assert classes.slab_class(1, 36, 0) == 1
    assert classes.slab_class(1, 37, 0) == 63                 # over 96: the largest


def test_an_item_is_in_the_class_its_memcached_size_fits():
    classes = memg.SlabClasses()
    # memcached's size: 48 (header) + key + 1 + value + 2 + 8 (CAS) [+ 4 with flags]
    assert classes.item_size(1, 10, 0) == 70
    assert classes.item_size(1, 10, 7) == 74
    assert memg.SlabClasses(use_cas=False).item_size(1, 10, 0) == 62
    assert classes.slab_class(1, 36, 0) == 1                 # 96 bytes: fills class 1
    assert classes.slab_class(1, 37, 0) == 2                 # 97
    assert classes.slab_class(1, 33, 5) == 2                 # 96 with flags' 4 bytes
    assert classes.slab_class(1, 36, 0) == 1
    assert memg.SlabClasses(use_cas=False).slab_class(1, 44, 0) == 1
    assert classes.slab_class(4, 66560, 0) == 31             # t/issue_22.t's items
    assert classes.slab_class(250, 2 * memg.MB, 1) == classes.largest


def test_a_large_item_takes_chunks_as_in_memcached():
    classes = memg.SlabClasses()
    small = classes.chunks(3, 1000, 0)
    assert small == [(classes.slab_class(3, 1000, 0), 1)]
    # memcached 1.6.18 with one 700,000-byte value under a 3-byte key, flags 1: a
    # 112-byte header in class 2, a 512 KB chunk, the rest in class 35
    assert classes.chunks(3, 700000, 1) == [(2, 1), (39, 1), (35, 1)]
    room = memg.MB // 2 - memg.CHUNK_STRUCT_SIZE             # data in a largest chunk
    assert classes.chunks(3, 2 * room - 2, 0) == [(2, 1), (39, 2)]      # no rest
    assert classes.chunks(3, 2 * room - 1, 0) == [(2, 1), (39, 2), (1, 1)]


def two_class_store(clock, evict=True):
    """A store with room for 3 items of 10 bytes, whose items of 10 and 100 bytes
    are in slab classes 1 and 4."""
    store = small_store(clock, evict=evict)
    assert (store.slabs.slab_class(2, 10, 0), store.slabs.slab_class(2, 100, 0)) == (1, 4)
    return store


def test_evictions_are_counted_in_the_evicted_items_class(clock):
    store = two_class_store(clock)
    store.store(SET, b"s0", b"x" * 10, exptime=100)
    store.get(b"s0")
    store.store(SET, b"s1", b"x" * 10)
    store.store(SET, b"s2", b"x" * 10)
    clock.advance(7)
    store.store(SET, b"b0", b"x" * 100)          # evicts s0 (read) and s1

    def evicted():
        return {slab: figures["evicted"] for slab, figures in store.class_stats().items()
                if figures["evicted"]}
    assert evicted() == {1: 2}
    counts = store.class_stats()[1]
    assert counts["evicted_nonzero"] == 1
    assert counts["evicted_unfetched"] == 1
    assert counts["evicted_time"] == 7           # s1, idle since it was stored
    assert store.snapshot()["evictions"] == 2
    store.store(SET, b"s3", b"x" * 10)           # evicts s2
    store.store(SET, b"s4", b"x" * 10)           # evicts b0
    assert evicted() == {1: 3, 4: 1}
    assert store.class_stats()[4]["evicted_time"] == 0
    store.reset_counters()
    assert evicted() == {}


def test_reclaims_and_refusals_are_counted_per_class(clock):
    store = two_class_store(clock, evict=False)
    store.store(SET, b"s0", b"x" * 10, exptime=5)
    store.store(SET, b"s1", b"x" * 10)
    store.store(SET, b"s2", b"x" * 10)
    clock.advance(5)
    assert store.store(SET, b"s3", b"x" * 10)[0] == STORED      # reclaims s0
    assert store.store(SET, b"b0", b"x" * 100) == (NO_MEMORY, None)
    counters = store.class_stats()
    assert counters[1]["reclaimed"] == counters[1]["expired_unfetched"] == 1
    assert store.class_counters[4]["outofmemory"] == 1    # (a class that held nothing)
    assert (store.snapshot()["reclaimed"], store.snapshot()["store_no_memory"]) == (1, 1)


def test_the_crawler_counts_what_it_checks_per_class(store, clock):
    store.store(SET, b"s", b"x" * 10, exptime=5)
    store.store(SET, b"t", b"x" * 10)
    store.store(SET, b"b", b"x" * 100, exptime=5)
    store.get(b"b")
    clock.advance(5)
    list(store.crawl())
    counters = store.class_stats()
    assert counters[1]["crawler_items_checked"] == 2
    assert counters[1]["crawler_reclaimed"] == counters[1]["expired_unfetched"] == 1
    assert counters[4]["crawler_reclaimed"] == 1
    assert counters[4]["expired_unfetched"] == 0             # b was read


def test_slab_usage_walks_the_items_into_their_classes(store, clock):
    store.store(SET, b"a", b"x" * 10)
    clock.advance(3)
    store.store(SET, b"b", b"x" * 10, flags=1)
    store.store(SET, b"big", b"x" * 700000, flags=1)
    store.store(SET, b"gone", b"x" * 100, exptime=1)
    clock.advance(1)
    usage = store.slab_usage()
    slabs = store.slabs
    assert usage.requested == {                              # memcached's bytes
        1: slabs.item_size(1, 10, 0) + slabs.item_size(1, 10, 1),
        4: slabs.item_size(4, 100, 0),                       # expired, still linked
        39: 700066}
    assert usage.chunks == {1: 2, 4: 1, 2: 1, 39: 1, 35: 1}


def test_walk_keeps_to_the_classes_asked_for(store):
    store.store(SET, b"a", b"x" * 10)
    store.store(SET, b"b", b"x" * 100)
    store.store(SET, b"c", b"x" * 10)
    assert [key for batch in store.walk(classes={1}) for key, _ in batch] == [b"c", b"a"]
    assert [key for batch in store.walk(classes={4, 5}) for key, _ in batch] == [b"b"]


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------

def test_get_counters(store):
    store.store(SET, b"k", b"v")
    store.get(b"k")
    store.get(b"k")
    store.get(b"nope")
    c = store.snapshot()
    assert (c["cmd_get"], c["get_hits"], c["get_misses"]) == (3, 2, 1)


def test_get_expired_counter(store, clock):
    # As memcached: an expired item a read finds counts in get_expired, never in
    # expired_unfetched (which counts those reclaimed at the LRU's tails).
    store.store(SET, b"k", b"v", exptime=1)
    clock.advance(1)
    store.get(b"k")
    c = store.snapshot()
    assert (c["get_expired"], c["get_misses"], c["expired_unfetched"]) == (1, 1, 0)


def test_touch_counters(store):
    store.store(SET, b"k", b"v")
    store.get(b"k", exptime=10)
    store.get(b"nope", exptime=10)
    c = store.snapshot()
    assert (c["cmd_touch"], c["touch_hits"], c["touch_misses"]) == (2, 1, 1)
    assert c["cmd_get"] == 0


def test_cas_counters(store):
    store.store(CAS, b"k", b"v", cas=1)
    _, item = store.store(SET, b"k", b"v")
    store.store(CAS, b"k", b"v", cas=unpack_item(item).cas + 100)
    store.store(CAS, b"k", b"v", cas=unpack_item(item).cas)
    c = store.snapshot()
    assert (c["cas_misses"], c["cas_badval"], c["cas_hits"]) == (1, 1, 1)


def test_delete_and_arithmetic_counters(store):
    store.store(SET, b"k", b"1")
    store.arithmetic(b"k", 1)
    store.arithmetic(b"k", 1, incr=False)
    store.arithmetic(b"nope", 1)
    store.arithmetic(b"nope", 1, incr=False)
    store.arithmetic(b"nope", 1, incr=False)
    store.delete(b"k")
    store.delete(b"k")
    c = store.snapshot()
    assert (c["incr_hits"], c["incr_misses"], c["decr_hits"], c["decr_misses"]) == (1, 1, 1, 2)
    assert (c["delete_hits"], c["delete_misses"]) == (1, 1)


def test_set_and_total_items_counters(store):
    store.store(SET, b"a", b"v")
    store.store(ADD, b"a", b"v")
    store.store(REPLACE, b"b", b"v")
    store.store(APPEND, b"a", b"v")
    c = store.snapshot()
    assert c["cmd_set"] == 4
    assert c["total_items"] == 2


def test_reset_counters(store):
    store.store(SET, b"k", b"v")
    store.get(b"k")
    store.get(b"nope")
    store.reset_counters()
    assert {value for name, value in store.snapshot().items()
            if name not in ("curr_items", "bytes", "limit_maxbytes", "hash_power_level")} == {0}
    assert value_of(store, b"k") == b"v"


def test_snapshot(store, clock):
    store.store(SET, b"a", b"12345")
    clock.advance(4)
    store.store(SET, b"b", b"")
    snap = store.snapshot()
    assert snap["curr_items"] == 2
    assert snap["bytes"] == cost(b"a", b"12345") + cost(b"b", b"")
    assert snap["limit_maxbytes"] == 64 * memg.MB
    assert snap["cmd_set"] == 2


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------

def run_threads(count, target):
    errors = []

    def wrapper():
        try:
            target()
        except BaseException as error:     # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=wrapper) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_concurrent_incr():
    store = memg.Store()
    store.store(SET, b"n", b"0")

    def work():
        for _ in range(300):
            assert store.arithmetic(b"n", 1)[0] == STORED

    run_threads(16, work)
    assert unpack_item(store.get(b"n")).value == b"4800"


def test_concurrent_cas_retry_loops():
    store = memg.Store()
    store.store(SET, b"n", b"0")

    def work():
        done = 0
        while done < 100:
            item = store.get(b"n")
            new = b"%d" % (int(unpack_item(item).value) + 1)
            outcome, _ = store.store(CAS, b"n", new, cas=unpack_item(item).cas)
            assert outcome in (STORED, EXISTS)
            done += outcome == STORED

    run_threads(8, work)
    assert unpack_item(store.get(b"n")).value == b"800"
    assert store.snapshot()["cas_hits"] == 800
