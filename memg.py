#!/usr/bin/env python3
"""memg: a memcached-compatible in-memory key-value server in one Python file.

memg speaks memcached's text protocol (the classic commands and the meta commands)
closely enough that memcached's clients cannot tell the difference.  It needs only
the Python standard library.  Run it with ``python memg.py`` and point any memcached
client at 127.0.0.1:11211; ``python memg.py -h`` lists the options.

The file reads top to bottom in the order data flows:

1. settings      -- what the command line and ``Server(**settings)`` can change
2. the store     -- items, expiry, memory accounting and the LRU, behind one lock
3. the protocol  -- one handler per command, found through a table
4. the connection -- one thread per client: read, dispatch, batch the replies
5. the server    -- accept loop, connection limit, background sweep, signals
6. the command line
7. the pytest plugin -- a ``memg_server`` fixture for other projects' tests
"""

import base64
import binascii
import collections
import contextlib
import dataclasses
import errno
import hmac
import io
import itertools
import mmap
import os
import queue
import re
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse
from typing import Optional

__version__ = "0.1.0"
# What ``version`` and ``stats`` report: the memcached release whose protocol memg
# follows, tagged so that people can tell the servers apart.
VERSION = "1.6.21-memg-" + __version__

KB = 1024
MB = 1024 * KB


# --------------------------------------------------------------------------
# 1. Settings
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """Everything a user can choose; the command line fills in the same fields."""

    host: str = "127.0.0.1"           # -l; memcached listens everywhere, memg on loopback
    port: int = 11211                  # -p; 0 picks a free port
    udp_port: int = 0                  # -U; UDP is not served, so only 0 is accepted
    unix_socket: Optional[str] = None  # -s; replaces TCP, as in memcached
    unix_mask: int = 0o700             # -a
    memory_limit: int = 64 * MB        # -m, in bytes here
    evict: bool = True                 # -M turns eviction off: full means an error
    max_connections: int = 1024        # -c
    item_size_max: int = 1 * MB        # -I
    threads: int = 4                   # -t; reported only: each client has its own thread
    verbose: int = 0                   # -v, -vv
    enable_shutdown: bool = False      # -A
    use_cas: bool = True               # -C turns CAS off
    flush_enabled: bool = True         # -F turns flush_all off
    dump_enabled: bool = True          # -X turns stats cachedump off
    backlog: int = 1024                # -b
    idle_timeout: int = 0              # -o idle_timeout=N; 0 means never
    track_sizes: bool = False          # -o track_sizes: keep ``stats sizes``
    auth_file: Optional[str] = None    # -Y; user:password lines clients must send first
    user: Optional[str] = None         # -u; privileges are dropped after binding
    pid_file: Optional[str] = None     # -P
    single: bool = False               # --single: serve one connection, then exit

    def __post_init__(self):
        """Refuse what memg cannot honour, with the option's name in the message."""
        if self.udp_port:
            raise ValueError("UDP is not supported: -U must be 0")
        if self.unix_socket and not hasattr(socket, "AF_UNIX"):
            raise ValueError("Unix sockets (-s) are not available on this platform")
        if not 0 <= self.port <= 65535:
            raise ValueError("port (-p) must be from 0 to 65535")
        if not 1 * KB <= self.item_size_max <= 1024 * MB:
            raise ValueError("item size limit (-I) must be from 1k to 1024m")
        if self.item_size_max > self.memory_limit // 2:
            raise ValueError("item size limit (-I) must be at most half the memory "
                             "limit (-m)")
        for name, option in (("max_connections", "-c"), ("threads", "-t"),
                             ("backlog", "-b")):
            if getattr(self, name) < 1:
                raise ValueError("%s (%s) must be at least 1"
                                 % (name.replace("_", " "), option))


# --------------------------------------------------------------------------
# 2. The store: items, expiry, memory accounting, LRU
# --------------------------------------------------------------------------

KEY_MAX_LENGTH = 250
U64 = 0xFFFFFFFFFFFFFFFF
# memcached reads numbers with C's strtol and strtoull: white space, a sign, digits,
# then the end, white space or a NUL (C's end of string; whatever follows is ignored).
_NUMBER = re.compile(rb"[\t\n\v\f\r ]*([+-]?)([0-9]+)(?![^\0\t\n\v\f\r ])")
def parse_uint64(text):
    """memcached's safe_strtoull (CAS uniques, deltas, stored numbers); None if it
    fails.  A minus sign passes only where strtoull's wrap-around leaves a number
    that is not negative as a signed 64-bit value."""
    if text.isdigit() and len(text) < 20:
        return int(text)                        # the common case
    match = _NUMBER.match(text)
    if match is None:
        return None
    number = int(match.group(2))
    if number > U64:
        return None
    if match.group(1) == b"-":
        number = -number & U64
        if number > U64 >> 1:
            return None
    return number


def parse_uint32(token):
    """memcached's safe_strtoul (client flags): parsed as 64 bits, kept as 32."""
    if token.isdigit() and len(token) < 10:
        return int(token)                       # the common case
    number = parse_uint64(token)
    return None if number is None else number & 0xFFFFFFFF


def parse_int32(token):
    """memcached's safe_strtol (exptimes, lengths): C's 64-bit strtol, kept in an
    int32, so that large numbers wrap as they do in memcached."""
    if token.isdigit() and len(token) < 10:
        return int(token)                       # the common case
    match = _NUMBER.match(token)
    if match is None:
        return None
    number = int(match.group(1) + match.group(2))
    if not -2 ** 63 <= number < 2 ** 63:
        return None
    return (number + 2 ** 31) % 2 ** 32 - 2 ** 31


# Relative expiry times may not exceed 30 days; larger numbers are Unix times.
MAX_RELATIVE_EXPTIME = 60 * 60 * 24 * 30
# What memcached adds to key and value when it checks the -I limit (its item header,
# CAS and terminators; 4 more for non-zero flags), so that the largest storable value
# is the same in both.
ITEM_HEADER_SIZE = 48 + 8 + 1 + 2
# What Python spends on an item beyond the bytes of its key and value: the key's
# and the item's object headers, the item's header of fields and the dict's entry.
# Resident memory grows by 110 to 160 bytes per item beyond key and value (a Store
# filled with 100,000 items of 10 to 4000 bytes, CPython 3.11, 64-bit);
# tests/test_server.py checks the bound it gives.
ITEM_OVERHEAD = 200

# Outcomes of store operations; the protocol turns them into reply lines.
STORED, NOT_STORED, EXISTS, NOT_FOUND = "STORED", "NOT_STORED", "EXISTS", "NOT_FOUND"
NO_MEMORY, NON_NUMERIC = "NO_MEMORY", "NON_NUMERIC"

# Storage modes, as memcached's NREAD_* values.
SET, ADD, REPLACE, CAS = "set", "add", "replace", "cas"
APPEND, PREPEND = "append", "prepend"

# Counters the store keeps under its lock; ``stats`` shows them, ``stats reset`` zeroes
# them.  (cmd_get and cmd_touch are not kept: every get is a hit or a miss, and so is
# every touch, so ``snapshot`` adds them up.)
STORE_COUNTERS = (
    "cmd_set", "cmd_flush",
    "get_hits", "get_misses", "get_expired", "get_flushed",
    "delete_misses", "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
    "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
    "store_too_large", "store_no_memory",
    "total_items", "evictions", "evicted_nonzero", "reclaimed", "expired_unfetched",
    "evicted_unfetched", "crawler_reclaimed", "crawler_items_checked",
)


# An item is one stored value and its metadata, packed into a single bytes object: a
# header (CAS unique, expiry, last access, client flags, state bits), then the value.
# A Python object per field would cost more than the value itself: a 100-byte item
# takes about 250 bytes of memory in all this way (with its key and its dict entry),
# 450 as an object with a value and two ints (memcached: 197).  It is a plain bytes
# object, not a subclass with properties: an instance of a class defined in Python
# costs 16 bytes more, and the garbage collector tracks it, so that each full
# collection walked every item (170 ms for a million items, with every thread
# stopped).  Items never change; an update links a new one (``make_item``), so a
# reader that got an item from the store may use it without the lock.
ITEM_HEADER = struct.Struct("<QqIIB")
# (cas, exptime, atime, flags, state) of an item, and where its value starts.
item_fields = ITEM_HEADER.unpack_from
pack_header = ITEM_HEADER.pack
VALUE_START = ITEM_HEADER.size
FETCHED, STALE, WON = 1, 2, 4           # the state bits


def make_item(value, flags, exptime, cas, atime, state=0):
    """A new item.  exptime: absolute Unix time in whole seconds, 0 never expires,
    -1 expired; atime: last access (LRU statistics, meta 'l', flush_all's deadline)."""
    return pack_header(cas, exptime, atime, flags, state) + value


class ItemView(collections.namedtuple("ItemView", "cas exptime atime flags state value")):
    """An item unpacked, for the code that reads its fields by name (the hot paths
    read ``item_fields`` instead)."""

    __slots__ = ()
    size = property(lambda self: len(self.value))
    fetched = property(lambda self: bool(self.state & FETCHED),
                       doc="read since stored (meta 'h', expired_unfetched)")
    stale = property(lambda self: bool(self.state & STALE),
                     doc="marked by 'md I': served with X until replaced")
    won = property(lambda self: bool(self.state & WON),
                   doc="a client holds the recache token (meta W/Z)")

    def pack(self):
        return make_item(self.value, self.flags, self.exptime, self.cas, self.atime,
                         self.state)


def unpack_item(item):
    return ItemView(*item_fields(item), item[VALUE_START:])


def changed_item(item, **changes):
    """item with some of its header fields changed."""
    return unpack_item(item)._replace(**changes).pack()


def item_cost(key, value_size):
    """Bytes an item is charged against the memory limit."""
    return len(key) + value_size + ITEM_OVERHEAD


class Store:
    """The cache: a dict in LRU order, a memory budget, CAS uniques and counters.

    Every public method takes the one lock, so each command is atomic whatever the
    interpreter (free-threaded CPython included).  Nothing here knows about sockets
    or the wire format; ``clock`` can be replaced in tests to move time.
    """

    def __init__(self, memory_limit=64 * MB, item_size_max=1 * MB, evict=True,
                 use_cas=True, track_sizes=False, clock=time.time):
        self.memory_limit = memory_limit
        self.item_size_max = item_size_max
        self.evict = evict
        self.use_cas = use_cas
        self.clock = clock
        self.started = int(clock())
        self.lock = threading.Lock()
        self.items = {}                          # key -> item, least recently used first
        self.oldest = {}                         # a batch of the first keys (_lru_key)
        self.bytes = 0
        self.last_cas = 0
        # flush_all: once this second has come, items linked at or before it are
        # gone (memcached's oldest_live); pending until the store has dropped them.
        self.flush_deadline = 0
        self.flush_pending = False
        self.counters = dict.fromkeys(STORE_COUNTERS, 0)
        self.evicted_time = 0                    # idle seconds of the last evicted item
        self.on_evict = None                     # called as on_evict(key, item, now)
        # Items per 32-byte size class (``stats sizes``), kept only if asked for.
        self.sizes = collections.Counter() if track_sizes else None
        self._sweep_keys = []                    # keys still to visit in this sweep

    # -- time ---------------------------------------------------------------

    def now(self):
        """The store's time: whole seconds, as memcached's clock, so that expiry
        and remaining TTLs round the way they do in memcached."""
        return int(self.clock())

    def expiry(self, exptime, now):
        """Turn a protocol exptime into an absolute time (0: never; past: expired)."""
        if exptime == 0:
            return 0
        if exptime < 0:
            return -1
        if exptime > MAX_RELATIVE_EXPTIME:
            # An absolute Unix time; one before the server started is already past.
            return exptime if exptime > self.started else -1
        return now + exptime

    def ttl(self, item, now):
        """Seconds an item has left, -1 for never (meta 't')."""
        exptime = item_fields(item)[1]
        return -1 if exptime == 0 else exptime - now

    # -- internals: the caller holds the lock ---------------------------------

    def _next_cas(self):
        if not self.use_cas:
            return 0
        self.last_cas += 1
        return self.last_cas

    def _find(self, key, now):
        """The live item under key, or None; drops it if it has expired or been
        flushed."""
        if self.flush_pending:
            self._apply_flush(now)
        item = self.items.get(key)
        if item is None:
            return None
        exptime = item_fields(item)[1]
        if exptime and exptime <= now:
            self._unlink(key, item)
            self.counters["get_expired"] += 1
            if not item_fields(item)[4] & FETCHED:
                self.counters["expired_unfetched"] += 1
            return None
        if self.flush_deadline and self._flushed(item, now):
            self._unlink(key, item)
            self.counters["get_flushed"] += 1
            return None
        return item

    def _flushed(self, item, now):
        """Whether a flush hides item: memcached's item_is_flushed.  The items a
        flush hides are usually dropped all at once; this catches those linked in
        the deadline's own second (and under -C those older than a past deadline)."""
        deadline = self.flush_deadline
        return deadline and deadline <= now and item_fields(item)[2] <= deadline

    def _apply_flush(self, now):
        """Drop every item at once when a delayed flush's deadline has come: all
        of them were linked before it."""
        if self.flush_pending and self.flush_deadline <= now:
            self._clear()

    def _bump(self, key, item, now):
        """Mark item read now and most recently used; returns it as it now is.  As
        memcached moves an item up its LRU at most once a minute, an item read again
        within the second it was last read or stored stays where it is: a read then
        costs no copy."""
        cas, exptime, atime, flags, state = item_fields(item)
        if atime == now and state & FETCHED:
            return item
        item = make_item(item[VALUE_START:], flags, exptime, cas, now, state | FETCHED)
        self._to_most_recent(key, item)
        return item

    def _to_most_recent(self, key, item):
        """Link item (key's, or a changed copy) as the most recently used."""
        del self.items[key]
        self.items[key] = item
        self.oldest.pop(key, None)

    def _lru_key(self):
        """The least recently used key.  A dict keeps insertion order, so that is its
        first key; but reaching it steps over every entry deleted before it since
        the dict was last resized, as many as there were evictions and bumps.  So
        the first keys are taken a batch at a time, into ``oldest`` (a key leaves
        it when it is used or unlinked), for one such walk per batch.  (An
        OrderedDict would do this alone, at 46 more bytes an item.)"""
        if not self.oldest:
            batch = max(64, len(self.items) // 256)
            self.oldest = collections.OrderedDict.fromkeys(
                itertools.islice(self.items, batch))
        return next(iter(self.oldest))

    def _relink(self, key, item):
        """Put a changed copy of a linked item in its place (same size, same LRU
        position)."""
        self.items[key] = item
        return item

    def _unlink(self, key, item):
        del self.items[key]
        self.oldest.pop(key, None)
        self.bytes -= item_cost(key, len(item) - VALUE_START)
        if self.sizes is not None:
            self.sizes[self.size_class(key, item)] -= 1

    def size_class(self, key, item):
        """The 32-byte class ``stats sizes`` counts an item in, by memcached's size."""
        flags = item_fields(item)[3]
        size = len(key) + len(item) - VALUE_START + ITEM_HEADER_SIZE + (4 if flags else 0)
        return -(-size // 32) * 32

    def _link(self, key, item, old=None):
        """Store item under key in place of old; False, with old left as it was,
        when memory is exhausted."""
        cost = item_cost(key, len(item) - VALUE_START)
        freed = item_cost(key, len(old) - VALUE_START) if old is not None else 0
        if self.bytes + cost - freed > self.memory_limit:
            if old is not None:
                self._to_most_recent(key, old)    # evict everything else first
            if not self._make_room(cost - freed, keep=key):
                return False
        if old is not None:
            self._unlink(key, old)
        self.items[key] = item
        self.bytes += cost
        self.counters["total_items"] += 1
        if self.sizes is not None:
            self.sizes[self.size_class(key, item)] += 1
        return True

    def _make_room(self, needed, keep=None):
        """Free memory from the LRU tail, never evicting keep: expired items, and
        live ones too unless eviction is off."""
        items = self.items
        now = self.now()
        while items and self.bytes + needed > self.memory_limit:
            key = self._lru_key()
            item = items[key]
            if key == keep:
                return False
            _, exptime, atime, _, state = item_fields(item)
            dead = exptime and exptime <= now
            if not dead and not self.evict:
                return False
            self._unlink(key, item)
            if dead:
                self.counters["reclaimed"] += 1
            else:
                self.counters["evictions"] += 1
                self.counters["evicted_nonzero"] += exptime != 0
                self.counters["evicted_unfetched"] += not state & FETCHED
                self.evicted_time = now - atime
                if self.on_evict is not None:
                    self.on_evict(key, item, now)
        return self.bytes + needed <= self.memory_limit

    def _clear(self):
        self.items = {}
        self.oldest = {}
        self.bytes = 0
        if self.sizes is not None:
            self.sizes.clear()
        self.flush_pending = False
        self._sweep_keys = []

    def too_large(self, key, nbytes, flags=0):
        """Whether a value of nbytes exceeds the item size limit (-I), as memcached
        counts it."""
        size = len(key) + nbytes + ITEM_HEADER_SIZE + (4 if flags else 0)
        return size > self.item_size_max

    # -- retrieval ------------------------------------------------------------

    def get(self, key, exptime=None, bump=True):
        """The item under key, or None.  With exptime, also sets its expiry (touch)."""
        return self.get_many((key,), exptime, bump)[0]

    def get_many(self, keys, exptime=None, bump=True):
        """The items under keys, None for each miss, under one hold of the lock."""
        with self.lock:
            now = self.now()
            items = []
            for key in keys:
                item = self._find(key, now)
                if item is not None:
                    if exptime is not None:
                        item = self._relink(key, changed_item(
                            item, exptime=self.expiry(exptime, now)))
                    if bump:
                        item = self._bump(key, item, now)
                items.append(item)
            missed = items.count(None)
            hits, misses = ("get_hits", "get_misses") if exptime is None else (
                "touch_hits", "touch_misses")
            self.counters[hits] += len(items) - missed
            self.counters[misses] += missed
            return items

    # -- storage --------------------------------------------------------------

    def store(self, mode, key, value, flags=0, exptime=0, cas=0, new_cas=0,
              invalidate=False, vivify=None):
        """Run one storage command; returns (outcome, item stored or None).

        mode is SET, ADD, REPLACE, APPEND, PREPEND or CAS.  cas, when not 0, must
        match the item's (CAS mode; append and prepend check it too).  new_cas
        replaces the generated CAS unique (meta E).  invalidate lets an older cas
        store a stale item (meta I).  vivify, an exptime, lets append and prepend
        create a missing item (meta N).
        """
        with self.lock:
            now = self.now()
            counters = self.counters
            counters["cmd_set"] += 1
            old = self._find(key, now)
            stale = False
            if old is None:
                if mode == CAS:
                    counters["cas_misses"] += 1
                    return NOT_FOUND, None
                if mode in (REPLACE, APPEND, PREPEND) and vivify is None:
                    return NOT_STORED, None
                if vivify is not None and mode in (APPEND, PREPEND):
                    exptime = vivify
                expires = self.expiry(exptime, now)
            else:
                if mode == ADD:
                    self._bump(key, old, now)
                    return NOT_STORED, None
                if mode == CAS:
                    was = unpack_item(old)
                    if cas == was.cas and self.use_cas:    # under -C, cas never matches
                        counters["cas_hits"] += 1
                    elif invalidate and cas < was.cas:
                        counters["cas_hits"] += 1
                        stale = True
                    else:
                        counters["cas_badval"] += 1
                        return EXISTS, None
                    expires = was.exptime if stale else self.expiry(exptime, now)
                elif mode in (APPEND, PREPEND):
                    was = unpack_item(old)
                    if cas and cas != was.cas:
                        return EXISTS, None
                    if self.too_large(key, len(was.value) + len(value), was.flags):
                        return NOT_STORED, None
                    value = was.value + value if mode == APPEND else value + was.value
                    flags, expires = was.flags, was.exptime
                else:
                    expires = self.expiry(exptime, now)
            state = STALE | (was.state & WON) if stale else 0
            item = make_item(value, flags, expires, new_cas or self._next_cas(), now, state)
            if not self._link(key, item, old):
                counters["store_no_memory"] += 1
                if mode == SET and old is not None:
                    self._unlink(key, old)    # as memcached: a failed set leaves no value
                return NO_MEMORY, None
            return STORED, item

    def refuse_too_large(self, key, drop_old):
        """Count a storage command refused for its size (-I) and drop the old value
        if asked: memcached drops it for set and for every meta set, so that a
        failed write leaves no stale data readable."""
        with self.lock:
            self.counters["store_too_large"] += 1
            if drop_old:
                old = self.items.get(key)
                if old is not None:
                    self._unlink(key, old)

    def delete(self, key, cas=None):
        """Remove key: STORED (deleted), NOT_FOUND, or EXISTS when cas (if given)
        does not match."""
        with self.lock:
            item = self._find(key, self.now())
            if item is None or (cas is not None and cas != item_fields(item)[0]):
                self.counters["delete_misses"] += 1
                return NOT_FOUND if item is None else EXISTS
            self._unlink(key, item)
            self.counters["delete_hits"] += 1
            return STORED

    def invalidate(self, key, cas=None, exptime=None, new_cas=0, drop_value=False):
        """Meta delete's I and x: mark the item stale (new CAS, optionally a new
        expiry) or empty its value, instead of removing it."""
        with self.lock:
            now = self.now()
            item = self._find(key, now)
            if item is None or (cas is not None and cas != item_fields(item)[0]):
                self.counters["delete_misses"] += 1
                return NOT_FOUND if item is None else EXISTS
            was = unpack_item(item)
            value = b"" if drop_value else was.value
            expires = was.exptime if exptime is None else self.expiry(exptime, now)
            stale = STALE if not drop_value or was.stale else 0
            new = make_item(value, was.flags, expires, new_cas or self._next_cas(), now, stale)
            self._link(key, new, item)            # no larger than item: cannot fail
            return STORED

    def arithmetic(self, key, delta, incr=True, cas=0, vivify=None, initial=0,
                   new_cas=0, exptime=None):
        """incr/decr: returns (outcome, item).  The value must be a decimal 64-bit
        unsigned number; incr wraps at 2**64, decr stops at 0.  A shorter result
        is padded with spaces to the old length, as memcached does in place.  Meta
        arithmetic adds a CAS check, creation on a miss (vivify, an exptime, with
        initial) and a new expiry (exptime)."""
        with self.lock:
            now = self.now()
            counters = self.counters
            item = self._find(key, now)
            if item is None:
                if vivify is None:
                    counters["incr_misses" if incr else "decr_misses"] += 1
                    return NOT_FOUND, None
                new = make_item(b"%d" % initial, 0, self.expiry(vivify, now),
                                new_cas or self._next_cas(), now)
                if not self._link(key, new):
                    counters["store_no_memory"] += 1
                    return NO_MEMORY, None
                return STORED, new
            was = unpack_item(item)
            if cas and cas != was.cas:
                return EXISTS, None
            number = parse_uint64(was.value) if was.value else None
            if number is None:
                return NON_NUMERIC, None
            if incr:
                number = (number + delta) & U64
            else:
                number = max(0, number - delta)
            counters["incr_hits" if incr else "decr_hits"] += 1
            digits = b"%d" % number
            if len(digits) < len(was.value):
                digits = digits.ljust(len(was.value))
            expires = was.exptime if exptime is None else self.expiry(exptime, now)
            new = make_item(digits, was.flags, expires, new_cas or self._next_cas(), now,
                            was.state & FETCHED)
            if not self._link(key, new, item):
                counters["store_no_memory"] += 1
                return NO_MEMORY, None
            return STORED, new

    # -- meta get ---------------------------------------------------------------

    def meta_get(self, key, exptime=None, bump=True, vivify=None, recache=None):
        """mg's item semantics.  Returns None on a miss, else (item, view): view holds
        what mg reports as it was before this request -- (hit_before, last_access,
        ttl_left, won, token_already_sent, stale) -- because mg's h and l flags
        describe the item before the command touched it."""
        with self.lock:
            now = self.now()
            counters = self.counters
            item = self._find(key, now)
            created = False
            if item is None and vivify is not None:
                item = make_item(b"", 0, self.expiry(vivify, now), self._next_cas(), now)
                created = self._link(key, item)
                if not created:
                    item = None
            touched = exptime is not None
            if item is None:
                counters["touch_misses" if touched else "get_misses"] += 1
                return None
            counters["touch_hits" if touched else "get_hits"] += 1
            was = unpack_item(item)
            if touched:
                item = self._relink(key, changed_item(item, exptime=self.expiry(exptime, now)))
            expires, token_sent = item_fields(item)[1], was.won
            won = created
            if (recache is not None and not created and not token_sent and expires
                    and expires < self.expiry(recache, now)):
                won = True
            if was.stale and not token_sent:
                won = True
            if won:
                item = self._relink(key, changed_item(item, state=was.state | WON))
            view = (was.fetched, now - was.atime, self.ttl(item, now), won,
                    token_sent, was.stale)
            if bump:
                item = self._bump(key, item, now)
            return item, view

    # -- whole-cache operations -------------------------------------------------------

    def flush(self, delay=0):
        """Invalidate every item now, or after delay (an exptime) if it is positive.
        As in memcached, the deadline is the second before the delay runs out (the
        second itself under -C, which has no CAS uniques to tell the items linked
        before the flush from those after it), and it stays in force: an item
        linked in that second is hidden too."""
        with self.lock:
            self.counters["cmd_flush"] += 1
            now = self.now()
            deadline = self.expiry(delay, now) if delay > 0 else now
            if deadline < 0:
                self.flush_deadline = 0      # before the server started: nothing to flush
                return
            self.flush_deadline = deadline - 1 if self.use_cas else deadline
            if self.flush_deadline > now:
                self.flush_pending = True
            elif self.use_cas or self.flush_deadline == now:
                self._clear()
            # else: under -C, a deadline already past hides only what is older

    def set_memory_limit(self, limit):
        """cache_memlimit: change the budget, evicting down to it if needed."""
        with self.lock:
            self.memory_limit = limit
            self._make_room(0)

    def sweep(self, budget=10000):
        """Drop expired items, checking budget keys per call and going on where the
        last call stopped, so that the lock is never held for long (the server calls
        this every second).  budget None checks every item now."""
        with self.lock:
            now = self.now()
            self._apply_flush(now)
            if budget is None or not self._sweep_keys:
                self._sweep_keys = list(self.items)
                budget = budget or len(self._sweep_keys)
            batch = self._sweep_keys[-budget:]
            del self._sweep_keys[-budget:]
            self.counters["crawler_items_checked"] += len(batch)
            for key in batch:
                item = self.items.get(key)
                if item is None:
                    continue
                _, exptime, _, _, state = item_fields(item)
                if exptime and exptime <= now or self._flushed(item, now):
                    self._unlink(key, item)
                    self.counters["crawler_reclaimed"] += 1
                    self.counters["expired_unfetched"] += not state & FETCHED

    def size_histogram(self):
        """(size, items) for each 32-byte class that has items, or None when sizes
        are not tracked."""
        with self.lock:
            if self.sizes is None:
                return None
            return sorted((size, count) for size, count in self.sizes.items() if count)

    def reset_counters(self):
        with self.lock:
            for name in STORE_COUNTERS:
                self.counters[name] = 0

    def snapshot(self):
        """Counters and sizes for ``stats``, read consistently."""
        with self.lock:
            now = self.now()
            oldest = next(iter(self.items.values()), None)
            counters = self.counters
            return dict(counters, curr_items=len(self.items), bytes=self.bytes,
                        cmd_get=counters["get_hits"] + counters["get_misses"],
                        cmd_touch=counters["touch_hits"] + counters["touch_misses"],
                        limit_maxbytes=self.memory_limit, evicted_time=self.evicted_time,
                        oldest_age=now - item_fields(oldest)[2] if oldest else 0)

    def dump(self, limit=0):
        """(key, item) pairs, most recently used first, at most limit of them if
        limit is not 0 (``stats cachedump``, ``lru_crawler metadump``)."""
        with self.lock:
            pairs = reversed(self.items.items())
            return list(itertools.islice(pairs, limit) if limit else pairs)


# --------------------------------------------------------------------------
# 3. The protocol
# --------------------------------------------------------------------------

# A command line longer than this with no newline closes the connection, except for
# get and gets, whose key lists may run up to GET_LINE_LIMIT (as memcached).
LINE_LIMIT = 2048
GET_LINE_LIMIT = 1 * MB
MEMCACHED_READ_BUFFER = 16 * KB
# Values are read in slices of this size, so that a claimed length is never
# allocated before the bytes arrive.
READ_CHUNK = 64 * KB
# memcached refuses data lengths beyond INT_MAX - 2 as malformed.
VALUE_LENGTH_MAX = 2 ** 31 - 3
# memcached's slab class ids run below this; memg keeps every item in class 1.
SLAB_CLASSES = 64
# Meta commands: at most this many tokens, opaque tokens at most this long.
META_MAX_TOKENS = 19
META_OPAQUE_MAX = 32

# Error replies, named once.
ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NOT_NUMBER = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
TOO_LARGE_REPLY = b"SERVER_ERROR object too large for cache\r\n"
NO_MEMORY_REPLY = b"SERVER_ERROR out of memory storing object\r\n"
NO_MEMORY_INCR = b"SERVER_ERROR out of memory\r\n"
BAD_META_FLAG = b"CLIENT_ERROR invalid or duplicate flag\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"
AUTH_FAILURE = b"CLIENT_ERROR authentication failure\r\n"
BAD_AUTH_FORMAT = b"CLIENT_ERROR bad authentication token format\r\n"
BAD_TERMINATION = b"CLIENT_ERROR bad command line termination\r\n"
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"

REPLIES = {STORED: b"STORED\r\n", NOT_STORED: b"NOT_STORED\r\n", EXISTS: b"EXISTS\r\n",
           NOT_FOUND: b"NOT_FOUND\r\n", NO_MEMORY: NO_MEMORY_REPLY}
META_CODES = {STORED: b"HD", NOT_STORED: b"NS", EXISTS: b"EX", NOT_FOUND: b"NF"}

_FLOAT = re.compile(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


def parse_float(token):
    """A decimal fraction, as the tuning commands take them; None if it is not one."""
    return float(token) if _FLOAT.match(token) else None


def uri(key):
    """A key as memcached's log lines write it: URI-encoded."""
    return urllib.parse.quote_from_bytes(key, safe="")


def decode_key(token):
    """A meta command's base64 key (flag b), or None if it is not base64."""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def bad_key(key):
    """Keys are at most 250 bytes.  Any byte but space (which ends the token) and NUL
    (which ends the line) may be in one: memcached stores them all, and clients such
    as libmemcached's memcaslap send control bytes in theirs."""
    return len(key) > KEY_MAX_LENGTH


class MetaFlags:
    """The flags of one meta command, parsed the way memcached parses them: one
    token per flag, its first character naming it, the rest its argument."""

    NUMERIC = {"N": parse_int32, "T": parse_int32, "R": parse_int32, "F": parse_uint32,
               "C": parse_uint64, "E": parse_uint64, "J": parse_uint64, "D": parse_uint64}
    ERRORS = {"F": BAD_FORMAT,
              "J": b"CLIENT_ERROR invalid numeric initial value\r\n",
              "D": b"CLIENT_ERROR invalid numeric delta value\r\n"}
    KNOWN = set("bcfhklqstuvxOPLNTRFCEJDMI")

    def __init__(self, tokens):
        self.tokens = tokens       # in request order: replies echo flags in this order
        self.values = {}
        self.error = None
        for token in tokens:
            flag = chr(token[0])
            if flag in self.values or token[0] >= 127:
                self.error = b"CLIENT_ERROR duplicate flag\r\n"
                return
            if flag not in self.KNOWN:
                self.error = b"CLIENT_ERROR invalid flag\r\n"
                return
            argument = token[1:]
            if flag in self.NUMERIC:
                argument = self.NUMERIC[flag](argument)
                if argument is None:
                    self.error = self.error or self.ERRORS.get(
                        flag, b"CLIENT_ERROR bad token in command line format\r\n")
            elif flag == "M" and len(token) != 2:
                self.error = self.error or b"CLIENT_ERROR incorrect length for M token\r\n"
            self.values[flag] = argument

    def __contains__(self, flag):
        return flag in self.values

    def get(self, flag, default=None):
        return self.values.get(flag, default)

    def reply(self, code, key, fields=None, tail=b""):
        """A meta reply line: code, then the requested return flags in request order,
        then tail.  O and k echo the opaque and the key; fields maps the other flags
        this command can return (b"c", b"t", ...) to their values."""
        parts = [code]
        for token in self.tokens:
            flag = token[:1]
            if flag == b"O":
                parts.append(b" " + token)
            elif flag == b"k":
                binary = "b" in self
                parts.append(b" k" + (base64.b64encode(key) + b" b" if binary else key))
            elif fields and flag in fields:
                parts.append(b" %s%d" % (flag, fields[flag]))
        parts.append(tail + b"\r\n")
        return b"".join(parts)


class Protocol:
    """memcached's text protocol for one client.

    ``rfile`` is a buffered binary reader (a socket's, or any binary file such as
    io.BytesIO, which is wrapped in one); replies collect in ``self.out`` until the
    connection sends them.  ``process()`` handles one command and returns False when
    the connection should close.  ``server`` gives the store, the settings and the
    server-wide statistics; it need not be running.
    """

    def __init__(self, server, rfile, name="-"):
        self.server = server
        self.store = server.store
        self.settings = server.settings
        # Long lines need peek(); wrap readers that lack it (io.BytesIO in tests).
        self.rfile = rfile if hasattr(rfile, "peek") else io.BufferedReader(rfile)
        self.name = name          # how -vv and watch name this client
        self.first = True
        self.authenticated = server.credentials is None
        self.watching = None      # the queue of events, once the client sent watch
        self.last_command = time.monotonic()     # for stats conns
        self.out = []             # replies not yet sent
        self.out_bytes = 0
        self.noreply = False

    # -- output -------------------------------------------------------------

    def queue(self, data):
        self.out.append(data)
        self.out_bytes += len(data)

    def reply(self, data):
        """Queue one reply, unless the command asked for none (noreply)."""
        if self.noreply:
            self.noreply = False
            return
        self.queue(data)
        if self.settings.verbose > 1:
            self.log(">", data)

    def error(self, data):
        """Queue an error that noreply does not hide (meta commands' errors)."""
        self.noreply = False
        self.reply(data)

    def log(self, direction, data):
        """-vv: a command or the first line of a reply, as memcached logs them."""
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        print("%s%s %s" % (direction, self.name, line), file=sys.stderr, flush=True)

    def take_output(self):
        out, self.out, self.out_bytes = self.out, [], 0
        return b"".join(out)

    # -- input --------------------------------------------------------------

    def strip_line(self, line):
        """The command in a line as read, without its terminator, for the lines that
        do not simply end in "\\r\\n" (process takes those itself); None at EOF or
        when the line is too long to be a command (memcached closes the connection
        then)."""
        if line[-1:] != b"\n":
            if len(line) < LINE_LIMIT + 2:
                return None                      # EOF, perhaps mid-line
            line = self.read_long_line(line)
            if line is None:
                return None
        if 0 in line:         # a NUL byte (a test for b"\0" would cost an exception)
            line = line[:line.index(0)] + b"\n"     # memcached's C strings end at NUL
        # As memcached: strip "\r\n" or "\n", but a lone "\r\n" keeps its "\r".
        return line[:-2] if line[-2:-1] == b"\r" and len(line) > 2 else line[:-1]

    def read_long_line(self, start):
        """The rest of a line longer than LINE_LIMIT, or None to close.  memcached
        takes such a line if its newline is already within its 16 KiB read buffer,
        and lets only get and gets lines grow beyond that."""
        buffered = self.rfile.peek(MEMCACHED_READ_BUFFER)
        if b"\n" in buffered[:MEMCACHED_READ_BUFFER - len(start)]:
            return start + self.rfile.readline(MEMCACHED_READ_BUFFER)
        command = start.lstrip(b" ")
        if len(start) - len(command) > 100 or not command.startswith((b"get ", b"gets ")):
            return None
        line = start + self.rfile.readline(GET_LINE_LIMIT - len(start))
        return line if line[-1:] == b"\n" else None

    def receive_value(self, key, nbytes, flags, drop_old, answer):
        """The data block of a storage command, or None when the command has been
        answered already: a value over the size limit is swallowed unread (the old
        value dropped if drop_old), and a block not ended by "\\r\\n" is refused.
        answer sends those errors: self.reply (noreply hides them) or self.error."""
        if self.store.too_large(key, nbytes, flags):
            self.store.refuse_too_large(key, drop_old)
            answer(TOO_LARGE_REPLY)
            self.swallow(nbytes + 2)
            return None
        value = self.read_block(nbytes)
        if value is None:
            answer(BAD_CHUNK)
        return value

    def read_block(self, nbytes):
        """nbytes of data and their "\\r\\n", read a slice at a time; None if the
        terminator is wrong.  Raises EOFError if the input ends first."""
        if nbytes + 2 <= READ_CHUNK:
            data = self.rfile.read(nbytes + 2)
        else:
            parts, remaining = [], nbytes + 2
            while remaining:
                part = self.rfile.read(min(remaining, READ_CHUNK))
                if not part:
                    break
                parts.append(part)
                remaining -= len(part)
            data = b"".join(parts)
        if len(data) < nbytes + 2:
            raise EOFError
        return data[:-2] if data[-2:] == b"\r\n" else None

    def swallow(self, nbytes):
        """Discard nbytes of input (the data of a refused storage command).  Raises
        EOFError if the input ends first."""
        while nbytes > 0:
            part = self.rfile.read(min(nbytes, READ_CHUNK))
            if not part:
                raise EOFError
            nbytes -= len(part)

    # -- dispatch -------------------------------------------------------------

    def process(self):
        """Read and run one command.  Returns False when the connection should close:
        at the end of the input, or when the command says so (handlers return False
        for that; anything else means go on)."""
        if self.first:
            self.first = False
            if self.rfile.peek(1)[:1] == b"\x80":
                self.refuse_binary()
                return False
        try:
            line = self.rfile.readline(LINE_LIMIT + 2)
            if line[-2:] == b"\r\n" and len(line) > 2 and 0 not in line:
                line = line[:-2]                 # the usual command line
            else:
                line = self.strip_line(line)
                if line is None:
                    return False
            self.last_command = time.monotonic()
            if self.settings.verbose > 1:
                self.log("<", line)
            self.noreply = False
            tokens = line.split(b" ")
            if b"" in tokens:
                tokens = [token for token in tokens if token]
            if not self.authenticated:
                return self.authenticate(tokens)
            try:
                handler, fewest, most = self.COMMANDS[tokens[0]]
            except (KeyError, IndexError):
                return self.unknown(tokens)
            if not fewest <= len(tokens) <= most:
                self.reply(ERROR)
                return True
            return handler(self, tokens) is not False
        except EOFError:
            return False             # the input ended inside a data block

    def refuse_binary(self):
        """A client that opens with memcached's binary protocol (magic byte 0x80)
        gets one binary reply, status 0x83 "not supported", then the connection
        closes: memg speaks only the text protocol."""
        header = self.rfile.peek(24)[:24].ljust(24, b"\0")
        message = b"memg supports only the text protocol"
        self.queue(struct.pack(">BBHBBHIIQ", 0x81, header[1], 0, 0, 0, 0x83,
                                    len(message), struct.unpack(">I", header[12:16])[0], 0)
                        + message)

    def unknown(self, tokens):
        """ERROR, except that a request that looks like HTTP closes the connection
        (as memcached: a browser tricked into talking to the port gets nothing).
        memcached only gets this far for words outside its first-letter branches."""
        if not tokens or len(tokens[0]) < 2:
            self.reply(ERROR)                # memcached's shortest command has two
            return True
        first = tokens[0][:1]
        if tokens[-1].startswith(b"HTTP/") and first not in b"gsacidt" and not (
                first == b"m" and len(tokens[0]) == 2):
            return False
        self.reply(ERROR)
        return True

    def authenticate(self, tokens):
        """-Y: until it has authenticated, a client may only send memcached's
        ``set <key> <flags> <exptime> <bytes>`` whose data is ``user password`` (key,
        flags and exptime are ignored).  Data that would not fit memcached's read
        buffer closes the connection, as memcached's does."""
        nbytes = parse_uint32(tokens[4]) if len(tokens) >= 5 and tokens[0] == b"set" else None
        if nbytes is None:
            self.reply(UNAUTHENTICATED)
            return True
        if nbytes + 2 > MEMCACHED_READ_BUFFER:
            return False
        payload = self.read_block(nbytes)
        if payload is None:
            self.reply(BAD_TERMINATION)
            return True
        credentials = [token for token in payload.split(b"\0", 1)[0].split(b" ") if token]
        if len(credentials) < 2:
            self.reply(BAD_AUTH_FORMAT)
            return True
        self.authenticated = self.server.authenticate(*credentials[:2])
        self.reply(REPLIES[STORED] if self.authenticated else AUTH_FAILURE)
        return True

    def check_noreply(self, tokens):
        """memcached's set_noreply_maybe: a last token of "noreply" silences the
        reply, errors included."""
        self.noreply = tokens[-1] == b"noreply"

    # -- retrieval: get gets gat gats -------------------------------------------

    def retrieve(self, tokens, with_cas, touch):
        if touch:
            exptime = parse_int32(tokens[1])
            if exptime is None:
                self.reply(BAD_EXPTIME)
                return
            keys = tokens[2:]
        else:
            exptime, keys = None, tokens[1:]
        # As memcached, the keys before a bad one are fetched (and counted) first.
        valid = keys
        if keys and bad_key(max(keys, key=len)):       # (one test for all the keys)
            valid = list(itertools.takewhile(lambda key: not bad_key(key), keys))
        items = self.store.get_many(valid, exptime)
        if "fetchers" in self.server.watchers.active:
            for key, item in zip(valid, items):
                self.watch_fetch(key, item)
        if valid is not keys:
            self.reply(BAD_FORMAT)
            return
        out = []
        for key, item in zip(keys, items):
            if item is not None:
                cas, _, _, flags, _ = item_fields(item)
                value = item[VALUE_START:]
                if with_cas:
                    out.append(b"VALUE %s %d %d %d\r\n%s\r\n" % (
                        key, flags, len(value), cas, value))
                else:
                    out.append(b"VALUE %s %d %d\r\n%s\r\n" % (key, flags, len(value), value))
        out.append(b"END\r\n")
        self.queue(b"".join(out))            # (get has no noreply)
        if self.settings.verbose > 1:
            for key, item in zip(keys, items):
                if item is not None:
                    self.log(">", b"sending key " + key)
            self.log(">", b"END")

    # -- storage: set add replace append prepend cas ------------------------------------

    def update(self, tokens, mode):
        self.check_noreply(tokens)
        key = tokens[1]
        flags = parse_uint32(tokens[2])
        exptime = parse_int32(tokens[3])
        nbytes = parse_int32(tokens[4])
        cas = parse_uint64(tokens[5]) if mode == CAS else 0
        if (bad_key(key) or flags is None or exptime is None or nbytes is None
                or cas is None or not 0 <= nbytes <= VALUE_LENGTH_MAX):
            self.reply(BAD_FORMAT)
            return
        value = self.receive_value(key, nbytes, flags, mode == SET, self.reply)
        if value is not None:
            outcome, item = self.store.store(mode, key, value, flags, exptime, cas)
            self.watch_store(mode, key, outcome, item)
            self.reply(REPLIES[outcome])

    # -- delete, incr, decr, touch -------------------------------------------------

    def delete(self, tokens):
        if len(tokens) > 2:
            hold_is_zero = tokens[2] == b"0"
            self.check_noreply(tokens)
            if not ((len(tokens) == 3 and (hold_is_zero or self.noreply))
                    or (len(tokens) == 4 and hold_is_zero and self.noreply)):
                self.reply(DELETE_USAGE)
                return
        if bad_key(tokens[1]):
            self.reply(BAD_FORMAT)
            return
        found = self.store.delete(tokens[1]) == STORED
        if found:
            self.watch_delete(b"delete", tokens[1])
        self.reply(b"DELETED\r\n" if found else b"NOT_FOUND\r\n")

    def arithmetic(self, tokens, incr):
        self.check_noreply(tokens)
        if bad_key(tokens[1]):
            self.reply(BAD_FORMAT)
            return
        delta = parse_uint64(tokens[2])
        if delta is None:
            self.reply(BAD_DELTA)
            return
        outcome, item = self.store.arithmetic(tokens[1], delta, incr)
        if outcome == STORED:
            self.reply(item[VALUE_START:].rstrip(b" ") + b"\r\n")
        elif outcome == NON_NUMERIC:
            self.reply(NOT_NUMBER)
        elif outcome == NO_MEMORY:
            self.reply(NO_MEMORY_INCR)
        else:
            self.reply(b"NOT_FOUND\r\n")

    def touch(self, tokens):
        self.check_noreply(tokens)
        if bad_key(tokens[1]):
            self.reply(BAD_FORMAT)
            return
        exptime = parse_int32(tokens[2])
        if exptime is None:
            self.reply(BAD_EXPTIME)
            return
        found = self.store.get(tokens[1], exptime) is not None
        self.reply(b"TOUCHED\r\n" if found else b"NOT_FOUND\r\n")

    # -- meta commands: mg ms md ma mn me ---------------------------------------------

    def meta_key(self, tokens, flag_start, too_long=b"options flags too long",
                 flag_error=None):
        """The key and flags of a meta command, or None after replying with the error
        (flag_error, if given, replaces the message for any bad flag, as md and ma)."""
        self.server.count("cmd_meta")
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            self.error(BAD_FORMAT)
            return None
        if len(tokens) > META_MAX_TOKENS:
            self.error(b"CLIENT_ERROR %s\r\n" % too_long)
            return None
        flags = MetaFlags(tokens[flag_start:])
        if flags.error and flag_error:
            flags.error = flag_error
        if flags.error is None and len(flags.get("O", b"")) >= META_OPAQUE_MAX:
            flags.error = b"CLIENT_ERROR opaque token too long\r\n"
        if flags.error is None and "b" in flags:
            key = decode_key(key)
            if key is None:
                flags.error = b"CLIENT_ERROR error decoding key\r\n"
        elif flags.error is None and bad_key(key):
            flags.error = BAD_FORMAT
        if flags.error:
            self.error(flags.error)
            return None
        self.noreply = "q" in flags
        return key, flags

    def meta_get(self, tokens):
        parsed = self.meta_key(tokens, 2, b"options flags are too long")
        if parsed is None:
            return
        key, flags = parsed
        found = self.store.meta_get(key, flags.get("T"), "u" not in flags,
                                    flags.get("N"), flags.get("R"))
        if "fetchers" in self.server.watchers.active:
            self.watch_fetch(key, found and found[0])
        if found is None:
            self.reply(flags.reply(b"EN", key))
            return
        self.noreply = False     # q hides only the miss
        item, (hit_before, last_access, ttl, won, token_sent, stale) = found
        item = unpack_item(item)
        # The recache markers: Z (another client holds the token), X (stale), W (this
        # client has won the right to recache).
        markers = (b" Z" if token_sent else b"") + (b" X" if stale else b"") + (
            b" W" if won else b"")
        line = flags.reply(b"VA %d" % len(item.value) if "v" in flags else b"HD", key, {
            b"s": len(item.value), b"t": ttl, b"c": item.cas, b"f": item.flags,
            b"l": last_access, b"h": hit_before}, markers)
        self.reply(line + item.value + b"\r\n" if "v" in flags else line)

    META_MODES = {None: SET, b"S": SET, b"E": ADD, b"A": APPEND, b"P": PREPEND,
                  b"R": REPLACE}

    def meta_set(self, tokens):
        if len(tokens) == 2:
            self.error(BAD_FORMAT)
            return
        # These errors leave the data to be read as commands; later ones swallow it.
        if len(tokens[1]) > KEY_MAX_LENGTH:
            self.error(BAD_FORMAT)
            return
        if len(tokens) > META_MAX_TOKENS:
            self.error(b"CLIENT_ERROR options flags too long\r\n")
            return
        nbytes = parse_int32(tokens[2])
        if nbytes is None or not 0 <= nbytes <= VALUE_LENGTH_MAX:
            self.error(BAD_FORMAT)
            return
        parsed = self.meta_key(tokens, 3)
        if parsed is None:
            self.swallow(nbytes + 2)
            return
        key, flags = parsed
        mode = self.META_MODES.get(flags.get("M"))
        if mode is None:
            self.error(b"CLIENT_ERROR invalid mode for ms M token\r\n")
            self.swallow(nbytes + 2)
            return
        value = self.receive_value(key, nbytes, flags.get("F"), True, self.error)
        if value is None:
            return
        cas = flags.get("C") or 0
        if "C" in flags and mode in (SET, REPLACE):
            mode = CAS          # even C0: it compares, and nothing has CAS 0
        outcome, item = self.store.store(
            mode, key, value, flags.get("F") or 0, flags.get("T") or 0, cas,
            flags.get("E") or 0, "I" in flags, flags.get("N"))
        self.watch_store(mode, key, outcome, item)
        if outcome == NO_MEMORY:
            self.error(NO_MEMORY_REPLY)
            return
        if outcome != STORED:
            self.noreply = False
        self.reply(flags.reply(META_CODES[outcome], key,
                               {b"c": item_fields(item)[0] if item else 0}))

    def meta_delete(self, tokens):
        parsed = self.meta_key(tokens, 2, flag_error=BAD_META_FLAG)
        if parsed is None:
            return
        key, flags = parsed
        if "I" in flags or "x" in flags:
            outcome = self.store.invalidate(key, flags.get("C"), flags.get("T"),
                                            flags.get("E") or 0, "x" in flags)
        else:
            outcome = self.store.delete(key, flags.get("C"))
            if outcome == STORED:
                self.watch_delete(b"md", key)
        if outcome != STORED:
            self.noreply = False
        self.reply(flags.reply(META_CODES[outcome], key))

    def meta_arithmetic(self, tokens):
        parsed = self.meta_key(tokens, 2, flag_error=BAD_META_FLAG)
        if parsed is None:
            return
        key, flags = parsed
        mode = flags.get("M")
        if mode not in (None, b"I", b"+", b"D", b"-"):
            self.error(b"CLIENT_ERROR invalid mode for ma M token\r\n")
            return
        delta = flags.get("D")
        outcome, item = self.store.arithmetic(
            key, 1 if delta is None else delta, mode not in (b"D", b"-"),
            flags.get("C") or 0, flags.get("N"), flags.get("J") or 0, flags.get("E") or 0,
            flags.get("T"))
        if outcome == NON_NUMERIC:
            self.error(NOT_NUMBER)
            return
        if outcome == NO_MEMORY:
            self.error(NO_MEMORY_INCR)
            return
        if item is None:
            self.noreply = False
            self.reply(flags.reply(META_CODES[outcome], key))
            return
        number = item[VALUE_START:].rstrip(b" ")
        line = flags.reply(b"VA %d" % len(number) if "v" in flags else b"HD", key, {
            b"c": item_fields(item)[0], b"t": self.store.ttl(item, self.store.now())})
        self.reply(line + number + b"\r\n" if "v" in flags else line)

    def meta_noop(self, tokens):
        self.reply(b"MN\r\n")

    def meta_debug(self, tokens):
        self.server.count("cmd_meta")
        if len(tokens) < 2 or len(tokens[1]) > KEY_MAX_LENGTH:
            self.reply(BAD_FORMAT)
            return
        key = tokens[1]
        binary = len(tokens) > 2 and tokens[2] == b"b"
        if binary:
            key = decode_key(key)
            if key is None:
                self.reply(BAD_FORMAT)
                return
        item = self.store.get(key, bump=False)
        if item is None:
            self.reply(b"EN\r\n")
            return
        now = self.store.now()
        ttl = self.store.ttl(item, now)
        item = unpack_item(item)
        self.reply(b"ME %s exp=%d la=%d cas=%d fetch=%s cls=1 size=%d\r\n" % (
            tokens[1], ttl, now - item.atime, item.cas,
            b"yes" if item.fetched else b"no", item_cost(key, item.size)))

    # -- everything else -----------------------------------------------------------

    def flush_all(self, tokens):
        self.check_noreply(tokens)
        if not self.settings.flush_enabled:
            self.reply(b"CLIENT_ERROR flush_all not allowed\r\n")
            return
        delay = 0
        if len(tokens) != (2 if self.noreply else 1):
            delay = parse_int32(tokens[1])
            if delay is None:
                self.reply(BAD_EXPTIME)
                return
        self.store.flush(delay)
        self.reply(b"OK\r\n")

    def version(self, tokens):
        self.reply(b"VERSION %s\r\n" % VERSION.encode())

    def verbosity(self, tokens):
        self.check_noreply(tokens)
        level = parse_uint32(tokens[1])
        if level is None:
            self.reply(BAD_FORMAT)
            return
        self.settings.verbose = min(level, 2)
        self.reply(b"OK\r\n")

    def cache_memlimit(self, tokens):
        self.check_noreply(tokens)
        megabytes = parse_uint32(tokens[1])
        if megabytes is None:
            self.reply(ERROR)
        elif megabytes < 8:
            self.reply(b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n")
        elif megabytes > 1000000000:
            self.reply(b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n")
        else:
            self.store.set_memory_limit(megabytes * MB)
            self.reply(b"OK\r\n")

    def quit(self, tokens):
        return False

    def shutdown(self, tokens):
        if not self.settings.enable_shutdown:
            self.reply(b"ERROR: shutdown not enabled\r\n")
            return
        if len(tokens) == 1 or (len(tokens) == 2 and tokens[1] == b"graceful"):
            self.server.request_stop()
            return False
        self.reply(b"CLIENT_ERROR invalid shutdown mode\r\n")

    def stats(self, tokens):
        sub = tokens[1] if len(tokens) > 1 else None
        if sub == b"reset":
            self.server.reset_stats()
            self.reply(b"RESET\r\n")
            return
        if sub == b"detail":
            self.reply(b"CLIENT_ERROR usage: stats detail on|off|dump\r\n")
            return
        if sub == b"cachedump":
            self.stats_cachedump(tokens)
            return
        report = self.STATS.get(sub)
        if report is None:
            self.reply(ERROR)
            return
        lines = [b"STAT %s %s\r\n" % (name.encode(), str(value).encode())
                 for name, value in report(self.server)]
        lines.append(b"END\r\n")
        self.reply(b"".join(lines))

    def stats_cachedump(self, tokens):
        if not self.settings.dump_enabled:
            self.reply(b"CLIENT_ERROR stats cachedump not allowed\r\n")
            return
        if len(tokens) < 4:
            self.reply(b"CLIENT_ERROR bad command line\r\n")
            return
        slab, limit = parse_uint32(tokens[2]), parse_uint32(tokens[3])
        if slab is None or limit is None:
            self.reply(BAD_FORMAT)
            return
        if slab >= SLAB_CLASSES:
            self.reply(b"CLIENT_ERROR Illegal slab id\r\n")
            return
        lines = [] if slab != 1 else [
            b"ITEM %s [%d b; %d s]\r\n" % (key, len(item) - VALUE_START, item_fields(item)[1])
            for key, item in self.store.dump(limit)]
        self.reply(b"".join(lines) + b"END\r\n")

    def lru_crawler(self, tokens):
        """memcached's LRU crawler commands.  memg's background sweep is its crawler:
        crawl sweeps every item now, metadump lists every item."""
        sub = tokens[1] if len(tokens) > 1 else b""
        argument = tokens[2] if len(tokens) > 2 else b""
        if len(tokens) == 2 and sub in (b"enable", b"disable"):
            self.server.crawler_enabled = sub == b"enable"
            self.reply(b"OK\r\n")
        elif len(tokens) == 3 and sub in (b"sleep", b"tocrawl"):
            number = parse_uint32(argument)
            if number is None:
                self.reply(BAD_FORMAT)
            elif sub == b"sleep" and number > 1000000:
                self.reply(b"CLIENT_ERROR sleep must be one second or less\r\n")
            else:
                self.reply(b"OK\r\n")
        elif len(tokens) == 3 and sub in (b"crawl", b"metadump"):
            classes = argument.split(b",")
            if argument not in (b"all", b"hash") and not all(
                    parse_uint32(c) is not None and parse_uint32(c) < SLAB_CLASSES
                    for c in classes):
                self.reply(b"BADCLASS invalid class id\r\n")
            elif sub == b"crawl":
                self.store.sweep(budget=None)
                self.reply(b"OK\r\n")
            elif not self.settings.dump_enabled:
                self.reply(b"ERROR metadump not allowed\r\n")
            else:
                self.reply(self.metadump(argument in (b"all", b"hash") or b"1" in classes))
        else:
            self.reply(ERROR)

    def slabs(self, tokens):
        """slabs reassign and automove.  memg has one class and no pages to move, so
        these answer as memcached does with nothing to do, and change nothing."""
        sub = tokens[1] if len(tokens) > 1 else b""
        if len(tokens) == 4 and sub == b"reassign":
            source, target = parse_int32(tokens[2]), parse_int32(tokens[3])
            if source is None or target is None:
                self.reply(BAD_FORMAT)
            elif source == target:
                self.reply(b"SAME src and dst class are identical\r\n")
            elif not (-1 <= source < SLAB_CLASSES and 0 <= target < SLAB_CLASSES):
                self.reply(b"BADCLASS invalid src or dst class id\r\n")
            else:
                self.reply(b"NOSPARE source class has no spare pages\r\n")
        elif len(tokens) >= 3 and sub == b"automove":
            self.check_noreply(tokens)
            level = parse_uint32(tokens[2])
            if tokens[2] == b"ratio":
                ratio = parse_float(tokens[3]) if len(tokens) >= 4 else None
                self.reply(ERROR if ratio is None else b"OK\r\n")
            elif level is None:
                self.reply(BAD_FORMAT)
            else:
                self.reply(b"OK\r\n" if level <= 2 else ERROR)
        else:
            self.reply(ERROR)

    def lru(self, tokens):
        """lru tune, mode and temp_ttl: memg has one plain LRU, so these check their
        arguments as memcached does and change nothing."""
        self.check_noreply(tokens)
        sub = tokens[1]
        if sub == b"tune" and len(tokens) >= 6:
            hot, warm = parse_uint32(tokens[2]), parse_uint32(tokens[3])
            hot_factor, warm_factor = parse_float(tokens[4]), parse_float(tokens[5])
            if None in (hot, warm, hot_factor, warm_factor):
                self.reply(ERROR)
            elif hot + warm > 80:
                self.reply(b"ERROR hot and warm pcts must not exceed 80\r\n")
            elif hot_factor <= 0 or warm_factor <= 0:
                self.reply(b"ERROR hot/warm age factors must be greater than 0\r\n")
            else:
                self.reply(b"OK\r\n")
        elif sub == b"mode" and len(tokens) >= 3:
            self.reply(b"OK\r\n" if tokens[2] in (b"flat", b"segmented") else ERROR)
        elif sub == b"temp_ttl" and len(tokens) >= 3:
            self.reply(b"OK\r\n" if parse_int32(tokens[2]) is not None else ERROR)
        else:
            self.reply(ERROR)

    # -- watch: the server's events as log lines ------------------------------------

    def watch(self, tokens):
        """Turn this connection into a watcher of the given kinds of event."""
        kinds = {token.decode("latin-1") for token in tokens[1:]} or {"fetchers"}
        if not kinds <= WATCH_KINDS:
            self.reply(ERROR)
            return
        self.watching = self.server.watchers.add(kinds)     # before OK: miss nothing
        self.reply(b"OK\r\n")
        return False             # the connection now streams; see Connection.handle

    def watch_fetch(self, key, item):
        """A fetchers line; the caller checked that someone watches fetchers."""
        self.server.watchers.emit("fetchers", (
            "type=item_get key=%s status=%s clsid=%d cfd=%s size=%d" % (
                uri(key), "found" if item else "not_found", 1 if item else 0, self.name,
                len(item) - VALUE_START if item else 0)))

    def watch_store(self, mode, key, outcome, item):
        if "mutations" in self.server.watchers.active:
            ttl = max(0, self.store.ttl(item, self.store.now())) if item else 0
            self.server.watchers.emit("mutations", (
                "type=item_store key=%s status=%s cmd=%s ttl=%d clsid=1 cfd=%s size=%d" % (
                    uri(key), outcome.lower(), mode, ttl, self.name,
                    len(item) - VALUE_START if item else 0)))

    def watch_delete(self, command, key):
        if "deletions" in self.server.watchers.active:
            self.server.watchers.emit("deletions", (
                "type=deleted key=%s cmd=%s clsid=1 cfd=%s" % (
                    uri(key), command.decode(), self.name)))

    def metadump(self, include):
        lines = []
        if include:
            for key, packed in self.store.dump():
                item = unpack_item(packed)
                lines.append(b"key=%s exp=%d la=%d cas=%d fetch=%s cls=1 size=%d\n" % (
                    uri(key).encode(),
                    item.exptime or -1, item.atime, item.cas,
                    b"yes" if item.fetched else b"no", item_cost(key, item.size)))
        return b"".join(lines) + b"END\r\n"

    # The command table: word -> (handler, fewest tokens, most tokens).  Commands that
    # differ by a switch share a handler, as in memcached's proto_text.c; the switch is
    # given here (a lambda rather than the handler and a tuple of switches: a call
    # with *switches costs the hot path a slow call).
    ANY = 1 << 30
    COMMANDS = {
        b"get": (lambda self, tokens: self.retrieve(tokens, False, False), 2, ANY),
        b"gets": (lambda self, tokens: self.retrieve(tokens, True, False), 2, ANY),
        b"gat": (lambda self, tokens: self.retrieve(tokens, False, True), 2, ANY),
        b"gats": (lambda self, tokens: self.retrieve(tokens, True, True), 2, ANY),
        b"set": (lambda self, tokens: self.update(tokens, SET), 5, 6),
        b"add": (lambda self, tokens: self.update(tokens, ADD), 5, 6),
        b"replace": (lambda self, tokens: self.update(tokens, REPLACE), 5, 6),
        b"append": (lambda self, tokens: self.update(tokens, APPEND), 5, 6),
        b"prepend": (lambda self, tokens: self.update(tokens, PREPEND), 5, 6),
        b"cas": (lambda self, tokens: self.update(tokens, CAS), 6, 7),
        b"delete": (delete, 2, 4),
        b"incr": (lambda self, tokens: self.arithmetic(tokens, True), 3, 4),
        b"decr": (lambda self, tokens: self.arithmetic(tokens, False), 3, 4),
        b"touch": (touch, 3, 4),
        b"mg": (meta_get, 2, ANY),
        b"ms": (meta_set, 2, ANY),
        b"md": (meta_delete, 2, ANY),
        b"ma": (meta_arithmetic, 2, ANY),
        b"mn": (meta_noop, 1, ANY),
        b"me": (meta_debug, 1, ANY),
        b"flush_all": (flush_all, 1, 3),
        b"version": (version, 1, ANY),
        b"verbosity": (verbosity, 2, 3),
        b"cache_memlimit": (cache_memlimit, 2, 3),
        b"stats": (stats, 1, ANY),
        b"quit": (quit, 1, ANY),
        b"shutdown": (shutdown, 1, ANY),
        b"lru_crawler": (lru_crawler, 1, ANY),
        b"slabs": (slabs, 1, ANY),
        b"lru": (lru, 2, ANY),
        b"watch": (watch, 1, ANY),
    }
    # ``stats <sub>`` reports, each a function of the server returning (name, value)s.
    STATS = {
        None: lambda server: server.general_stats(),
        b"settings": lambda server: server.settings_stats(),
        b"items": lambda server: server.item_stats(),
        b"slabs": lambda server: server.slab_stats(),
        b"conns": lambda server: server.connection_stats(),
        b"sizes": lambda server: server.size_stats(),
    }


# --------------------------------------------------------------------------
# 4. The connection: one thread per client
# --------------------------------------------------------------------------

# Replies are sent when the reader needs more input, or once this much is pending,
# so that a client pipelining requests without reading the replies holds at most
# this much memory (its thread then waits in send, as memcached stops reading).
OUTPUT_LIMIT = 256 * KB


# Each connection's input buffer.  Only the pages that input reaches are resident.
READ_BUFFER = 64 * KB


def replies_sender():
    """The C library's send(fd, data, size, flags), called without releasing the GIL
    (ctypes.PyDLL), and the flags that keep it from waiting; where there is no such
    function, one that sends nothing, so that every reply goes through the socket.
    (No argtypes: converting through them costs 700 ns a call, four times the rest
    of it; so size must fit a C int, which SEND_MAX keeps it to.)

    A thread that calls socket.send releases the GIL, and another connection's
    thread waiting for it takes it: one more switch between threads for every
    reply, though a reply to a client that reads almost never has to wait.  Sending
    without waiting and without releasing the GIL cut the server's CPU time per
    operation by a third at 16 busy connections (tests/bench.py); what the socket
    does not take at once then goes through socket.sendall, which waits.  (At 200
    and 1,000 connections it measured the same, within the noise: there, another
    thread could have run Python while this one was in the kernel.)"""
    try:
        import ctypes
        send = ctypes.PyDLL(None).send
        flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
    except (ImportError, OSError, TypeError, AttributeError):
        return (lambda fileno, data, size, flags: 0), 0
    send.restype = ctypes.c_ssize_t
    return send, flags


send_without_waiting, SEND_FLAGS = replies_sender()
SEND_MAX = 1 << 30


class SocketReader:
    """A connection's input, with the three reads Protocol uses (readline, read and
    peek, as io.BufferedReader has them).

    The buffer is an anonymous memory map of the connection's own, not heap memory:
    a thousand clients coming and going, each with a heap buffer, leave the heap
    full of holes (over ten rounds of tests/soak.py, resident memory grew 35 to 56 %
    with 64 KiB heap buffers, 7 % with maps), while a map goes back to the system
    whole when the connection closes.  Before
    it waits for more input, it has the connection send the replies queued so far,
    so that the replies to commands that arrived together leave in one send.
    """

    def __init__(self, connection, size=READ_BUFFER):
        self.connection = connection
        self.buffer = mmap.mmap(-1, size)
        self.view = memoryview(self.buffer)    # what recv_into fills
        self.start = self.end = 0          # the unread input is buffer[start:end]

    def close(self):
        self.view.release()
        # A slice of the view that an exception's traceback still holds (gevent's
        # recv_into is Python code) keeps the map open until the collector frees both.
        with contextlib.suppress(BufferError):
            self.buffer.close()

    def receive(self):
        """Add the socket's next input after what is buffered; False at its end.
        The caller makes sure the buffer is not full of unread input."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):
            self.buffer.move(0, self.start, self.end - self.start)
            self.start, self.end = 0, self.end - self.start
        connection = self.connection
        connection.flush()
        if connection.idle_timeout:
            connection.arm_idle_timeout()
        # (Most reads start an empty buffer: they need no slice of the view.)
        received = connection.sock.recv_into(self.view[self.end:] if self.end else self.view)
        self.end += received
        connection.bytes_read += received
        return received > 0

    def take(self, count):
        """Up to count bytes of the buffered input."""
        data = self.buffer[self.start:min(self.end, self.start + count)]
        self.start += len(data)
        return data

    def readline(self, limit):
        """Input up to and including the next newline, at most limit bytes; what
        there is at the end of input."""
        if self.start == self.end:         # (saves a search of an empty buffer)
            self.receive()
        start, end = self.start, self.end
        newline = self.buffer.find(b"\n", start, end if end - start < limit else start + limit)
        if newline >= 0:                   # the usual case: the whole line is here
            self.start = newline + 1
            return self.buffer[start:newline + 1]
        parts = []
        while True:
            newline = self.buffer.find(b"\n", self.start, min(self.end, self.start + limit))
            if newline >= 0 or self.end - self.start >= limit:
                parts.append(self.take(newline + 1 - self.start if newline >= 0 else limit))
                break
            if self.start == 0 and self.end == len(self.buffer):
                limit -= self.end          # a line longer than the buffer (get's)
                parts.append(self.take(self.end))
            if not self.receive():
                parts.append(self.take(self.end - self.start))
                break
        return b"".join(parts)

    def read(self, count):
        """count bytes of input; fewer only at its end."""
        start = self.start
        if self.end - start >= count:      # the usual case: all of them are here
            self.start = start + count
            return self.buffer[start:start + count]
        parts = [self.take(count)]
        count -= len(parts[0])
        while count and self.receive():
            parts.append(self.take(count))
            count -= len(parts[-1])
        return b"".join(parts)

    def peek(self, count):
        """The buffered input, receiving some first if there is none; as with
        io.BufferedReader, count is only a hint."""
        if self.start == self.end:
            self.receive()
        return self.buffer[self.start:self.end]


class Connection:
    """One client connection, served by the thread that calls ``handle()``."""

    def __init__(self, server, sock, address):
        self.server = server
        self.sock = sock
        self.address = address
        self.fileno = sock.fileno()
        self.started = time.time()
        self.bytes_read = self.bytes_written = 0
        self.idle_timeout = server.settings.idle_timeout
        self.reader = SocketReader(self)
        self.protocol = Protocol(server, self.reader, name=str(self.fileno))

    def flush(self):
        """Send the queued replies, in one send if the socket takes them at once;
        sendall sends any rest (or all of them after an error, which it reports)."""
        if self.protocol.out:
            data = self.protocol.take_output()
            sent = send_without_waiting(self.sock.fileno(), data, min(len(data), SEND_MAX),
                                        SEND_FLAGS)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[max(sent, 0):])
            self.bytes_written += len(data)

    def arm_idle_timeout(self):
        """-o idle_timeout: as in memcached, a client is idle from its last command,
        so one that trickles a line a byte at a time is idle too."""
        left = self.idle_timeout - (time.monotonic() - self.protocol.last_command)
        if left <= 0:
            raise socket.timeout
        self.sock.settimeout(left)

    def handle(self):
        """Serve commands until the client leaves or is sent away, then close."""
        self.server.watch_connection("conn_new", self)
        try:
            protocol = self.protocol
            while protocol.process():
                if protocol.out_bytes > OUTPUT_LIMIT:
                    self.flush()       # a client that does not read blocks here
            self.flush()
            if protocol.watching is not None:
                self.stream(protocol.watching)
        except socket.timeout:
            self.server.count("idle_kicks")
        except OSError:
            pass             # reset by the peer, or closed by stop(): nothing to say
        except Exception:
            # A bug in memg: this client gets memcached's severe-error reply and is
            # closed; the traceback goes to the server's stderr, not the wire.
            traceback.print_exc()
            self.protocol.queue(b"SERVER_ERROR internal error\r\n")
            with contextlib.suppress(OSError):
                self.flush()
        finally:
            if self.protocol.watching is not None:
                self.server.watchers.remove(self.protocol.watching)
            # Before the close, so that no later connection can reuse its number first.
            self.server.watch_connection("conn_close", self)
            self.sock.close()
            self.reader.close()

    def stream(self, events):
        """Send a watcher its queue of events until it leaves or the server stops."""
        self.sock.settimeout(self.server.settings.idle_timeout or None)
        while not self.server.stopping.is_set():
            try:
                lines = [events.get(timeout=1.0)]
            except queue.Empty:
                if self.peer_closed():
                    return
                continue
            with contextlib.suppress(queue.Empty):
                while len(lines) < 1000:
                    lines.append(events.get_nowait())
            data = b"".join(lines)
            self.sock.sendall(data)
            self.bytes_written += len(data)

    def peer_closed(self):
        """Whether the client has closed its end (a watcher only ever listens)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""


# --------------------------------------------------------------------------
# 5. The server
# --------------------------------------------------------------------------

# What ``watch`` accepts: memcached's kinds of event.  memg emits the first five; the
# others (its proxy's and raw command logs) never have anything to say here.
WATCH_KINDS = {"fetchers", "mutations", "evictions", "connevents", "deletions",
               "proxyreqs", "proxyevents", "proxyuser", "sysevents", "rawcmds"}
# Log lines a watcher may fall behind by before it misses some.
WATCH_BACKLOG = 10000


class Watchers:
    """The connections that sent ``watch``, and the events they are sent: one line
    each, "ts=<time> gid=<sequence> type=..." as memcached writes them.  A watcher
    that falls WATCH_BACKLOG lines behind misses lines (log_watcher_skipped)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queues = {}                 # queue -> the kinds of event it wants
        self.active = frozenset()        # kinds someone watches: emitters look here first
        self.gid = 0
        self.counters = dict.fromkeys(("log_watcher_sent", "log_watcher_skipped"), 0)

    def add(self, kinds):
        events = queue.Queue(WATCH_BACKLOG)
        with self.lock:
            self.queues[events] = kinds
            self.active = frozenset().union(*self.queues.values())
        return events

    def remove(self, events):
        with self.lock:
            del self.queues[events]
            self.active = frozenset().union(*self.queues.values())

    def emit(self, kind, text):
        with self.lock:
            self.gid += 1
            line = ("ts=%.6f gid=%d %s\n" % (time.time(), self.gid, text)).encode("latin-1")
            for events, kinds in self.queues.items():
                if kind in kinds:
                    try:
                        events.put_nowait(line)
                        self.counters["log_watcher_sent"] += 1
                    except queue.Full:
                        self.counters["log_watcher_skipped"] += 1


def read_auth_file(path):
    """-Y: memcached's auth file, lines of ``user:password``, as {user: password}.
    Raises ValueError, naming the file and line, if it cannot be used."""
    try:
        with open(path, "rb") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise ValueError("cannot read the auth file (-Y) %s: %s"
                         % (path, error.strerror or error))
    credentials = {}
    for number, line in enumerate(lines, 1):
        user, colon, password = line.partition(b":")
        if not colon or not user:
            raise ValueError("auth file (-Y) %s, line %d: expected user:password"
                             % (path, number))
        credentials[user] = password
    if not credentials:
        raise ValueError("auth file (-Y) %s has no user:password line" % path)
    return credentials


def parse_listen(spec, port):
    """-l: a comma-separated list of host, host:port or [ipv6]:port."""
    addresses = []
    for part in spec.split(","):
        part = part.strip()
        host, _, rest = part.rpartition("]") if part.startswith("[") else ("", "", part)
        if host:
            host = host[1:]
            port_text = rest[1:] if rest.startswith(":") else ""
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        else:
            host, port_text = rest, ""
        addresses.append((host, int(port_text) if port_text else port))
    return addresses


class Server:
    """A memg server: ``Server(port=0).start()`` serves from background threads,
    ``serve_forever()`` from the calling thread; ``stop()`` ends both.  Every
    setting of the command line is a keyword argument (see Settings)."""

    def __init__(self, host="127.0.0.1", port=0, **settings):
        self.settings = Settings(host=host, port=port, **settings)
        s = self.settings
        self.store = Store(s.memory_limit, s.item_size_max, s.evict, s.use_cas,
                           s.track_sizes)
        self.credentials = read_auth_file(s.auth_file) if s.auth_file else None
        self.watchers = Watchers()
        self.store.on_evict = self.watch_eviction
        self.started = time.time()
        self.lock = threading.Lock()             # guards connections and counters
        self.connections = {}                    # Connection -> thread
        self.counters = dict.fromkeys(
            ("total_connections", "rejected_connections", "listen_disabled_num",
             "idle_kicks", "cmd_meta", "auth_cmds", "auth_errors", "closed_bytes_read",
             "closed_bytes_written"), 0)
        # Traffic totals at the last ``stats reset``: connections own their byte
        # counts, so a reset records where it happened instead of writing to them.
        self.traffic_at_reset = (0, 0)
        self.listeners = []
        self.crawler_enabled = True              # lru_crawler enable|disable
        self.stopping = threading.Event()
        self._wakeup = None                      # socket pair to interrupt the accept loop
        self._threads = []

    # -- life cycle -------------------------------------------------------------

    @property
    def address(self):
        """The (host, port) actually bound (the path, for a Unix socket)."""
        if not self.listeners:
            return None
        name = self.listeners[0].getsockname()
        return name if isinstance(name, str) else name[:2]

    def bind(self):
        """Open the listening sockets; if one cannot be opened, close them all."""
        s = self.settings
        self._wakeup = socket.socketpair()
        try:
            if s.unix_socket:
                if os.path.exists(s.unix_socket):
                    os.unlink(s.unix_socket)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.listeners.append(listener)
                listener.bind(s.unix_socket)
                os.chmod(s.unix_socket, s.unix_mask)
            else:
                for host, port in parse_listen(s.host, s.port):
                    family, kind, proto, _, sockaddr = socket.getaddrinfo(
                        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
                    listener = socket.socket(family, kind, proto)
                    self.listeners.append(listener)
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(sockaddr)
            for listener in self.listeners:
                listener.listen(s.backlog)
        except BaseException:
            self.close_sockets()
            raise

    def start(self):
        """Bind and serve from background threads; returns self."""
        self.bind()
        for target in (self.serve, self.sweep):
            thread = threading.Thread(target=target, name="memg-" + target.__name__,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve_forever(self):
        """Bind (if not yet bound) and serve from this thread until stopped."""
        if not self.listeners:
            self.bind()
        sweeper = threading.Thread(target=self.sweep, name="memg-sweep", daemon=True)
        sweeper.start()
        self._threads.append(sweeper)
        self.serve()

    def request_stop(self):
        """Ask the accept loop to end; safe from signal handlers and other threads."""
        self.stopping.set()
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                self._wakeup[1].send(b"x")

    def wakeup_on_signals(self):
        """Have signals wake the accept loop, whichever thread receives them."""
        self._wakeup[1].setblocking(False)
        signal.set_wakeup_fd(self._wakeup[1].fileno())

    def stop(self, timeout=2.0):
        """Stop accepting, close every connection, join the threads, free the port."""
        self.request_stop()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self.close_connections(timeout)
        self.close_sockets()
        if self.settings.unix_socket and os.path.exists(self.settings.unix_socket):
            os.unlink(self.settings.unix_socket)

    def close_sockets(self):
        for sock in self.listeners + list(self._wakeup or ()):
            sock.close()
        self.listeners = []

    def close_connections(self, timeout):
        with self.lock:
            connections = list(self.connections.items())
        for connection, _ in connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- accepting ---------------------------------------------------------------

    def serve(self):
        """The accept loop: one thread per client, up to the connection limit."""
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wakeup[0], selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wakeup[0] or self.stopping.is_set():
                        continue
                    try:
                        sock, address = key.fileobj.accept()
                    except OSError as error:
                        if error.errno in (errno.EMFILE, errno.ENFILE):
                            # Out of file descriptors: wait for some to close rather
                            # than spin (memcached stops accepting for a while too).
                            self.count("listen_disabled_num")
                            self.stopping.wait(0.1)
                        continue
                    if self.accept(sock, address) and self.settings.single:
                        return

    def accept(self, sock, address):
        """Admit one client, or refuse it over the connection limit.  Returns True
        if it was served here, in --single mode."""
        with self.lock:
            admitted = len(self.connections) < self.settings.max_connections
            self.counters["total_connections" if admitted else "rejected_connections"] += 1
        if not admitted:
            return self.turn_away(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(self, sock, address)
        if self.settings.single:
            # In the calling thread, so that a profiler there sees the work.
            with self.lock:
                self.connections[connection] = None
            self.run_connection(connection)
            return True
        thread = threading.Thread(target=self.run_connection, args=(connection,),
                                  name="memg-conn-%d" % connection.fileno, daemon=True)
        with self.lock:
            self.connections[connection] = thread
        try:
            thread.start()
        except RuntimeError:
            # The system would not give another thread (RLIMIT_NPROC, memory): this
            # client is turned away as if over the limit, and the server goes on.
            with self.lock:
                del self.connections[connection]
                self.counters["rejected_connections"] += 1
            self.turn_away(sock)
        return False

    @staticmethod
    def turn_away(sock):
        """memcached's reply to a client it cannot take, then the close."""
        with contextlib.suppress(OSError):
            sock.sendall(TOO_MANY_CONNECTIONS)
        sock.close()
        return False

    def run_connection(self, connection):
        if self.settings.verbose > 1:
            print("%d: Client using the ascii protocol" % connection.fileno, file=sys.stderr)
        try:
            connection.handle()
        finally:
            with self.lock:
                del self.connections[connection]
                self.counters["closed_bytes_read"] += connection.bytes_read
                self.counters["closed_bytes_written"] += connection.bytes_written
            if self.settings.verbose > 1:
                print("<%d connection closed." % connection.fileno, file=sys.stderr)

    def authenticate(self, user, password):
        """Whether user and password match a line of the auth file (-Y).  Every
        password is compared in constant time, so that timing reveals nothing."""
        matched = (hmac.compare_digest(password, self.credentials.get(user, b""))
                   and user in self.credentials)
        with self.lock:
            self.counters["auth_cmds"] += 1
            self.counters["auth_errors"] += not matched
        return matched

    def watch_connection(self, event, connection):
        if "connevents" in self.watchers.active:
            peer = connection.address
            where = ("rip=%s rport=%d transport=tcp" % peer[:2] if isinstance(peer, tuple)
                     else "transport=local")
            self.watchers.emit("connevents", "type=%s %s%s cfd=%d" % (
                event, where, " reason=normal" if event == "conn_close" else "",
                connection.fileno))

    def watch_eviction(self, key, item, now):
        if "evictions" in self.watchers.active:
            ttl, item = self.store.ttl(item, now), unpack_item(item)
            self.watchers.emit("evictions", (
                "type=eviction key=%s fetch=%s ttl=%d la=%d clsid=1" % (
                    uri(key), "yes" if item.fetched else "no", ttl, now - item.atime)))

    def sweep(self):
        """Background expiry: reclaim dead items a slice at a time, once a second."""
        while not self.stopping.wait(1.0):
            if self.crawler_enabled:
                self.store.sweep()

    def count(self, name):
        with self.lock:
            self.counters[name] += 1

    # -- statistics -----------------------------------------------------------

    def reset_stats(self):
        self.store.reset_counters()
        with self.lock:
            self.traffic_at_reset = self._traffic()
            for name in ("total_connections", "rejected_connections", "listen_disabled_num",
                         "idle_kicks", "cmd_meta"):
                self.counters[name] = 0

    def _traffic(self):
        """(bytes read, bytes written) since the start; the caller holds the lock."""
        live = self.connections
        return (self.counters["closed_bytes_read"] + sum(c.bytes_read for c in live),
                self.counters["closed_bytes_written"] + sum(c.bytes_written for c in live))

    def general_stats(self):
        """``stats``: memcached's general statistics, in memcached's order, for the
        ones that mean something here."""
        now = time.time()
        store = self.store.snapshot()
        with self.lock:
            counters = dict(self.counters)
            live = list(self.connections)
            (read, written), (read_before, written_before) = (
                self._traffic(), self.traffic_at_reset)
        bytes_read, bytes_written = read - read_before, written - written_before
        usage = os.times()
        return [
            ("pid", os.getpid()),
            ("uptime", int(now - self.started)),
            ("time", int(now)),
            ("version", VERSION),
            ("libevent", "none"),
            ("pointer_size", 64 if sys.maxsize > 2 ** 32 else 32),
            ("rusage_user", "%.6f" % usage.user),
            ("rusage_system", "%.6f" % usage.system),
            ("max_connections", self.settings.max_connections),
            ("curr_connections", len(live)),
            ("total_connections", counters["total_connections"]),
            ("rejected_connections", counters["rejected_connections"]),
            ("connection_structures", len(live)),
            ("cmd_get", store["cmd_get"]),
            ("cmd_set", store["cmd_set"]),
            ("cmd_flush", store["cmd_flush"]),
            ("cmd_touch", store["cmd_touch"]),
            ("cmd_meta", counters["cmd_meta"]),
            ("get_hits", store["get_hits"]),
            ("get_misses", store["get_misses"]),
            ("get_expired", store["get_expired"]),
            ("get_flushed", store["get_flushed"]),
            ("delete_misses", store["delete_misses"]),
            ("delete_hits", store["delete_hits"]),
            ("incr_misses", store["incr_misses"]),
            ("incr_hits", store["incr_hits"]),
            ("decr_misses", store["decr_misses"]),
            ("decr_hits", store["decr_hits"]),
            ("cas_misses", store["cas_misses"]),
            ("cas_hits", store["cas_hits"]),
            ("cas_badval", store["cas_badval"]),
            ("touch_hits", store["touch_hits"]),
            ("touch_misses", store["touch_misses"]),
            ("store_too_large", store["store_too_large"]),
            ("store_no_memory", store["store_no_memory"]),
            ("auth_cmds", counters["auth_cmds"]),
            ("auth_errors", counters["auth_errors"]),
            ("idle_kicks", counters["idle_kicks"]),
            ("bytes_read", bytes_read),
            ("bytes_written", bytes_written),
            ("limit_maxbytes", store["limit_maxbytes"]),
            ("accepting_conns", 1),
            ("listen_disabled_num", counters["listen_disabled_num"]),
            ("threads", self.settings.threads),
            ("conn_yields", 0),
            ("bytes", store["bytes"]),
            ("curr_items", store["curr_items"]),
            ("total_items", store["total_items"]),
            ("expired_unfetched", store["expired_unfetched"]),
            ("evicted_unfetched", store["evicted_unfetched"]),
            ("evictions", store["evictions"]),
            ("reclaimed", store["reclaimed"]),
            ("crawler_reclaimed", store["crawler_reclaimed"]),
            ("crawler_items_checked", store["crawler_items_checked"]),
            ("log_watcher_skipped", self.watchers.counters["log_watcher_skipped"]),
            ("log_watcher_sent", self.watchers.counters["log_watcher_sent"]),
            ("log_watchers", len(self.watchers.queues)),
        ]

    def settings_stats(self):
        """``stats settings``, with memcached's names."""
        s = self.settings
        return [
            ("maxbytes", self.store.memory_limit),
            ("maxconns", s.max_connections),
            ("tcpport", 0 if s.unix_socket else (self.address or (0, s.port))[1]),
            ("udpport", s.udp_port),
            ("inter", s.host),
            ("verbosity", s.verbose),
            ("oldest", 0),
            ("evictions", "on" if s.evict else "off"),
            ("domain_socket", s.unix_socket or "NULL"),
            ("umask", "%o" % s.unix_mask),
            ("shutdown_command", "yes" if s.enable_shutdown else "no"),
            ("num_threads", s.threads),
            ("cas_enabled", "yes" if s.use_cas else "no"),
            ("tcp_backlog", s.backlog),
            ("binding_protocol", "ascii"),
            ("auth_enabled_sasl", "no"),
            ("auth_enabled_ascii", s.auth_file or "no"),
            ("item_size_max", s.item_size_max),
            ("flush_enabled", "yes" if s.flush_enabled else "no"),
            ("idle_timeout", s.idle_timeout),
            ("track_sizes", "yes" if s.track_sizes else "no"),
        ]

    def item_stats(self):
        """``stats items``: memg has no slab classes, so all items are in class 1."""
        store = self.store.snapshot()
        if not store["curr_items"]:
            return []
        return [("items:1:" + name, value) for name, value in (
            ("number", store["curr_items"]),
            ("age", store["oldest_age"]),
            ("mem_requested", store["bytes"]),
            ("evicted", store["evictions"]),
            ("evicted_nonzero", store["evicted_nonzero"]),
            ("evicted_time", store["evicted_time"]),
            ("outofmemory", store["store_no_memory"]),
            ("reclaimed", store["reclaimed"]),
            ("expired_unfetched", store["expired_unfetched"]),
            ("evicted_unfetched", store["evicted_unfetched"]),
            ("crawler_reclaimed", store["crawler_reclaimed"]),
            ("crawler_items_checked", store["crawler_items_checked"]),
        )]

    def slab_stats(self):
        """``stats slabs``: one pseudo slab class holding every item."""
        store = self.store.snapshot()
        used = []
        if store["curr_items"]:
            used = [("1:" + name, value) for name, value in (
                ("chunk_size", store["bytes"] // store["curr_items"]),
                ("used_chunks", store["curr_items"]),
                ("get_hits", store["get_hits"]),
                ("cmd_set", store["cmd_set"]),
                ("delete_hits", store["delete_hits"]),
                ("incr_hits", store["incr_hits"]),
                ("decr_hits", store["decr_hits"]),
                ("cas_hits", store["cas_hits"]),
                ("cas_badval", store["cas_badval"]),
                ("touch_hits", store["touch_hits"]),
            )]
        return used + [("active_slabs", 1 if used else 0), ("total_malloced", store["bytes"])]

    def size_stats(self):
        """``stats sizes``: items per 32-byte size class, with -o track_sizes."""
        histogram = self.store.size_histogram()
        if histogram is None:
            return [("sizes_status", "disabled")]
        return [(str(size), count) for size, count in histogram]

    def connection_stats(self):
        """``stats conns``: the listening sockets, then one block per client."""
        now = time.monotonic()
        rows = []
        for listener in self.listeners:
            fd = listener.fileno()
            rows += [("%d:addr" % fd, _socket_name(listener.getsockname())),
                     ("%d:state" % fd, "conn_listening")]
        with self.lock:
            live = sorted(self.connections, key=lambda connection: connection.fileno)
        for connection in live:
            fd = connection.fileno
            rows += [("%d:addr" % fd, _socket_name(connection.address)),
                     ("%d:listen_addr" % fd, _socket_name(connection.sock.getsockname())),
                     ("%d:state" % fd, "conn_parse_cmd"),
                     ("%d:secs_since_last_cmd" % fd,
                      int(now - connection.protocol.last_command))]
        return rows


def _socket_name(name):
    """A socket address as memcached's ``stats conns`` writes it."""
    if isinstance(name, tuple):
        return "tcp:%s:%d" % name[:2] if ":" not in name[0] else "tcp6:[%s]:%d" % name[:2]
    return "unix:%s" % (name or "")


# --------------------------------------------------------------------------
# 6. The command line
# --------------------------------------------------------------------------

def _size(text, unit):
    """A size such as 64, 512k, 2m or 1g; a bare number is in ``unit`` bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    if match is None:
        raise ValueError("bad size %r" % text)
    scale = {"": unit, "k": KB, "m": MB, "g": 1024 * MB}[match.group(2).lower()]
    return int(match.group(1)) * scale


# memcached options that tune machinery memg does not have: accepted, with a warning,
# so that service files written for memcached keep working.
IGNORED_OPTIONS = {
    "-r": (False, "core dump limits"), "-k": (False, "memory locking"),
    "-f": (True, "slab growth factor"), "-n": (True, "slab minimum size"),
    "-L": (False, "large pages"), "-D": (True, "stats detail delimiter"),
    "-R": (True, "requests per event"), "-W": (False, "watch commands"),
}
# memcached -o options memg accepts and ignores (slab, LRU, hash and extstore tuning).
IGNORED_EXTENDED = {
    "maxconns_fast", "no_maxconns_fast", "hashpower", "tail_repair_time", "hash_algorithm",
    "lru_crawler", "no_lru_crawler", "lru_crawler_sleep", "lru_crawler_tocrawl",
    "read_buf_mem_limit", "lru_maintainer", "no_lru_maintainer", "hot_lru_pct",
    "warm_lru_pct", "hot_max_factor", "warm_max_factor", "temporary_ttl",
    "slab_chunk_max", "watcher_logbuf_size", "worker_logbuf_size",
    "no_hashexpand", "modern", "no_modern", "sock_cookie_id", "slab_reassign",
    "no_slab_reassign", "slab_automove", "slab_automove_ratio", "slab_automove_window",
    "slab_automove_freeratio", "relaxed_privileges", "no_relaxed_privileges",
    "drop_privileges", "no_drop_privileges", "inline_ascii_response", "lru_segmented",
    "no_lru_segmented", "meta_response_old", "no_inline_ascii_resp", "bind_protocol",
}
# memcached options whose feature memg does not have: refused, never silently ignored.
UNSUPPORTED_OPTIONS = {
    "-d": (False, "daemon mode: run memg under a service manager instead"),
    "-S": (False, "SASL authentication"),
    "-Z": (False, "TLS"), "-e": (True, "memory files (restartable cache)"),
}


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit("memg: %s (see memg -h)" % message)

    parser = Parser(
        prog="memg", allow_abbrev=False, add_help=False,
        description="memg %s: a memcached-compatible server in one Python file." % __version__)
    add = parser.add_argument
    add("-p", "--port", type=int, default=11211, help="TCP port to listen on (default: 11211)")
    add("-U", "--udp-port", type=int, default=0, help="UDP port; only 0 (off) is supported")
    add("-s", "--unix-socket", metavar="FILE", help="UNIX socket to listen on (disables TCP)")
    add("-a", "--unix-mask", default="700", metavar="MASK",
        help="access mask for the UNIX socket, in octal (default: 700)")
    add("-A", "--enable-shutdown", action="store_true", help='enable the "shutdown" command')
    add("-l", "--listen", default="127.0.0.1", metavar="ADDR",
        help="interfaces to listen on, comma separated, host or host:port "
             "(default: 127.0.0.1; memcached's default is every interface)")
    add("-u", "--user", help="drop root privileges to this user after binding")
    add("-Y", "--auth-file", metavar="FILE",
        help="require clients to authenticate first with a user:password line of FILE "
             "(memcached's ASCII authentication; see README)")
    add("-m", "--memory-limit", default="64", metavar="MB",
        help="item memory in megabytes (default: 64)")
    add("-M", "--disable-evictions", action="store_true",
        help="return an error when memory is full instead of evicting")
    add("-c", "--conn-limit", type=int, default=1024, metavar="N",
        help="max simultaneous connections (default: 1024)")
    add("-v", "--verbose", action="count", default=0,
        help="-v: errors and warnings; -vv: also every command and reply")
    add("-h", "--help", action="help", help="print this help and exit")
    add("-V", "--version", action="version", version="memg %s (memcached protocol %s)"
        % (__version__, VERSION.split("-")[0]), help="print version and exit")
    add("-P", "--pidfile", metavar="FILE", help="write the process id to FILE")
    add("-t", "--threads", type=int, default=4,
        help="accepted for compatibility and reported by stats; memg runs a thread "
             "per connection (default: 4)")
    add("-C", "--disable-cas", action="store_true", help="disable CAS")
    add("-b", "--listen-backlog", type=int, default=1024, metavar="N",
        help="listen backlog (default: 1024)")
    add("-B", "--protocol", default="auto", choices=("ascii", "auto", "binary"),
        help="protocol: ascii or auto (the binary protocol is not supported)")
    add("-I", "--max-item-size", default="1m", metavar="SIZE",
        help="max item size, as 512k or 2m (default: 1m, min: 1k, max: 1024m)")
    add("-F", "--disable-flush-all", action="store_true", help="disable flush_all")
    add("-X", "--disable-dumping", action="store_true", help="disable stats cachedump")
    add("-o", "--extended", action="append", default=[], metavar="OPTIONS",
        help="comma separated key=value options: idle_timeout=SECONDS, track_sizes; "
             "memcached's slab, LRU and hash tuning options are accepted and ignored")
    add("--gevent", action="store_true",
        help="run each connection's thread as a gevent greenlet: the same code, one OS "
             "thread, no switching between threads (needs gevent: pip install "
             "memg[gevent])")
    add("--single", action="store_true",
        help="serve one connection, then exit (for python -m cProfile memg.py --single)")
    for options, label in ((IGNORED_OPTIONS, "ignored: memg has no %s"),
                           (UNSUPPORTED_OPTIONS, "not supported: %s")):
        for flag, (takes_value, what) in options.items():
            add(flag, dest="option_" + flag[1], help=label % what,
                **({"metavar": "X"} if takes_value else {"action": "store_true"}))
    return parser


def parse_command_line(argv):
    """Settings from memcached-style arguments, plus warnings to print.  Raises
    SystemExit with a one-line message for anything memg cannot honour."""
    args = build_parser().parse_args(argv)
    warnings = []
    for flag, (_, what) in UNSUPPORTED_OPTIONS.items():
        if getattr(args, "option_" + flag[1]):
            raise SystemExit("memg: %s is not supported (%s)" % (flag, what))
    for flag, (_, what) in IGNORED_OPTIONS.items():
        if getattr(args, "option_" + flag[1]):
            warnings.append("%s ignored: memg has no %s" % (flag, what))
    if args.protocol == "binary":
        raise SystemExit("memg: the binary protocol is not supported (-B ascii or auto)")
    idle_timeout, track_sizes = 0, False
    for group in args.extended:
        for option in filter(None, group.split(",")):
            name, _, value = option.partition("=")
            if name == "idle_timeout":
                if not value.isdigit():
                    raise SystemExit("memg: idle_timeout needs a number of seconds")
                idle_timeout = int(value)
            elif name == "track_sizes":
                track_sizes = True
            elif name in IGNORED_EXTENDED or name.startswith(("ext_", "ssl_")):
                warnings.append("-o %s ignored: memg has no such tuning" % name)
            else:
                raise SystemExit("memg: unknown -o option %r" % name)
    try:
        memory_limit = _size(args.memory_limit, MB)
        item_size_max = _size(args.max_item_size, 1)
        unix_mask = int(args.unix_mask, 8)
    except ValueError as error:
        raise SystemExit("memg: %s" % error)
    settings = dict(
        host=args.listen, port=args.port, udp_port=args.udp_port,
        unix_socket=args.unix_socket,
        unix_mask=unix_mask, memory_limit=memory_limit, evict=not args.disable_evictions,
        max_connections=args.conn_limit, item_size_max=item_size_max,
        threads=args.threads, verbose=min(args.verbose, 2),
        enable_shutdown=args.enable_shutdown, use_cas=not args.disable_cas,
        flush_enabled=not args.disable_flush_all, dump_enabled=not args.disable_dumping,
        backlog=args.listen_backlog, idle_timeout=idle_timeout, track_sizes=track_sizes,
        auth_file=args.auth_file, user=args.user,
        pid_file=args.pidfile, single=args.single, gevent=args.gevent)
    return settings, warnings


def drop_privileges(user):
    """-u: become user after binding; as in memcached, only when running as root."""
    if not hasattr(os, "getuid") or os.getuid() != 0:
        return
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SystemExit("memg: unknown user %r (-u)" % user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def raise_open_file_limit(max_connections):
    """Make room for -c connections plus a few files of our own, as memcached does."""
    try:
        import resource
    except ImportError:          # Windows has no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 32
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


# The stack each connection's thread reserves.  memg's handlers call only a few levels
# deep; 1,000 connections then reserve 256 MB of address space instead of the 8 GB of
# Linux's default 8 MB stacks (resident memory, about 21 kB a connection, is the same).
THREAD_STACK_SIZE = 256 * KB

# How long a thread may run Python before another that waits for the GIL makes it
# let go (CPython's default: 5 ms).  A connection's thread lets go by itself at each
# wait for input, so forced switches only hand the GIL around in the kernel, and one
# that catches a thread inside the store's lock stalls every thread that reaches the
# lock.  50 ms measured 7 %, 20 % and 37 % more throughput at 16, 200 and 1,000 busy
# connections (tests/bench.py's load), with up to a third less CPU per operation.
# The price: a command that runs long in Python (a multi-get of many large values)
# can hold the others back that much longer.  (Under --gevent, where every
# connection runs in one thread, it measured 5 % slower, and is left alone.)
SWITCH_INTERVAL = 0.05

# glibc gives a process up to eight malloc arenas per core so that threads seldom wait
# for each other's allocations.  Under the GIL they seldom would anyway, and with a
# thread per connection every arena keeps holes of its own: with two, resident memory
# over tests/soak.py's rounds of a thousand clients grows half as much.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8                 # glibc's mallopt parameter number


def limit_malloc_arenas():
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (ImportError, OSError, AttributeError):
        pass                     # no ctypes, or a C library without mallopt


def beyond_loopback(settings):
    """Whether the server listens on an address other machines can reach."""
    if settings["unix_socket"]:
        return False
    return any(not (host.startswith("127.") or host in ("localhost", "::1"))
               for host, _ in parse_listen(settings["host"], settings["port"]))


def use_gevent():
    """--gevent: gevent's monkey patching turns threads, sockets and locks into
    greenlets and cooperative sockets, so memg's blocking thread-per-connection code
    runs unchanged in one OS thread, as gunicorn's gevent worker runs blocking code.
    Connection threads then never hand the GIL to each other: under many busy
    clients that switching is most of a threaded server's CPU time.  It must run
    before the server creates any lock, socket or thread."""
    try:
        from gevent import monkey
    except ImportError:
        raise SystemExit("memg: --gevent needs gevent (pip install gevent)")
    monkey.patch_all()


def main(argv=None):
    """The memg command: memcached's options, then serve until SIGINT or SIGTERM."""
    limit_malloc_arenas()
    settings, warnings = parse_command_line(sys.argv[1:] if argv is None else argv)
    if settings.pop("gevent"):
        use_gevent()
    else:
        sys.setswitchinterval(SWITCH_INTERVAL)     # (greenlets share one thread)
    for warning in warnings:
        print("memg: warning: " + warning, file=sys.stderr)
    try:
        server = Server(**settings)
        server.bind()
    except ValueError as error:
        raise SystemExit("memg: %s" % error)
    except OSError as error:
        raise SystemExit("memg: cannot listen on %s: %s" % (
            settings["unix_socket"] or "%s port %d" % (settings["host"], settings["port"]),
            error.strerror or error))
    if settings["user"]:
        drop_privileges(settings["user"])
    raise_open_file_limit(settings["max_connections"])
    with contextlib.suppress(ValueError, RuntimeError):   # where sizes cannot be set
        threading.stack_size(THREAD_STACK_SIZE)
    if settings["pid_file"]:
        with open(settings["pid_file"], "w") as pid_file:
            pid_file.write("%d\n" % os.getpid())
    if beyond_loopback(settings) and not settings["auth_file"]:
        print("memg: warning: listening beyond loopback (%s) with no authentication: "
              "anyone who can reach the port can read and change the cache"
              % settings["host"], file=sys.stderr)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.request_stop())
    # The kernel may hand a signal to any thread, while Python runs handlers only in
    # the main one: the wake-up byte gets the accept loop there to run it promptly.
    server.wakeup_on_signals()
    if settings["verbose"]:
        print("memg %s listening on %s" % (__version__, _socket_name(server.address)),
              file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.stop()
        if settings["pid_file"]:
            with contextlib.suppress(OSError):
                os.unlink(settings["pid_file"])
    return 0


# --------------------------------------------------------------------------
# 7. The pytest plugin
# --------------------------------------------------------------------------
# ``pip install memg`` registers this module with pytest (entry point pytest11).  The
# fixture ``memg_server`` is a memg serving from the test process, started once per
# session and emptied before every test.  memg imports pytest only when pytest calls.

def pytest_addoption(parser):
    parser.getgroup("memg").addoption(
        "--memg-external", metavar="HOST:PORT",
        help="point the memg_server fixture at this running memcached (or memg) "
             "instead of starting memg in the test process")


class ExternalServer:
    """What ``memg_server`` gives with --memg-external: a server this test run did
    not start, with a Server's ``address``."""

    def __init__(self, spec):
        host, _, port = spec.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("--memg-external wants HOST:PORT, not %r" % spec)
        self.address = (host.strip("[]"), int(port))


def flush(server):
    """Empty a server: in place for ours, with ``flush_all`` for an external one."""
    if isinstance(server, Server):
        server.store.flush()
        return
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"flush_all\r\n")
        reply = sock.makefile("rb").readline()
    if reply != b"OK\r\n":
        raise RuntimeError("flush_all on %s:%d answered %r" % (server.address + (reply,)))


def pytest_configure(config):
    import pytest

    @pytest.fixture(scope="session")
    def memg_session_server():
        external = config.getoption("memg_external")
        if external:
            yield ExternalServer(external)
            return
        with Server(port=0) as server:
            yield server

    @pytest.fixture
    def memg_server(memg_session_server):
        """A running memcached-compatible server, empty at the start of the test;
        connect to ``memg_server.address``."""
        flush(memg_session_server)
        return memg_session_server

    # pytest finds fixtures among a plugin module's attributes.
    fixtures = types.ModuleType("memg_fixtures")
    fixtures.memg_session_server, fixtures.memg_server = memg_session_server, memg_server
    config.pluginmanager.register(fixtures, "memg-fixtures")


if __name__ == "__main__":
    sys.exit(main())
