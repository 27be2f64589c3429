"""memg.BinaryProtocol packet for packet, without sockets.

Each script of request packets is handed to a new connection of an unstarted
memg.Server (test_protocol.Session: a fake clock on the store), then the end of
the input, and every response packet is compared with the exact bytes memcached
1.6.18 sends (proto_bin.c; test_differential.py sends the same kind of scripts to
a real memcached).  The packets are built and read here, field by field, with the
header layout of the binary protocol's spec, not with memg's own code.  The
sections follow the opcodes: retrieval, storage, delete and incr/decr, the rest,
statistics, then -B, lengths and framing, and SASL (where memcached answers as
Cyrus SASL's PLAIN does).  Where memg differs on purpose, the test says so: the
version it answers.
"""

import collections
import enum
import struct

import pytest

import memg
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


def flags(value):
    """The extras of a get's (gat's, touch's) response: the client flags."""
    return struct.pack(">I", value)


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
    """Assert that replies are the expected packets' bytes: compared packet by
    packet first, for a readable difference, then byte for byte."""
    wanted = b"".join(expected)
    assert parse(replies) == parse(wanted)
    assert replies == wanted


def run(*packets, **settings):
    """Every reply to the packets, sent on one connection to a new server."""
    return Session(**settings).send(b"".join(packets))


def named(value):
    """Test ids for parameters that are opcodes or statuses: their names."""
    return value.name if isinstance(value, enum.Enum) else None


def talk(session, *packets):
    """Every reply to the packets, on a new connection to session's server."""
    return session.send(b"".join(packets))


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


@pytest.mark.parametrize("opcode", [Op.GETQ, Op.GETKQ], ids=named)
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


@pytest.mark.parametrize("opcode", [Op.GAT, Op.GATQ, Op.GATK, Op.GATKQ], ids=named)
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
], ids=named)
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


@pytest.mark.parametrize("opcode", [Op.SET, Op.ADD, Op.REPLACE, Op.SETQ], ids=named)
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


@pytest.mark.parametrize("opcode", [Op.APPEND, Op.PREPENDQ], ids=named)
def test_append_and_prepend_with_a_cas(opcode):
    session = Session()
    talk(session, store(Op.SET, b"k", b"b"))
    joined = b"bx" if opcode == Op.APPEND else b"xb"
    check(talk(session, request(opcode, b"k", b"y", cas=5), request(opcode, b"k", b"x", cas=1),
               request(Op.GET, b"k")),
          failure(opcode, Status.EXISTS), b"" if opcode in QUIET else response(opcode, cas=2),
          hit(Op.GET, joined, cas=2))


def test_without_cas_uniques_a_stores_cas_is_ignored():
    # -C: memcached cannot give the new item the header's CAS, so the store stays
    # a plain one; delete and incr compare the CAS with the item's 0 and refuse.
    check(run(store(Op.SET, b"k", b"v", cas=5), store(Op.ADD, b"k", b"v", cas=5),
              store(Op.REPLACE, b"k", b"x", cas=5), request(Op.APPEND, b"k", b"a", cas=5),
              request(Op.GETK, b"k"), counter(Op.INCREMENT, b"k", cas=5),
              request(Op.DELETE, b"k", cas=5), request(Op.DELETE, b"k"), use_cas=False),
          response(Op.SET), failure(Op.ADD, Status.EXISTS), response(Op.REPLACE),
          response(Op.APPEND), hit(Op.GETK, b"xa", key=b"k"), failure(Op.INCREMENT, Status.EXISTS),
          failure(Op.DELETE, Status.EXISTS), response(Op.DELETE))


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
    (Op.PREPENDQ, True)], ids=named)
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


# --------------------------------------------------------------------------
# delete, increment, decrement
# --------------------------------------------------------------------------

def test_delete():
    session = Session()
    check(talk(session, store(Op.SET, b"k", b"v"), request(Op.DELETE, b"k", opaque=1),
               request(Op.DELETE, b"k", opaque=2), request(Op.GET, b"k")),
          response(Op.SET, cas=1), response(Op.DELETE, opaque=1),
          failure(Op.DELETE, Status.NOT_FOUND, opaque=2), failure(Op.GET, Status.NOT_FOUND))
    counters = session.server.store.snapshot()
    assert (counters["delete_hits"], counters["delete_misses"]) == (1, 1)


def test_deleteq_hides_only_success():
    check(run(store(Op.SET, b"k", b"v"), request(Op.DELETEQ, b"k", opaque=1),
              request(Op.DELETEQ, b"k", opaque=2), NOOP),
          response(Op.SET, cas=1), failure(Op.DELETEQ, Status.NOT_FOUND, opaque=2), DONE)


def test_delete_with_a_cas():
    check(run(store(Op.SET, b"k", b"v"), request(Op.DELETE, b"k", cas=2),
              request(Op.DELETE, b"no", cas=1), request(Op.GET, b"k"),
              request(Op.DELETE, b"k", cas=1), request(Op.GET, b"k")),
          response(Op.SET, cas=1), failure(Op.DELETE, Status.EXISTS),
          failure(Op.DELETE, Status.NOT_FOUND), hit(Op.GET, b"v", cas=1), response(Op.DELETE),
          failure(Op.GET, Status.NOT_FOUND))


@pytest.mark.parametrize("opcode, delta, result", [
    (Op.INCREMENT, 5, 15), (Op.DECREMENT, 3, 7), (Op.DECREMENT, 100, 0),
    (Op.INCREMENT, 2 ** 64 - 1, 9), (Op.INCREMENT, 0, 10)], ids=named)
def test_incr_and_decr_answer_the_new_value_and_cas(opcode, delta, result):
    # decr stops at 0, incr wraps at 2**64; the item keeps its flags.
    check(run(store(Op.SET, b"n", b"10", flags=5), counter(opcode, b"n", delta, opaque=3),
              request(Op.GET, b"n")),
          response(Op.SET, cas=1), number(opcode, result, cas=2, opaque=3),
          hit(Op.GET, b"%d" % result if result >= 10 else b"%d " % result, flags=5, cas=2))


def test_a_shorter_result_is_padded_and_a_longer_one_grows():
    # As memcached writes a shorter number in place, padded with spaces.
    check(run(store(Op.SET, b"n", b"100"), counter(Op.DECREMENT, b"n", 1), request(Op.GET, b"n"),
              counter(Op.INCREMENT, b"n", 901), request(Op.GET, b"n")),
          response(Op.SET, cas=1), number(Op.DECREMENT, 99, cas=2), hit(Op.GET, b"99 ", cas=2),
          number(Op.INCREMENT, 1000, cas=3), hit(Op.GET, b"1000", cas=3))


@pytest.mark.parametrize("opcode", [Op.INCREMENT, Op.DECREMENT], ids=named)
def test_a_miss_creates_the_initial_value(opcode):
    # The initial value itself, not initial plus or minus delta; flags 0.
    check(run(counter(opcode, b"n", 5, initial=7, opaque=1), counter(opcode, b"n", 5),
              request(Op.GET, b"n")),
          number(opcode, 7, cas=1, opaque=1), number(opcode, 12 if opcode == Op.INCREMENT else 2,
                                                      cas=2),
          hit(Op.GET, b"12" if opcode == Op.INCREMENT else b"2", cas=2))


def test_a_created_value_takes_the_expiration():
    session = Session()
    check(talk(session, counter(Op.INCREMENT, b"n", initial=2 ** 64 - 1, expiration=10)),
          number(Op.INCREMENT, 2 ** 64 - 1, cas=1))
    session.advance(9)
    check(talk(session, request(Op.GET, b"n")), hit(Op.GET, b"18446744073709551615", cas=1))
    session.advance(1)
    check(talk(session, request(Op.GET, b"n")), failure(Op.GET, Status.NOT_FOUND))


@pytest.mark.parametrize("opcode", [Op.INCREMENT, Op.DECREMENTQ], ids=named)
def test_an_expiration_of_all_ones_creates_nothing(opcode):
    session = Session()
    check(talk(session, counter(opcode, b"n", initial=7, expiration=0xFFFFFFFF),
               request(Op.GET, b"n")),
          failure(opcode, Status.NOT_FOUND), failure(Op.GET, Status.NOT_FOUND))
    counters = session.server.store.snapshot()
    misses = "incr_misses" if opcode == Op.INCREMENT else "decr_misses"
    assert counters[misses] == 1


def test_a_created_value_is_no_miss():
    session = Session()
    talk(session, counter(Op.INCREMENT, b"n"), counter(Op.DECREMENT, b"m"))
    counters = session.server.store.snapshot()
    assert (counters["incr_misses"], counters["decr_misses"]) == (0, 0)


@pytest.mark.parametrize("value", [b"abc", b"", b"12abc", b"18446744073709551616", b"-1"],
                         ids=["letters", "empty", "trailing-letters", "2**64", "negative"])
def test_incr_of_a_value_that_is_no_number(value):
    check(run(store(Op.SET, b"n", value), counter(Op.INCREMENT, b"n", opaque=4),
              counter(Op.DECREMENTQ, b"n", opaque=5), request(Op.GET, b"n")),
          response(Op.SET, cas=1), failure(Op.INCREMENT, Status.NON_NUMERIC, opaque=4),
          failure(Op.DECREMENTQ, Status.NON_NUMERIC, opaque=5), hit(Op.GET, value, cas=1))


def test_quiet_incr_and_decr_hide_only_success():
    check(run(counter(Op.INCREMENTQ, b"n", initial=5), counter(Op.INCREMENTQ, b"n", 2),
              counter(Op.DECREMENTQ, b"n", 1),
              counter(Op.INCREMENTQ, b"no", expiration=0xFFFFFFFF, opaque=9),
              request(Op.GET, b"n")),
          failure(Op.INCREMENTQ, Status.NOT_FOUND, opaque=9), hit(Op.GET, b"6", cas=3))


def test_incr_and_decr_with_a_cas():
    check(run(store(Op.SET, b"n", b"5"), counter(Op.INCREMENT, b"n", cas=9),
              counter(Op.DECREMENT, b"n", cas=1), counter(Op.DECREMENT, b"n", cas=1),
              counter(Op.INCREMENT, b"no", initial=3, cas=7)),
          response(Op.SET, cas=1), failure(Op.INCREMENT, Status.EXISTS),
          number(Op.DECREMENT, 4, cas=2), failure(Op.DECREMENT, Status.EXISTS),
          number(Op.INCREMENT, 3, cas=3))          # a miss creates, whatever the CAS


def test_an_empty_value_is_no_number_before_its_cas_is_compared():
    # memcached's do_add_delta refuses an empty value before it compares CAS uniques.
    check(run(store(Op.SET, b"n", b""), counter(Op.INCREMENT, b"n", cas=9)),
          response(Op.SET, cas=1), failure(Op.INCREMENT, Status.NON_NUMERIC))


# --------------------------------------------------------------------------
# Everything else: quit flush noop version verbosity, unknown opcodes
# --------------------------------------------------------------------------

def test_quit_answers_then_closes():
    session = Session()
    check(talk(session, request(Op.QUIT, opaque=2), request(Op.VERSION)),
          response(Op.QUIT, opaque=2))
    assert session.protocol.closing


def test_quitq_closes_silently():
    session = Session()
    assert talk(session, store(Op.SETQ, b"k", b"v"), request(Op.QUITQ), NOOP) == b""
    assert session.protocol.closing
    assert session.server.store.get(b"k") is not None


def test_flush():
    check(run(store(Op.SET, b"k", b"v"), flush(opaque=1), request(Op.GET, b"k"),
              store(Op.SET, b"k", b"v"), flush(0, opcode=Op.FLUSHQ), NOOP, request(Op.GET, b"k")),
          response(Op.SET, cas=1), response(Op.FLUSH, opaque=1), failure(Op.GET, Status.NOT_FOUND),
          response(Op.SET, cas=2), DONE, failure(Op.GET, Status.NOT_FOUND))


def test_flush_with_a_delay():
    # As memcached: the deadline is the second before the delay runs out, and what
    # is stored until then goes too.
    session = Session()
    check(talk(session, store(Op.SET, b"k", b"v"), flush(10), request(Op.GET, b"k")),
          response(Op.SET, cas=1), response(Op.FLUSH), hit(Op.GET, b"v", cas=1))
    session.advance(8)
    check(talk(session, store(Op.SET, b"late", b"v"), request(Op.GET, b"k")),
          response(Op.SET, cas=2), hit(Op.GET, b"v", cas=1))
    session.advance(1)
    check(talk(session, request(Op.GET, b"k"), request(Op.GET, b"late")),
          failure(Op.GET, Status.NOT_FOUND), failure(Op.GET, Status.NOT_FOUND))
    assert session.server.store.snapshot()["cmd_flush"] == 1


def test_flush_disabled_is_an_auth_error():
    # memcached's status for a flush that -F forbids.
    check(run(store(Op.SET, b"k", b"v"), flush(), flush(opcode=Op.FLUSHQ), request(Op.GET, b"k"),
              flush_enabled=False),
          response(Op.SET, cas=1), failure(Op.FLUSH, Status.AUTH_ERROR),
          failure(Op.FLUSHQ, Status.AUTH_ERROR), hit(Op.GET, b"v", cas=1))


def test_noop_and_version():
    # version is the memcached release whose protocol memg follows, alone.
    check(run(request(Op.NOOP, opaque=1), request(Op.VERSION, opaque=2)),
          response(Op.NOOP, opaque=1), response(Op.VERSION, value=b"1.6.21", opaque=2))


@pytest.mark.parametrize("opcode", [Op.VERBOSITY, 0x25, 0x30, 0x48, 0x80, 0xFF],
                         ids=lambda opcode: "0x%02x" % opcode)
def test_unknown_opcodes(opcode):
    # memcached 1.6.18 answers verbosity (0x1b) as unknown too.  As memcached, the
    # body is discarded after the extras and key have been read: as many bytes as
    # the whole body, so that extras and key's length more go too.
    packet = request(opcode, b"key", b"value", extras=b"ext", opaque=4)
    proto = Session().connect()
    check(proto.receive_data(packet + b"ext" + b"key" + NOOP),
          failure(opcode, Status.UNKNOWN_COMMAND, opaque=4), DONE)
    assert not proto.closing


# --------------------------------------------------------------------------
# Statistics: stat with and without a group
# --------------------------------------------------------------------------

def stat_packets(replies, opaque=0):
    """A stat's reply as {name: value} of bytes: a packet per statistic, then an
    empty one; each a success echoing opaque."""
    packets = parse(replies)
    assert packets[-1] == parse(response(Op.STAT, opaque=opaque))[0]
    for packet in packets:
        assert (packet.opcode, packet.status, packet.extras, packet.opaque, packet.cas) == (
            Op.STAT, Status.SUCCESS, b"", opaque, 0)
    return {packet.key: packet.value for packet in packets[:-1]}


def test_stat_general():
    session = Session()
    talk(session, store(Op.SET, b"a", b"x"), request(Op.GET, b"a"), request(Op.GET, b"b"))
    stats = stat_packets(talk(session, request(Op.STAT, opaque=6)), opaque=6)
    assert list(stats)[:4] == [b"pid", b"uptime", b"time", b"version"]
    assert stats[b"version"] == b"1.6.21"
    assert (stats[b"curr_items"], stats[b"cmd_get"], stats[b"get_hits"], stats[b"cmd_set"]) == (
        b"1", b"2", b"1", b"1")


def test_stat_groups_as_the_text_protocol_reports_them():
    session = Session(track_sizes=True)
    talk(session, store(Op.SET, b"a", b"x" * 100))
    for group in (b"settings", b"items", b"slabs", b"sizes"):
        text = session.send(b"stats %s\r\n" % group)
        stats = stat_packets(talk(session, request(Op.STAT, group)))
        assert b"".join(b"STAT %s %s\r\n" % row for row in stats.items()) + b"END\r\n" == text
    assert stat_packets(talk(session, request(Op.STAT, b"items")))[
        b"items:%d:number" % memg.slab_class(1, 100, 0)] == b"1"


def test_stat_of_an_empty_cache():
    check(run(request(Op.STAT, b"items"), request(Op.STAT, b"slabs"), request(Op.STAT, b"sizes")),
          response(Op.STAT), response(Op.STAT, key=b"active_slabs", value=b"0"),
          response(Op.STAT, key=b"total_malloced", value=b"0"), response(Op.STAT),
          response(Op.STAT, key=b"sizes_status", value=b"disabled"), response(Op.STAT))


def test_stat_reset():
    session = Session()
    talk(session, store(Op.SET, b"a", b"x"), request(Op.GET, b"a"))
    check(talk(session, request(Op.STAT, b"reset", opaque=3)), response(Op.STAT, opaque=3))
    stats = stat_packets(talk(session, request(Op.STAT)))
    assert (stats[b"cmd_get"], stats[b"cmd_set"], stats[b"curr_items"]) == (b"0", b"0", b"1")


def test_stat_detail():
    # As memcached: every get, gat and touch counts a get (and a hit if it found
    # the item), every set and append a set, every delete a delete, under the key's
    # prefix (up to the first ":"); off stops the counting, reset clears it.
    check(run(request(Op.STAT, b"detail on", opaque=1), store(Op.SET, b"a:1", b"v"),
              request(Op.GET, b"a:1"), request(Op.GETQ, b"a:2"), touching(Op.GAT, b"a:3", 0),
              touching(Op.TOUCH, b"a:1", 0), request(Op.DELETE, b"a:1"),
              counter(Op.INCREMENT, b"a:n"), request(Op.APPEND, b"a:1", b"x"),
              request(Op.GETK, b"nodelimiter"), request(Op.STAT, b"detail dump", opaque=2),
              request(Op.STAT, b"detail off"), store(Op.SET, b"a:2", b"v"),
              request(Op.STAT, b"detail dump"), request(Op.STAT, b"reset"),
              request(Op.STAT, b"detail dump")),
          response(Op.STAT, opaque=1), response(Op.SET, cas=1), hit(Op.GET, b"v", cas=1),
          failure(Op.GAT, Status.NOT_FOUND), response(Op.TOUCH, extras=flags(0), cas=1),
          response(Op.DELETE), number(Op.INCREMENT, 0, cas=2),
          failure(Op.APPEND, Status.NOT_STORED), response(Op.GETK, Status.NOT_FOUND,
                                                           key=b"nodelimiter"),
          response(Op.STAT, key=b"detailed", opaque=2,
                   value=b"PREFIX a get 4 hit 2 set 2 del 1\r\nEND\r\n"),
          response(Op.STAT, opaque=2), response(Op.STAT), response(Op.SET, cas=3),
          response(Op.STAT, key=b"detailed", value=b"PREFIX a get 4 hit 2 set 2 del 1\r\nEND\r\n"),
          response(Op.STAT), response(Op.STAT),
          response(Op.STAT, key=b"detailed", value=b"END\r\n"), response(Op.STAT))


@pytest.mark.parametrize("group", [b"nosuch", b"conns", b"detail", b"detail x", b"detailon",
                                   b"cachedump 1 0", b"RESET"])
def test_stat_of_an_unknown_group(group):
    # memcached's binary stat has no conns group (its text protocol's has one).
    check(run(request(Op.STAT, group, opaque=1)), failure(Op.STAT, Status.NOT_FOUND, opaque=1))


def test_settings_show_the_protocol():
    for settings, shown in [({}, b"auto-negotiate"), ({"protocol": "binary"}, b"binary")]:
        stats = stat_packets(run(request(Op.STAT, b"settings"), **settings))
        assert stats[b"binding_protocol"] == shown
        assert stats[b"auth_enabled_sasl"] == b"no"


# --------------------------------------------------------------------------
# -B: which protocol a connection speaks
# --------------------------------------------------------------------------

def test_auto_lets_the_first_byte_choose():
    session = Session()
    check(talk(session, request(Op.VERSION), b"version\r\n"), response(Op.VERSION, value=b"1.6.21"))
    assert session.protocol.closing                  # text is a bad magic byte here
    # A text connection reads a packet as text: the noop's opcode is a newline.
    assert talk(session, b"version\r\n", NOOP) == b"VERSION 1.6.21\r\nERROR\r\n"


def test_ascii_reads_a_packet_as_text():
    # "\x80" is one line (the noop's opcode is a newline), the rest another, cut at
    # its first NUL.
    assert run(NOOP + b"mn\r\n", protocol="ascii") == b"ERROR\r\nERROR\r\n"


def test_binary_closes_on_text():
    session = Session(protocol="binary")
    assert talk(session, b"version\r\n", NOOP) == b""
    assert session.protocol.closing
    check(talk(session, NOOP), DONE)


# --------------------------------------------------------------------------
# Lengths and framing
# --------------------------------------------------------------------------

def closes(session, *packets):
    """The replies to packets, received at once on a new connection without the
    end of the input, and whether the connection then closes."""
    proto = session.connect()
    reply = proto.receive_data(b"".join(packets))
    return reply, proto.closing


def test_packets_received_together_are_answered_in_order():
    session = Session()
    proto = session.connect()
    check(proto.receive_data(b"".join(request(Op.NOOP, opaque=n) for n in range(100))),
          *[response(Op.NOOP, opaque=n) for n in range(100)])
    assert not proto.closing


@pytest.mark.parametrize("magic", [0x00, 0x81, 0x7F, ord("g")])
def test_a_bad_magic_byte_closes_without_a_reply(magic):
    reply, closed = closes(Session(), NOOP, request(Op.NOOP, magic=magic), NOOP)
    check(reply, DONE)
    assert closed


@pytest.mark.parametrize("packet", [
    request(Op.GET, b"kk", bodylen=1),                  # key longer than the body
    store(Op.SET, b"k", b"", bodylen=8),                # extras and key longer
    request(Op.STAT, b"k", extras=b"e", bodylen=1),
    request(0x50, b"key", bodylen=2),                   # whatever the opcode
], ids=["key", "extras-and-key", "stat", "unknown-opcode"])
def test_a_body_shorter_than_extras_and_key_closes(packet):
    reply, closed = closes(Session(), packet, NOOP)
    opcode = packet[1]
    check(reply, failure(opcode, Status.UNKNOWN_COMMAND))
    assert closed


def test_a_key_of_250_bytes_is_the_longest():
    check(run(store(Op.SET, b"k" * 250, b"v"), request(Op.GETK, b"k" * 250)),
          response(Op.SET, cas=1), hit(Op.GETK, b"v", cas=1, key=b"k" * 250))


@pytest.mark.parametrize("opcode", [Op.GET, Op.SET, Op.DELETE, Op.INCREMENT, Op.APPEND,
                                    Op.TOUCH, Op.GATKQ, Op.STAT, 0x50], ids=named)
def test_a_key_over_250_bytes_closes(opcode):
    reply, closed = closes(Session(), request(opcode, b"k" * 251), NOOP)
    check(reply, failure(opcode, Status.INVALID))
    assert closed


# Requests whose lengths do not fit their opcode (memcached's checks, as in
# dispatch_bin_command): each is answered "Invalid arguments", then the close.
BAD_LENGTHS = [
    request(Op.GET, b"k", extras=b"x"), request(Op.GETQ), request(Op.GETK, b"k", b"v"),
    request(Op.GETKQ, extras=b"x"),
    request(Op.SET, b"k", b"v", b"1234"), store(Op.ADD, b"", b"v"), request(Op.REPLACE, b"k", b"v"),
    request(Op.SETQ, b"k"),
    request(Op.APPEND, b"", b"v"), request(Op.PREPEND, b"k", b"v", b"12345678"),
    request(Op.APPENDQ, extras=b"1"),
    request(Op.DELETE), request(Op.DELETE, b"k", b"v"), request(Op.DELETEQ, b"k", extras=b"1234"),
    request(Op.INCREMENT, b"k"), counter(Op.DECREMENT, b""),
    request(Op.INCREMENTQ, b"k", b"v", bytes(20)), request(Op.DECREMENTQ, b"k", extras=bytes(8)),
    request(Op.TOUCH, b"k"), touching(Op.GAT, b"", 0), request(Op.GATQ, b"k", extras=bytes(8)),
    request(Op.GATK, b"k", extras=bytes(3)),
    request(Op.FLUSH, extras=bytes(8)), request(Op.FLUSHQ, b"k"), request(Op.FLUSH, value=b"v"),
    request(Op.FLUSH, extras=bytes(4), value=b"v"),
    request(Op.NOOP, b"k"), request(Op.NOOP, value=b"v"), request(Op.VERSION, extras=b"x"),
    request(Op.QUIT, b"k"), request(Op.QUITQ, value=b"v"), request(Op.STAT, extras=b"x"),
    request(Op.SASL_LIST_MECHS, value=b"v"), request(Op.SASL_AUTH, value=b"v"),
    request(Op.SASL_STEP, b"PLAIN", extras=b"x"),
]


@pytest.mark.parametrize("packet", BAD_LENGTHS,
                         ids=["%s-%d" % (Op(packet[1]).name, number)
                              for number, packet in enumerate(BAD_LENGTHS)])
def test_lengths_that_do_not_fit_the_opcode_close(packet):
    reply, closed = closes(Session(), packet, NOOP)
    check(reply, failure(packet[1], Status.INVALID))
    assert closed


def test_a_body_beyond_what_the_opcode_reads_is_read_as_packets():
    # touch reads its extras and key; stat its key.  As in memcached, what more the
    # body length claims is the next packet.
    check(run(touching(Op.TOUCH, b"k", 0, bodylen=5 + 24), NOOP,
              request(Op.STAT, b"reset", bodylen=5 + 24), NOOP),
          failure(Op.TOUCH, Status.NOT_FOUND), DONE, response(Op.STAT), DONE)


def test_a_packet_cut_anywhere_is_answered_once_complete():
    packets = [store(Op.SET, b"key", b"value", flags=3, opaque=1),
               request(Op.GETK, b"key", opaque=2),
               counter(Op.INCREMENT, b"n", initial=5, opaque=3)]
    expected = [response(Op.SET, cas=1, opaque=1),
                hit(Op.GETK, b"value", flags=3, cas=1, key=b"key", opaque=2),
                number(Op.INCREMENT, 5, cas=2, opaque=3)]
    script = b"".join(packets)
    for cut in range(1, len(script)):
        proto = Session().connect()
        replies = proto.receive_data(script[:cut]) + proto.receive_data(script[cut:])
        check(replies, *expected)


@pytest.mark.parametrize("packet, reply", [
    (store(Op.SET, b"k", b"", bodylen=0xFFFFFFFF), failure(Op.SET, Status.TOO_LARGE)),
    (request(Op.APPENDQ, b"k", bodylen=0xFFFFFFFF), failure(Op.APPENDQ, Status.TOO_LARGE)),
    (request(0x50, b"k", bodylen=0x80000000), failure(0x50, Status.UNKNOWN_COMMAND)),
], ids=["set", "appendq", "unknown"])
def test_a_body_of_2_gb_or_more_is_refused_and_what_follows_read_at_once(packet, reply):
    # memcached holds the length in a signed int: such a body discards nothing, and
    # the next request is read as it comes (nothing of the claim is ever held).
    proto = Session().connect()
    check(proto.receive_data(packet + NOOP), reply, DONE)
    assert proto.block is None and not proto.closing


@pytest.mark.parametrize("packet, reply", [
    (store(Op.SET, b"k", b"", bodylen=0x7FFFFFF0), failure(Op.SET, Status.TOO_LARGE)),
    (request(0x50, b"k", bodylen=0x7FFFFFF0), failure(0x50, Status.UNKNOWN_COMMAND)),
], ids=["set", "unknown"])
def test_a_body_just_under_2_gb_is_refused_at_once_and_discarded_as_it_comes(packet, reply):
    proto = Session().connect()
    check(proto.receive_data(packet), reply)
    for _ in range(64):
        assert proto.receive_data(b"x" * 65536) == b""
        assert len(proto.buffer) <= 65536 and proto.block.parts is None
    assert not proto.closing


@pytest.mark.parametrize("packet", [request(Op.GET, b"k", bodylen=0xFFFFFFFF),
                                    request(Op.NOOP, bodylen=0xFFFFFFFF)], ids=["get", "noop"])
def test_a_body_of_4_gb_that_the_opcode_cannot_have_closes(packet):
    reply, closed = closes(Session(), packet, b"x" * 1000)
    check(reply, failure(packet[1], Status.INVALID))
    assert closed


def test_input_ending_inside_a_packet_closes():
    session = Session()
    for part in (NOOP[:20], request(Op.GET, b"key")[:26]):
        assert talk(session, NOOP, part) == DONE
        assert session.protocol.closing


def test_replies_beyond_the_output_bound_wait_for_the_engine():
    session = Session()
    talk(session, store(Op.SET, b"k", b"x" * 1000))
    proto = session.connect()
    first = proto.receive_data(request(Op.GET, b"k") * 1000)
    assert memg.OUTPUT_LIMIT <= len(first) < memg.OUTPUT_LIMIT + 2000
    assert proto.pending
    rest = b""
    while proto.pending:
        rest += proto.data_to_send()
    check(first + rest, hit(Op.GET, b"x" * 1000, cas=1) * 1000)


# --------------------------------------------------------------------------
# SASL (-S): PLAIN against the password database
# --------------------------------------------------------------------------

AUTH = request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"secret"))
AUTHENTICATED = response(Op.SASL_AUTH, value=b"Authenticated")
START = request(Op.SASL_AUTH, b"PLAIN")                    # PLAIN with no data yet
CONTINUE = response(Op.SASL_AUTH, Status.AUTH_CONTINUE)
STEP = request(Op.SASL_STEP, b"PLAIN", plain(b"alice", b"secret"))
STEPPED = response(Op.SASL_STEP, value=b"Authenticated")
WRONG = request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"wrong"))
WRONG_STEP = request(Op.SASL_STEP, b"PLAIN", plain(b"alice", b"wrong"))
# What an unauthenticated get gets: an auth error, then the close.
REFUSED = failure(Op.GET, Status.AUTH_ERROR)


@pytest.fixture
def sasl(tmp_path):
    """A server with -S and its password database."""
    path = tmp_path / "sasl-passwords"
    path.write_bytes(b"alice:secret\nbob:pass:word\n")
    return Session(sasl=True, sasl_pwdb=str(path))


def test_sasl_makes_the_protocol_binary(sasl):
    assert sasl.server.settings.protocol == "binary"
    stats = stat_packets(talk(sasl, AUTH, request(Op.STAT, b"settings"))[len(AUTHENTICATED):])
    assert (stats[b"auth_enabled_sasl"], stats[b"binding_protocol"]) == (b"yes", b"binary")


def test_sasl_list_mechanisms(sasl):
    check(talk(sasl, request(Op.SASL_LIST_MECHS, opaque=8)),
          response(Op.SASL_LIST_MECHS, value=b"PLAIN", opaque=8))


def test_sasl_right_password(sasl):
    check(talk(sasl, AUTH, store(Op.SET, b"k", b"v"), request(Op.GET, b"k")),
          AUTHENTICATED, response(Op.SET, cas=1), hit(Op.GET, b"v", cas=1))


@pytest.mark.parametrize("message", [
    plain(b"alice", b"wrong"), plain(b"carol", b"secret"), plain(b"bob", b"pass"),
    plain(b"alice", b"secret", b"bob"),            # to act as another user
    b"alice\0secret", plain(b"alice", b"secret") + b"\0", b"",
], ids=["wrong-password", "unknown-user", "password-prefix", "authzid-another-user",
        "two-fields", "four-fields", "empty-step"])
def test_sasl_refusals(sasl, message):
    # The connection stays open, unauthenticated: the next get is refused and closes.
    opcode = Op.SASL_STEP if not message else Op.SASL_AUTH
    first = START if not message else b""
    reply = talk(sasl, first, request(opcode, b"PLAIN", message), request(Op.GET, b"k"), NOOP)
    check(reply, CONTINUE if first else b"", failure(opcode, Status.AUTH_ERROR), REFUSED)


@pytest.mark.parametrize("message", [
    plain(b"alice", b"secret", b"alice"), plain(b"bob", b"pass:word")],
    ids=["authzid-the-same-user", "colon-in-password"])
def test_sasl_accepted(sasl, message):
    check(talk(sasl, request(Op.SASL_AUTH, b"PLAIN", message), request(Op.GET, b"k")),
          AUTHENTICATED, failure(Op.GET, Status.NOT_FOUND))


def test_sasl_mechanism_names_are_case_blind(sasl):
    check(talk(sasl, request(Op.SASL_AUTH, b"plain", plain(b"alice", b"secret"))), AUTHENTICATED)


def test_sasl_unknown_mechanism(sasl):
    check(talk(sasl, request(Op.SASL_AUTH, b"CRAM-MD5", b"x"), request(Op.VERSION)),
          failure(Op.SASL_AUTH, Status.AUTH_ERROR), response(Op.VERSION, value=b"1.6.21"))


def test_sasl_mechanism_name_over_32_bytes(sasl):
    # memcached refuses it before SASL sees it: invalid, its data discarded, and
    # the connection's state (authenticated here) unchanged.
    check(talk(sasl, AUTH, request(Op.SASL_AUTH, b"P" * 33, plain(b"alice", b"secret")),
               request(Op.GET, b"k")),
          AUTHENTICATED, failure(Op.SASL_AUTH, Status.INVALID), failure(Op.GET, Status.NOT_FOUND))


def test_sasl_data_over_the_item_size_is_refused_at_once(tmp_path):
    # memcached reads SASL data into an item, so the size limit bounds it ("Out of
    # memory" when it cannot have one): an unauthenticated client cannot make the
    # server hold gigabytes.
    path = tmp_path / "sasl-passwords"
    path.write_bytes(b"alice:secret\n")
    proto = Session(sasl=True, sasl_pwdb=str(path), item_size_max=1024).connect()
    check(proto.receive_data(request(Op.SASL_AUTH, b"PLAIN", bodylen=0x7FFFFFF0)),
          failure(Op.SASL_AUTH, Status.NO_MEMORY))
    for _ in range(16):
        assert proto.receive_data(b"x" * 65536) == b""
        assert len(proto.buffer) <= 65536 and proto.block.parts is None


def test_sasl_plain_without_data_continues_then_a_step_authenticates(sasl):
    check(talk(sasl, START, START, STEP, request(Op.GET, b"k")),
          CONTINUE, CONTINUE, STEPPED, failure(Op.GET, Status.NOT_FOUND))


def test_sasl_a_failed_step_may_be_tried_again(sasl):
    # Cyrus's PLAIN ends a conversation only when it succeeds.
    check(talk(sasl, START, WRONG_STEP, STEP, request(Op.GET, b"k")),
          CONTINUE, failure(Op.SASL_STEP, Status.AUTH_ERROR), STEPPED,
          failure(Op.GET, Status.NOT_FOUND))


def test_sasl_step_before_auth(sasl):
    check(talk(sasl, STEP, request(Op.VERSION), request(Op.GET, b"k")),
          failure(Op.SASL_STEP, Status.AUTH_ERROR), response(Op.VERSION, value=b"1.6.21"),
          REFUSED)


def test_sasl_a_failed_auth_ends_the_conversation(sasl):
    check(talk(sasl, START, WRONG, STEP, AUTH),
          CONTINUE, failure(Op.SASL_AUTH, Status.AUTH_ERROR),
          failure(Op.SASL_STEP, Status.AUTH_ERROR), AUTHENTICATED)


def test_sasl_a_second_auth_after_success_fails_and_unauthenticates(sasl):
    # As memcached with Cyrus: the first auth after a success fails (the
    # connection is then unauthenticated), and it ends that conversation, so
    # that the next one may succeed.
    check(talk(sasl, AUTH, AUTH, request(Op.GET, b"k")),
          AUTHENTICATED, failure(Op.SASL_AUTH, Status.AUTH_ERROR), REFUSED)
    check(talk(sasl, AUTH, AUTH, AUTH, request(Op.GET, b"k")),
          AUTHENTICATED, failure(Op.SASL_AUTH, Status.AUTH_ERROR), AUTHENTICATED,
          failure(Op.GET, Status.NOT_FOUND))


def test_sasl_after_success_a_step_fails_and_so_does_a_new_conversation(sasl):
    # Cyrus refuses to step a conversation that succeeded, and PLAIN without data
    # starts none: it continues, and its step fails.
    check(talk(sasl, AUTH, STEP, request(Op.GET, b"k")),
          AUTHENTICATED, failure(Op.SASL_STEP, Status.AUTH_ERROR), REFUSED)
    check(talk(sasl, AUTH, START, STEP, AUTH, AUTH),
          AUTHENTICATED, CONTINUE, failure(Op.SASL_STEP, Status.AUTH_ERROR),
          failure(Op.SASL_AUTH, Status.AUTH_ERROR), AUTHENTICATED)


def test_sasl_each_connection_authenticates_for_itself(sasl):
    check(talk(sasl, AUTH), AUTHENTICATED)
    check(talk(sasl, request(Op.GET, b"k")), REFUSED)


UNAUTHENTICATED = [
    request(Op.GET, b"k"), request(Op.GETKQ, b"k"), store(Op.SET, b"k", b"v"),
    store(Op.ADDQ, b"k", b"v"), request(Op.APPEND, b"k", b"v"), request(Op.DELETE, b"k"),
    counter(Op.INCREMENT, b"k"), touching(Op.GAT, b"k", 0), request(Op.QUIT), request(Op.QUITQ),
    flush(), request(Op.NOOP), request(Op.STAT), request(Op.STAT, b"reset"),
    request(Op.VERBOSITY, extras=bytes(4)), request(0x50, b"k", b"v"),
    request(Op.GET, b"k", extras=b"x"),              # lengths are checked after
    request(Op.GET, b"k" * 251),
]


@pytest.mark.parametrize("packet", UNAUTHENTICATED,
                         ids=["%02x-%d" % (packet[1], number)
                              for number, packet in enumerate(UNAUTHENTICATED)])
def test_sasl_unauthenticated_commands_are_refused_and_close(sasl, packet):
    reply, closed = closes(sasl, packet, request(Op.VERSION))
    check(reply, failure(packet[1], Status.AUTH_ERROR))
    assert closed


def test_sasl_version_needs_no_authentication(sasl):
    check(talk(sasl, request(Op.VERSION), request(Op.VERSION)),
          response(Op.VERSION, value=b"1.6.21") * 2)


def test_sasl_a_body_shorter_than_its_key_closes_before_authentication(sasl):
    reply, closed = closes(sasl, request(Op.GET, b"kk", bodylen=1))
    check(reply, failure(Op.GET, Status.UNKNOWN_COMMAND))
    assert closed


def test_sasl_attempts_are_counted(sasl):
    # Successes and failures count; a "continue" and a refused mechanism name do not.
    talk(sasl, AUTH)
    talk(sasl, WRONG)
    talk(sasl, STEP)
    talk(sasl, START, STEP)
    talk(sasl, request(Op.SASL_AUTH, b"P" * 33, b"x"))
    stats = stat_packets(talk(sasl, AUTH, request(Op.STAT))[len(AUTHENTICATED):])
    assert (stats[b"auth_cmds"], stats[b"auth_errors"]) == (b"5", b"2")


@pytest.mark.parametrize("packet", [
    request(Op.SASL_LIST_MECHS), request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"secret")),
    request(Op.SASL_STEP, b"PLAIN", b"data")], ids=["list", "auth", "step"])
def test_without_sasl_its_opcodes_are_unknown(packet):
    # Their data is discarded: the noop after them is read.
    proto = Session().connect()
    check(proto.receive_data(packet + NOOP), failure(packet[1], Status.UNKNOWN_COMMAND), DONE)
    assert not proto.closing


def test_sasl_needs_a_password_database(tmp_path):
    with pytest.raises(ValueError, match="MEMCACHED_SASL_PWDB"):
        memg.Server(port=0, sasl=True)
    with pytest.raises(ValueError, match="needs the binary protocol"):
        memg.Server(port=0, sasl=True, sasl_pwdb=str(tmp_path), protocol="ascii")
