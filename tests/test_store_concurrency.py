"""One memg.Store hammered by many threads at once, without sockets.

memg's claim is that the Store's single lock makes every command atomic on any
interpreter, free-threaded CPython included, where threads really do run in
parallel and nothing is protected by the GIL.  These tests force a thread switch
every microsecond (sys.setswitchinterval) and check invariants that a missing or
misplaced lock would break:

- a mixed workload (every kind of command, a memory limit a dozen items big, a
  fake clock that keeps items expiring, a crawler, flushes; in a flat LRU, and in
  a segmented one with a TEMP LRU and its maintainer) leaves the books right at
  every moment a monitor looks: the byte count equals the cost of the items, the
  counts of each sub-LRU and class match them, the size histogram matches them, a
  flat LRU's order matches their last use, CAS uniques are distinct, no counter is
  negative, and the memory limit holds;
- every value read was written whole by some thread;
- the statistics count exactly what the threads saw;
- appends, prepends, incrs and decrs from many threads all land;
- of threads racing on one CAS unique, exactly one wins;
- nothing stored before a flush can be read after it;
- an expired item is never returned, while a crawler runs.
"""

import collections
import dataclasses
import random
import re
import sys
import threading
import time
import zlib

import pytest

import memg
from conftest import Clock
from memg import (ADD, APPEND, CAS, EXISTS, NO_MEMORY, NON_NUMERIC, NOT_FOUND,
                  NOT_STORED, PREPEND, REPLACE, SET, STORED, unpack_item)

START = 1_700_000_000.0


@pytest.fixture(scope="module", autouse=True)
def frequent_thread_switches():
    """Switch threads every microsecond, so that under the GIL, too, a thread is
    interrupted almost anywhere, as it would be running in parallel."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_concurrently(workers, background=(), timeout=60):
    """Run each worker in its own thread, all released at once, and each of the
    background callables (given an Event) until every worker is done.  Re-raises
    the first exception any of them raised; fails if they are not done in time
    (a deadlock, or a loop that a broken store never lets end)."""
    errors = []
    finished = threading.Event()
    start = threading.Barrier(len(workers) + len(background))

    def guarded(target, *args):
        def run():
            try:
                start.wait()
                target(*args)
            except BaseException as error:      # re-raised in the calling thread
                errors.append(error)
                finished.set()
        # Daemon threads, so that a hung one cannot keep pytest from exiting.
        return threading.Thread(target=run, daemon=True)

    worker_threads = [guarded(work) for work in workers]
    background_threads = [guarded(task, finished) for task in background]
    for thread in worker_threads + background_threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in worker_threads:
        thread.join(max(0, deadline - time.monotonic()))
    finished.set()
    for thread in background_threads:
        thread.join(max(0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in worker_threads + background_threads), (
        "threads still running after %d s" % timeout)


def tick(clock, seconds_per_millisecond=1):
    """A background task: move a fake clock on, so that items keep expiring."""
    def run(finished):
        while not finished.wait(0.001):
            clock.advance(seconds_per_millisecond)
    return run


# --------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------

def over_the_limit(store):
    """Whether the store holds more than its limit while it could evict (the caller
    holds store.lock): it may be over only when a lower limit (set_memory_limit)
    found nothing left to evict but the TEMP LRU's items, which are never evicted."""
    return store.bytes + store.flushed_bytes + store.index_charge > store.memory_limit and any(
        store.segments[segment] for segment in (memg.HOT, memg.WARM, memg.COLD))


def accounting_problems(store, clock_is_monotonic=True):
    """What is wrong with the store's books, recomputed from its items.  The caller
    holds store.lock, so the store is between two commands."""
    items = {key: item for segment in store.segments for key, item in segment.items()}
    # (Each item's header only: unpacking whole items would copy every value.)
    headers = [memg.item_fields(item) for item in items.values()]
    problems = []
    cost = sum(memg.item_cost(key, len(item) - memg.VALUE_START) for key, item in items.items())
    if store.bytes != cost:
        problems.append("bytes %d but the items cost %d" % (store.bytes, cost))
    flushed = sum(memg.item_cost(key, len(item) - memg.VALUE_START)
                  for segment in store.flushed for key, item in segment.items())
    if store.flushed_bytes != flushed:
        problems.append("flushed_bytes %d but what a flush dropped costs %d" % (
            store.flushed_bytes, flushed))
    if store.bytes + store.flushed_bytes + store.index_charge < 0 or over_the_limit(store):
        problems.append("bytes %d, flushed_bytes %d and index_charge %d outside 0..%d" % (
            store.bytes, store.flushed_bytes, store.index_charge, store.memory_limit))
    tables = sum(sys.getsizeof(segment) - memg.EMPTY_DICT for segment in store.segments)
    if store.index_bytes != tables:
        problems.append("index_bytes %d but the tables take %d" % (store.index_bytes, tables))
    if store.sizes is not None:
        sizes = collections.Counter(store.size_class(k, i) for k, i in items.items())
        kept = {size: count for size, count in store.sizes.items() if count}
        if kept != sizes:
            problems.append("size histogram %r, items %r" % (kept, dict(sizes)))
    if len(items) != sum(map(len, store.segments)):
        problems.append("a key in two sub-LRUs")
    lru_items, lru_bytes = [0] * memg.LRU_IDS, [0] * memg.LRU_IDS
    for segment, segment_items in enumerate(store.segments):
        for key, item in segment_items.items():
            lru = segment << memg.SEGMENT_SHIFT | item[memg.CLASS_BYTE]
            lru_items[lru] += 1
            lru_bytes[lru] += memg.item_cost(key, len(item) - memg.VALUE_START)
    if (lru_items, lru_bytes) != (store.lru_items, store.lru_bytes):
        problems.append("LRU counts do not match the items")
    uniques = [cas for cas, _, _, _, _ in headers]
    if len(set(uniques)) != len(uniques) or max(uniques, default=0) > store.last_cas:
        problems.append("CAS uniques %r, last %d" % (uniques, store.last_cas))
    # A flat LRU is COLD's dict order; it agrees with recency if the last access times
    # never decrease from the least to the most recently used end.
    atimes = [memg.header(item).atime for item in store.segments[memg.COLD].values()]
    if not store.segmented and clock_is_monotonic and atimes != sorted(atimes):
        problems.append("LRU order has access times %r" % atimes)
    negative = {name: n for counters in [store.counters] + store.class_counters
                for name, n in counters.items() if n < 0}
    if negative:
        problems.append("negative counters %r" % negative)
    return problems


def audit(store):
    with store.lock:
        try:
            return accounting_problems(store)
        except RuntimeError as error:     # "dictionary changed size during iteration"
            return ["items changed while the lock was held: %s" % error]


# Values of the hammered keys are runs of self-checking pieces, one per write: the
# writer, its sequence number, and a checksum that includes the key, so a value torn,
# mixed from two writes or filed under the wrong key does not check.
PIECE = re.compile(rb"(\d\d)\.(\d{6})\.([0-9a-f]{8});")


def piece(key, writer, seq):
    body = b"%02d.%06d" % (writer, seq)
    return body + b".%08x;" % zlib.crc32(key + body)


PIECE_SIZE = len(piece(b"k", 0, 0))


def written_whole(key, value):
    """Whether value is a run of whole pieces made for key (or empty, as meta get's
    vivify and meta delete's x leave it)."""
    if len(value) % PIECE_SIZE:
        return False
    for start in range(0, len(value), PIECE_SIZE):
        match = PIECE.fullmatch(value, start, start + PIECE_SIZE)
        if match is None or match.group() != piece(key, int(match[1]), int(match[2])):
            return False
    return True


NUMBER = re.compile(rb"[0-9]{1,20} *")    # incr/decr pad a shorter result with spaces


# --------------------------------------------------------------------------
# The hammer: every command at once on a few keys in a tiny store
# --------------------------------------------------------------------------

WORKERS = 8
OPS_PER_WORKER = 12000
PIECE_KEYS = [b"p%d" % i for i in range(20)]
NUMBER_KEYS = [b"n%d" % i for i in range(4)]
# Ten or fifteen items (of about 150 bytes) fit: almost every store evicts
# something.  The limit moves between the two, through set_memory_limit.
MEMORY_LIMITS = (10 * memg.item_cost(b"p10", 150), 15 * memg.item_cost(b"p10", 150))
ITEM_SIZE_MAX = 2048
EXPTIMES = (0, 0, 1, 2, 3)                  # relative seconds on a clock that races


@dataclasses.dataclass
class HammerReport:
    tallies: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    torn: list = dataclasses.field(default_factory=list)
    inconsistent: list = dataclasses.field(default_factory=list)
    over_limit: list = dataclasses.field(default_factory=list)
    audits: int = 0
    snapshots: int = 0


class Hammer:
    """One worker thread: a random mix of every Store command, each reply checked,
    each call and outcome tallied for comparison with the store's counters."""

    def __init__(self, store, writer, report):
        self.store = store
        self.writer = writer
        self.report = report
        self.rng = random.Random(writer)
        self.seq = 0
        self.tallies = collections.Counter()
        self.operations = [self.set, self.add, self.replace, self.append, self.prepend,
                           self.cas, self.get, self.get, self.meta_get, self.touch,
                           self.delete, self.invalidate, self.set_number,
                           self.arithmetic, self.arithmetic, self.get_number,
                           self.set_memory_limit]

    def __call__(self):
        for _ in range(OPS_PER_WORKER):
            # Flushes are rare, or the store would be empty most of the time.
            if self.rng.random() < 0.002:
                self.flush()
            else:
                self.rng.choice(self.operations)()

    # -- helpers ----------------------------------------------------------------

    def pieces(self, key, count):
        made = b""
        for _ in range(count):
            self.seq += 1
            made += piece(key, self.writer, self.seq)
        return made

    def check_read(self, key, item, command):
        self.tallies[command, "hit" if item is not None else "miss"] += 1
        if item is None:
            return
        whole = (NUMBER.fullmatch(unpack_item(item).value) if key in NUMBER_KEYS
                 else written_whole(key, unpack_item(item).value))
        if not whole:
            self.report.torn.append((command, key, unpack_item(item).value))

    def write(self, mode, key, value, **options):
        outcome, _ = self.store.store(mode, key, value, **options)
        self.tallies[mode, outcome] += 1

    # -- keys holding pieces ------------------------------------------------------

    def replace_value(self, mode):
        key = self.rng.choice(PIECE_KEYS)
        self.write(mode, key, self.pieces(key, self.rng.randint(1, 12)),
                   flags=self.writer, exptime=self.rng.choice(EXPTIMES))

    def set(self):
        self.replace_value(SET)

    def add(self):
        self.replace_value(ADD)

    def replace(self):
        self.replace_value(REPLACE)

    def extend(self, mode):
        key = self.rng.choice(PIECE_KEYS)
        self.write(mode, key, self.pieces(key, self.rng.randint(1, 3)))

    def append(self):
        self.extend(APPEND)

    def prepend(self):
        self.extend(PREPEND)

    def cas(self):
        key = self.rng.choice(PIECE_KEYS)
        item = self.store.get(key)
        self.check_read(key, item, "get")
        if item is not None:
            self.write(CAS, key, self.pieces(key, 2), cas=unpack_item(item).cas,
                       exptime=self.rng.choice(EXPTIMES))

    def get(self):
        key = self.rng.choice(PIECE_KEYS)
        self.check_read(key, self.store.get(key, bump=self.rng.random() < 0.8), "get")

    def meta_get(self):
        key = self.rng.choice(PIECE_KEYS)
        found = self.store.meta_get(key, vivify=self.rng.choice((None, 2)))
        self.check_read(key, found and found[0], "get")

    def touch(self):
        key = self.rng.choice(PIECE_KEYS)
        item = self.store.get(key, exptime=self.rng.choice((0, 1, 3, -1)))
        self.check_read(key, item, "touch")

    def delete(self):
        outcome = self.store.delete(self.rng.choice(PIECE_KEYS + NUMBER_KEYS))
        self.tallies["delete", outcome] += 1

    def invalidate(self):
        self.store.invalidate(self.rng.choice(PIECE_KEYS),
                              drop_value=self.rng.random() < 0.3)

    # -- keys holding numbers -----------------------------------------------------

    def set_number(self):
        number = b"%d" % self.rng.randrange(10 ** self.rng.randint(1, 12))
        self.write(SET, self.rng.choice(NUMBER_KEYS), number,
                   exptime=self.rng.choice(EXPTIMES))

    def arithmetic(self):
        incr = self.rng.random() < 0.5
        outcome, _ = self.store.arithmetic(self.rng.choice(NUMBER_KEYS),
                                           self.rng.randint(1, 10 ** 6), incr=incr)
        self.tallies["incr" if incr else "decr", outcome] += 1

    def get_number(self):
        key = self.rng.choice(NUMBER_KEYS)
        self.check_read(key, self.store.get(key), "get")

    # -- whole store ---------------------------------------------------------------

    def flush(self):
        # Mostly at once; sometimes delayed, so that a later command applies it.
        self.store.flush(self.rng.choice((0, 0, 3)))
        self.tallies["flush", "done"] += 1

    def set_memory_limit(self):
        self.store.set_memory_limit(self.rng.choice(MEMORY_LIMITS))


def audit_continually(store, report):
    """A background task: check the books between commands, as often as it can."""
    def run(finished):
        while not finished.is_set():
            report.inconsistent.extend(audit(store))
            report.audits += 1
    return run


def watch_memory(store, report):
    """A background task: what ``stats`` would show, checked against the limit."""
    def run(finished):
        while not finished.is_set():
            snapshot = store.snapshot()
            if snapshot["bytes"] > snapshot["limit_maxbytes"]:
                with store.lock:
                    if over_the_limit(store):    # (still: see over_the_limit)
                        report.over_limit.append((snapshot["bytes"],
                                                  snapshot["limit_maxbytes"]))
            report.snapshots += 1
    return run


def crawl_continually(store, batch=5):
    def run(finished):
        while not finished.is_set():
            for _ in store.crawl(batch=batch):
                pass
    return run


def juggle_continually(store):
    """The LRU maintainer, running as fast as it can."""
    def run(finished):
        while not finished.is_set():
            store.juggle(20, 40, 0.2, 2.0)
    return run


@pytest.fixture(scope="module", params=["flat", "segmented"])
def hammered(request):
    """A tiny store after WORKERS threads ran OPS_PER_WORKER random commands each,
    with the clock racing, a crawler, two monitors and, in a segmented LRU (with a
    TEMP LRU for the shortest TTLs), the maintainer; and what they saw.  An exception
    in any thread (a KeyError from a store whose dicts and books disagree, say) makes
    every test that uses this fixture an error."""
    clock = Clock(START)
    segmented = request.param == "segmented"
    store = memg.Store(memory_limit=MEMORY_LIMITS[0], item_size_max=ITEM_SIZE_MAX,
                       track_sizes=True, clock=clock, segmented=segmented,
                       temp_ttl=2 if segmented else None)
    report = HammerReport()
    workers = [Hammer(store, writer, report) for writer in range(WORKERS)]
    run_concurrently(workers, [tick(clock), crawl_continually(store),
                               audit_continually(store, report),
                               watch_memory(store, report)]
                     + [juggle_continually(store)] * segmented)
    # Merged here rather than by the threads: Counter.update is not atomic.
    for worker in workers:
        report.tallies.update(worker.tallies)
    return store, report


def test_the_hammer_evicts_expires_flushes_and_is_watched(hammered):
    """The run did what the other hammer tests rely on (each can be 0 by mistake)."""
    store, report = hammered
    counters = store.snapshot()
    assert counters["evictions"] > 100
    assert counters["get_expired"] + counters["reclaimed"] + counters["crawler_reclaimed"] > 10
    assert counters["cmd_flush"] > 10
    if store.segmented:
        assert counters["moves_to_cold"] > 100 and counters["moves_to_warm"] > 10
    assert report.tallies["get", "hit"] > 1000
    assert report.audits > 50 and report.snapshots > 50


def test_the_books_agree_with_the_items_at_every_audit(hammered):
    store, report = hammered
    assert report.inconsistent == []
    assert audit(store) == []
    for _ in store.crawl():
        pass
    assert audit(store) == []


def test_memory_stays_within_the_limit_at_every_snapshot(hammered):
    _, report = hammered
    assert report.over_limit == []


def test_every_value_read_was_written_whole(hammered):
    _, report = hammered
    assert report.torn == []


def test_counters_count_what_the_threads_saw(hammered):
    """No increment of a counter was lost or doubled."""
    store, report = hammered
    tallies, counters = report.tallies, store.snapshot()

    def total(*names):
        return sum(count for name, count in tallies.items() if name[0] in names)

    assert counters["cmd_get"] == total("get")
    assert counters["get_hits"] == tallies["get", "hit"]
    assert counters["cmd_touch"] == total("touch")
    assert counters["touch_hits"] == tallies["touch", "hit"]
    assert counters["cmd_set"] == total(SET, ADD, REPLACE, APPEND, PREPEND, CAS)
    assert counters["cas_hits"] == tallies[CAS, STORED] + tallies[CAS, NO_MEMORY]
    assert counters["cas_badval"] == tallies[CAS, EXISTS]
    assert counters["cas_misses"] == tallies[CAS, NOT_FOUND]
    assert counters["delete_hits"] == tallies["delete", STORED]
    for command in ("incr", "decr"):
        # Number keys only ever hold digits: NON_NUMERIC would mean that another
        # key's value landed under one.
        assert tallies[command, NON_NUMERIC] == 0
        assert counters[command + "_hits"] == (tallies[command, STORED]
                                              + tallies[command, NO_MEMORY])
        assert counters[command + "_misses"] == tallies[command, NOT_FOUND]
    assert counters["cmd_flush"] == total("flush")


# --------------------------------------------------------------------------
# Exact results: nothing is evicted, so every update must show
# --------------------------------------------------------------------------

THREADS = 8


def test_appends_and_prepends_from_many_threads_all_land():
    """Thread i appends its capital letter and prepends its small one M times each:
    each letter must appear exactly M times, on its side of the original value."""
    times = 3000
    store = memg.Store()
    store.store(SET, b"log", b"|")

    def extend(thread):
        for _ in range(times):
            assert store.store(APPEND, b"log", b"%c" % (ord("A") + thread))[0] == STORED
            assert store.store(PREPEND, b"log", b"%c" % (ord("a") + thread))[0] == STORED

    run_concurrently([lambda i=i: extend(i) for i in range(THREADS)])
    value = unpack_item(store.get(b"log")).value
    front, bar, back = value.partition(b"|")
    assert bar == b"|"
    assert collections.Counter(front) == {ord("a") + i: times for i in range(THREADS)}
    assert collections.Counter(back) == {ord("A") + i: times for i in range(THREADS)}
    assert store.bytes == memg.item_cost(b"log", len(value))


def test_concurrent_incr_and_decr_net_out_exactly():
    """Half the threads incr, half decr, each by its own delta, so that a lost update
    of any thread changes the result; the start is high enough that decr never stops
    at 0."""
    times = 3000
    start = 10 ** 9
    store = memg.Store()
    store.store(SET, b"n", b"%d" % start)
    deltas = {thread: thread + 1 for thread in range(THREADS)}

    def count(thread):
        incr = thread % 2 == 0
        for _ in range(times):
            outcome, item = store.arithmetic(b"n", deltas[thread], incr=incr)
            assert outcome == STORED and NUMBER.fullmatch(unpack_item(item).value)

    run_concurrently([lambda i=i: count(i) for i in range(THREADS)])
    net = sum(delta if thread % 2 == 0 else -delta for thread, delta in deltas.items())
    assert int(unpack_item(store.get(b"n")).value) == start + net * times
    counters = store.snapshot()
    assert counters["incr_hits"] == counters["decr_hits"] == THREADS // 2 * times


# --------------------------------------------------------------------------
# CAS: one winner per unique
# --------------------------------------------------------------------------

# What a racer tries with the unique every racer read, and what the item must hold
# afterwards if it won (None: deleted).  Losers see the item changed or gone.
CAS_ATTEMPTS = (
    (lambda store, cas, me: store.store(CAS, b"c", b"%d" % (1000 + me), cas=cas)[0],
     lambda me: b"%d" % (1000 + me)),
    (lambda store, cas, me: store.store(APPEND, b"c", b"+%d" % me, cas=cas)[0],
     lambda me: b"100+%d" % me),
    (lambda store, cas, me: store.arithmetic(b"c", me + 1, cas=cas)[0],
     lambda me: b"%d" % (100 + me + 1)),
    (lambda store, cas, me: store.delete(b"c", cas=cas),
     lambda me: None),
)
LOSING_OUTCOMES = {EXISTS, NOT_FOUND, NOT_STORED}


class CasRace:
    """Rounds of racers on one CAS unique: between rounds (the barrier's action, run
    while every racer waits) the last round is checked and the item stored anew."""

    def __init__(self, store, racers):
        self.store = store
        self.racers = racers
        # A timeout, so that a racer that died breaks the barrier for the others.
        self.barrier = threading.Barrier(racers, action=self.between_rounds, timeout=10)
        self.unique = None
        self.outcomes = [None] * racers
        self.problems = []
        self.rounds = 0

    def between_rounds(self):
        if self.unique is not None:
            self.check_round()
        _, item = self.store.store(SET, b"c", b"100")
        self.unique = unpack_item(item).cas
        self.outcomes = [None] * self.racers

    def check_round(self):
        self.rounds += 1
        winners = [me for me, outcome in enumerate(self.outcomes) if outcome == STORED]
        losers = {self.outcomes[me] for me in range(self.racers) if me not in winners}
        if len(winners) != 1 or not losers <= LOSING_OUTCOMES:
            self.problems.append(("outcomes", self.outcomes))
            return
        me = winners[0]
        item = self.store.get(b"c")
        expected = CAS_ATTEMPTS[me % len(CAS_ATTEMPTS)][1](me)
        if (item and unpack_item(item).value) != expected:
            self.problems.append(("value", me, item and unpack_item(item).value, expected))

    def racer(self, me, rounds):
        attempt = CAS_ATTEMPTS[me % len(CAS_ATTEMPTS)][0]
        self.barrier.wait()                     # the first round's item
        for _ in range(rounds):
            self.outcomes[me] = attempt(self.store, self.unique, me)
            self.barrier.wait()


def test_exactly_one_racer_per_cas_unique_wins():
    """Each round, racers holding the same unique try cas, append, incr and delete
    with it: exactly one succeeds, and the item shows its change alone."""
    rounds = 3000
    race = CasRace(memg.Store(), THREADS)
    run_concurrently([lambda me=me: race.racer(me, rounds) for me in range(THREADS)])
    assert race.problems == []
    assert race.rounds == rounds


# --------------------------------------------------------------------------
# flush_all racing with sets
# --------------------------------------------------------------------------

def test_nothing_stored_before_a_flush_is_readable_after_it():
    """Writers keep storing increasing sequence numbers and publish the last one
    stored.  The flusher notes those, flushes, and reads every key: a value at or
    below the noted number was stored before the flush and must be gone."""
    writers, keys_each, flushes = 6, 8, 2000
    store = memg.Store()
    stored = [0] * writers                  # writer -> last sequence number stored
    stale, survivors = [], []

    def write(writer):
        def run(finished):
            keys = [b"w%d-%d" % (writer, k) for k in range(keys_each)]
            seq = 0
            while not finished.is_set():
                seq += 1
                assert store.store(SET, keys[seq % keys_each], b"%d" % seq)[0] == STORED
                stored[writer] = seq
        return run

    def flush_and_check():
        for _ in range(flushes):
            before = list(stored)
            store.flush()
            for writer in range(writers):
                for k in range(keys_each):
                    item = store.get(b"w%d-%d" % (writer, k))
                    if item is not None:
                        seq = int(unpack_item(item).value)
                        (stale if seq <= before[writer] else survivors).append(seq)

    run_concurrently([flush_and_check], [write(w) for w in range(writers)])
    assert stale == []
    assert survivors, "writers never stored between a flush and the reads after it"
    assert audit(store) == []


# --------------------------------------------------------------------------
# Expiry under concurrent reads and crawls
# --------------------------------------------------------------------------

class WitnessClock(Clock):
    """A Clock that remembers, for each thread, the time it last told it: the
    store reads its clock once per command, so this is the time that thread's last
    command ran at."""

    def __init__(self, now):
        super().__init__(now)
        self.seen = threading.local()

    def __call__(self):
        now = self.now
        self.seen.now = now
        return now


def test_an_expired_item_is_never_returned():
    """Writers store items with absolute expiry times a few (fast) seconds ahead,
    written into the value, or none (0); readers use get and meta get while the
    clock races and a crawler runs.  No read may return an item whose time had come
    at the moment of the read."""
    ops = 15000
    keys = [b"e%d" % i for i in range(16)]
    clock = WitnessClock(START)
    store = memg.Store(clock=clock)
    expired_reads, live_reads = [], []

    def write(seed):
        rng = random.Random(seed)
        for _ in range(ops):
            deadline = rng.choice((0, int(clock()) + rng.randint(0, 3)))
            store.store(SET, rng.choice(keys), b"%d" % deadline, exptime=deadline)

    def read(seed):
        rng = random.Random(seed)
        for _ in range(ops):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                item = store.get(key)
            else:
                found = store.meta_get(key)
                item = found and found[0]
            if item is not None:
                deadline = int(unpack_item(item).value)
                now = clock.seen.now
                (expired_reads if deadline and deadline <= now else live_reads).append(
                    (key, deadline, now))

    workers = [lambda s=s: write(s) for s in range(3)] + [
        lambda s=s: read(s) for s in range(3, 7)]
    run_concurrently(workers, [tick(clock), crawl_continually(store, batch=4)])
    assert expired_reads == []
    assert len(live_reads) > 1000
    counters = store.snapshot()
    assert counters["get_expired"] > 0 and counters["crawler_reclaimed"] > 0
    for _ in store.crawl():
        pass
    now = store.now()
    expiries = {key: unpack_item(item).exptime for key, item in store.items.items()}
    assert [key for key, exptime in expiries.items() if exptime and exptime <= now] == []
    assert audit(store) == []
