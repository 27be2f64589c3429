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
