"""memg's protocols under random input: they never break, and the text protocol
keeps memcached's semantics.

Two kinds of test:

1. A byte-level fuzz of memg's protocols, in-process without sockets (as
   test_protocol.Session).  Inputs are random bytes, and mutated or spliced copies
   of a corpus of valid commands (every command word, odd numbers, NUL and high
   bytes, lone CR, LF-only lines, lengths claiming 4 GB, truncated data blocks),
   and of a corpus of binary protocol packets (every opcode and its quiet form,
   lengths that do not fit, bodies claiming 4 GB, truncated packets); an input
   whose first byte is the binary magic is read as binary packets (-B auto).
   For each input: memg never sends an internal error; nothing prints a traceback;
   the output is a sequence of well-formed memcached replies (VALUE and VA data
   blocks parsed by the length their header states), or of well-formed response
   packets; the same input cut into random pieces, handed over one piece at a
   time, gets the same replies and leaves the same items (unless a text line is
   longer than memcached reads at once, or a metadump follows other commands,
   where memcached's own answer depends on how the bytes arrive); afterwards a fresh connection can still set and get, the
   store's byte count is the sum of its items' costs, its size histogram matches
   its items, and ``stats`` agrees with the store.
   Hypothesis generates some inputs, and a seeded random loop always runs
   FUZZ_CASES more.

2. A Hypothesis state machine sends random command sequences (set add replace
   append prepend cas get gets gat gats delete incr decr touch flush_all, noreply
   variants, TTLs, four keys) and compares every reply with a model of memcached's
   semantics written here.  It runs against memg with a fake clock (so TTLs and
   delayed flushes expire when a rule advances time), and then the same machine,
   with only the TTLs whose outcome does not depend on a real clock (and no delayed
   flush_all), runs against a real memcached process: the model is memcached's,
   not just memg's.  (Where memcached's own answer depends on timing or on memory
   beyond an item, that run accepts either answer or does not ask; see
   MemcachedMachine.)
"""

import collections
import contextlib
import io
import random
import re
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import memg
import conftest
from conftest import Clock, start_memcached
from test_binary import (HEADER, Op, Status, counter, flush, parse, plain, request, store,
                         touching)
from test_protocol import Session

# The seeded loop runs exactly this many inputs, whatever Hypothesis does.
FUZZ_CASES = 10000
FUZZ_SEED = 20240611

MB = 1024 * 1024
U64 = 2 ** 64 - 1

# --------------------------------------------------------------------------
# Fuzz inputs: a corpus of valid commands, and the pieces to break them with
# --------------------------------------------------------------------------

CORPUS = [
    b"set k 0 0 1\r\nx\r\n", b"set k 5 100 3 noreply\r\nabc\r\n", b"set n 0 0 2\r\n10\r\n",
    b"set e 0 0 0\r\n\r\n", b"set big 0 0 70000\r\n" + b"v" * 70000 + b"\r\n",
    b"add k 0 0 2\r\nhi\r\n", b"replace k 0 -1 1\r\ny\r\n", b"append k 0 0 2\r\nzz\r\n",
    b"prepend k 0 0 2 noreply\r\naa\r\n", b"cas k 0 0 1 1\r\nq\r\n",
    b"cas k 0 0 1 0 noreply\r\nq\r\n",
    b"get k\r\n", b"gets k n k nope\r\n", b"gat 10 k\r\n", b"gats 0 k n\r\n",
    b"get " + b" ".join(b"key%d" % i for i in range(600)) + b"\r\n",
    b"delete k\r\n", b"delete k 0 noreply\r\n", b"delete k 1\r\n",
    b"incr n 1\r\n", b"decr n 5\r\n", b"incr n 18446744073709551615\r\n", b"incr k 1 noreply\r\n",
    b"touch k 10\r\n", b"touch k -1 noreply\r\n",
    b"mg k v f t c s k O123 h l\r\n", b"mg k N30 s v\r\n", b"mg k R30 T10 v q\r\n",
    b"mg a2V5 b v k\r\n", b"mg k u E5\r\n",
    b"ms k 2 T10 F5 c\r\nhi\r\n", b"ms k 2 MA\r\nhi\r\n", b"ms k 1 I C1\r\nx\r\n",
    b"ms k 2 E99 q\r\nhi\r\n", b"ms k 1 MA N10\r\nx\r\n", b"ms AAEC 1 b\r\nx\r\n",
    b"md k q\r\n", b"md k I T30\r\n", b"md k x\r\n", b"md k C1 k O9\r\n",
    b"ma n\r\n", b"ma n MD D10 v\r\n", b"ma n N0 J13 v t c\r\n", b"ma n q\r\n",
    b"mn\r\n", b"me k\r\n", b"me AAEC b\r\n",
    b"flush_all\r\n", b"flush_all 10\r\n", b"flush_all 0 noreply\r\n", b"flush_all -1\r\n",
    b"version\r\n", b"verbosity 1\r\n", b"verbosity 2 noreply\r\n",
    b"stats\r\n", b"stats items\r\n", b"stats slabs\r\n", b"stats settings\r\n",
    b"stats sizes\r\n", b"stats conns\r\n", b"stats reset\r\n", b"stats cachedump 1 0\r\n",
    b"stats detail on\r\n", b"lru_crawler metadump all\r\n", b"lru_crawler crawl all\r\n",
    b"lru_crawler sleep 100\r\n", b"slabs reassign 1 2\r\n", b"slabs automove ratio 0.5\r\n",
    b"lru tune 10 25 0.1 2.0\r\n", b"lru mode flat\r\n", b"lru temp_ttl 61\r\n",
    b"cache_memlimit 100\r\n", b"cache_memlimit 8\r\n",
    b"quit\r\n", b"shutdown\r\n", b"watch mutations\r\n", b"GET / HTTP/1.1\r\n",
]

WORDS = [b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"get", b"gets", b"gat",
         b"gats", b"delete", b"incr", b"decr", b"touch", b"mg", b"ms", b"md", b"ma", b"mn",
         b"me", b"flush_all", b"version", b"verbosity", b"stats", b"cache_memlimit",
         b"lru_crawler", b"slabs", b"lru", b"quit", b"shutdown", b"watch", b"GET", b"m", b""]

# Tokens that sit on parsing edges: int32 and uint64 limits and their neighbours,
# signs, non-decimal forms, key lengths, control and high bytes, meta flags.
ARGS = [
    b"k", b"n", b"0", b"1", b"-1", b"10", b"noreply", b"4294967295", b"4294967296",
    b"4294967297", b"2147483645", b"2147483646", b"2147483647", b"2147483648",
    b"-2147483649", b"18446744073709551615", b"18446744073709551616",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808",
    b"99999999999999999999999", b"+5", b"-0", b"0x10", b"1e3", b"1.5", b"k" * 250,
    b"k" * 251, b"\xff\xfe", b"\x00", b"a\rb", b"a2V5", b"====", b"AA==", b"v", b"q", b"b",
    b"O123", b"O" + b"x" * 40, b"T-1", b"N30", b"R5", b"C0", b"E18446744073709551615", b"MA",
    b"MX", b"MD", b"D99", b"J7", b"Fabc", b"all", b"1,2", b"reset", b"items", b"cachedump",
    b"HTTP/1.1", b"ratio", b"tune", b"on",
]

TERMINATORS = [b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\x00\r\n"]

# Data lengths a storage line may claim: wrapping to 0, beyond INT_MAX - 2, at and
# beyond the item size limit, and far more than the input holds.
LENGTHS = [b"0", b"1", b"5", b"-1", b"4294967295", b"4294967296", b"4294967297",
           b"2147483645", b"2147483646", b"2147483647", b"1048576", b"1048577", b"1000000",
           b"70000"]

MUTATIONS = ["flip", "insert", "delete", "truncate", "duplicate"]


def mutate(data, edits):
    """Apply (kind, position, junk) edits to data; positions wrap around its length."""
    data = bytearray(data)
    for kind, position, junk in edits:
        at = position % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= 1 << (position % 8)
        elif kind == "insert":
            data[at:at] = junk
        elif kind == "delete":
            del data[at:at + len(junk) + 1]
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate":
            data[at:at] = data[at:at + len(junk) + 4]
    return bytes(data)


# -- the binary protocol's packets ------------------------------------------------

KEYS = [b"k", b"n", b"key", b"\x00\x01\x02", b"nope"]     # (the prelude's, and a miss)
BINARY_CORPUS = [
    *[request(opcode, key, opaque=7) for opcode in (Op.GET, Op.GETQ, Op.GETK, Op.GETKQ)
      for key in KEYS],
    *[store(opcode, b"k", b"v", flags=5, exptime=100) for opcode in (
        Op.SET, Op.ADD, Op.REPLACE, Op.SETQ, Op.ADDQ, Op.REPLACEQ)],
    store(Op.SET, b"n", b"12", cas=1), store(Op.ADD, b"new", b"", exptime=0xFFFFFFFF),
    store(Op.SET, b"big", b"v" * 70000), store(Op.REPLACEQ, b"key", b"abc", cas=2 ** 64 - 1),
    store(Op.SET, b"k", b"v", exptime=2592001), store(Op.SETQ, b"\x00\x01\x02", b"\r\n"),
    *[request(opcode, b"k", b"tail") for opcode in (Op.APPEND, Op.PREPEND, Op.APPENDQ,
                                                     Op.PREPENDQ)],
    request(Op.APPEND, b"nope", b"x"), request(Op.PREPEND, b"k", b"x", cas=3),
    *[request(opcode, key, cas=cas) for opcode in (Op.DELETE, Op.DELETEQ) for key, cas in (
        (b"k", 0), (b"nope", 0), (b"n", 2))],
    *[counter(opcode, key, delta, initial, expiration) for opcode in (
        Op.INCREMENT, Op.DECREMENT, Op.INCREMENTQ, Op.DECREMENTQ) for key, delta, initial,
      expiration in ((b"n", 1, 0, 0), (b"new", 5, 7, 10), (b"nope", 1, 1, 0xFFFFFFFF),
                     (b"k", 2 ** 64 - 1, 2 ** 64 - 1, 0))],
    counter(Op.INCREMENT, b"n", cas=1),
    *[touching(opcode, key, exptime) for opcode in (
        Op.TOUCH, Op.GAT, Op.GATQ, Op.GATK, Op.GATKQ) for key, exptime in (
        (b"k", 0), (b"key", 100), (b"nope", 10), (b"n", 2592001))],
    flush(), flush(0), flush(10), flush(opcode=Op.FLUSHQ), flush(1000000000, opcode=Op.FLUSHQ),
    request(Op.NOOP), request(Op.VERSION), request(Op.QUIT), request(Op.QUITQ),
    *[request(Op.STAT, group) for group in (
        b"", b"settings", b"items", b"slabs", b"sizes", b"conns", b"reset", b"nosuch")],
    request(Op.VERBOSITY, extras=bytes(4)) + bytes(4), request(0x50, b"k", b"v") + b"k",
    request(Op.SASL_LIST_MECHS), request(Op.SASL_AUTH, b"PLAIN", plain(b"a", b"b")),
    request(Op.SASL_STEP, b"PLAIN", b"x"),
]
# Packets that do not fit their opcode, claim more than follows, or are cut short.
BINARY_ODD = [
    request(Op.GET, b"k", extras=b"x"), request(Op.GET, b"kk", bodylen=1),
    store(Op.SET, b"k", b"", bodylen=8), request(Op.SET, b"k", b"v"),
    request(Op.GET, b"k" * 251), request(Op.INCREMENT, b"n"), request(Op.NOOP, value=b"v"),
    request(Op.FLUSH, extras=bytes(8)), request(Op.STAT, extras=b"x"),
    store(Op.SET, b"k", b"v", bodylen=0xFFFFFFFF), store(Op.SET, b"k", b"v", bodylen=1048600),
    request(Op.APPEND, b"k", bodylen=0x7FFFFFFF), request(0x50, b"k", bodylen=0xFFFFFFFF),
    request(Op.GET, b"k", bodylen=0xFFFFFFFF), request(Op.NOOP, magic=0x81),
    request(Op.GET, b"key")[:26], request(Op.NOOP)[:10], store(Op.SET, b"k", b"value")[:-2],
]
# Values a length field may be given.
LENGTH_EDGES = {"keylen": [0, 1, 250, 251, 0xFFFF], "extlen": [0, 4, 8, 20, 255],
                "bodylen": [0, 1, 8, 28, 0x7FFFFFFF, 0xFFFFFFFF]}


def relength(packet, field, value):
    """packet with one length field of its header replaced (the bytes after stay)."""
    if len(packet) < 24:
        return packet
    fields = dict(zip(("magic", "opcode", "keylen", "extlen", "datatype", "vbucket",
                       "bodylen", "opaque", "cas"), HEADER.unpack_from(packet)))
    fields[field] = value
    return HEADER.pack(*fields.values()) + packet[24:]


# -- the same inputs as Hypothesis strategies ---------------------------------

numbers = st.integers(-2 ** 70, 2 ** 70).map(lambda n: b"%d" % n)
tokens = st.one_of(st.sampled_from(ARGS), numbers, st.binary(max_size=10))


@st.composite
def command_lines(draw):
    """A line of a command word (or junk) and arguments, maybe a data block."""
    word = draw(st.one_of(st.sampled_from(WORDS), st.binary(max_size=6)))
    args = draw(st.lists(tokens, max_size=8))
    line = draw(st.sampled_from([b" ", b"  "])).join([word] + args)
    line += draw(st.sampled_from(TERMINATORS))
    if draw(st.booleans()):
        line += draw(st.binary(max_size=40)) + draw(st.sampled_from(TERMINATORS))
    return line


@st.composite
def claimed_lengths(draw):
    """A storage line whose length does not match the data that follows."""
    word = draw(st.sampled_from([b"set", b"add", b"append", b"cas", b"ms"]))
    length = draw(st.sampled_from(LENGTHS))
    if word == b"ms":
        line = b"ms k %s T0\r\n" % length
    else:
        line = b"%s k 0 0 %s%s\r\n" % (word, length, b" 1" if word == b"cas" else b"")
    return line + draw(st.binary(max_size=20)) + draw(st.sampled_from(TERMINATORS))


edits = st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 17),
                           st.binary(max_size=8)), max_size=4)
mutated_corpus = st.builds(mutate, st.sampled_from(CORPUS), edits)
# Whole corpus commands weigh double: they keep the cache busy between the junk.
pieces = st.one_of(st.sampled_from(CORPUS), st.sampled_from(CORPUS), mutated_corpus,
                   command_lines(), claimed_lengths(), st.binary(max_size=64))
length_edges = st.sampled_from(sorted(LENGTH_EDGES)).flatmap(
    lambda field: st.tuples(st.just(field), st.sampled_from(LENGTH_EDGES[field])))
binary_pieces = st.one_of(
    st.sampled_from(BINARY_CORPUS), st.sampled_from(BINARY_CORPUS), st.sampled_from(BINARY_ODD),
    st.builds(mutate, st.sampled_from(BINARY_CORPUS), edits),
    st.builds(lambda packet, edge: relength(packet, *edge), st.sampled_from(BINARY_CORPUS),
              length_edges),
    st.binary(max_size=64))
# A binary script opens with a whole packet: its magic byte makes the connection binary.
binary_scripts = st.builds(lambda first, rest: first + b"".join(rest),
                           st.sampled_from(BINARY_CORPUS), st.lists(binary_pieces, max_size=15))
scripts = st.one_of(st.lists(pieces, min_size=1, max_size=16).map(b"".join),
                    st.binary(max_size=512), binary_scripts)


# -- the same inputs from a seeded random.Random --------------------------------

def random_token(rng):
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(ARGS)
    if kind < 0.8:
        return b"%d" % rng.randint(-2 ** 70, 2 ** 70)
    return rng.randbytes(rng.randint(0, 10))


def random_piece(rng):
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(CORPUS)
    if kind < 0.6:
        return mutate(rng.choice(CORPUS), [
            (rng.choice(MUTATIONS), rng.randrange(1 << 17), rng.randbytes(rng.randint(0, 8)))
            for _ in range(rng.randint(1, 4))])
    if kind < 0.8:
        args = [random_token(rng) for _ in range(rng.randint(0, 8))]
        line = b" ".join([rng.choice(WORDS)] + args) + rng.choice(TERMINATORS)
        if rng.random() < 0.5:
            line += rng.randbytes(rng.randint(0, 40)) + rng.choice(TERMINATORS)
        return line
    if kind < 0.88:
        return b"set k 0 0 %s\r\n" % rng.choice(LENGTHS) + rng.randbytes(rng.randint(0, 20))
    return rng.randbytes(rng.randint(0, 64))


def random_binary_piece(rng):
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(BINARY_CORPUS)
    if kind < 0.6:
        return rng.choice(BINARY_ODD)
    if kind < 0.75:
        return mutate(rng.choice(BINARY_CORPUS), [
            (rng.choice(MUTATIONS), rng.randrange(1 << 17), rng.randbytes(rng.randint(0, 8)))
            for _ in range(rng.randint(1, 4))])
    if kind < 0.9:
        field = rng.choice(sorted(LENGTH_EDGES))
        return relength(rng.choice(BINARY_CORPUS), field, rng.choice(LENGTH_EDGES[field]))
    return rng.randbytes(rng.randint(0, 64))


def random_script(rng):
    """A text script, a binary one (three times in ten) or random bytes."""
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 512))
    if kind < 0.4:
        return rng.choice(BINARY_CORPUS) + b"".join(
            random_binary_piece(rng) for _ in range(rng.randint(0, 15)))
    return b"".join(random_piece(rng) for _ in range(rng.randint(1, 16)))


# --------------------------------------------------------------------------
# Fuzz checks: the reply stream, the store, the server afterwards
# --------------------------------------------------------------------------

# Every reply line memg (and memcached) sends, without its "\r\n".  Meta reply
# flags are tokens without spaces; they may hold any other byte an opaque echoes.
_REPLY_LINE = re.compile(rb"""(?x)
    (STORED|NOT_STORED|EXISTS|NOT_FOUND|DELETED|TOUCHED|END|OK|ERROR|RESET|MN)
  | ERROR[ :][^\n]+
  | Error\ TLS\ not\ enabled
  | (CLIENT_ERROR|SERVER_ERROR)\ [^\n]+
  | STAT\ [^ \n]+\ [^\n]*
  | VERSION\ [^\n]+
  | (BADCLASS|NOSPARE|SAME|MEMLIMIT_TOO_SMALL|MEMLIMIT_ADJUST_FAILED)\ [^\n]+
  | (HD|NS|EX|NF|EN)(\ [^ \n]+)*
  | ME\ [^ \n]+\ exp=-?\d+\ la=\d+\ cas=\d+\ fetch=(yes|no)\ cls=\d+\ size=\d+
  | [0-9]+
""")
# Headers of replies followed by a data block of the length they state.
_VALUE = re.compile(rb"VALUE [\x21-\x7e\x80-\xff]{1,250} \d+ (\d+)( \d+)?\r\n")
_VA = re.compile(rb"VA (\d+)( [^ \n]+)*\r\n")
# stats cachedump names keys raw (a binary meta key may hold "\r\n", as in memcached);
# lru_crawler metadump URI-encodes them and ends its lines with "\n" alone.
_ITEM = re.compile(rb"ITEM .{1,250}? \[\d+ b; -?\d+ s\]\r\n", re.S)
_METADUMP = re.compile(rb"key=[^ \n]+ exp=-?\d+ la=\d+ cas=\d+ fetch=(yes|no) cls=\d+ size=\d+\n")


def split_replies(output):
    """The output as a list of replies (a line, or a header and its data block);
    fails at the first byte that does not start a well-formed reply."""
    replies, at = [], 0
    while at < len(output):
        for header in (_VALUE, _VA):
            match = header.match(output, at)
            if match:
                end = match.end() + int(match.group(1))
                assert output[end:end + 2] == b"\r\n", \
                    "data block not ended by CRLF at %d: %r" % (at, output[at:end + 2])
                replies.append(output[at:end + 2])
                at = end + 2
                break
        else:
            match = _ITEM.match(output, at) or _METADUMP.match(output, at)
            if match:
                replies.append(match.group())
                at = match.end()
                continue
            end = output.find(b"\r\n", at)
            assert end >= 0, "reply not ended by CRLF: %r" % output[at:at + 200]
            line = output[at:end]
            assert _REPLY_LINE.fullmatch(line), "malformed reply line: %r" % line
            replies.append(output[at:end + 2])
            at = end + 2
    return replies


def converse(server, script, cuts=()):
    """Everything memg answers to script on one connection, handed over whole or
    cut at the given offsets (an exception fails the test)."""
    bounds = [0] + list(cuts) + [len(script)]
    pieces = [script[start:end] for start, end in zip(bounds, bounds[1:])]
    return conftest.converse(server.service.new_protocol(), *pieces)


def random_cuts(script):
    """Offsets to cut script at, the same for the same script."""
    rng = random.Random(zlib.crc32(script))
    return sorted(rng.sample(range(1, len(script)), min(len(script) - 1, rng.randint(1, 20))))


# What differs between two runs of the same script: statistics of time, CPU and
# traffic, and watchers' time stamps.
_VARYING = re.compile(rb"STAT (\S+) [^\r\n]*|ts=[0-9.]+ gid=\d+")


def comparable(output, binary):
    if binary:       # the value of each statistic's packet
        return [packet._replace(value=b"") if packet.opcode == Op.STAT and packet.key
                else packet for packet in parse(output)]
    return _VARYING.sub(lambda match: match.group(1) or b"ts", output)


def fresh_server():
    server = memg.Server(port=0, track_sizes=True)
    server.store.clock = Clock(1700000000.0)
    assert converse(server, PRELUDE) == b"STORED\r\n" * 3 + b"HD\r\n"
    return server


def split_binary_replies(output):
    """The binary protocol's response packets in output (test_binary.parse: it
    fails on anything else, an internal error's text included), each with a status
    memcached sends."""
    replies = parse(output)
    for reply in replies:
        assert isinstance(reply.status, Status), reply
    return replies


def check_store(store):
    """The store's accounting agrees with its items."""
    items = store.items
    assert store.bytes == sum(memg.item_cost(key, len(memg.unpack_item(item).value))
                              for key, item in items.items())
    assert store.bytes <= store.memory_limit
    assert all(0 < len(key) <= memg.KEY_MAX_LENGTH for key in items)
    # track_sizes is on: ``stats sizes`` counts every item once, in its class.
    counted = collections.Counter(store.size_class(key, item) for key, item in items.items())
    assert all(n >= 0 for n in store.sizes.values())
    assert +store.sizes == counted


def stat(reply, name):
    match = re.search(rb"STAT %s (\d+)\r\n" % name, reply)
    assert match, "no STAT %s in %r" % (name, reply)
    return int(match.group(1))


# Items the corpus names, stored before each script so that its reads and
# modifications find something ("key" is a2V5 in base64, "\x00\x01\x02" AAEC).
PRELUDE = (b"set k 0 0 1\r\nx\r\nset n 3 0 2\r\n10\r\nset key 7 100 3\r\nabc\r\n"
           b"ms AAEC 2 b T0\r\nhi\r\n")


def fuzz_one(script):
    """Run script on a fresh memg and check everything the module docstring says."""
    server = fresh_server()
    log = io.StringIO()
    with contextlib.redirect_stderr(log):       # verbosity 2 in a script logs here
        output = converse(server, script)
        assert b"SERVER_ERROR internal" not in output
        binary = script[:1] == b"\x80"
        if binary:
            split_binary_replies(output)
        else:
            split_replies(output)
        check_store(server.store)
        # (A metadump refuses to follow replies not yet sent, which depends on how
        # the bytes arrive, as in memcached.)
        if len(script) > 1 and (binary or max(map(len, script.split(b"\n"))) <= memg.LINE_LIMIT
                                and b"metadump" not in script):
            twin = fresh_server()
            assert comparable(converse(twin, script, random_cuts(script)), binary) == \
                comparable(output, binary)
            assert twin.store.items == server.store.items
        # The cache still works on a new connection, and stats tell the truth.  The
        # clock first passes any flush_all deadline the script set (int32 Unix times
        # end in 2038): memcached hides items stored in a deadline's last second.
        server.store.clock.now = 2 ** 31 + 10
        assert converse(server, b"set k 0 0 1\r\nx\r\nget k\r\n") == \
            b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n"
        check_store(server.store)
        stats = converse(server, b"stats\r\n")
        assert stat(stats, b"curr_items") == len(server.store.items)
        assert stat(stats, b"bytes") == server.store.bytes
    assert "Traceback" not in log.getvalue()


# -- the checker's own checks: it must refuse what is not a reply ------------------

@pytest.mark.parametrize("output", [
    b"STORED\r\nVALUE k 0 2\r\nx\r\nEND\r\n",       # data block shorter than stated
    b"VA 1 f0\r\nxy\r\n",                            # data block longer than stated
    b"STORED\r\nSTORED",                             # last line not ended
    b"Traceback (most recent call last):\r\n",
    b"STORE\r\n", b"12a\r\n", b"\r\n", b"HD  f1\r\n",
])
def test_split_replies_refuses_malformed_output(output):
    with pytest.raises(AssertionError):
        split_replies(output)


def test_split_replies_reads_data_blocks_by_length():
    output = (b"VALUE k 0 9\r\nEND\r\nOK\r\n\r\nVA 5 f1 Oa\rb\r\nEND\r\n\r\nEND\r\n42\r\n"
              b"ITEM a\r\nb [1 b; 0 s]\r\nkey=a exp=-1 la=1 cas=2 fetch=no cls=1 size=301\n")
    assert split_replies(output) == [
        b"VALUE k 0 9\r\nEND\r\nOK\r\n\r\n", b"VA 5 f1 Oa\rb\r\nEND\r\n\r\n", b"END\r\n",
        b"42\r\n", b"ITEM a\r\nb [1 b; 0 s]\r\n",
        b"key=a exp=-1 la=1 cas=2 fetch=no cls=1 size=301\n"]


@pytest.mark.parametrize("output", [
    b"\x81\x00" + bytes(20),                               # a header cut short
    b"\x80" + bytes(23),                                    # a request's magic
    b"\x81\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05" + bytes(12) + b"abc",   # body cut short
    b"\x81\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x01" + bytes(12) + b"k",     # key beyond body
    b"\x81\x00\x00\x00\x00\x00\x00\x99" + bytes(16),       # no such status
    b"SERVER_ERROR internal error\r\n",
])
def test_split_binary_replies_refuses_malformed_output(output):
    with pytest.raises(AssertionError):
        split_binary_replies(output)


def test_binary_corpus_entries_are_whole_packets():
    # As the text corpus: a noop after each entry is read as the next packet.
    server = memg.Server(port=0)
    server.store.clock = Clock()
    noop = request(Op.NOOP, opaque=0xFEED)
    for packet in BINARY_CORPUS:
        if packet[1] in (Op.QUIT, Op.QUITQ):
            continue                                  # these end the connection
        replies = split_binary_replies(converse(server, packet + noop))
        assert (replies[-1].opcode, replies[-1].opaque) == (Op.NOOP, 0xFEED), packet


def test_corpus_entries_are_whole_commands():
    # The mutations start from the corpus, so each entry must be one complete
    # command that memg parses: an mn after it is read as the next command.
    server = memg.Server(port=0)
    server.store.clock = Clock()
    with contextlib.redirect_stderr(io.StringIO()):
        for command in CORPUS:
            if command.startswith((b"quit", b"watch", b"GET ")):
                continue                              # these end the connection
            assert split_replies(converse(server, command + b"mn\r\n"))[-1] == b"MN\r\n", \
                command


# -- the fuzz itself -----------------------------------------------------------------

@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts)
def test_fuzz_hypothesis(script):
    fuzz_one(script)


def run_seeded(cases, make_script, check):
    """check(script) for each of cases scripts make_script(rng) makes from the seed."""
    rng = random.Random(FUZZ_SEED)
    for case in range(cases):
        script = make_script(rng)
        try:
            check(script)
        except AssertionError as error:
            # The seed makes the case reproducible; the script may be megabytes.
            raise AssertionError("case %d (seed %d), script of %d bytes starting %r: %s" % (
                case, FUZZ_SEED, len(script), script[:200], error)) from error


def test_fuzz_seeded_random():
    run_seeded(FUZZ_CASES, random_script, fuzz_one)


# SASL's packets, for a server with -S: each connection must authenticate first.
SASL_CORPUS = [
    request(Op.SASL_LIST_MECHS), request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"secret")),
    request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"wrong")), request(Op.SASL_AUTH, b"PLAIN"),
    request(Op.SASL_STEP, b"PLAIN", plain(b"alice", b"secret")), request(Op.SASL_STEP, b"PLAIN"),
    request(Op.SASL_AUTH, b"plain", plain(b"alice", b"secret", b"alice")),
    request(Op.SASL_AUTH, b"PLAIN", plain(b"alice", b"secret", b"bob")),
    request(Op.SASL_AUTH, b"P" * 40, b"x"), request(Op.SASL_AUTH, b"CRAM-MD5", b"\0\0\0"),
    request(Op.SASL_AUTH, b"PLAIN", b"\0" * 5), request(Op.SASL_AUTH, b"PLAIN", bodylen=0xFFFFFFFF),
    request(Op.VERSION),
]
SASL_FUZZ_CASES = 1000


def random_sasl_script(rng):
    """SASL's packets and binary pieces; half open with the right credentials, so
    that what follows is served."""
    first = SASL_CORPUS[1] if rng.random() < 0.5 else rng.choice(SASL_CORPUS)
    return first + b"".join(
        rng.choice(SASL_CORPUS) if rng.random() < 0.3 else random_binary_piece(rng)
        for _ in range(rng.randint(0, 12)))


def test_fuzz_sasl_seeded(tmp_path):
    # Well-formed packets, the same whatever the cuts, a store that adds up.
    pwdb = tmp_path / "sasl-passwords"
    pwdb.write_bytes(b"alice:secret\n")

    def check(script):
        outputs, stores = [], []
        for cuts in ((), random_cuts(script) if len(script) > 1 else ()):
            server = memg.Server(port=0, sasl=True, sasl_pwdb=str(pwdb), track_sizes=True)
            server.store.clock = Clock(1700000000.0)
            outputs.append(converse(server, script, cuts))
            stores.append(server.store)
        split_binary_replies(outputs[0])
        assert comparable(outputs[1], True) == comparable(outputs[0], True)
        assert stores[1].items == stores[0].items
        check_store(stores[0])

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        run_seeded(SASL_FUZZ_CASES, random_sasl_script, check)
    assert "Traceback" not in log.getvalue()


# --------------------------------------------------------------------------
# The model: memcached's item semantics, and the state machine that checks it
# --------------------------------------------------------------------------

MAX_RELATIVE_EXPTIME = 60 * 60 * 24 * 30
_SPACE = b" \t\n\v\f\r"


def strtoull(data):
    """memcached's safe_strtoull: optional white space and sign, digits, then the
    end, white space or a NUL (the value is a C string there); None if it fails or
    does not fit 64 bits.  A minus sign is refused only when the wrapped-around
    result would be negative as a signed number."""
    match = re.match(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)", data)
    if match is None:
        return None
    after = data[match.end():match.end() + 1]
    if after and after not in _SPACE and after != b"\x00":
        return None
    number = int(match.group(2))
    if number > U64:
        return None
    if match.group(1) == b"-":
        number = -number & U64
        if number >= 2 ** 63:
            return None
    return number


class Entry:
    """A model item.  linked is when it was stored (memcached's it->time, which a
    delayed flush compares with); version counts modifications across the cache;
    cas is the unique the server showed for this version, once seen."""

    def __init__(self, value, flags, exptime, linked, version):
        self.value, self.flags, self.exptime = value, flags, exptime
        self.linked, self.version, self.cas = linked, version, None


class Model:
    """A memcached cache as a dict, with memcached's rules for expiry and flush_all.

    flush_all sets oldest_live (memcached's name) to a second before its deadline;
    once that time comes, every item stored at or before it is gone -- including
    items stored during that last second.  (memcached also lets a later delayed
    flush_all revive items an immediate one had flushed but not yet unlinked, when
    its LRU crawler has not got to them: timing-dependent, so not modelled, and the
    run against memcached sends no delayed flush.)"""

    def __init__(self, now):
        self.now = now
        self.items = {}
        self.oldest_live = None
        self.versions = 0
        self.uniques = {}          # version -> the CAS unique the server gave it

    def expiry(self, exptime):
        if exptime == 0:
            return 0
        if exptime < 0:
            return -1                                # memcached: already expired
        if exptime > MAX_RELATIVE_EXPTIME:
            # A Unix time.  memcached turns one before its start into "expired";
            # any time already past is just as dead here.
            return exptime if exptime > self.now else -1
        return self.now + exptime

    def find(self, key):
        """The live entry under key, or None (dropping it if dead)."""
        entry = self.items.get(key)
        if entry is None:
            return None
        expired = entry.exptime != 0 and entry.exptime <= self.now
        flushed = (self.oldest_live is not None and self.oldest_live <= self.now
                   and entry.linked <= self.oldest_live)
        if expired or flushed:
            del self.items[key]
            return None
        return entry

    def link(self, key, value, flags, exptime):
        self.versions += 1
        self.items[key] = Entry(value, flags, exptime, self.now, self.versions)

    def flush(self, delay):
        # What the last flush_all has flushed stays gone (memcached would revive
        # items it has not yet unlinked; see above): drop them before it is replaced.
        for key in list(self.items):
            self.find(key)
        deadline = self.expiry(delay) - 1 if delay > 0 else self.now - 1
        self.oldest_live = deadline
        if deadline <= self.now:
            self.items.clear()

    def observe(self, entry, unique):
        """Check a CAS unique gets showed for entry: the same for as long as the
        entry is unmodified, and otherwise new and ordered as the modifications."""
        if entry.cas is not None:
            assert unique == entry.cas, "the CAS unique of an unmodified item changed"
            return
        for version, seen in self.uniques.items():
            assert seen != unique, "two versions share CAS unique %d" % unique
            assert (version < entry.version) == (seen < unique), \
                "CAS uniques are not in modification order"
        entry.cas = unique
        self.uniques[entry.version] = unique


KEYS = [b"a", b"b", b"key:c", b"\xc3\xa9"]
FLAGS = [0, 1, 12345, 2 ** 32 - 1]
# Values: plain, empty, with CRLF inside, and numbers in every form incr reads or
# refuses (never with "MN" inside: the socket client reads up to "MN\r\n").
VALUES = [b"", b"x", b"abc", b"a\r\nb", b"hello world", b"0", b"1", b"9", b"10", b"99",
          b"100", b"007", b" 12", b"12 ", b"+5", b"-5", b"-0", b"12abc", b"12\x00",
          b"7\x00x", b"18446744073709551615", b"18446744073709551614",
          b"18446744073709551616", b"\x00"]
DELTAS = [b"0", b"1", b"2", b"10", b"100", b"18446744073709551615", b"9223372036854775808",
          b"-1", b"abc", b"18446744073709551616"]
STORAGE = [b"set", b"add", b"replace", b"append", b"prepend"]

BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NOT_NUMBER = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
_VALUE_CAS = re.compile(rb"VALUE (\S+) (\d+) (\d+) (\d+)\r\n")

values = st.one_of(st.sampled_from(VALUES),
                   st.binary(max_size=12).filter(lambda v: b"MN" not in v))
keys = st.sampled_from(KEYS)
# noreply one time in four: enough to check it hides every outcome, not so often
# that most replies go unchecked.
noreplies = st.sampled_from([False, False, False, True])


class CacheMachine(RuleBasedStateMachine):
    """Random commands against a server, every reply checked against Model.

    Subclasses give the server (request() sends one command and returns its reply)
    and the TTLs and flush_all delays they can check."""

    def __init__(self):
        super().__init__()
        self.model = Model(self.start_time())

    # -- what subclasses provide ------------------------------------------------------

    def start_time(self):
        raise NotImplementedError

    def request(self, command):
        raise NotImplementedError

    def exptimes(self):
        raise NotImplementedError

    FLUSH_DELAYS = [None, 0, -1]

    # -- helpers ----------------------------------------------------------------------

    def expect(self, command, reply):
        assert self.request(command) == reply, command

    def silent(self, reply, noreply):
        return b"" if noreply else reply

    def retrieve(self, command, key_list, exptime=None):
        """Send a retrieval command; returns the reply and the live entries found,
        touching them first for gat/gats as memcached does."""
        found = []
        for key in key_list:
            entry = self.model.find(key)
            if entry is not None:
                if exptime is not None:
                    entry.exptime = self.model.expiry(exptime)
                found.append((key, entry))
        line = command if exptime is None else command + b" %d" % exptime
        return self.request(line + b" " + b" ".join(key_list) + b"\r\n"), found

    def check_with_cas(self, reply, found):
        """A gets/gats reply: the values the model expects, and CAS uniques that
        follow the model's modifications."""
        at = 0
        for key, entry in found:
            match = _VALUE_CAS.match(reply, at)
            assert match, "expected VALUE %r at %d of %r" % (key, at, reply)
            assert match.group(1, 2, 3) == (key, b"%d" % entry.flags, b"%d" % len(entry.value))
            start = match.end()
            assert reply[start:start + len(entry.value) + 2] == entry.value + b"\r\n"
            self.model.observe(entry, int(match.group(4)))
            at = start + len(entry.value) + 2
        assert reply[at:] == b"END\r\n", reply

    def aim(self, data, key, fits=lambda entry: True):
        """Two times in three, a key holding a live item (that fits), so that most
        commands find something; else key, which may miss."""
        model = self.model
        live = sorted(k for k in list(model.items) if model.find(k) and fits(model.items[k]))
        if live and data.draw(st.sampled_from([True, True, False]), label="aim"):
            return data.draw(st.sampled_from(live), label="live key")
        return key

    def gets(self, key):
        reply, found = self.retrieve(b"gets", [key])
        self.check_with_cas(reply, found)
        return found[0][1] if found else None

    # -- storage --------------------------------------------------------------------------

    # Every run starts with all keys stored: Hypothesis enables a random subset of the
    # rules in each run, and one without storage rules would only ever miss.
    @initialize(contents=st.lists(values, min_size=len(KEYS), max_size=len(KEYS)))
    def fill(self, contents):
        for key, value in zip(KEYS, contents):
            self.model.link(key, value, 0, 0)
            self.expect(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value), b"STORED\r\n")

    @rule(command=st.sampled_from(STORAGE), key=keys, flags=st.sampled_from(FLAGS),
          data=st.data(), value=values, noreply=noreplies)
    def store(self, command, key, flags, data, value, noreply):
        exptime = data.draw(st.sampled_from(self.exptimes()), label="exptime")
        if command != b"set":
            key = self.aim(data, key)
        model = self.model
        entry = model.find(key)
        stored = (command == b"set" or (command == b"add") == (entry is None))
        if stored and command in (b"append", b"prepend"):
            joined = entry.value + value if command == b"append" else value + entry.value
            model.link(key, joined, entry.flags, entry.exptime)  # keeps flags and TTL
        elif stored:
            model.link(key, value, flags, model.expiry(exptime))
        line = b"%s %s %d %d %d%s\r\n%s\r\n" % (command, key, flags, exptime, len(value),
                                               b" noreply" if noreply else b"", value)
        self.expect(line, self.silent(b"STORED\r\n" if stored else b"NOT_STORED\r\n",
                                      noreply))

    @rule(key=keys, right=st.booleans(), flags=st.sampled_from(FLAGS), data=st.data(),
          value=values, noreply=noreplies)
    def cas(self, key, right, flags, data, value, noreply):
        exptime = data.draw(st.sampled_from(self.exptimes()), label="exptime")
        key = self.aim(data, key)
        model = self.model
        entry = self.gets(key) if right else model.find(key)
        if right and entry is not None:
            unique = entry.cas
        else:
            # A unique this version cannot have: another version's, 0 (which no
            # item has) or one never reached.
            others = [u for v, u in model.uniques.items() if entry is None or v != entry.version]
            unique = data.draw(st.sampled_from(others + [0, 2 ** 63 + 1]), label="unique")
        if entry is None:
            reply = b"NOT_FOUND\r\n"
        elif unique != entry.cas:
            reply = b"EXISTS\r\n"
        else:
            reply = b"STORED\r\n"
            model.link(key, value, flags, model.expiry(exptime))
        line = b"cas %s %d %d %d %d%s\r\n%s\r\n" % (key, flags, exptime, len(value), unique,
                                                   b" noreply" if noreply else b"", value)
        self.expect(line, self.silent(reply, noreply))

    # -- retrieval ------------------------------------------------------------------------

    @rule(key_list=st.lists(keys, min_size=1, max_size=5))
    def get(self, key_list):
        self.check_get(key_list)

    def check_get(self, key_list):
        reply, found = self.retrieve(b"get", key_list)
        assert reply == b"".join(b"VALUE %s %d %d\r\n%s\r\n" % (
            key, entry.flags, len(entry.value), entry.value) for key, entry in found) + b"END\r\n"

    @rule(key_list=st.lists(keys, min_size=1, max_size=5))
    def gets_many(self, key_list):
        self.check_with_cas(*self.retrieve(b"gets", key_list))

    @rule(command=st.sampled_from([b"gat", b"gats"]),
          key_list=st.lists(keys, min_size=1, max_size=3), data=st.data())
    def gat(self, command, key_list, data):
        exptime = data.draw(st.sampled_from(self.exptimes()), label="exptime")
        reply, found = self.retrieve(command, key_list, exptime)
        if command == b"gats":
            self.check_with_cas(reply, found)
        else:
            assert reply == b"".join(b"VALUE %s %d %d\r\n%s\r\n" % (
                key, entry.flags, len(entry.value), entry.value)
                for key, entry in found) + b"END\r\n"

    # -- delete, incr, decr, touch ----------------------------------------------------

    @rule(key=keys, noreply=noreplies, data=st.data())
    def delete(self, key, noreply, data):
        key = self.aim(data, key)
        found = self.model.find(key) is not None
        self.model.items.pop(key, None)
        self.expect(b"delete %s%s\r\n" % (key, b" noreply" if noreply else b""),
                    self.silent(b"DELETED\r\n" if found else b"NOT_FOUND\r\n", noreply))

    @rule(key=keys, value=st.sampled_from([v for v in VALUES if strtoull(v) is not None]))
    def store_number(self, key, value):
        # Numbers often enough that incr and decr mostly find one.
        self.model.link(key, value, 0, 0)
        self.expect(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value), b"STORED\r\n")

    @rule(incr=st.booleans(), key=keys, delta=st.sampled_from(DELTAS), noreply=noreplies,
          data=st.data())
    def arithmetic(self, incr, key, delta, noreply, data):
        model = self.model
        key = self.aim(data, key, lambda entry: strtoull(entry.value) is not None)
        amount = strtoull(delta)
        entry = model.find(key) if amount is not None else None
        if entry is not None and not self.predictable(entry.value):
            return
        number = strtoull(entry.value) if entry is not None and entry.value else None
        digits = stored = None
        if amount is None:
            reply = BAD_DELTA
        elif entry is None:
            reply = b"NOT_FOUND\r\n"
        elif number is None:
            reply = NOT_NUMBER
        else:
            number = (number + amount) & U64 if incr else max(0, number - amount)
            digits = b"%d" % number
            reply = digits + b"\r\n"
            # memcached writes a result no longer than the old value in place,
            # padded with spaces; a longer one makes a new item.
            stored = digits
            if len(digits) <= len(entry.value):
                stored = digits.ljust(len(entry.value))
            model.link(key, stored, entry.flags, entry.exptime)
        line = b"%s %s %s%s\r\n" % (b"incr" if incr else b"decr", key, delta,
                                    b" noreply" if noreply else b"")
        self.expect(line, self.silent(reply, noreply))
        if stored != digits:
            self.shortened(key, digits)

    def predictable(self, value):
        """Whether the server's incr and decr have a defined answer for value."""
        return True

    def shortened(self, key, digits):
        """An incr or decr result was padded to the old length.  memg always pads."""

    @rule(key=keys, data=st.data(), noreply=noreplies)
    def touch(self, key, data, noreply):
        exptime = data.draw(st.sampled_from(self.exptimes()), label="exptime")
        key = self.aim(data, key)
        entry = self.model.find(key)
        if entry is not None:
            entry.exptime = self.model.expiry(exptime)      # the CAS unique stays
        self.expect(b"touch %s %d%s\r\n" % (key, exptime, b" noreply" if noreply else b""),
                    self.silent(b"TOUCHED\r\n" if entry else b"NOT_FOUND\r\n", noreply))

    # Only when there is something to flush: else most steps find an empty cache.
    @precondition(lambda self: len(self.model.items) >= 2)
    @rule(data=st.data(), noreply=noreplies)
    def flush_all(self, data, noreply):
        delay = data.draw(st.sampled_from(self.FLUSH_DELAYS), label="delay")
        model = self.model
        if model.oldest_live is not None and model.oldest_live <= model.now and any(
                entry.linked <= model.oldest_live for entry in model.items.values()):
            # A deadline that has passed takes effect for an item when the server
            # next looks it up (or its crawler or sweep gets there first): a new
            # flush_all before that revives the item, in memcached and memg alike,
            # by timing.  So look at every key first.
            self.check_get(KEYS)
        model.flush(delay or 0)
        line = b"flush_all" + (b"" if delay is None else b" %d" % delay)
        self.expect(line + (b" noreply" if noreply else b"") + b"\r\n",
                    self.silent(b"OK\r\n", noreply))


class MemgMachine(CacheMachine):
    """The machine against memg in-process, with a fake clock that a rule moves."""

    FLUSH_DELAYS = [None, 0, -1, 1, 2, 10, 100]

    def start_time(self):
        self.session = Session(memory_limit=64 * MB)
        # Mostly no expiry, so that items live long enough to be worked on.
        self.exptime_choices = [0, 0, 0, 0, -1, 1, 2, 10, 100, MAX_RELATIVE_EXPTIME,
                                int(self.session.clock.now) + 50, MAX_RELATIVE_EXPTIME + 1]
        return int(self.session.clock.now)

    def exptimes(self):
        return self.exptime_choices

    def request(self, command):
        # Each command is followed by mn, so that a reply noreply should have
        # hidden shows up before the MN, not lost at the end.
        reply = self.session.send(command + b"mn\r\n")
        assert reply.endswith(b"MN\r\n"), reply
        return reply[:-4]

    @rule(seconds=st.sampled_from([1, 1, 2, 5, 9, 60, 100]))
    def advance_time(self, seconds):
        self.session.advance(seconds)
        self.model.now += seconds

    @invariant()
    def store_is_consistent(self):
        store = self.session.server.store
        assert store.snapshot()["evictions"] == 0    # the model never evicts
        assert store.bytes == sum(memg.item_cost(key, memg.unpack_item(item).size)
                                  for key, item in store.items.items())


class MemcachedMachine(CacheMachine):
    """The same machine against a real memcached over a socket.  Time is memcached's
    own, so only TTLs whose outcome it cannot change are sent: none, already past, or
    far enough ahead; and flush_all only without a delay."""

    server = None          # set by the test: a conftest ServerProcess

    def start_time(self):
        self.client = self.server.connect()
        assert self.client.request(b"flush_all\r\n") == b"OK\r\n"
        now = int(time.time())
        self.exptime_choices = [0, 0, 0, 0, -1, 1000, MAX_RELATIVE_EXPTIME, now + 1000,
                                MAX_RELATIVE_EXPTIME + 1]
        return now

    def exptimes(self):
        return self.exptime_choices

    def request(self, command):
        reply = self.client.request(command + b"mn\r\n", terminator=b"MN\r\n")
        assert reply.endswith(b"MN\r\n"), reply
        return reply[:-4]

    def predictable(self, value):
        # memcached 1.6.18 reads two kinds of stored value past their end, so that
        # its answer depends on whatever memory follows the item (memg's answers,
        # which the memg run checks, are non-numeric and the sum):
        # - nothing but white space: strtoull skips it and its "\r\n" and takes
        #   digits from beyond;
        # - a number of 2**63 or more: safe_strtoull looks for a minus sign with
        #   strchr, up to the next NUL, and calls it non-numeric if one is there.
        # (Deltas are tokens of the command line, which ends in a NUL: no problem.)
        if value and not value.strip(_SPACE):
            return False
        number = strtoull(value)
        return number is None or number < 2 ** 63

    def shortened(self, key, digits):
        """memcached pads a shorter result in place only if no other thread holds
        the item just then (refcount 2; its LRU maintainer sometimes does); else it
        links a new item of the digits alone.  Accept either, then store the padded
        form again: what follows must not depend on the choice, or Hypothesis's
        replays of an example would draw differently (the model steers draws)."""
        model = self.model
        entry = model.items[key]
        reply = self.request(b"get %s\r\n" % key)
        assert reply in [b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, entry.flags, len(v), v)
                         for v in (entry.value, digits)], reply
        # (entry.exptime is 0 or a Unix time, which set takes as it is.)
        model.link(key, entry.value, entry.flags, entry.exptime)
        self.expect(b"set %s %d %d %d\r\n%s\r\n" % (key, entry.flags, entry.exptime,
                                                     len(entry.value), entry.value),
                    b"STORED\r\n")

    def teardown(self):
        self.client.close()


def test_memg_matches_the_model():
    run_state_machine_as_test(MemgMachine, settings=settings(
        max_examples=250, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow]))


@pytest.fixture(scope="module")
def memcached_server():
    server = start_memcached()
    yield server
    server.stop()


def test_memcached_matches_the_model(memcached_server):
    MemcachedMachine.server = memcached_server
    run_state_machine_as_test(MemcachedMachine, settings=settings(
        max_examples=100, stateful_step_count=40, deadline=None, report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow]))
