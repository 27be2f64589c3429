"""memg.BinaryProtocol packet for packet, without sockets.

Each script of request packets is handed to a new connection of an unstarted
memg.Server (test_protocol.Session: a fake clock on the store), then the end of
the input, and every response packet is compared with the exact bytes memcached
1.6.18 sends (proto_bin.c; test_differential.py sends the same kind of scripts to
a real memcached).  The packets are built and read here, field by field, with the
header layout of the binary protocol's spec, not with memg's own code.  The
sections follow the opcodes: retrieval, storage, delete, incr/decr, the rest,
statistics, lengths and framing, then SASL.
"""

import collections
import enum
import struct

import pytest

from conftest import converse
from test_protocol import Session

# magic, opcode, key length, extras length, data type, vbucket (a response's
# status), body length, opaque, CAS: 24 bytes, big-endian.
HEADER = struct.Struct(">BBHBBHIIQ")
REQUEST, RESPONSE = 0x80, 0x81


class Op(enum.IntEnum):
    GET = 0x00
    SET = 0x01
    ADD = 0x02
    REPLACE = 0x03
    DELETE = 0x04
    INCREMENT = 0x05
    DECREMENT = 0x06
    QUIT = 0x07
    FLUSH = 0x08
    GETQ = 0x09
    NOOP = 0x0A
    VERSION = 0x0B
    GETK = 0x0C
    GETKQ = 0x0D
    APPEND = 0x0E
    PREPEND = 0x0F
    STAT = 0x10
    SETQ = 0x11
    ADDQ = 0x12
    REPLACEQ = 0x13
    DELETEQ = 0x14
    INCREMENTQ = 0x15
    DECREMENTQ = 0x16
    QUITQ = 0x17
    FLUSHQ = 0x18
    APPENDQ = 0x19
    PREPENDQ = 0x1A
    VERBOSITY = 0x1B
    TOUCH = 0x1C
    GAT = 0x1D
    GATQ = 0x1E
    SASL_LIST_MECHS = 0x20
    SASL_AUTH = 0x21
    SASL_STEP = 0x22
    GATK = 0x23
    GATKQ = 0x24


class Status(enum.IntEnum):
    SUCCESS = 0x00
    NOT_FOUND = 0x01
    EXISTS = 0x02
    TOO_LARGE = 0x03
    INVALID = 0x04
    NOT_STORED = 0x05
    NON_NUMERIC = 0x06
    AUTH_ERROR = 0x20
    AUTH_CONTINUE = 0x21
    UNKNOWN_COMMAND = 0x81
    NO_MEMORY = 0x82


# The body of memcached's error responses (write_bin_error).
ERROR_TEXT = {
    Status.NOT_FOUND: b"Not found", Status.EXISTS: b"Data exists for key.",
    Status.TOO_LARGE: b"Too large.", Status.INVALID: b"Invalid arguments",
    Status.NOT_STORED: b"Not stored.",
    Status.NON_NUMERIC: b"Non-numeric server-side value for incr or decr",
    Status.AUTH_ERROR: b"Auth failure.", Status.UNKNOWN_COMMAND: b"Unknown command",
    Status.NO_MEMORY: b"Out of memory",
}

# The quiet opcodes, and the loud ones they are quiet forms of.
QUIET = {Op.GETQ: Op.GET, Op.GETKQ: Op.GETK, Op.SETQ: Op.SET, Op.ADDQ: Op.ADD,
         Op.REPLACEQ: Op.REPLACE, Op.DELETEQ: Op.DELETE, Op.INCREMENTQ: Op.INCREMENT,
         Op.DECREMENTQ: Op.DECREMENT, Op.QUITQ: Op.QUIT, Op.FLUSHQ: Op.FLUSH,
         Op.APPENDQ: Op.APPEND, Op.PREPENDQ: Op.PREPEND, Op.GATQ: Op.GAT, Op.GATKQ: Op.GATK}


# -- building requests ----------------------------------------------------------

def request(opcode, key=b"", value=b"", extras=b"", *, opaque=0, cas=0, magic=REQUEST,
            keylen=None, extlen=None, bodylen=None):
    """A request packet.  keylen, extlen and bodylen, if given, replace the true
    lengths in the header (to lie about them); the bytes sent stay the same."""
    keylen = len(key) if keylen is None else keylen
    extlen = len(extras) if extlen is None else extlen
    bodylen = len(extras) + len(key) + len(value) if bodylen is None else bodylen
    return HEADER.pack(magic, opcode, keylen, extlen, 0, 0, bodylen, opaque,
                       cas) + extras + key + value


def store(opcode, key, value, flags=0, exptime=0, **fields):
    """set add replace (and their quiet forms): extras are flags and expiry."""
    return request(opcode, key, value, struct.pack(">II", flags, exptime), **fields)


def counter(opcode, key, delta=1, initial=0, expiration=0, **fields):
    """increment and decrement: extras are delta, initial value, expiration."""
    return request(opcode, key, extras=struct.pack(">QQI", delta, initial, expiration),
                   **fields)


def touching(opcode, key, exptime, **fields):
    """touch gat gatk (and quiet forms): the extras are the new expiry."""
    return request(opcode, key, extras=struct.pack(">I", exptime), **fields)


def flush(delay=None, opcode=Op.FLUSH, **fields):
    return request(opcode, extras=b"" if delay is None else struct.pack(">I", delay),
                   **fields)


def plain(user, password, authzid=b""):
    """A SASL PLAIN message."""
    return authzid + b"\0" + user + b"\0" + password


# -- reading responses -----------------------------------------------------------

Response = collections.namedtuple("Response", "opcode status key extras value opaque cas")


def response(opcode, status=Status.SUCCESS, key=b"", extras=b"", value=b"", *, opaque=0,
             cas=0):
    """The bytes of a response packet."""
    return HEADER.pack(RESPONSE, opcode, len(key), len(extras), 0, status,
                       len(extras) + len(key) + len(value), opaque, cas) + extras + key + value


def failure(opcode, status, opaque=0):
    """An error response, with memcached's text for the status."""
    return response(opcode, status, value=ERROR_TEXT[status], opaque=opaque)


def hit(opcode, value, flags=0, cas=0, key=b"", opaque=0):
    """A get's (gat's ...) response for an item found."""
    return response(opcode, key=key, extras=struct.pack(">I", flags), value=value,
                    opaque=opaque, cas=cas)


def number(opcode, value, cas, opaque=0):
    """An incr's or decr's response: the new value, as 64 bits."""
    return response(opcode, value=struct.pack(">Q", value), cas=cas, opaque=opaque)


def parse(data):
    """The response packets in data, as Responses (opcode and status by name where
    they have one); fails on anything else: a wrong magic, a data type other than
    raw bytes, lengths that do not add up, a packet cut short."""
    responses, at = [], 0
    while at < len(data):
        assert len(data) - at >= HEADER.size, "truncated header: %r" % data[at:]
        magic, opcode, keylen, extlen, datatype, status, bodylen, opaque, cas = \
            HEADER.unpack_from(data, at)
        assert magic == RESPONSE, "not a response: %r" % data[at:at + HEADER.size]
        assert datatype == 0 and keylen + extlen <= bodylen, data[at:at + HEADER.size]
        end = at + HEADER.size + bodylen
        assert end <= len(data), "body cut short: %r" % data[at:]
        body = data[at + HEADER.size:end]
        responses.append(Response(
            Op(opcode) if opcode in Op._value2member_map_ else opcode,
            Status(status) if status in Status._value2member_map_ else status,
            body[extlen:extlen + keylen], body[:extlen], body[extlen + keylen:], opaque, cas))
        at = end
    return responses


# -- conversations -------------------------------------------------------------------

def check(replies, *expected):
    """replies are the bytes of the expected packets; compared packet by packet
    first, for a readable difference, then byte for byte."""
    wanted = b"".join(expected)
    assert parse(replies) == parse(wanted)
    assert replies == wanted


def run(*packets, **settings):
    """Every reply to the packets, sent on one connection to a new server."""
    return Session(**settings).send(b"".join(packets))


def talk(session, *packets):
    """Every reply to the packets, on a new connection to session's server."""
    return session.send(b"".join(packets))


def flags(value):
    """A hit's extras: the client flags."""
    return struct.pack(">I", value)


NOOP = request(Op.NOOP)
DONE = response(Op.NOOP)


# --------------------------------------------------------------------------
# Retrieval: get getk touch gat gatk, and their quiet forms
# --------------------------------------------------------------------------

def test_get_hit_returns_flags_cas_and_value_and_echoes_the_opaque():
    check(run(store(Op.SET, b"k", b"value", flags=5), request(Op.GET, b"k", opaque=0xDEADBEEF)),
          response(Op.SET, cas=1), hit(Op.GET, b"value", flags=5, cas=1, opaque=0xDEADBEEF))


def test_get_miss():
    check(run(request(Op.GET, b"k", opaque=9)), failure(Op.GET, Status.NOT_FOUND, opaque=9))


def test_getk_returns_the_key_with_a_hit_and_a_miss():
    # A miss of getk carries the key instead of memcached's "Not found".
    check(run(store(Op.SET, b"k", b"v"), request(Op.GETK, b"k"), request(Op.GETK, b"nope")),
          response(Op.SET, cas=1), hit(Op.GETK, b"v", cas=1, key=b"k"),
          response(Op.GETK, Status.NOT_FOUND, key=b"nope"))


@pytest.mark.parametrize("opcode", [Op.GETQ, Op.GETKQ])
def test_quiet_gets_send_hits_and_hide_misses(opcode):
    key = b"k" if opcode == Op.GETKQ else b""
    check(run(store(Op.SETQ, b"k", b"v", flags=3), request(opcode, b"nope", opaque=1),
              request(opcode, b"k", opaque=2), request(opcode, b"nope", opaque=3),
              request(opcode, b"k", opaque=4), request(Op.NOOP, opaque=5)),
          hit(opcode, b"v", flags=3, cas=1, key=key, opaque=2),
          hit(opcode, b"v", flags=3, cas=1, key=key, opaque=4), response(Op.NOOP, opaque=5))


def test_a_quiet_pipeline_ended_by_noop():
    # A client's multi-get: getkq for every key but the last, then noop; the
    # replies of the hits come in request order, then the noop's.
    session = Session()
    talk(session, *[store(Op.SETQ, b"key%d" % n, b"value%d" % n) for n in range(0, 10, 2)])
    replies = talk(session, *[request(Op.GETKQ, b"key%d" % n, opaque=n) for n in range(10)],
                   NOOP)
    check(replies, *[hit(Op.GETKQ, b"value%d" % n, cas=n // 2 + 1, key=b"key%d" % n,
                         opaque=n) for n in range(0, 10, 2)], DONE)


def test_get_counts_hits_and_misses():
    session = Session()
    talk(session, store(Op.SET, b"k", b"v"), request(Op.GET, b"k"), request(Op.GETQ, b"no"),
         request(Op.GETK, b"no"))
    counters = session.server.store.snapshot()
    assert (counters["get_hits"], counters["get_misses"]) == (1, 2)


def test_touch_answers_flags_and_cas_without_the_value():
    session = Session()
    talk(session, store(Op.SET, b"k", b"value", flags=4, exptime=10))
    check(talk(session, touching(Op.TOUCH, b"k", 100, opaque=1),
               touching(Op.TOUCH, b"nope", 100, opaque=2)),
          response(Op.TOUCH, extras=flags(4), cas=1, opaque=1),
          failure(Op.TOUCH, Status.NOT_FOUND, opaque=2))
    session.advance(99)
    check(talk(session, request(Op.GET, b"k")), hit(Op.GET, b"value", flags=4, cas=1))
    session.advance(1)
    check(talk(session, request(Op.GET, b"k")), failure(Op.GET, Status.NOT_FOUND))


@pytest.mark.parametrize("opcode", [Op.GAT, Op.GATQ, Op.GATK, Op.GATKQ])
def test_gat_returns_the_item_and_sets_its_expiry(opcode):
    session = Session()
    talk(session, store(Op.SET, b"k", b"v", flags=2, exptime=10))
    key = b"k" if opcode in (Op.GATK, Op.GATKQ) else b""
    check(talk(session, touching(opcode, b"k", 100, opaque=5)),
          hit(opcode, b"v", flags=2, cas=1, key=key, opaque=5))
    session.advance(99)
    check(talk(session, request(Op.GET, b"k")), hit(Op.GET, b"v", flags=2, cas=1))
    session.advance(1)
    check(talk(session, request(Op.GET, b"k")), failure(Op.GET, Status.NOT_FOUND))


@pytest.mark.parametrize("opcode, reply", [
    (Op.GAT, failure(Op.GAT, Status.NOT_FOUND)),
    (Op.GATK, response(Op.GATK, Status.NOT_FOUND, key=b"k")),
    (Op.GATQ, b""),
    (Op.GATKQ, b""),
], ids=lambda value: value.name if isinstance(value, Op) else None)
def test_gat_miss(opcode, reply):
    check(run(touching(opcode, b"k", 100), NOOP), reply, DONE)


def test_gat_zero_removes_the_expiry():
    session = Session()
    talk(session, store(Op.SET, b"k", b"v", exptime=10), touching(Op.GAT, b"k", 0))
    session.advance(1000)
    check(talk(session, request(Op.GET, b"k")), hit(Op.GET, b"v", cas=1))


def test_touch_to_a_time_before_the_start_expires_at_once():
    # More than 30 days is a Unix time; one before the server started has passed.
    check(run(store(Op.SET, b"k", b"v"), touching(Op.TOUCH, b"k", 2592001),
              request(Op.GET, b"k")),
          response(Op.SET, cas=1), response(Op.TOUCH, extras=flags(0), cas=1),
          failure(Op.GET, Status.NOT_FOUND))


def test_touch_counts_hits_and_misses():
    session = Session()
    talk(session, store(Op.SET, b"k", b"v"), touching(Op.TOUCH, b"k", 1),
         touching(Op.GATQ, b"no", 1), touching(Op.GATK, b"k", 1))
    counters = session.server.store.snapshot()
    assert (counters["touch_hits"], counters["touch_misses"]) == (2, 1)


# --------------------------------------------------------------------------
# Storage: set add replace append prepend, quiet forms, CAS, flags and expiry
# --------------------------------------------------------------------------

# (opcode, whether the key holds "old" (flags 1) first, status, what get finds after)
STORAGE = [
    (Op.SET, False, Status.SUCCESS, (b"new", 7)),
    (Op.SET, True, Status.SUCCESS, (b"new", 7)),
    (Op.ADD, False, Status.SUCCESS, (b"new", 7)),
    (Op.ADD, True, Status.EXISTS, (b"old", 1)),
    (Op.REPLACE, False, Status.NOT_FOUND, None),
    (Op.REPLACE, True, Status.SUCCESS, (b"new", 7)),
    (Op.APPEND, False, Status.NOT_STORED, None),
    (Op.APPEND, True, Status.SUCCESS, (b"oldnew", 1)),       # flags stay
    (Op.PREPEND, False, Status.NOT_STORED, None),
    (Op.PREPEND, True, Status.SUCCESS, (b"newold", 1)),
]


def storage_request(opcode, key, value, **fields):
    """A request of any storage opcode: set, add and replace carry flags 7."""
    if QUIET.get(opcode, opcode) in (Op.APPEND, Op.PREPEND):
        return request(opcode, key, value, **fields)
    return store(opcode, key, value, flags=7, **fields)


@pytest.mark.parametrize("quiet", [False, True], ids=["loud", "quiet"])
@pytest.mark.parametrize("opcode, exists, status, after", STORAGE,
                         ids=["%s-%s" % (case[0].name, "hit" if case[1] else "miss")
                              for case in STORAGE])
def test_storage(opcode, exists, status, after, quiet):
    if quiet:
        opcode = {loud: quiet for quiet, loud in QUIET.items()}[opcode]
    session = Session()
    if exists:
        talk(session, store(Op.SET, b"k", b"old", flags=1))
    reply = talk(session, storage_request(opcode, b"k", b"new", opaque=3), NOOP)
    cas = 2 if exists else 1          # a store takes the next CAS unique
    if status != Status.SUCCESS:
        check(reply, failure(opcode, status, opaque=3), DONE)     # quiet or not
    else:
        check(reply, b"" if quiet else response(opcode, cas=cas, opaque=3), DONE)
    if after is None:
        check(talk(session, request(Op.GET, b"k")), failure(Op.GET, Status.NOT_FOUND))
    else:
        value, flag = after
        check(talk(session, request(Op.GET, b"k")),
              hit(Op.GET, value, flags=flag, cas=cas if status == Status.SUCCESS else 1))


def test_set_counts_every_storage_command():
    session = Session()
    talk(session, store(Op.SET, b"k", b"v"), store(Op.ADDQ, b"k", b"v"),
         request(Op.APPEND, b"no", b"v"))
    assert session.server.store.snapshot()["cmd_set"] == 3


def test_empty_value_and_binary_data():
    key, value = b"\x00\r\n \xff", bytes(range(256))
    check(run(store(Op.SET, b"empty", b""), store(Op.SET, key, value),
              request(Op.GETK, b"empty"), request(Op.GETK, key)),
          response(Op.SET, cas=1), response(Op.SET, cas=2), hit(Op.GETK, b"", cas=1, key=b"empty"),
          hit(Op.GETK, value, cas=2, key=key))


@pytest.mark.parametrize("opcode", [Op.SET, Op.ADD, Op.REPLACE, Op.SETQ])
def test_a_cas_in_the_header_makes_a_store_compare_and_swap(opcode):
    # As memcached: set, add and replace with a CAS unique all store only over the
    # item that has it (add too: it does not fail for the key existing).
    quiet = opcode in QUIET
    session = Session()
    talk(session, store(Op.SET, b"k", b"old"))
    check(talk(session, store(opcode, b"k", b"new", cas=2), store(opcode, b"no", b"x", cas=1),
               store(opcode, b"k", b"new", flags=9, cas=1), request(Op.GET, b"k")),
          failure(opcode, Status.EXISTS), failure(opcode, Status.NOT_FOUND),
          b"" if quiet else response(opcode, cas=2), hit(Op.GET, b"new", flags=9, cas=2))
    counters = session.server.store.snapshot()
    assert (counters["cas_badval"], counters["cas_misses"], counters["cas_hits"]) == (1, 1, 1)


@pytest.mark.parametrize("opcode", [Op.APPEND, Op.PREPENDQ])
def test_append_and_prepend_with_a_cas(opcode):
    session = Session()
    talk(session, store(Op.SET, b"k", b"b"))
    joined = b"bx" if opcode == Op.APPEND else b"xb"
    check(talk(session, request(opcode, b"k", b"y", cas=5), request(opcode, b"k", b"x", cas=1),
               request(Op.GET, b"k")),
          failure(opcode, Status.EXISTS), b"" if opcode in QUIET else response(opcode, cas=2),
          hit(Op.GET, joined, cas=2))


def test_append_and_prepend_keep_flags_and_expiry():
    session = Session()
    talk(session, store(Op.SET, b"k", b"b", flags=5, exptime=10),
         request(Op.APPEND, b"k", b"c"), request(Op.PREPEND, b"k", b"a"))
    check(talk(session, request(Op.GET, b"k")), hit(Op.GET, b"abc", flags=5, cas=3))
    session.advance(10)
    check(talk(session, request(Op.GET, b"k")), failure(Op.GET, Status.NOT_FOUND))


def test_flags_and_relative_expiry():
    session = Session()
    talk(session, store(Op.SET, b"k", b"v", flags=0xFFFFFFFF, exptime=10))
    session.advance(9)
    check(talk(session, request(Op.GET, b"k")), hit(Op.GET, b"v", flags=0xFFFFFFFF, cas=1))
    session.advance(1)
    check(talk(session, request(Op.GET, b"k")), failure(Op.GET, Status.NOT_FOUND))


def test_absolute_expiry():
    session = Session()
    deadline = int(session.clock()) + 100
    talk(session, store(Op.SET, b"k", b"v", exptime=deadline),
         store(Op.SET, b"month", b"v", exptime=30 * 24 * 3600),
         store(Op.SET, b"far", b"v", exptime=0xFFFFFFFF),       # unsigned: in 2106
         store(Op.SET, b"past", b"v", exptime=30 * 24 * 3600 + 1))
    check(talk(session, request(Op.GET, b"past")), failure(Op.GET, Status.NOT_FOUND))
    session.advance(99)
    check(talk(session, request(Op.GETK, b"k"), request(Op.GETK, b"month"),
               request(Op.GETK, b"far")),
          hit(Op.GETK, b"v", cas=1, key=b"k"), hit(Op.GETK, b"v", cas=2, key=b"month"),
          hit(Op.GETK, b"v", cas=3, key=b"far"))
    session.advance(1)
    check(talk(session, request(Op.GETK, b"k")), response(Op.GETK, Status.NOT_FOUND, key=b"k"))


# -I 1024: the largest value a key of one byte takes, as memcached counts the item:
# 59 bytes of header, 4 more for non-zero flags.
LARGEST = 1024 - 59 - 1


@pytest.mark.parametrize("flag, largest", [(0, LARGEST), (1, LARGEST - 4)])
def test_the_size_limit(flag, largest):
    check(run(store(Op.SET, b"k", b"v" * largest, flags=flag), touching(Op.TOUCH, b"k", 0),
              store(Op.SET, b"k", b"v" * (largest + 1), flags=flag), request(Op.GET, b"k"),
              item_size_max=1024),
          response(Op.SET, cas=1), response(Op.TOUCH, extras=flags(flag), cas=1),
          failure(Op.SET, Status.TOO_LARGE), failure(Op.GET, Status.NOT_FOUND))


@pytest.mark.parametrize("opcode, kept", [
    (Op.SET, False), (Op.SETQ, False), (Op.ADD, True), (Op.REPLACE, True), (Op.APPEND, True),
    (Op.PREPENDQ, True)], ids=lambda value: value.name if isinstance(value, Op) else None)
def test_a_value_over_the_limit_is_refused(opcode, kept):
    # Refused whatever the cache holds; a set drops the old value, as memcached's:
    # a failed write leaves no stale data readable.
    session = Session(item_size_max=1024)
    talk(session, store(Op.SET, b"k", b"old"))
    check(talk(session, storage_request(opcode, b"k", b"v" * 2000, opaque=4),
               request(Op.GET, b"k")),
          failure(opcode, Status.TOO_LARGE, opaque=4),
          hit(Op.GET, b"old", cas=1) if kept else failure(Op.GET, Status.NOT_FOUND))
    assert session.server.store.snapshot()["store_too_large"] == 1


def test_a_value_over_the_limit_is_discarded_as_it_arrives():
    session = Session(item_size_max=1024)
    proto = session.connect()
    # Refused at once, from the header alone; then its bytes go as they come.
    assert proto.receive_data(store(Op.SET, b"k", b"v" * 100000)[:30000]) == \
        failure(Op.SET, Status.TOO_LARGE)
    assert proto.block.parts is None
    assert len(proto.buffer) <= 30000
    assert proto.receive_data(b"v" * 70033 + NOOP) == DONE


def test_append_beyond_the_limit_is_not_stored():
    check(run(store(Op.SET, b"k", b"v" * 900), request(Op.APPEND, b"k", b"w" * 100),
              request(Op.PREPENDQ, b"k", b"w" * 100), touching(Op.TOUCH, b"k", 0),
              item_size_max=1024),
          response(Op.SET, cas=1), failure(Op.APPEND, Status.NOT_STORED),
          failure(Op.PREPENDQ, Status.NOT_STORED), response(Op.TOUCH, extras=flags(0), cas=1))


def test_a_value_that_arrives_in_pieces():
    session = Session()
    proto = session.connect()
    packet = store(Op.SET, b"key", b"0123456789", flags=1, opaque=6)
    for cut in range(len(packet) - 1):
        # Nothing is stored, and nothing answered, before the last byte.
        assert proto.receive_data(packet[cut:cut + 1]) == b""
        assert session.server.store.get(b"key") is None
    check(proto.receive_data(packet[-1:]), response(Op.SET, cas=1, opaque=6))
    check(talk(session, request(Op.GET, b"key")), hit(Op.GET, b"0123456789", flags=1, cas=1))


def test_input_ending_inside_a_value_stores_nothing():
    session = Session()
    assert talk(session, store(Op.SET, b"k", b"0123456789")[:-1]) == b""
    assert session.protocol.closing
    assert session.server.store.get(b"k") is None


def full_session(*first):
    """A cache of 4096 bytes without evictions, holding what the first packets
    store, then filled with values of 100 bytes and empty ones until neither fits."""
    session = Session(memory_limit=4096, item_size_max=1024, evict=False)
    talk(session, *first)
    talk(session, *[store(Op.SETQ, b"f%d" % n, b"v" * 100) for n in range(40)],
         *[store(Op.SETQ, b"e%d" % n, b"") for n in range(40)])
    assert session.server.store.snapshot()["store_no_memory"] > 0
    return session


# memcached's texts for what does not fit: its ASCII errors without "SERVER_ERROR ".
NO_MEMORY_FOR_ITEM = b"Out of memory allocating item"


def test_a_store_that_does_not_fit_is_refused_with_evictions_off():
    session = full_session()
    refused = session.server.store.snapshot()["store_no_memory"]
    check(talk(session, store(Op.SET, b"new", b"v" * 900, opaque=1),
               store(Op.ADDQ, b"new", b"v" * 900, opaque=2),
               request(Op.APPENDQ, b"f0", b"v" * 500, opaque=3), NOOP),
          response(Op.SET, Status.NO_MEMORY, value=NO_MEMORY_FOR_ITEM, opaque=1),
          response(Op.ADDQ, Status.NO_MEMORY, value=NO_MEMORY_FOR_ITEM, opaque=2),
          response(Op.APPENDQ, Status.NO_MEMORY, value=NO_MEMORY_FOR_ITEM, opaque=3), DONE)
    assert session.server.store.snapshot()["store_no_memory"] == refused + 3


def test_a_set_that_does_not_fit_drops_the_old_value():
    session = full_session(store(Op.SET, b"k", b"small"))
    check(talk(session, store(Op.SET, b"k", b"v" * 900), request(Op.GET, b"k")),
          response(Op.SET, Status.NO_MEMORY, value=NO_MEMORY_FOR_ITEM),
          failure(Op.GET, Status.NOT_FOUND))


def test_an_incr_that_does_not_fit_creates_nothing():
    session = full_session()
    check(talk(session, counter(Op.INCREMENT, b"new", initial=1), request(Op.GET, b"new")),
          response(Op.INCREMENT, Status.NO_MEMORY, value=b"Out of memory allocating new item"),
          failure(Op.GET, Status.NOT_FOUND))
