#!/usr/bin/env python3
"""memg: a memcached-compatible in-memory key-value server in one Python file.

memg speaks memcached's text protocol (the classic commands and the meta commands)
closely enough that memcached's clients cannot tell the difference.  It needs only
the Python standard library.  Run it with ``python memg.py`` and point any memcached
client at 127.0.0.1:11211; ``python memg.py -h`` lists the options.

The file reads top to bottom in the order data flows:

1. settings      -- each option once: its field drives the command line and
                    ``stats settings``
2. the store     -- items, expiry, memory accounting and the LRU, behind one lock;
                    it knows nothing of sockets or the wire format
3. the service   -- what every connection shares: the store, counters, statistics,
                    watchers, credentials, the crawler
4. the protocol  -- memcached's text protocol without I/O: bytes in, replies out,
                    one handler per command, found through a table
5. the engines   -- what moves the bytes: a thread per connection (the default) or
                    an asyncio event loop (on uvloop when it is installed); each
                    enforces what is about connections (limits, idle time, output
                    bounds, clean stop); ``Server`` puts a service and an engine
                    together
6. the command line
7. the pytest plugin -- a ``memg_server`` fixture for other projects' tests
"""

import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import errno
import glob
import hmac
import itertools
import mmap
import os
import re
import select
import selectors
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import zlib
from time import monotonic
from typing import Optional

__version__ = "0.1.0"
# What ``version`` answers, in both protocols: the memcached release whose protocol
# memg follows.  Clients read the version as the last x.y.z in the reply, so it is
# that alone; ``memg -V`` and the start-up line of ``memg -v`` tell memg apart (``stats``
# shows memcached's statistics alone, as tools that count them expect).
VERSION = "1.6.21"

KB = 1024
MB = 1024 * KB


# --------------------------------------------------------------------------
# 1. Settings
# --------------------------------------------------------------------------

def parse_size(text, unit):
    """A size such as 64, 512k, 2m or 1g; a bare number is in ``unit`` bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    if match is None:
        raise ValueError("bad size %r" % text)
    scale = {"": unit, "k": KB, "m": MB, "g": 1024 * MB}[match.group(2).lower()]
    return int(match.group(1)) * scale


def yes_no(value):
    return "yes" if value else "no"


# OpenSSL's verify flags for each of memcached's ssl_verify_mode values, which its
# stats settings show: none; peer; peer and fail if none; and client once.
VERIFY_FLAGS = {0: 0, 1: 1, 2: 3, 3: 7}


def memcached_port(text):
    """A port as memcached's -p and -U take it: 0 is none, -1 any free one (None
    and 0 in Settings, as Python's socket calls have them)."""
    number = int(text)
    return None if number == 0 else 0 if number == -1 else number


def option(default, *flags, help, stat=None, show=str, parse=None, metavar=None,
           choices=None, extended=False):
    """A setting: its default; the command-line flags that set it (a flag on a
    True/False setting flips the default); with extended, ``-o NAME[=VALUE]`` sets
    it instead; parse turns the command line's text into the value; stat and show
    give memcached's name for it in ``stats settings`` and how it reads there."""
    return dataclasses.field(default=default, metadata=dict(
        flags=flags, help=help, stat=stat, show=show, parse=parse, metavar=metavar,
        choices=choices, extended=extended))


@dataclasses.dataclass
class Settings:
    """Everything a user can choose.  ``Server(**settings)`` takes these fields, the
    command line is built from them, and ``stats settings`` shows them in this order
    (memcached's)."""

    memory_limit: int = option(
        64 * MB, "-m", "--memory-limit", parse=lambda text: parse_size(text, MB),
        metavar="MB", stat="maxbytes", help="item memory in megabytes (default: 64)")
    max_connections: int = option(
        1024, "-c", "--conn-limit", parse=int, metavar="N", stat="maxconns",
        help="max simultaneous connections (default: 1024)")
    port: Optional[int] = option(
        11211, "-p", "--port", parse=lambda text: memcached_port(text), stat="tcpport",
        show=lambda port: port or 0,
        help="TCP port to listen on: 0 turns TCP off, -1 picks a free one (memcached's "
             "rules; memg.Server takes None for off and 0 for a free one) (default: "
             "11211, or the UDP port if -U is given)")
    udp_port: Optional[int] = option(
        None, "-U", "--udp-port", parse=lambda text: memcached_port(text), stat="udpport",
        show=lambda port: port or 0,
        help="UDP port to serve memcached's UDP framing on too: 0 (the default) turns it "
             "off, -1 picks a free one; a reflection risk beyond loopback")
    host: str = option(
        "127.0.0.1", "-l", "--listen", metavar="ADDR", stat="inter",
        help="interfaces to listen on, comma separated, host or host:port (default: "
             "127.0.0.1; memcached's default is every interface)")
    verbose: int = option(
        0, "-v", "--verbose", stat="verbosity",
        help="-v: errors and warnings; -vv: also every command and reply")
    evict: bool = option(
        True, "-M", "--disable-evictions", stat="evictions",
        show=lambda on: "on" if on else "off",
        help="return an error when memory is full instead of evicting")
    unix_socket: Optional[str] = option(
        None, "-s", "--unix-socket", metavar="FILE", stat="domain_socket",
        show=lambda path: path or "NULL", help="UNIX socket to listen on (disables TCP)")
    unix_mask: int = option(
        0o700, "-a", "--unix-mask", parse=lambda text: int(text, 8), metavar="MASK",
        stat="umask", show=lambda mask: "%o" % mask,
        help="access mask for the UNIX socket, in octal (default: 700)")
    enable_shutdown: bool = option(
        False, "-A", "--enable-shutdown", stat="shutdown_command", show=yes_no,
        help='enable the "shutdown" command')
    growth_factor: float = option(
        1.25, "-f", "--slab-growth-factor", parse=float, metavar="FACTOR",
        stat="growth_factor", show="%.2f".__mod__,
        help="memcached's slab classes (stats items, stats slabs): each class's chunk "
             "this much larger than the last (default: 1.25)")
    chunk_size: int = option(
        48, "-n", "--slab-min-size", parse=int, metavar="BYTES", stat="chunk_size",
        help="memcached's slab classes: the smallest chunk's room for key, value and "
             "flags (default: 48)")
    threads: int = option(
        4, "-t", "--threads", parse=int, stat="num_threads",
        help="accepted for compatibility and reported by stats (default: 4)")
    detail_delimiter: str = option(
        ":", "-D", metavar="CHAR", stat="stat_key_prefix",
        help="stats detail counts keys by their prefix up to this character (default: :)")
    detail_enabled: bool = option(
        False, stat="detail_enabled", show=yes_no,
        help="stats detail on|off turns this on and off while memg serves")
    reqs_per_event: int = option(
        20, "-R", "--max-reqs-per-event", parse=int, metavar="N", stat="reqs_per_event",
        help="commands a connection runs in a row while others wait their turn (default: "
             "20)")
    use_cas: bool = option(
        True, "-C", "--disable-cas", stat="cas_enabled", show=yes_no, help="disable CAS")
    backlog: int = option(
        1024, "-b", "--listen-backlog", parse=int, metavar="N", stat="tcp_backlog",
        help="listen backlog (default: 1024)")
    protocol: Optional[str] = option(
        None, "-B", "--protocol", choices=("ascii", "auto", "binary"),
        stat="binding_protocol", show=lambda name: "auto-negotiate" if name == "auto" else name,
        help="protocol: ascii, binary or auto (the first byte decides; the default, but "
             "binary with -S and ascii with -Y)")
    sasl: bool = option(
        False, "-S", "--enable-sasl", stat="auth_enabled_sasl", show=yes_no,
        help="require SASL authentication (PLAIN; the binary protocol only) with the "
             "user:password lines of the file named by $MEMCACHED_SASL_PWDB")
    sasl_pwdb: Optional[str] = option(
        None, help="the user:password file of -S (the command line takes it from the "
                   "environment variable MEMCACHED_SASL_PWDB, as memcached)")
    auth_file: Optional[str] = option(
        None, "-Y", "--auth-file", metavar="FILE", stat="auth_enabled_ascii",
        show=lambda path: path or "no",
        help="require clients to authenticate first with a user:password line of FILE "
             "(memcached's ASCII authentication; see README)")
    item_size_max: int = option(
        1 * MB, "-I", "--max-item-size", parse=lambda text: parse_size(text, 1),
        metavar="SIZE", stat="item_size_max",
        help="max item size, as 512k or 2m (default: 1m, min: 1k, max: 1024m)")
    slab_chunk_max: Optional[int] = option(
        None, parse=int, extended=True, stat="slab_chunk_max",
        help="-o slab_chunk_max=BYTES: memcached's largest slab chunk; larger items "
             "take several (default: half of a 1 MB page, the whole page under "
             "no_modern up to -I 1m)")
    lru_crawler: bool = option(
        True, extended=True, stat="lru_crawler", show=yes_no,
        help="-o lru_crawler, no_lru_crawler: the LRU crawler, which reclaims expired "
             "items (lru_crawler crawl and metadump; with the maintainer, runs of its "
             "own, as memcached schedules them) (default: on)")
    lru_crawler_sleep: int = option(
        100, parse=int, extended=True, stat="lru_crawler_sleep",
        help="-o lru_crawler_sleep=MICROSECONDS: accepted and shown; memg's crawler "
             "lets other work in after each thousand items instead (default: 100)")
    lru_crawler_tocrawl: int = option(
        0, parse=int, extended=True, stat="lru_crawler_tocrawl",
        help="-o lru_crawler_tocrawl=N: a crawl looks at N items at most of each class "
             "in each sub-LRU (default: 0, all)")
    flush_enabled: bool = option(
        True, "-F", "--disable-flush-all", stat="flush_enabled", show=yes_no,
        help="disable flush_all")
    dump_enabled: bool = option(
        True, "-X", "--disable-dumping", stat="dump_enabled", show=yes_no,
        help="disable stats cachedump and lru_crawler metadump")
    watch_enabled: bool = option(
        True, "-W", "--disable-watch", help="disable watch commands (live logging)")
    lru_maintainer: bool = option(
        True, extended=True, stat="lru_maintainer_thread", show=yes_no,
        help="-o lru_maintainer, no_lru_maintainer: the LRU maintainer, which each "
             "second moves items between the parts of the segmented LRU and reclaims "
             "expired ones at their tails; without it the LRU is flat (default: on)")
    lru_segmented: bool = option(
        True, stat="lru_segmented", show=yes_no,
        help="the segmented LRU (HOT, WARM, COLD): an item read twice is kept from "
             "eviction longer than one read once or never; otherwise a flat LRU, where a "
             "read moves an item up (on with the maintainer; lru mode flat|segmented "
             "switches while serving)")
    hot_lru_pct: int = option(
        20, parse=int, extended=True, stat="hot_lru_pct",
        help="-o hot_lru_pct=N: the share of the LRU's bytes that HOT keeps at most, in "
             "percent (default: 20)")
    warm_lru_pct: int = option(
        40, parse=int, extended=True, stat="warm_lru_pct",
        help="-o warm_lru_pct=N: WARM's share, in percent (default: 40)")
    hot_max_factor: float = option(
        0.2, parse=float, extended=True, stat="hot_max_factor", show=lambda f: "%.2f" % f,
        help="-o hot_max_factor=F: an item idle F times as long as COLD's least recently "
             "used one leaves HOT (default: 0.2)")
    warm_max_factor: float = option(
        2.0, parse=float, extended=True, stat="warm_max_factor", show=lambda f: "%.2f" % f,
        help="-o warm_max_factor=F: the same for WARM (default: 2.0)")
    temp_lru: bool = option(
        False, stat="temp_lru", show=yes_no,
        help="the TEMP LRU, of the items whose TTL is at most temporary_ttl, which are "
             "never evicted (-o temporary_ttl turns it on; lru temp_ttl switches)")
    temporary_ttl: int = option(
        61, parse=int, extended=True, stat="temporary_ttl",
        help="-o temporary_ttl=SECONDS: turn the TEMP LRU on, for items whose TTL is at "
             "most this (needs the maintainer) (default: off; 61)")
    idle_timeout: int = option(
        0, parse=int, extended=True, stat="idle_timeout",
        help="-o idle_timeout=SECONDS: close clients idle that long (0: never)")
    watcher_logbuf_size: int = option(
        256 * KB, parse=lambda text: parse_size(text, KB), extended=True,
        stat="watcher_logbuf_size",
        help="-o watcher_logbuf_size=KB: log lines a watcher may fall behind by, in "
             "kilobytes, before it misses some (default: 256)")
    track_sizes: bool = option(
        False, extended=True, stat="track_sizes", show=yes_no,
        help="-o track_sizes: keep the item size histogram of stats sizes")
    no_modern: bool = option(
        False, extended=True,
        help="-o no_modern: memcached 1.4's defaults where memg has them (slab_chunk_max)")
    ssl_enabled: bool = option(
        False, "-Z", "--enable-ssl", stat="ssl_enabled", show=yes_no,
        help="serve TLS on every TCP listener but those -l names with notls: (needs "
             "-o ssl_chain_cert)")
    ssl_chain_cert: Optional[str] = option(
        None, extended=True, stat="ssl_chain_cert", show=lambda path: path or "(null)",
        help="-o ssl_chain_cert=FILE: the server's certificate chain, PEM")
    ssl_key: Optional[str] = option(
        None, extended=True, stat="ssl_key", show=lambda path: path or "(null)",
        help="-o ssl_key=FILE: its private key, PEM, if not in the chain's file")
    ssl_verify_mode: int = option(
        0, parse=int, extended=True, stat="ssl_verify_mode",
        show=lambda mode: VERIFY_FLAGS.get(mode, mode),
        help="-o ssl_verify_mode=N: client certificates: 0 not asked for, 1 checked if "
             "given, 2 required, 3 required once")
    ssl_keyformat: int = option(
        1, parse=int, extended=True, stat="ssl_keyformat",
        help="-o ssl_keyformat=1: the key's format: PEM (1) alone")
    ssl_ciphers: Optional[str] = option(
        None, extended=True, stat="ssl_ciphers", show=lambda ciphers: ciphers or "NULL",
        help="-o ssl_ciphers=LIST: OpenSSL's cipher list for TLS up to 1.2")
    ssl_ca_cert: Optional[str] = option(
        None, extended=True, stat="ssl_ca_cert", show=lambda path: path or "NULL",
        help="-o ssl_ca_cert=FILE: the CAs whose client certificates are accepted, PEM")
    ssl_wbuf_size: int = option(
        16, parse=int, extended=True, stat="ssl_wbuf_size", show=lambda size: size * KB,
        help="-o ssl_wbuf_size=KB: accepted; memg's TLS writes need no buffer of their "
             "own")
    ssl_session_cache: bool = option(
        False, extended=True, stat="ssl_session_cache", show=yes_no,
        help="-o ssl_session_cache: accepted; sessions are OpenSSL's to cache")
    ssl_kernel_tls: bool = option(
        False, extended=True, stat="ssl_kernel_tls", show=yes_no,
        help="-o ssl_kernel_tls: kernel TLS offload, where Python and OpenSSL have it")
    ssl_min_version: int = option(
        2, parse=int, extended=True, stat="ssl_min_version",
        show=lambda version: "tlsv1.%d" % version,
        help="-o ssl_min_version=N: the oldest TLS accepted: 0 for 1.0 ... 3 for 1.3 "
             "(default: 2)")
    ssl_context: Optional[object] = option(
        None, help="an ssl.SSLContext to serve TLS with, instead of the files (memg.Server "
                   "only)")
    memory_file: Optional[str] = option(
        None, "-e", "--memory-file", metavar="FILE", stat="memory_file",
        show=lambda path: path or "(null)",
        help="keep the cache across restarts in FILE: a snapshot of memg's own, written "
             "when memg stops (SIGUSR1, SIGTERM, SIGINT) and read when it starts")
    user: Optional[str] = option(
        None, "-u", "--user", help="drop root privileges to this user after binding")
    pid_file: Optional[str] = option(
        None, "-P", "--pidfile", metavar="FILE",
        help="write the process id to FILE (removed when memg stops)")
    daemonize: bool = option(
        False, "-d", "--daemon",
        help="run in the background, in a session of its own, with stdin, stdout and "
             "stderr on /dev/null (stderr kept with -v); memg returns once it listens "
             "(needs fork: not on Windows)")
    engine: str = option(
        "threads", "--engine", choices=lambda: sorted(ENGINES),
        help="how connections are served: threads (a thread per connection, the "
             "default) or asyncio (an event loop; on uvloop when it is installed)")
    event_loop: str = option(
        "auto", "--event-loop", choices=("auto", "uvloop", "stdlib"),
        help="the asyncio engine's event loop: uvloop's when it is installed (auto), or "
             "the standard library's")
    single: bool = option(
        False, "--single",
        help="serve one connection, then exit (threads; for python -m cProfile memg.py "
             "--single)")
    debug_commands: bool = option(
        False, "--debug-commands",
        help="serve the commands of memcached's debug build (memcached-debug), which its "
             "test harness sends: debugtime N moves the cache's clock N seconds ahead")

    def __post_init__(self):
        """Refuse what memg cannot honour, with the option's name in the message."""
        # As memcached: SASL exists only in the binary protocol, -Y only in the text.
        for enabled, needed, name in ((self.sasl, "binary", "-S"),
                                      (self.auth_file, "ascii", "-Y")):
            if enabled and self.protocol is None:
                self.protocol = needed
            elif enabled and self.protocol != needed:
                raise ValueError("%s needs the %s protocol (-B %s)" % (name, needed, needed))
        self.protocol = self.protocol or "auto"
        if self.sasl and self.udp_port is not None:
            raise ValueError("UDP (-U) cannot authenticate with SASL (-S), as memcached's "
                             "cannot")
        if self.ssl_context is not None:
            self.ssl_enabled = True
        elif self.ssl_enabled and not self.ssl_chain_cert:
            raise ValueError("TLS (-Z) needs a certificate: -o ssl_chain_cert=FILE")
        if self.ssl_enabled and self.port is None:
            raise ValueError("TLS (-Z) needs a TCP port (-p)")
        if self.ssl_verify_mode not in VERIFY_FLAGS:
            raise ValueError("ssl_verify_mode must be 0, 1, 2 or 3")
        if self.ssl_min_version not in range(4):
            raise ValueError("ssl_min_version must be 0, 1, 2 or 3")
        if self.ssl_keyformat != 1:
            raise ValueError("ssl_keyformat: only PEM (1) is supported")
        if any(part.strip().startswith("notls:") for part in self.host.split(",")) and (
                not self.ssl_enabled):
            raise ValueError("'notls' option is valid only when SSL is enabled")
        if self.sasl and not self.sasl_pwdb:
            raise ValueError("-S needs the environment variable MEMCACHED_SASL_PWDB naming "
                             "a file of user:password lines")
        if self.daemonize and not hasattr(os, "fork"):
            raise ValueError("-d needs fork(), which this platform does not have: run "
                             "memg under a service manager instead")
        if self.unix_socket and not hasattr(socket, "AF_UNIX"):
            raise ValueError("Unix sockets (-s) are not available on this platform")
        for name in ("port", "udp_port"):
            if not 0 <= (getattr(self, name) or 0) <= 65535:
                raise ValueError("%s (%s) must be from -1 to 65535" % (
                    name.replace("_", " "), self.flag(name)))
        if not 1 * KB <= self.item_size_max <= 1024 * MB:
            raise ValueError("item size limit (-I) must be from 1k to 1024m")
        if self.item_size_max > self.memory_limit // 2:
            raise ValueError("item size limit (-I) must be at most half the memory "
                             "limit (-m)")
        if self.growth_factor <= 1:
            raise ValueError("the slab growth factor (-f) must be greater than 1")
        if self.chunk_size < 1:
            raise ValueError("the slab minimum size (-n) must be at least 1")
        if self.slab_chunk_max is None:
            # memcached's default; -I over a page brings back half a page
            whole = self.no_modern and self.item_size_max <= SLAB_PAGE_SIZE
            self.slab_chunk_max = SLAB_PAGE_SIZE if whole else SLAB_PAGE_SIZE // 2
        if not CHUNK_STRUCT_SIZE < self.slab_chunk_max <= SLAB_PAGE_SIZE:
            raise ValueError("slab_chunk_max must be more than %d (a chunk's header) and "
                             "at most %d (a slab page)" % (CHUNK_STRUCT_SIZE, SLAB_PAGE_SIZE))
        for name in ("max_connections", "threads", "backlog", "reqs_per_event"):
            if getattr(self, name) < 1:
                raise ValueError("%s (%s) must be at least 1" % (
                    name.replace("_", " "), self.flag(name)))
        if len(self.detail_delimiter) != 1:
            raise ValueError("the stats detail delimiter (-D) must be one character")
        if self.idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        if self.engine not in ENGINES:
            raise ValueError("unknown engine %r (choose from %s)"
                             % (self.engine, ", ".join(sorted(ENGINES))))
        if self.single and self.engine != "threads":
            raise ValueError("--single needs the threads engine")
        # The LRU's settings, checked in memcached's words.  As in memcached, the
        # segmented LRU is the maintainer's: without it, the LRU is flat.
        if not self.lru_maintainer:
            self.lru_segmented = False
        if self.temp_lru and not self.lru_maintainer:
            raise ValueError("temporary_ttl requires lru_maintainer to be enabled")
        for name in ("hot_lru_pct", "warm_lru_pct"):
            if not 1 <= getattr(self, name) < 80:
                raise ValueError("%s must be > 1 and < 80" % name)
        if self.hot_lru_pct + self.warm_lru_pct > 80:
            raise ValueError("hot_lru_pct + warm_lru_pct cannot be more than 80% combined")
        for name in ("hot_max_factor", "warm_max_factor"):
            if not getattr(self, name) > 0:
                raise ValueError("%s must be > 0" % name)
        if not 0 <= self.lru_crawler_sleep <= 1000000:
            raise ValueError("LRU crawler sleep must be between 0 and 1 second")
        if not 0 <= self.lru_crawler_tocrawl <= 0xFFFFFFFF:
            raise ValueError("lru_crawler_tocrawl takes a numeric 32bit value")

    @staticmethod
    def flag(name):
        """How the command line names a setting: its short flag, or -o name."""
        metadata = SETTINGS_FIELDS[name].metadata
        return metadata["flags"][0] if metadata["flags"] else "-o " + name

    def stats(self):
        """``stats settings``: (memcached's name, value) for each setting it shows."""
        return [(field.metadata["stat"], field.metadata["show"](getattr(self, field.name)))
                for field in SETTINGS_FIELDS.values() if field.metadata["stat"]]


SETTINGS_FIELDS = {field.name: field for field in dataclasses.fields(Settings)}
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


def storage_numbers(tokens):
    """(flags, exptime, bytes) of a storage command, each None if malformed."""
    flags, exptime, nbytes = tokens[2], tokens[3], tokens[4]
    if flags.isdigit() and exptime.isdigit() and nbytes.isdigit() and len(
            flags) < 10 and len(exptime) < 10 and len(nbytes) < 10:
        return int(flags), int(exptime), int(nbytes)        # the common case
    return parse_uint32(flags), parse_int32(exptime), parse_int32(nbytes)


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

# Outcomes of store operations; the protocol turns them into reply lines.
STORED, NOT_STORED, EXISTS, NOT_FOUND = "STORED", "NOT_STORED", "EXISTS", "NOT_FOUND"
NO_MEMORY, NON_NUMERIC = "NO_MEMORY", "NON_NUMERIC"

# Storage modes, as memcached's NREAD_* values.
SET, ADD, REPLACE, CAS = "set", "add", "replace", "cas"
APPEND, PREPEND = "append", "prepend"

# Counters the store keeps under its lock; ``stats`` shows them, ``stats reset`` zeroes
# them.  (cmd_get and cmd_touch are not kept: every get is a hit or a miss, and so is
# every touch, so ``snapshot`` adds them up; get_hits are the reads of each sub-LRU,
# Store.lru_hits.)
STORE_COUNTERS = (
    "cmd_flush", "get_misses", "get_expired", "get_flushed", "delete_misses",
    "incr_misses", "decr_misses", "cas_misses", "touch_misses", "store_too_large",
    "total_items",
)
# Counters kept per slab class, as memcached keeps them: what the commands did to the
# items of each class (``stats slabs``; cmd_set by the class of the value sent), and
# what happened to them at the LRUs' tails (``stats items``).  ``stats`` shows the
# sums (store_no_memory is outofmemory's).
CLASS_COUNTERS = (
    "cmd_set", "delete_hits", "incr_hits", "decr_hits", "cas_hits", "cas_badval",
    "touch_hits",
    "evicted", "evicted_nonzero", "outofmemory", "reclaimed", "expired_unfetched",
    "evicted_unfetched", "crawler_reclaimed", "crawler_items_checked",
    "moves_to_cold", "moves_to_warm", "moves_within_lru", "direct_reclaims",
)

# An item is one stored value and its metadata, packed into a single bytes object: a
# header (CAS unique, expiry, last access, client flags, state bits and slab class),
# then the value.
# A Python object per field would cost more than the value itself: a 100-byte item
# takes about 250 bytes of memory in all this way (with its key and its dict entry),
# 450 as an object with a value and two ints (memcached: 197).  It is a plain bytes
# object, not a subclass with properties: an instance of a class defined in Python
# costs 16 bytes more, and the garbage collector tracks it, so that each full
# collection walked every item (170 ms for a million items, with every thread
# stopped).  Items never change; an update links a new one (``make_item``), so a
# reader that got an item from the store may use it without the lock.
ITEM_HEADER = struct.Struct("<QqIIH")
# (cas, exptime, atime, flags, state) of an item, and where its value starts.  The
# hot paths unpack all five into names at once; other code reads ``header(item)``.
item_fields = ITEM_HEADER.unpack_from
pack_header = ITEM_HEADER.pack
VALUE_START = ITEM_HEADER.size
# The state bits.  ACTIVE: read again since it was last moved (memcached's
# ITEM_ACTIVE), which keeps an item out of the segmented LRU's COLD part.
FETCHED, STALE, WON, ACTIVE = 1, 2, 4, 8
# The state's high byte is the item's slab class, which its key, value and flags set
# once: per-class counts need no size arithmetic on the hot paths.  STATE_BYTE and
# CLASS_BYTE are where the state's two bytes are in an item.
CLASS_SHIFT = 8
STATE_BYTE, CLASS_BYTE = VALUE_START - 2, VALUE_START - 1
ItemHeader = collections.namedtuple("ItemHeader", "cas exptime atime flags state")


def header(item):
    """An item's fields by name, without copying its value."""
    return ItemHeader._make(item_fields(item))


def value_size(item):
    return len(item) - VALUE_START


def make_item(value, flags, exptime, cas, atime, state=0):
    """An item.  exptime: absolute Unix time in whole seconds, 0 never expires, -1
    expired; atime: last access (LRU statistics, meta 'l', flush_all's deadline);
    state: its bits and its class (see Store._new_item)."""
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


# -- memory: what items and the index really take ----------------------------------
# -m bounds the memory the cache holds: its items, each two bytes objects (its key and
# itself), and its index, the four sub-LRUs' dict tables.  An item is charged its two
# objects as the allocators hand them out; each table is charged as a whole
# (Store.index_bytes), as sys.getsizeof measures it.  CPython serves objects of up to
# 512 bytes from its own allocator, in blocks of a multiple of 16 bytes carved from
# pools (16 KiB, 4 KiB before 3.10) that each lose a 48-byte header and the tail no
# block fits; a larger object comes from malloc, which adds 8 bytes and rounds to 16,
# or, from MMAP_THRESHOLD up (the memg command fixes it: see tune_malloc), maps whole
# pages.
BYTES_OBJECT = sys.getsizeof(b"")       # a bytes object's header and final NUL: 33
ITEM_OBJECT = BYTES_OBJECT + VALUE_START
SMALL_OBJECT_MAX = 512
POOL_SIZE, POOL_HEADER = (16 if sys.version_info >= (3, 10) else 4) * KB, 48
MMAP_THRESHOLD = 1 * MB
EMPTY_DICT = sys.getsizeof({})          # the dict object alone, without a table
# The part of the tables not charged: what memcached's hash table takes for as many
# keys (a pointer a bucket, 2 ** Store.hash_power buckets: 512 KiB at first), which
# memcached keeps outside -m, so that the same -m holds as much in both; and a small
# cache's tables do not hang on CPython's sizing of small tables.
HASH_BUCKET_SIZE = struct.calcsize("P")
# The least room a sub-LRU's table is made with (Store._reindex): a small one that
# items pass through (COLD under churn) is then remade every few hundred insertions,
# not every few.  Four such tables take 37 KiB, within memcached's first table.
INDEX_ROOM = 256


def fill_table(items, room):
    """Insert and delete a key of no client room + 1 times: the last insertion finds
    the dict's table full, and CPython remakes it for the keys the dict holds."""
    for _ in range(room + 1):
        items[None] = None
        del items[None]


def pooled_size(size):
    """A small object's share of its pool, to the nearest byte."""
    block = max(16, -(-size // 16) * 16)
    return (2 * POOL_SIZE // ((POOL_SIZE - POOL_HEADER) // block) + 1) // 2


POOLED_SIZES = [pooled_size(size) for size in range(SMALL_OBJECT_MAX + 1)]


def allocated(size):
    """The memory an object of size bytes takes."""
    if size <= SMALL_OBJECT_MAX:
        return POOLED_SIZES[size]
    chunk = (size + 8 + 15) & -16
    if chunk < MMAP_THRESHOLD:
        return chunk
    return (chunk + 8 + mmap.PAGESIZE - 1) & -mmap.PAGESIZE


# What a bytes object of each length up to 4 KiB takes, looked up on every store.
BYTES_COSTS = [allocated(BYTES_OBJECT + length) for length in range(4 * KB)]


def item_cost(key, size):
    """The memory an item with a value of size bytes takes: its key and itself."""
    try:
        return BYTES_COSTS[len(key)] + BYTES_COSTS[VALUE_START + size]
    except IndexError:
        return allocated(BYTES_OBJECT + len(key)) + allocated(ITEM_OBJECT + size)


# -- slab classes: where memcached would keep an item ----------------------------------
# memg allocates no slabs, but ``stats items`` and ``stats slabs`` show its items in
# the classes memcached 1.6.18 would store them in (its slabs_init, slabs_clsid and
# item_make_header), so that dashboards and exporters read the same classes from
# both.  memcached cuts its classes' chunks from pages of 1 MB.
SLAB_PAGE_SIZE = 1 * MB
# memcached's item header (its struct _stritem, on 64 bits) and the header of each
# chunk of a large item (struct _strchunk).
ITEM_STRUCT_SIZE = 48
CHUNK_STRUCT_SIZE = 48
# memcached's slab class ids run below this (0 is its pool of free pages).
SLAB_CLASSES = 64
# The sizes whose class SlabClasses.slab_class looks up in a table, not by bisection.
CLASS_TABLE_MAX = 1 * MB


class SlabClasses:
    """memcached's slab classes for -f, -n and slab_chunk_max: class i (from 1)
    keeps items of up to ``chunk_sizes[i - 1]`` bytes as memcached sizes an item
    (``item_size``), one to a chunk.  The largest class's chunk is slab_chunk_max;
    an item larger than that is in the largest class too, but made of chunks: a
    header chunk of the class its header fits, chunks of the largest class, and
    one of the class the rest fits."""

    def __init__(self, growth_factor=1.25, chunk_size=48, slab_chunk_max=SLAB_PAGE_SIZE // 2,
                 use_cas=True, whole_pages=True):
        """whole_pages: whether memcached mallocs a whole page for a class, as it
        does unless -o no_modern leaves slab_chunk_max at a page (then it mallocs
        the chunks that fit in one)."""
        sizes = []
        size = ITEM_STRUCT_SIZE + chunk_size
        # As slabs_init: the classes grow by the factor, 8-byte aligned, until one
        # more would pass the largest chunk.
        while len(sizes) < SLAB_CLASSES - 2 and size < slab_chunk_max / growth_factor:
            size += -size % 8
            sizes.append(size)
            size = int(size * growth_factor)
        self.chunk_sizes = sizes + [slab_chunk_max]
        self.largest = len(self.chunk_sizes)
        self.smaller_sizes = sizes               # (what a bisection needs)
        self.chunk_max = slab_chunk_max
        self.whole_pages = whole_pages
        # What an item's size adds to its key and value: its header, the key's NUL,
        # the value's "\r\n", the CAS unique.
        self.overhead = ITEM_STRUCT_SIZE + 1 + 2 + (8 if use_cas else 0)
        # The class of each size up to table_max, by eighths of it (chunk sizes are
        # multiples of 8): the set path looks an item's class up here.
        self.table_max = min(slab_chunk_max, CLASS_TABLE_MAX)
        table = bytearray()
        for number, size in enumerate(self.chunk_sizes, 1):
            if size >= self.table_max:
                table += bytes([number]) * (self.table_max // 8 + 2 - len(table))
                break
            table += bytes([number]) * (size // 8 + 1 - len(table))
        self.class_of_eights = bytes(table)

    def item_size(self, key_length, value_length, flags):
        """memcached's size of an item (ITEM_ntotal): its header, the key and a NUL,
        the client flags unless 0, the value and "\r\n", the CAS unique."""
        return self.overhead + key_length + value_length + (4 if flags else 0)

    def slab_class(self, key_length, value_length, flags):
        """The class memcached keeps such an item in."""
        size = self.overhead + key_length + value_length + (4 if flags else 0)
        return self.class_of_eights[size + 7 >> 3] if size <= self.table_max else (
            self.class_for(size))

    def class_for(self, size):
        """The class whose chunks fit size bytes, or the largest (slabs_clsid)."""
        return bisect.bisect_left(self.smaller_sizes, size) + 1

    def chunks(self, key_length, value_length, flags):
        """The chunks memcached takes for such an item: (class, how many) pairs."""
        size = self.item_size(key_length, value_length, flags)
        if size <= self.chunk_max:
            return [(self.class_for(size), 1)]
        header = size - value_length - 2 + CHUNK_STRUCT_SIZE    # with a chunk header
        full, rest = divmod(value_length + 2, self.chunk_max - CHUNK_STRUCT_SIZE)
        return [(self.class_for(header), 1)] + ([(self.largest, full)] if full else []) + (
            [(self.class_for(rest + CHUNK_STRUCT_SIZE), 1)] if rest else [])

    def per_page(self, slab_class):
        return SLAB_PAGE_SIZE // self.chunk_sizes[slab_class - 1]

    def page_bytes(self, slab_class):
        """What memcached mallocs for a page of the class."""
        return (SLAB_PAGE_SIZE if self.whole_pages
                else self.chunk_sizes[slab_class - 1] * self.per_page(slab_class))


# What a walk of the cache finds the items take in memcached's slab classes
# (Store.slab_usage): requested, slab class -> memcached's bytes of its items
# (mem_requested); chunks, slab class -> chunks taken.
SlabUsage = collections.namedtuple("SlabUsage", "requested chunks")
# What mg reports of an item as it was before the request (Store.meta_get).
MetaView = collections.namedtuple("MetaView", "hit_before last_access ttl won token_sent stale")
# Keys a walk of the whole cache visits under one hold of the store's lock.
WALK_BATCH = 1000
# How long a flush keeps what it dropped at hand (see Store.flushed), at least.
FLUSHED_KEPT = 1.0
# memcached's hash table: 2**16 buckets at first, 2**32 at most (see grow_hash_table).
HASH_POWER_DEFAULT, HASH_POWER_MAX = 16, 32


# memcached's sub-LRUs.  memcached numbers an LRU by a slab class or-ed with its
# sub-LRU shifted by SEGMENT_SHIFT (HOT_LRU 0, WARM_LRU 64, COLD_LRU 128, TEMP_LRU
# 192); memg numbers its per-class counts the same way.
HOT, WARM, COLD, TEMP = range(4)
SEGMENT_NAMES = ("hot", "warm", "cold", "temp")
SEGMENT_SHIFT = 6
LRU_IDS = 4 << SEGMENT_SHIFT
# How many items a look at an LRU's tail considers at most, and how many looks at
# each a run of the maintainer takes at most (memcached's lru_pull_tail and
# lru_maintainer_juggle).
TAIL_TRIES = 5
JUGGLE_ROUNDS = 500
# How far from a shared sub-LRU's tail the maintainer looks for each class's tail.
TAIL_WINDOW = 4096


class Store:
    """The cache: items in memcached's sub-LRUs, a memory budget, CAS uniques and
    counters.

    Each item is in one of four dicts (key -> item, least recently used first), as
    memcached links each item into one of its LRUs.  In the segmented LRU
    (memcached's default) a new item enters HOT; a second read marks it active, and
    moves it up to WARM if it is in COLD; the maintainer (``juggle``) moves items
    down from HOT and WARM to COLD past their share (active ones go to WARM's head
    instead), and memory is made by evicting COLD's tail.  In the flat LRU
    (memcached's -o no_modern) new items enter COLD and a read moves an item to the
    head.  Items whose TTL is at most temp_ttl (if set) live in TEMP, never
    evicted.  memcached keeps these LRUs per slab class, each class with memory of
    its own; memg's memory is one budget, so its sub-LRUs hold every class, and the
    classes are counted (``lru_items``, ``lru_bytes``).  A lookup tries the dicts in
    turn: an item costs one dict entry, with no index beside them.

    Every public method takes the one lock, so each command is atomic whatever the
    interpreter (free-threaded CPython included).  Nothing here knows about sockets
    or the wire format; ``clock`` can be replaced in tests to move time.
    """

    # Every attribute, named: a Store's attributes are read on every command, and
    # CPython 3.11 and later read those of an instance with a dict more slowly once
    # it has 30 (its shared keys hold fewer): a get and a set took 6 % longer.
    # A new attribute is one more name here.
    __slots__ = (
        "memory_limit", "item_size_max", "evict", "use_cas", "slabs", "clock", "segmented",
        "temp_ttl", "started", "lock", "segments", "tails", "lru_items", "lru_bytes",
        "lru_hits", "classes_used", "bytes", "index_room", "index_bytes", "index_charge",
        "last_cas", "flush_deadline", "flush_pending", "flushed", "flushed_bytes",
        "flushed_at", "counters", "class_counters", "evicted_time", "on_evict", "sizes",
        "hash_power")

    def __init__(self, memory_limit=64 * MB, item_size_max=1 * MB, evict=True,
                 use_cas=True, track_sizes=False, clock=time.time, segmented=False,
                 temp_ttl=None, slabs=None):
        """slabs: the SlabClasses that items are counted in (memcached's default
        classes if None)."""
        self.memory_limit = memory_limit
        self.item_size_max = item_size_max
        self.evict = evict
        self.use_cas = use_cas
        self.slabs = slabs or SlabClasses(use_cas=use_cas)
        self.clock = clock
        self.segmented = segmented               # else flat (lru mode)
        self.temp_ttl = temp_ttl                 # None: no TEMP LRU (lru temp_ttl)
        self.started = int(clock())
        self.lock = threading.Lock()
        self.segments = ({}, {}, {}, {})         # HOT, WARM, COLD, TEMP
        self.tails = [{}, {}, {}, {}]            # a batch of each one's first keys (_tail)
        # Items, their bytes and the reads that found them, by LRU id.
        self.lru_items = [0] * LRU_IDS
        self.lru_bytes = [0] * LRU_IDS
        self.lru_hits = [0] * LRU_IDS
        self.classes_used = set()               # classes that have held an item
        self.bytes = 0                           # what the items take (item_cost)
        # The index (see _reindex): how many more insertions each sub-LRU's table
        # has room for, what the four take and the part of that charged under -m.
        self.index_room = [0, 0, 0, 0]
        self.index_bytes = self.index_charge = 0
        self.last_cas = 0
        # flush_all: once this second has come, items linked at or before it are
        # gone (memcached's oldest_live); pending until the store has dropped them.
        self.flush_deadline = 0
        self.flush_pending = False
        # What the last flush dropped, its sub-LRUs' dicts: the items leave the cache
        # at once (curr_items and bytes fall to 0), but stay at hand for FLUSHED_KEPT,
        # until the second's work after that (release_flushed), or until room is
        # needed, so that a lookup of one of their keys then counts get_flushed, as
        # memcached's counts an item its flush hid and has not yet unlinked; those
        # let go count as reclaimed, as memcached's maintainer counts what it unlinks.
        # They cost memory until then: flushed_bytes, under -m.
        self.flushed = ()
        self.flushed_bytes = 0
        self.flushed_at = 0.0
        self.counters = dict.fromkeys(STORE_COUNTERS, 0)
        self.class_counters = [dict.fromkeys(CLASS_COUNTERS, 0) for _ in range(SLAB_CLASSES)]
        self.evicted_time = [0] * SLAB_CLASSES   # idle seconds of each class's last eviction
        self.on_evict = None                     # called as on_evict(key, item, now)
        # Items per 32-byte size class (``stats sizes``), kept only if asked for.
        self.sizes = collections.Counter() if track_sizes else None
        self.hash_power = HASH_POWER_DEFAULT     # see grow_hash_table

    @property
    def items(self):
        """Every item, key -> item, in a new dict: each sub-LRU's items, least recently
        used first (HOT's, WARM's, COLD's, then TEMP's), for a look at the whole
        cache.  (The store's own paths read ``segments``.)"""
        with self.lock:
            return {key: item for items in self.segments for key, item in items.items()}

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
        exptime = header(item).exptime
        return -1 if exptime == 0 else exptime - now

    # -- internals: the caller holds the lock ---------------------------------

    def _next_cas(self):
        if not self.use_cas:
            return 0
        self.last_cas += 1
        return self.last_cas

    def _find(self, key, now, watch=None):
        """(segment, item) of the live item under key, or (None, None); drops it if
        it has expired or been flushed.  watch, if given, is told what the lookup
        found, as memcached's item_get log line says it: watch(key, status, item),
        status "found" (with the item), "not_found", "flushed" or "expired" (with
        None)."""
        if self.flush_pending:
            self._apply_flush(now)
        # (An empty sub-LRU, often TEMP and in a flat LRU HOT and WARM, is not asked.)
        hot, warm, cold, temp = self.segments
        if cold and (item := cold.get(key)) is not None:
            segment = COLD
        elif hot and (item := hot.get(key)) is not None:
            segment = HOT
        elif warm and (item := warm.get(key)) is not None:
            segment = WARM
        elif temp and (item := temp.get(key)) is not None:
            segment = TEMP
        else:
            flushed = bool(self.flushed) and self._forget_flushed(key)
            if watch is not None:
                watch(key, "flushed" if flushed else "not_found", None)
            return None, None
        exptime = item_fields(item)[1]
        if exptime and exptime <= now:
            self._unlink(key, item, segment)
            self.counters["get_expired"] += 1
            if watch is not None:
                watch(key, "expired", None)
            return None, None
        if self.flush_deadline and self._flushed(item, now):
            self._unlink(key, item, segment)
            self.counters["get_flushed"] += 1
            if watch is not None:
                watch(key, "flushed", None)
            return None, None
        if watch is not None:
            watch(key, "found", item)
        return segment, item

    def _flushed(self, item, now):
        """Whether a flush hides item: memcached's item_is_flushed.  The items a
        flush hides are usually dropped all at once; this catches those linked in
        the deadline's own second (and under -C those older than a past deadline)."""
        deadline = self.flush_deadline
        return deadline and deadline <= now and header(item).atime <= deadline

    def _dead(self, item, now):
        """Whether item has expired or been flushed (but is still linked)."""
        exptime = header(item).exptime
        return bool(exptime and exptime <= now or self._flushed(item, now))

    def _forget_flushed(self, key):
        """Whether key was among what the last flush dropped; a lookup that finds it
        there counts get_flushed, once."""
        for items in self.flushed:
            item = items.pop(key, None)
            if item is not None:
                self.flushed_bytes -= item_cost(key, len(item) - VALUE_START)
                self.counters["get_flushed"] += 1
                return True
        return False

    def _let_go_flushed(self, limit=None):
        """Let what the last flush dropped go, all of it or (limit) that many of its
        least recently used items, counted as reclaimed (and expired_unfetched if
        never read) by class, as memcached's LRU counts the items a flush hid as it
        unlinks them at its tails."""
        if limit is None:
            kept = ()
            gone = [item[CLASS_BYTE] << 1 | item[STATE_BYTE] & FETCHED
                    for items in self.flushed for item in items.values()]
        else:
            kept, gone = self.flushed, []
            for items in (kept[COLD], kept[WARM], kept[HOT], kept[TEMP]):
                for key in list(itertools.islice(items, limit - len(gone))):
                    item = items.pop(key)
                    self.flushed_bytes -= item_cost(key, len(item) - VALUE_START)
                    gone.append(item[CLASS_BYTE] << 1 | item[STATE_BYTE] & FETCHED)
        for kind, count in collections.Counter(gone).items():
            counters = self.class_counters[kind >> 1]
            counters["reclaimed"] += count
            counters["expired_unfetched"] += 0 if kind & FETCHED else count
        if not any(kept):
            self.flushed = ()
            self.flushed_bytes = 0

    def _apply_flush(self, now):
        """Drop every item at once when a delayed flush's deadline has come: all
        of them were linked before it."""
        if self.flush_pending and self.flush_deadline <= now:
            self._clear()

    def _bump(self, key, segment, item, now):
        """Mark item read now (memcached's do_item_bump); returns it as it now is.
        Segmented: a first read marks it fetched, a second active, which moves it up
        to WARM from COLD (and stamps its last access); an active item is left as
        it is.  Flat: it is marked fetched and moves to the head of its LRU, at most
        once a second (memcached: a minute): an item read again within the second it
        was last read or stored stays where it is, so that such a read costs no
        copy."""
        cas, exptime, atime, flags, state = item_fields(item)
        if self.segmented:
            if state & ACTIVE:
                return item
            if not state & FETCHED:
                item = pack_header(cas, exptime, atime, flags, state | FETCHED) + item[
                    VALUE_START:]
                self.segments[segment][key] = item
            elif segment == COLD:
                item = pack_header(cas, exptime, now, flags, state) + item[VALUE_START:]
                self._move(key, item, COLD, WARM)
                self.class_counters[state >> CLASS_SHIFT]["moves_to_warm"] += 1
            else:
                item = pack_header(cas, exptime, now, flags, state | ACTIVE) + item[
                    VALUE_START:]
                self.segments[segment][key] = item
            return item
        if atime == now and state & FETCHED:
            return item
        item = pack_header(cas, exptime, now, flags, state | FETCHED) + item[VALUE_START:]
        self._move(key, item, segment, segment)
        return item

    def _update(self, key, segment, item, now):
        """memcached's do_item_update, for an add that finds its key: the item's last
        access is now, and in the flat LRU it moves to the head (at most once a
        second, as _bump)."""
        cas, exptime, atime, flags, state = item_fields(item)
        if atime != now:
            item = pack_header(cas, exptime, now, flags, state) + item[VALUE_START:]
            if self.segmented:
                self.segments[segment][key] = item
            else:
                self._move(key, item, segment, segment)

    def _tail(self, segment, count=1):
        """The least recently used keys of a segment: the first count of them (fewer
        if it holds fewer), or its first key alone (or None).  A dict keeps insertion
        order, so those are its first keys; but reaching them steps over every entry
        deleted before them since the dict was last resized, as many as there were
        evictions, moves and bumps.  So the first keys are taken a batch at a time,
        into ``tails`` (a key leaves it when it is used, moved or unlinked), for one
        such walk per batch.  (An OrderedDict would do this alone, at 46 more bytes
        an item.)"""
        tail = self.tails[segment]
        items = self.segments[segment]
        if len(tail) < count and len(items) > len(tail) or not tail:
            tail = self.tails[segment] = collections.OrderedDict.fromkeys(
                itertools.islice(items, max(count, 64, len(items) // 256)))
        if count == 1:
            return next(iter(tail), None)
        return list(itertools.islice(tail, count))

    def _move(self, key, item, segment, target):
        """Put key's item (the one in segment, or a copy with other header fields) at
        the head of target."""
        del self.segments[segment][key]
        self.tails[segment].pop(key, None)
        self._put(target, key, item)
        if target != segment:
            cost = item_cost(key, len(item) - VALUE_START)
            for lru_segment, sign in ((segment, -1), (target, 1)):
                lru = lru_segment << SEGMENT_SHIFT | item[CLASS_BYTE]
                self.lru_items[lru] += sign
                self.lru_bytes[lru] += sign * cost

    def _put(self, segment, key, item):
        """Insert key, not in segment, with item: an entry of its table (see _reindex)."""
        if self.index_room[segment] <= 0:
            self._reindex(segment)
        self.index_room[segment] -= 1
        self.segments[segment][key] = item

    def _reindex(self, segment):
        """Give a segment's dict table room before an insertion would find it full.

        Every insertion takes an entry of the table and a deletion frees none (it
        leaves a dummy), so a sub-LRU that items pass through (one that evicts as the
        cache stores, or that reads and the maintainer move items out of) fills its
        table however many items it holds.  CPython then makes a table for three
        times the keys: 60 to 120 bytes an item.  When memory is short, the table is
        made for an eighth more keys instead (34 to 68 bytes an item; with a quarter
        more, a cache of 100-byte values in -m 64 whose items had filled the memory
        beside a table of 2^19 slots made one of 2^20, and evicted a sixth of its
        items for the 10 MB more it took), by CPython
        still: it remakes a full table for the keys it holds as it resizes it, at the
        least power of two of slots for three times them, so it is given a number of
        keys that makes the size wanted: the newest keys are set aside meanwhile (or,
        for a small one, keys of no client added), then put back in their order.
        That takes 30 ms for 270,000 to 410,000 items, once every 35,000 to 290,000
        insertions (100-byte and 1-byte values in -m 64); a copy of the dict would
        touch every item (50 to 70 ms).  An empty dict gets its first table here, so
        that every table is charged before the items take it."""
        items = self.segments[segment]
        used = len(items)
        spare = used if self.bytes * 2 < self.memory_limit else used // 8
        wanted = used + 1 + max(spare, INDEX_ROOM)
        # The least table whose usable two thirds hold wanted, and the keys CPython
        # makes one of that size for: from a sixth of its slots to a third.
        slots = 1 << ((3 * wanted + 1) // 2 - 1).bit_length()
        lowest, highest = (slots + 7) // 6, slots // 3
        room = self.index_room[segment]
        held = min(max(used, lowest), highest)
        if used < lowest:            # all set aside, and the table made small first
            aside = list(items)
            values = list(map(items.pop, aside))
            fill_table(items, room)
            room = 8 * 2 // 3 - 1                   # CPython's first table: 8 slots
            for placeholder in range(lowest):       # (an int is no client's key)
                if room == 0:
                    room = (1 << (3 * placeholder - 1).bit_length()) * 2 // 3 - placeholder
                items[placeholder] = None
                room -= 1
        else:
            aside = list(itertools.islice(reversed(items), used - held))
            values = list(map(items.pop, aside))
            aside.reverse()
            values.reverse()
        fill_table(items, room)                     # remade for held keys
        items.update(zip(aside, values))
        for placeholder in range(lowest if used < lowest else 0):
            del items[placeholder]
        self.index_room[segment] = slots * 2 // 3 - held - 1 - len(aside)
        self.index_bytes = sum(sys.getsizeof(items) - EMPTY_DICT for items in self.segments)
        self._charge_index()

    def _charge_index(self):
        """Charge the index beyond memcached's hash table for as many keys (see
        HASH_BUCKET_SIZE)."""
        self.index_charge = max(0, self.index_bytes - (HASH_BUCKET_SIZE << self.hash_power))

    def _unlink(self, key, item, segment):
        del self.segments[segment][key]
        self.tails[segment].pop(key, None)
        # (The counts of _link, taken back.)
        cost = item_cost(key, len(item) - VALUE_START)
        lru = segment << SEGMENT_SHIFT | item[CLASS_BYTE]
        self.lru_items[lru] -= 1
        self.lru_bytes[lru] -= cost
        self.bytes -= cost
        if self.sizes is not None:
            self.sizes[self.size_class(key, item)] -= 1

    def size_class(self, key, item):
        """The 32-byte class ``stats sizes`` counts an item in, by memcached's size."""
        size = len(key) + value_size(item) + ITEM_HEADER_SIZE + (
            4 if header(item).flags else 0)
        return -(-size // 32) * 32

    def _new_item(self, key, value, flags, exptime, cas, atime, state=0):
        """A new item for key, its class set from its size."""
        return make_item(value, flags, exptime, cas, atime, state | self.slabs.slab_class(
            len(key), len(value), flags) << CLASS_SHIFT)

    def _new_segment(self, exptime, now):
        """Where a new item goes: TEMP if its TTL is at most temp_ttl, else HOT
        (segmented) or COLD (flat)."""
        if self.temp_ttl is not None and exptime > 0 and 0 <= exptime - now <= self.temp_ttl:
            return TEMP
        return HOT if self.segmented else COLD

    def _link(self, key, item, segment, now, old=None, old_segment=None):
        """Link item under key into segment, in place of old (in old_segment, live
        now); False, with old left as it was, when memory is exhausted."""
        try:                                     # item_cost, written out: the set path
            cost = BYTES_COSTS[len(key)] + BYTES_COSTS[len(item)]
        except IndexError:
            cost = item_cost(key, len(item) - VALUE_START)
        freed = item_cost(key, len(old) - VALUE_START) if old is not None else 0
        if not self.segmented:
            self._pull_tail(COLD, now)   # as memcached's flat LRU before each allocation
        if self.bytes + self.flushed_bytes + self.index_charge + cost - freed > (
                self.memory_limit):
            if old is not None:          # out of reach of the evictions it makes room by
                del self.segments[old_segment][key]
                self.tails[old_segment].pop(key, None)
            made = self._make_room(cost - freed, now, item[CLASS_BYTE])
            if old is not None:
                self._put(old_segment, key, old)
            if not made:
                self.class_counters[item[CLASS_BYTE]]["outofmemory"] += 1
                return False
        if old is not None:
            self._unlink(key, old, old_segment)
        room = self.index_room                   # (_put, written out)
        if room[segment] <= 0:
            self._reindex(segment)
            if self.bytes + self.flushed_bytes + self.index_charge + cost > self.memory_limit:
                self._make_room(cost, now)       # for a larger table
        room[segment] -= 1
        self.segments[segment][key] = item
        # The counts of each LRU and class (inline: this is the set path).
        lru = segment << SEGMENT_SHIFT | item[CLASS_BYTE]
        self.lru_items[lru] += 1
        self.lru_bytes[lru] += cost
        self.bytes += cost
        if self.lru_items[lru] == 1:
            self.classes_used.add(item[CLASS_BYTE])
        self.counters["total_items"] += 1
        if self.sizes is not None:
            self.sizes[self.size_class(key, item)] += 1
        return True

    def _make_room(self, needed, now, cls=None):
        """Free memory from the LRUs' tails until needed more bytes fit, as
        memcached's allocation does: COLD's tail goes, expired items first, then
        live ones unless eviction is off; with COLD empty, HOT's tail moves down to
        it, then WARM's (memcached's maintainer keeps WARM to its share, so that
        COLD always has items; memg's runs once a second).  TEMP is never evicted.
        Each look at a tail counts as a direct reclaim of cls.  What the last flush
        dropped goes first.  False when nothing more can go."""
        if self.flushed:
            self._let_go_flushed()
        looks = 0
        try:
            while self.bytes + self.index_charge + needed > self.memory_limit:
                looks += 1
                if self._pull_tail(COLD, now, evict=True):
                    continue
                if self.segments[COLD] or not (
                        self._pull_tail(HOT, now) or self._pull_tail(WARM, now)):
                    return False                 # a live tail, not to be evicted; or none
            return True
        finally:
            if cls is not None:
                self.class_counters[cls]["direct_reclaims"] += looks

    def _pull_tail(self, segment, now, limit=0, max_age=0, evict=False, each_class=False):
        """memcached's lru_pull_tail: look at the items at a segment's tail, reclaiming
        expired and flushed ones, and act on the first live one: from HOT or WARM, an
        active item moves to WARM's head, no longer active, and another moves down to
        COLD if the segment holds over limit bytes or it has been idle over max_age
        seconds; from COLD, with evict, it is evicted (if eviction is on).  Up to
        TAIL_TRIES items are looked at.  memcached keeps an LRU per slab class, and its
        maintainer pulls the tail of each: with each_class, so does this, in memg's
        shared sub-LRU (where a class's items are in the order of its own LRU), for
        each class among the TAIL_WINDOW least recently used items.  Otherwise the
        segment is one LRU (memg's allocations: its memory is one pool).  Returns how
        many items went or moved."""
        items = self.segments[segment]
        classes = sum(map(bool, self.lru_items[segment << SEGMENT_SHIFT:
                                               segment + 1 << SEGMENT_SHIFT]))
        looked = {}                              # class (or None) -> items looked at
        ended = done = 0                         # how many turns are over
        for key in self._window(segment) if each_class else self._tail(segment, TAIL_TRIES):
            item = items.get(key)
            if item is None:
                continue                         # (moved by this pull)
            turn = item[CLASS_BYTE] if each_class else None
            if looked.get(turn, 0) == TAIL_TRIES:
                continue
            looked[turn] = looked.get(turn, 0) + 1
            cas, exptime, atime, flags, state = item_fields(item)
            counters = self.class_counters[state >> CLASS_SHIFT]
            if exptime and exptime <= now or self.flush_deadline and self._flushed(item, now):
                self._unlink(key, item, segment)
                counters["reclaimed"] += 1
                counters["expired_unfetched"] += not state & FETCHED
                done += 1
                if looked[turn] < TAIL_TRIES:
                    continue
            elif segment == COLD:
                if evict and self.evict:
                    self._evict(key, item, now)
                    done += 1
            elif segment != TEMP:
                if state & ACTIVE:
                    self._move(key, pack_header(cas, exptime, atime, flags, state & ~ACTIVE)
                               + item[VALUE_START:], segment, WARM)
                    counters["moves_within_lru" if segment == WARM else "moves_to_warm"] += 1
                    done += 1
                elif now - atime > max_age or self._segment_bytes(segment) > limit:
                    self._move(key, item, segment, COLD)
                    counters["moves_to_cold"] += 1
                    done += 1
            looked[turn] = TAIL_TRIES            # this one's turn is over
            ended += 1
            if ended == (classes if each_class else 1):
                break
        return done

    def _window(self, segment):
        """The keys of a segment from its tail, up to TAIL_WINDOW of them, copied a
        growing piece at a time, so that a look that finds every class near the tail
        copies few.  (Items moved meanwhile shift the rest: a key may be missed, for
        the next look, or come twice.)"""
        items = self.segments[segment]
        start, size = 0, 64
        while start < TAIL_WINDOW:
            keys = list(itertools.islice(items, start, start + size))
            yield from keys
            if len(keys) < size:
                return
            start, size = start + size, size * 4

    def _segment_bytes(self, segment):
        return sum(self.lru_bytes[segment << SEGMENT_SHIFT:segment + 1 << SEGMENT_SHIFT])

    def _evict(self, key, item, now):
        _, exptime, atime, _, state = item_fields(item)
        self._unlink(key, item, COLD)
        cls = state >> CLASS_SHIFT
        counters = self.class_counters[cls]
        counters["evicted"] += 1
        counters["evicted_nonzero"] += exptime != 0
        counters["evicted_unfetched"] += not state & FETCHED
        self.evicted_time[cls] = now - atime
        if self.on_evict is not None:
            self.on_evict(key, item, now)

    def _clear(self):
        """Drop every item at once (flush_all), into ``flushed``.  memcached unlinks
        the items a flush hides as lookups, its maintainer or its allocations come
        upon them; memg drops them all now, and counts them as they are found or let
        go."""
        self._let_go_flushed()
        # (The tables go with the items, the part of them charged still charged.)
        self.flushed, self.flushed_bytes = self.segments, self.bytes + self.index_charge
        self.flushed_at = self.clock()
        self.segments = ({}, {}, {}, {})
        self.tails = [{}, {}, {}, {}]
        self.index_room[:] = [0, 0, 0, 0]        # (new dicts have no table)
        self.index_bytes = self.index_charge = 0
        self.lru_items = [0] * LRU_IDS
        self.lru_bytes = [0] * LRU_IDS
        self.bytes = 0
        if self.sizes is not None:
            self.sizes.clear()
        self.flush_pending = False

    def too_large(self, key, nbytes, flags=0):
        """Whether a value of nbytes exceeds the item size limit (-I), as memcached
        counts it."""
        size = len(key) + nbytes + ITEM_HEADER_SIZE + (4 if flags else 0)
        return size > self.item_size_max

    # -- retrieval ------------------------------------------------------------

    def get(self, key, exptime=None, bump=True, watch=None):
        """The item under key, or None.  With exptime, also sets its expiry (touch)."""
        return self.get_many((key,), exptime, bump, watch)[0]

    def get_many(self, keys, exptime=None, bump=True, watch=None):
        """The items under keys, None for each miss, under one hold of the lock
        (watch: see _find; every public method that looks a key up takes one).
        (acquire and release rather than ``with``: a third less time on the path
        every get takes.)"""
        self.lock.acquire()
        try:
            now = int(self.clock())
            items = []
            if exptime is None:
                for key in keys:
                    segment, item = self._find(key, now, watch)
                    if item is not None:
                        self.lru_hits[segment << SEGMENT_SHIFT | item[CLASS_BYTE]] += 1
                        if bump:
                            item = self._bump(key, segment, item, now)
                    items.append(item)
                self.counters["get_misses"] += items.count(None)
            else:
                for key in keys:
                    items.append(self._touch(key, exptime, now, bump, watch))
                self.counters["touch_misses"] += items.count(None)
            return items
        finally:
            self.lock.release()

    def peek(self, key, watch=None):
        """The item under key, or None, neither bumped nor counted as a get (me:
        memcached counts only what its lookup drops, expired or flushed)."""
        with self.lock:
            return self._find(key, self.now(), watch)[1]

    def _touch(self, key, exptime, now, bump, watch):
        """A gat's or touch's lookup: the item with its new expiry, or None."""
        segment, item = self._find(key, now, watch)
        if item is not None:
            self.class_counters[item[CLASS_BYTE]]["touch_hits"] += 1
            item = changed_item(item, exptime=self.expiry(exptime, now))
            self.segments[segment][key] = item
            if bump:
                item = self._bump(key, segment, item, now)
        return item

    # -- storage --------------------------------------------------------------

    def store(self, mode, key, value, *, flags=0, exptime=0, cas=0, new_cas=0,
              invalidate=False, vivify=None, watch=None):
        """Run one storage command; returns (outcome, item stored or None).

        mode is SET, ADD, REPLACE, APPEND, PREPEND or CAS.  cas, when not 0, must
        match the item's (CAS mode; append and prepend check it too).  new_cas
        replaces the generated CAS unique (meta E).  invalidate lets an older cas
        store a stale item (meta I).  vivify, an exptime, lets append and prepend
        create a missing item (meta N).
        """
        self.lock.acquire()          # (not ``with``: see get_many)
        try:
            now = int(self.clock())
            counters = self.counters
            # (slab_class's size and look-up, inline: this is the set path.)
            slabs = self.slabs
            size = slabs.overhead + len(key) + len(value) + (4 if flags else 0)
            cls = slabs.class_of_eights[size + 7 >> 3] if size <= slabs.table_max else (
                slabs.class_for(size))
            self.class_counters[cls]["cmd_set"] += 1
            if self.flushed and not self.segmented:
                # memcached's flat LRU makes the new item (pulling COLD's tail, where
                # a flush's items are) before it looks the key up.
                self._let_go_flushed(TAIL_TRIES)
            segment, old = self._find(key, now, watch)
            stale = False
            if old is None:
                if mode == CAS:
                    counters["cas_misses"] += 1
                    return NOT_FOUND, None
                if mode in (REPLACE, APPEND, PREPEND) and vivify is None:
                    return NOT_STORED, None
                if vivify is not None and mode in (APPEND, PREPEND):
                    exptime = vivify
                expires = self.expiry(exptime, now) if exptime else 0
            else:
                if mode == ADD:
                    self._update(key, segment, old, now)
                    return NOT_STORED, None
                if mode == CAS:
                    was = unpack_item(old)
                    class_counters = self.class_counters[old[CLASS_BYTE]]
                    if cas == was.cas and self.use_cas:    # under -C, cas never matches
                        class_counters["cas_hits"] += 1
                    elif invalidate and cas < was.cas:
                        class_counters["cas_hits"] += 1
                        stale = True
                    else:
                        class_counters["cas_badval"] += 1
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
                    cls = slabs.slab_class(len(key), len(value), flags)
                else:
                    expires = self.expiry(exptime, now) if exptime else 0
            state = STALE | (was.state & WON) if stale else 0
            item = pack_header(new_cas or self._next_cas(), expires, now, flags,
                               state | cls << CLASS_SHIFT) + value
            # (_new_segment, inline while there is no TEMP LRU: the set path.)
            place = (HOT if self.segmented else COLD) if self.temp_ttl is None else (
                self._new_segment(expires, now))
            if not self._link(key, item, place, now, old, segment):
                if mode == SET and old is not None:
                    self._unlink(key, old, segment)   # as memcached: a failed set leaves no value
                return NO_MEMORY, None
            return STORED, item
        finally:
            self.lock.release()

    def refuse_too_large(self, key, drop_old, watch=None):
        """Count a storage command refused for its size (-I) and drop the old value
        if asked: memcached drops it for set and for every meta set, so that a
        failed write leaves no stale data readable."""
        with self.lock:
            self.counters["store_too_large"] += 1
            if drop_old:
                segment, old = self._find(key, self.now(), watch)
                if old is not None:
                    self._unlink(key, old, segment)

    def delete(self, key, cas=None, watch=None):
        """Remove key: STORED (deleted), NOT_FOUND, or EXISTS when cas (if given)
        does not match."""
        with self.lock:
            segment, item = self._find(key, self.now(), watch)
            if item is None or (cas is not None and cas != header(item).cas):
                self.counters["delete_misses"] += 1
                return NOT_FOUND if item is None else EXISTS
            self._unlink(key, item, segment)
            self.class_counters[item[CLASS_BYTE]]["delete_hits"] += 1
            return STORED

    def invalidate(self, key, *, cas=None, exptime=None, new_cas=0, drop_value=False,
                   watch=None):
        """Meta delete's I and x: mark the item stale (new CAS, optionally a new
        expiry) or empty its value, instead of removing it (it stays in its
        sub-LRU)."""
        with self.lock:
            now = self.now()
            segment, item = self._find(key, now, watch)
            if item is None or (cas is not None and cas != header(item).cas):
                self.counters["delete_misses"] += 1
                return NOT_FOUND if item is None else EXISTS
            was = unpack_item(item)
            value = b"" if drop_value else was.value
            expires = was.exptime if exptime is None else self.expiry(exptime, now)
            stale = STALE if not drop_value or was.stale else 0
            new = self._new_item(key, value, was.flags, expires, new_cas or self._next_cas(), now,
                           stale)
            self._link(key, new, segment, now, item, segment)   # no larger: cannot fail
            return STORED

    def arithmetic(self, key, delta, *, incr=True, cas=0, vivify=None, initial=0,
                   new_cas=0, exptime=None, watch=None):
        """incr/decr: returns (outcome, item).  The value must be a decimal 64-bit
        unsigned number; incr wraps at 2**64, decr stops at 0.  A shorter result
        is padded with spaces to the old length, as memcached does in place (the
        item stays in its sub-LRU); a longer one is a new item, as in memcached.
        Meta arithmetic adds a CAS check, creation on a miss (vivify, an exptime,
        with initial) and a new expiry (exptime)."""
        with self.lock:
            now = self.now()
            counters = self.counters
            segment, item = self._find(key, now, watch)
            if item is None:
                if vivify is None:
                    counters["incr_misses" if incr else "decr_misses"] += 1
                    return NOT_FOUND, None
                expires = self.expiry(vivify, now)
                new = self._new_item(key, b"%d" % initial, 0, expires, new_cas or self._next_cas(), now)
                if not self._link(key, new, self._new_segment(expires, now), now):
                    return NO_MEMORY, None
                return STORED, new
            was = unpack_item(item)
            if not was.value:
                return NON_NUMERIC, None    # as memcached: before the CAS is compared
            if cas and cas != was.cas:
                return EXISTS, None
            number = parse_uint64(was.value)
            if number is None:
                return NON_NUMERIC, None
            if incr:
                number = (number + delta) & U64
            else:
                number = max(0, number - delta)
            self.class_counters[item[CLASS_BYTE]]["incr_hits" if incr else "decr_hits"] += 1
            digits = b"%d" % number
            if len(digits) < len(was.value):
                digits = digits.ljust(len(was.value))
            expires = was.exptime if exptime is None else self.expiry(exptime, now)
            new = self._new_item(key, digits, was.flags, expires, new_cas or self._next_cas(), now,
                           was.state & FETCHED)
            place = segment if len(digits) == len(was.value) else self._new_segment(expires, now)
            if not self._link(key, new, place, now, item, segment):
                return NO_MEMORY, None
            return STORED, new

    # -- meta get ---------------------------------------------------------------

    def meta_get(self, key, *, exptime=None, bump=True, vivify=None, recache=None,
                 watch=None):
        """mg's item semantics.  Returns None on a miss, else (item, MetaView): the
        view holds what mg reports as it was before this request, because mg's h and
        l flags describe the item before the command touched it."""
        with self.lock:
            now = self.now()
            counters = self.counters
            segment, item = self._find(key, now, watch)
            created = False
            if item is None and vivify is not None:
                expires = self.expiry(vivify, now)
                segment = self._new_segment(expires, now)
                item = self._new_item(key, b"", 0, expires, self._next_cas(), now)
                created = self._link(key, item, segment, now)
                if not created:
                    item = None
            touched = exptime is not None
            if item is None:
                counters["touch_misses" if touched else "get_misses"] += 1
                return None
            if touched:
                self.class_counters[item[CLASS_BYTE]]["touch_hits"] += 1
            else:
                self.lru_hits[segment << SEGMENT_SHIFT | item[CLASS_BYTE]] += 1
            was = unpack_item(item)
            if touched:
                item = changed_item(item, exptime=self.expiry(exptime, now))
                self.segments[segment][key] = item
            expires, token_sent = header(item).exptime, was.won
            won = created
            if (recache is not None and not created and not token_sent and expires
                    and expires < self.expiry(recache, now)):
                won = True
            if was.stale and not token_sent:
                won = True
            if won:
                item = changed_item(item, state=was.state | WON)
                self.segments[segment][key] = item
            view = MetaView(hit_before=was.fetched, last_access=now - was.atime,
                            ttl=self.ttl(item, now), won=won, token_sent=token_sent,
                            stale=was.stale)
            if bump:
                item = self._bump(key, segment, item, now)
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
            self._make_room(0, self.now())

    def juggle(self, hot_pct, warm_pct, hot_max_factor, warm_max_factor):
        """One run of memcached's LRU maintainer (lru_maintainer_juggle): TEMP's
        expired tails are reclaimed; then HOT and WARM move their tails down to COLD
        (segmented: past hot_pct and warm_pct percent of the bytes of HOT, WARM and
        COLD, or idle longer than the factor times the idle time of COLD's tail;
        flat: all of them), active ones going to WARM's head instead, and COLD's
        expired tails are reclaimed; up to JUGGLE_ROUNDS rounds of looks at each,
        each round under one hold of the lock.  (memcached's maintainer runs up to a
        thousand times a second, each run measuring the LRUs anew; memg's runs once
        a second, and measures them anew each round.)  Returns how many rounds did
        something."""
        rounds = 0
        for _ in range(JUGGLE_ROUNDS):
            with self.lock:
                if not self._pull_tail(TEMP, self.now(), each_class=True):
                    break
            rounds += 1
        for _ in range(JUGGLE_ROUNDS):
            with self.lock:
                now = self.now()
                hot = warm = (0, 0)
                if self.segmented:
                    key = self._tail(COLD)
                    cold_age = (now - header(self.segments[COLD][key]).atime
                                if key is not None else 0)
                    total = sum(map(self._segment_bytes, (HOT, WARM, COLD)))
                    hot = (total * hot_pct // 100, cold_age * hot_max_factor)
                    warm = (total * warm_pct // 100, cold_age * warm_max_factor)
                moved = (self._pull_tail(HOT, now, *hot, each_class=True)
                         or self._pull_tail(WARM, now, *warm, each_class=True))
                if self.segmented:
                    moved += self._pull_tail(COLD, now, each_class=True)
            if not moved:
                break
            rounds += 1
        return rounds

    def crawl(self, classes=None, tocrawl=0, found=None, batch=WALK_BATCH):
        """Look at items for expiry, as memcached's LRU crawler (``lru_crawler
        crawl`` and the maintainer's own runs): each segment from its tail, a batch
        of keys under each hold of the lock, yielding after each batch; only the
        items of classes (class ids; None: all), and at most tocrawl of a class in
        each segment (0: all).  Expired and flushed items are reclaimed
        (crawler_reclaimed); every item looked at is counted (crawler_items_checked).
        found, a dict, is given how many live items were seen ("seen"), how many of
        them never expire ("noexp") and how many expire in each minute of the next
        hour ("minutes"), for the maintainer's schedule.  Yields the size of each
        batch.

        Where a crawl goes on is kept as a position in each segment's order, not as a
        list of its keys: such a list kept every key evicted since it was made alive
        until the crawl came to it (at 10,000 a second), under churn as much memory
        again as the cache's keys.  A key moved meanwhile, or one that others unlinked
        before it shift, may be missed, or looked at twice."""
        seen = collections.Counter()                 # (segment, class) -> items looked at
        minutes = [0] * 60
        for segment in (HOT, WARM, COLD, TEMP):
            position, count = 0, batch
            while count == batch:
                with self.lock:
                    position, count = self._crawl_batch(segment, position, batch, classes,
                                                        tocrawl, seen, found, minutes)
                if count:
                    yield count
        if found is not None:
            found["minutes"] = minutes

    def _crawl_batch(self, segment, position, batch, classes, tocrawl, seen, found, minutes):
        """A crawl's look at batch items of a segment from position (see crawl); returns
        where the next begins and how many were looked at.  (A method of its own, so
        that a crawl waiting for its next turn holds no key.)"""
        now = self.now()
        self._apply_flush(now)
        items = self.segments[segment]
        pairs = list(itertools.islice(items.items(), position, position + batch))
        position += len(pairs)
        for key, item in pairs:
            cls = item[CLASS_BYTE]
            if classes is not None and cls not in classes or (
                    tocrawl and seen[segment, cls] >= tocrawl):
                continue
            seen[segment, cls] += 1
            counters = self.class_counters[cls]
            counters["crawler_items_checked"] += 1
            _, exptime, _, _, state = item_fields(item)
            flushed = self.flush_deadline and self._flushed(item, now)
            if exptime and exptime <= now or flushed:
                self._unlink(key, item, segment)
                position -= 1                        # (the rest move up)
                counters["crawler_reclaimed"] += 1
                counters["expired_unfetched"] += not (flushed or state & FETCHED)
            elif found is not None:
                found["seen"] = found.get("seen", 0) + 1
                if not exptime:
                    found["noexp"] = found.get("noexp", 0) + 1
                elif exptime - now < 3600:
                    minutes[(exptime - now) // 60] += 1
        return position, len(pairs)

    def _key_batches(self, segment, newest_first=False, batch=WALK_BATCH):
        """A segment's keys as they are now, least recently used first (or most),
        WALK_BATCH at a time: only the keys are copied, in one pass of C (3 ms for a
        million items), so that a walk holds the lock for a batch at a time."""
        with self.lock:
            items = self.segments[segment]
            keys = list(reversed(items) if newest_first else items)
        for start in range(0, len(keys), batch):
            yield keys[start:start + batch]

    def walk(self, segments=(HOT, WARM, COLD, TEMP), batch=WALK_BATCH, dead=False,
             classes=None):
        """Every live item of the segments given, each segment's most recently used
        first, as lists of (key, item) pairs, a batch at a time (``stats
        cachedump``, ``lru_crawler metadump``, snapshots): the lock is held for one
        batch, never for the whole walk, so that other clients wait no longer than
        that.  An item changed since the walk began comes as it now is, one gone or
        moved to another segment since is left out.  dead: with the items expired or
        flushed but not yet dropped; classes: only the items of these slab
        classes."""
        for segment in segments:
            for keys in self._key_batches(segment, newest_first=True, batch=batch):
                with self.lock:
                    now = self.now()
                    items = self.segments[segment]
                    pairs = [(key, item) for key, item in zip(keys, map(items.get, keys))
                             if item is not None and (dead or not self._dead(item, now))
                             and (classes is None or item[CLASS_BYTE] in classes)]
                yield pairs

    def class_stats(self, ages=True):
        """For each slab class that has held items, its figures as {name: value}: its
        items in all and in each sub-LRU (number, number_hot ...), the bytes charged
        for them (mem_requested), the reads that found them (get_hits, and in each
        sub-LRU hits_to_hot ...), what CLASS_COUNTERS counts, and with ages, the idle
        seconds of the class's least recently used item in HOT, WARM and COLD
        (age_hot, age_warm, age: found by a walk from each tail that stops once
        every class is found)."""
        with self.lock:
            now = self.now()
            numbers, sizes, hits = list(self.lru_items), list(self.lru_bytes), list(self.lru_hits)
            classes = {cls: dict(self.class_counters[cls], evicted_time=self.evicted_time[cls],
                                 age_hot=0, age_warm=0, age=0)
                       for cls in self.classes_used}
        for cls, figures in classes.items():
            lrus = [segment << SEGMENT_SHIFT | cls for segment in range(4)]
            for name, lru in zip(SEGMENT_NAMES, lrus):
                figures["number_" + name] = numbers[lru]
                figures["hits_to_" + name] = hits[lru]
            figures.update(number=sum(numbers[lru] for lru in lrus),
                           mem_requested=sum(sizes[lru] for lru in lrus),
                           get_hits=sum(hits[lru] for lru in lrus))
        for segment, age in ((HOT, "age_hot"), (WARM, "age_warm"), (COLD, "age")) * ages:
            wanted = {cls for cls in classes if numbers[segment << SEGMENT_SHIFT | cls]}
            for keys in self._key_batches(segment):
                if not wanted:
                    break
                with self.lock:
                    items = self.segments[segment]
                    for item in filter(None, map(items.get, keys)):
                        if item[CLASS_BYTE] in wanted:
                            wanted.discard(item[CLASS_BYTE])
                            classes[item[CLASS_BYTE]][age] = now - header(item).atime
        return classes

    def slab_usage(self):
        """What the items take in memcached's slab classes, found by a walk of the
        cache (every linked item, as curr_items counts them): a SlabUsage."""
        slabs = self.slabs
        requested, chunks = collections.Counter(), collections.Counter()
        for batch in self.walk(dead=True):
            for key, item in batch:
                flags, size = item_fields(item)[3], len(item) - VALUE_START
                requested[item[CLASS_BYTE]] += slabs.item_size(len(key), size, flags)
                for chunk_class, number in slabs.chunks(len(key), size, flags):
                    chunks[chunk_class] += number
        return SlabUsage(requested, chunks)

    def size_histogram(self):
        """(size, items) for each 32-byte class that has items, or None when sizes
        are not tracked."""
        with self.lock:
            if self.sizes is None:
                return None
            return sorted((size, count) for size, count in self.sizes.items() if count)

    def grow_hash_table(self):
        """Follow memcached's hash table, whose size its ``stats`` show as
        hash_power_level: it doubles once its items outnumber its buckets by half,
        checked once a second as memcached does (the engines call this through
        Service.sweep), and never shrinks.  memg's dicts size themselves; this is
        what memcached would show for the same keys, and a restart (-e) keeps it."""
        with self.lock:
            if (sum(map(len, self.segments)) > 3 * 2 ** self.hash_power // 2
                    and self.hash_power < HASH_POWER_MAX):
                self.hash_power += 1
                self._charge_index()

    def release_flushed(self):
        """Let what the last flush dropped go once it has been kept FLUSHED_KEPT (the
        engines call this through Service.sweep, every second)."""
        with self.lock:
            if self.flushed and self.clock() - self.flushed_at >= FLUSHED_KEPT:
                self._let_go_flushed()

    def reset_counters(self):
        with self.lock:
            for name in STORE_COUNTERS:
                self.counters[name] = 0
            for counters in self.class_counters:
                for name in CLASS_COUNTERS:
                    counters[name] = 0
            self.evicted_time = [0] * SLAB_CLASSES
            self.lru_hits = [0] * LRU_IDS

    def snapshot(self):
        """Counters and sizes for ``stats``, read consistently (the per-class
        counters summed)."""
        with self.lock:
            counters = dict(self.counters, **{name: sum(
                counts[name] for counts in self.class_counters) for name in CLASS_COUNTERS})
            get_hits = sum(self.lru_hits)
            return dict(counters, curr_items=sum(map(len, self.segments)), bytes=self.bytes,
                        get_hits=get_hits, store_no_memory=counters["outofmemory"],
                        evictions=counters.pop("evicted"),
                        cmd_get=get_hits + counters["get_misses"],
                        cmd_touch=counters["touch_hits"] + counters["touch_misses"],
                        limit_maxbytes=self.memory_limit, hash_power_level=self.hash_power)

    def cas_counter(self):
        with self.lock:
            return self.last_cas

    def move_clock(self, seconds):
        """Run the store's clock seconds ahead from now on (memcached-debug's
        debugtime, for test harnesses)."""
        with self.lock:
            clock = self.clock
            self.clock = lambda: clock() + seconds

    def restore(self, pairs, cas_counter, hash_power=0, batch=WALK_BATCH):
        """Link the items of a snapshot: (key, item) pairs, most recently used first,
        as ``walk`` gives them, each item in the class of this store's slabs.  They
        keep that order of use, in COLD (none has been read since the restart) or
        TEMP, above the items already there; those expired since, and those too
        large for -I, are left out, and so are the least recently used of them
        beyond the memory limit, as eviction would leave them out.  The lock is held
        a batch at a time.  The CAS counter goes on above every unique restored, and
        the hash table is as large as the snapshot's was, if that was larger (0: not
        known).  Returns how many were linked."""
        now = self.now()
        kept, cost, highest = [], 0, cas_counter
        for key, item in pairs:
            cas, exptime, atime, flags, state = item_fields(item)
            size = len(item) - VALUE_START
            if exptime and exptime <= now or self.too_large(key, size, flags):
                continue
            cost += item_cost(key, size)
            if cost > self.memory_limit:
                break
            slab_class = self.slabs.slab_class(len(key), size, flags)
            if item[CLASS_BYTE] != slab_class:           # (a snapshot of other classes)
                item = pack_header(cas, exptime, atime, flags, state & ~(
                    0xFF << CLASS_SHIFT) | slab_class << CLASS_SHIFT) + item[VALUE_START:]
            kept.append((key, item))
            highest = max(highest, cas)
        kept.reverse()                           # linked least recently used first
        linked = 0
        for start in range(0, len(kept), batch):
            with self.lock:
                if self.flush_pending:
                    self._apply_flush(now)
                for key, item in kept[start:start + batch]:
                    if self._flushed(item, now):         # older than a flush here
                        item = changed_item(item, atime=now)
                    old_segment = next((segment for segment in (HOT, WARM, COLD, TEMP)
                                        if key in self.segments[segment]), None)
                    old = self.segments[old_segment][key] if old_segment is not None else None
                    if old is not None and self._dead(old, now):
                        self._unlink(key, old, old_segment)
                        old = None
                    segment = TEMP if self._new_segment(header(item).exptime, now) == TEMP else COLD
                    linked += self._link(key, item, segment, now, old, old_segment)
                if self.use_cas:
                    self.last_cas = max(self.last_cas, highest)
        with self.lock:
            self.hash_power = max(self.hash_power, min(hash_power, HASH_POWER_MAX))
            self._charge_index()
        return linked


# -- snapshots: the items kept across a restart (-e) ----------------------------------
# memg's own format.  Every number is big-endian and of a fixed size, so that a file
# reads the same on any platform and Python; a later memg reads every earlier
# version.  It is data only (never pickle: reading a snapshot runs no code).
#
#   header    magic b"MEMGSNAP", format version (u16, now 1), the hash power (u16:
#             hash_power_level then, see Store.grow_hash_table; 0, not known, in
#             files of memg before it kept it), when it was written (i64, Unix
#             seconds)
#   items     each: key length (u16), value length (u32), client flags (u32), CAS
#             unique (u64), expiry (i64, Unix seconds; 0 never), last access (i64,
#             Unix seconds), state (u8: 1 if fetched since stored), then the key and
#             the value; the most recently used first
#   trailer   how many items (u64), the CAS counter (u64), then a CRC-32 (u32) of
#             every byte before it
SNAPSHOT_MAGIC = b"MEMGSNAP"
SNAPSHOT_VERSION = 1
SNAPSHOT_HEADER = struct.Struct(">8sHHq")
SNAPSHOT_ITEM = struct.Struct(">HIIQqqB")
SNAPSHOT_COUNTS = struct.Struct(">QQ")
SNAPSHOT_CHECKSUM = struct.Struct(">I")


class SnapshotError(ValueError):
    """A file that is not a whole snapshot this memg can read."""


def save_snapshot(store, path):
    """Write the store's live items to path, safely: to a temporary file in the
    same folder, flushed to disk, then renamed over path, so that a crash or a full
    disk mid-write leaves the previous snapshot whole.  The items are read a batch
    at a time (Store.walk): no client waits longer than one batch.  Returns how
    many were written."""
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp",
                                             prefix=os.path.basename(path) + ".")
    try:
        with open(descriptor, "wb", buffering=1 * MB) as file:
            checksum, count = 0, 0

            def put(data):
                nonlocal checksum
                file.write(data)
                checksum = zlib.crc32(data, checksum)

            put(SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION,
                                     store.snapshot()["hash_power_level"], int(time.time())))
            pack = SNAPSHOT_ITEM.pack
            for pairs in store.walk():
                parts = []
                for key, item in pairs:
                    cas, exptime, atime, flags, state = item_fields(item)
                    parts += (pack(len(key), len(item) - VALUE_START, flags, cas, exptime,
                                   atime, state & FETCHED), key,
                              memoryview(item)[VALUE_START:])
                put(b"".join(parts))
                count += len(pairs)
            put(SNAPSHOT_COUNTS.pack(count, store.cas_counter()))
            file.write(SNAPSHOT_CHECKSUM.pack(checksum))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError, AttributeError):     # (a folder cannot be opened
        folder_descriptor = os.open(folder, os.O_RDONLY)   # everywhere: the rename is
        try:                                               # then as safe as it gets)
            os.fsync(folder_descriptor)
        finally:
            os.close(folder_descriptor)
    return count


def read_snapshot(path):
    """The items of the snapshot at path, most recently used first, as (key, item)
    pairs (of no slab class yet: Store.restore sets it), its CAS counter and its hash
    power (Store.restore's arguments); SnapshotError if the file is not a whole
    snapshot of a format this memg reads.  The file is read whole and checked before any item
    is made, so it is never half-loaded, and reading allocates no more than its size:
    every length in it is checked against the bytes that are there."""
    with open(path, "rb") as file:
        data = file.read()
    end = len(data) - SNAPSHOT_COUNTS.size - SNAPSHOT_CHECKSUM.size  # where the items end
    if end < SNAPSHOT_HEADER.size or not data.startswith(SNAPSHOT_MAGIC):
        raise SnapshotError("not a memg snapshot")
    _, version, hash_power, _ = SNAPSHOT_HEADER.unpack_from(data)
    if version > SNAPSHOT_VERSION:
        raise SnapshotError("format version %d, newer than this memg reads (%d)"
                            % (version, SNAPSHOT_VERSION))
    count, cas_counter = SNAPSHOT_COUNTS.unpack_from(data, end)
    checksum, = SNAPSHOT_CHECKSUM.unpack_from(data, len(data) - SNAPSHOT_CHECKSUM.size)
    if zlib.crc32(memoryview(data)[:-SNAPSHOT_CHECKSUM.size]) != checksum:
        raise SnapshotError("its checksum does not match: truncated or corrupt")
    pairs = []
    unpack, fixed = SNAPSHOT_ITEM.unpack_from, SNAPSHOT_ITEM.size
    view = memoryview(data)
    position = SNAPSHOT_HEADER.size
    while position < end:
        if position + fixed > end:
            raise SnapshotError("an item is cut short")
        key_length, value_length, flags, cas, exptime, atime, state = unpack(data, position)
        key_start = position + fixed
        value_start = key_start + key_length
        position = value_start + value_length
        if position > end or not 0 < key_length <= KEY_MAX_LENGTH:
            raise SnapshotError("an item's lengths do not fit")
        pairs.append((data[key_start:value_start], pack_header(
            cas, exptime, atime, flags, state & FETCHED) + view[value_start:position]))
    if len(pairs) != count:
        raise SnapshotError("it holds %d items, not the %d it says" % (len(pairs), count))
    return pairs, cas_counter, hash_power


# --------------------------------------------------------------------------
# 3. The service: what every connection shares
# --------------------------------------------------------------------------

# What ``watch`` accepts: memcached's kinds of event.  memg emits the first five; the
# others (its proxy's and raw command logs) never have anything to say here.
WATCH_KINDS = {"fetchers", "mutations", "evictions", "connevents", "deletions",
               "proxyreqs", "proxyevents", "proxyuser", "sysevents", "rawcmds"}
# Room memcached asks of a watcher's buffer beyond a line (for a "skipped=N" line).
WATCH_LINE_ROOM = 128
# Lines made (memcached's workers' lines written), sent and skipped.
WATCH_COUNTERS = ("log_worker_written", "log_watcher_sent", "log_watcher_skipped")


class Watcher:
    """A connection that sent ``watch``: the kinds of event it wants, the lines not
    yet sent to it and their size, the lines it missed since, and how to tell its
    engine that there are some (wake is called when lines arrive for a watcher that
    had none, from whichever thread emits)."""

    __slots__ = ("kinds", "lines", "size", "skipped", "wake")

    def __init__(self, kinds, wake):
        self.kinds = kinds
        self.lines = collections.deque()
        self.size = 0
        self.skipped = 0
        self.wake = wake


class Watchers:
    """The watchers, and the events they are sent: one line each,
    "ts=<time> gid=<sequence> type=..." as memcached writes them.  A watcher whose
    unsent lines would pass buffer_size bytes (-o watcher_logbuf_size) misses lines
    (log_watcher_skipped); once it has room again, a "skipped=N" line tells it how
    many, as memcached's logger does."""

    def __init__(self, buffer_size=256 * KB):
        self.buffer_size = buffer_size
        self.lock = threading.Lock()
        self.watchers = []
        self.active = frozenset()        # kinds someone watches: emitters look here first
        self.gid = 0
        self.counters = dict.fromkeys(WATCH_COUNTERS, 0)

    def add(self, kinds, wake):
        watcher = Watcher(kinds, wake)
        with self.lock:
            self.watchers.append(watcher)
            self.active = frozenset().union(*(w.kinds for w in self.watchers))
        return watcher

    def remove(self, watcher):
        with self.lock:
            self.watchers.remove(watcher)
            self.active = frozenset().union(*(w.kinds for w in self.watchers))

    def emit(self, kind, text):
        woken = []
        with self.lock:
            self.gid += 1
            self.counters["log_worker_written"] += 1
            line = ("ts=%.6f gid=%d %s\n" % (time.time(), self.gid, text)).encode("latin-1")
            for watcher in self.watchers:
                if kind not in watcher.kinds:
                    continue
                if watcher.size + len(line) + WATCH_LINE_ROOM > self.buffer_size:
                    watcher.skipped += 1
                    self.counters["log_watcher_skipped"] += 1
                    continue
                if not watcher.lines:
                    woken.append(watcher)
                if watcher.skipped:
                    self._append(watcher, b"skipped=%d\n" % watcher.skipped)
                    watcher.skipped = 0
                self._append(watcher, line)
                self.counters["log_watcher_sent"] += 1
        for watcher in woken:            # outside the lock: a wake may take the engine's
            watcher.wake()

    @staticmethod
    def _append(watcher, line):
        watcher.lines.append(line)
        watcher.size += len(line)

    def snapshot(self):
        """The counters, and how many watchers there are (log_watchers), for stats."""
        with self.lock:
            return dict(self.counters, log_watchers=len(self.watchers))

    def reset_counters(self):
        with self.lock:
            for name in WATCH_COUNTERS:
                self.counters[name] = 0

    def take(self, watcher):
        """The lines waiting for watcher, as bytes."""
        with self.lock:
            lines, watcher.lines, watcher.size = watcher.lines, collections.deque(), 0
        return b"".join(lines)


def read_auth_file(path, what="the auth file (-Y)"):
    """-Y's auth file or -S's password database (MEMCACHED_SASL_PWDB): lines of
    ``user:password``, as {user: password}.  Raises ValueError, naming the file and
    line, if it cannot be used."""
    try:
        with open(path, "rb") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise ValueError("cannot read %s %s: %s" % (what, path, error.strerror or error))
    credentials = {}
    for number, line in enumerate(lines, 1):
        user, colon, password = line.partition(b":")
        if not colon or not user:
            raise ValueError("%s %s, line %d: expected user:password" % (what, path, number))
        credentials[user] = password
    if not credentials:
        raise ValueError("%s %s has no user:password line" % (what, path))
    return credentials


# How many batches of items (WALK_BATCH each) the maintainer's crawl looks at each
# second, and the longest it waits between crawls (memcached's MAX_MAINTCRAWL_WAIT).
AUTOCRAWL_BATCHES = 10
AUTOCRAWL_MAX_WAIT = 60 * 60

# Counters the service keeps under its lock.  Traffic (bytes read and written, and
# cmd_meta) is counted by each connection's protocol, and added in when it closes.
SERVICE_COUNTERS = ("total_connections", "rejected_connections", "listen_disabled_num",
                    "idle_kicks", "auth_cmds", "auth_errors", "ssl_handshake_errors",
                    "ssl_new_sessions", "lru_crawler_starts", "lru_maintainer_juggles",
                    "conn_yields")
TRAFFIC = ("bytes_read", "bytes_written", "cmd_meta")


# What stats slabs shows of what the commands did to a class's items, in memcached's
# order.
SLAB_COMMAND_STATS = ("get_hits", "cmd_set", "delete_hits", "incr_hits", "decr_hits",
                      "cas_hits", "cas_badval", "touch_hits")


# memcached's figures of machinery memg does not have, which ``stats`` shows as
# memcached shows them when that machinery is idle: 0.  They are: its pools of
# response objects and read buffers (response_obj_*, read_buf_*: memg's replies and
# reads are bytes objects of their own); the descriptors it keeps back from -c
# (reserved_fds: memg keeps none back); its slab pages and their mover
# (slab_reassign_*, slabs_moved, slab_global_page_pool); items evicted while active
# and reads queued for its maintainer (evicted_active, lru_bumps_dropped: memg moves an
# item out of COLD at its second read, in the reader's own call); tail items another
# thread held (lrutail_reflocked: memg's store has one lock); failed allocations
# (malloc_fails: memg's fail only as the process does); its NAPI-id thread steering
# (unexpected_napi_ids, round_robin_fallback).
def idle_figures(*names):
    return [(name, 0) for name in names]


# The counters of stats detail, per prefix.
GETS, HITS, SETS, DELETES = range(4)


def tls_context(settings):
    """The server's TLS context, from -Z's settings (as memcached's ssl_init);
    ValueError in memcached's words if a file will not load."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1,
                               ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3][
        settings.ssl_min_version]

    def refusal(what, path, error):
        return ValueError("Error loading the %s: %s : %s" % (what, path, error if isinstance(
            error, str) else getattr(error, "reason", None) or error.strerror or error))

    # Python loads the chain and its key in one call: a chain that holds no
    # certificate is told apart first, so that the line names the file at fault.
    try:
        with open(settings.ssl_chain_cert, "rb") as chain:
            holds_one = b"-----BEGIN CERTIFICATE-----" in chain.read()
    except OSError as error:
        raise refusal("certificate chain", settings.ssl_chain_cert, error)
    if not holds_one:
        raise refusal("certificate chain", settings.ssl_chain_cert, "no certificate")
    try:
        context.load_cert_chain(settings.ssl_chain_cert, settings.ssl_key)
    except (ssl.SSLError, OSError) as error:
        raise refusal("key", settings.ssl_key or settings.ssl_chain_cert, error)
    if settings.ssl_ca_cert:
        try:
            context.load_verify_locations(settings.ssl_ca_cert)
        except (ssl.SSLError, OSError) as error:
            raise refusal("CA certificate", settings.ssl_ca_cert, error)
    # Modes 2 and 3 require a client certificate; 1 checks one if the client has one.
    context.verify_mode = [ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED,
                           ssl.CERT_REQUIRED][settings.ssl_verify_mode]
    if settings.ssl_ciphers:
        try:
            context.set_ciphers(settings.ssl_ciphers)
        except ssl.SSLError:
            raise ValueError("Error setting the provided cipher(s): %s" % settings.ssl_ciphers)
    if settings.ssl_kernel_tls:
        if not hasattr(ssl, "OP_ENABLE_KTLS"):
            raise ValueError("Kernel TLS offload is not available")
        context.options |= ssl.OP_ENABLE_KTLS
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)     # as memcached
    # Python 3.9 ignores a client's end without close_notify (3.10 no longer does);
    # memcached answers one that ends a handshake half-way with decode_error.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


def socket_name(name, transport="tcp"):
    """A socket address as memcached's ``stats conns`` writes it."""
    if isinstance(name, tuple):
        if ":" in name[0]:
            return "%s6:[%s]:%d" % ((transport,) + name[:2])
        return "%s:%s:%d" % ((transport,) + name[:2])
    return "unix:%s" % (name or "")


class Service:
    """What every connection of a server shares: the store, the settings, counters
    and statistics, watchers, credentials and the crawler.  It knows no sockets:
    an engine registers each connection's protocol here (``open_connection``,
    ``close_connection``) and tells it what it listens on (``listening``)."""

    def __init__(self, settings):
        self.settings = s = settings
        slabs = SlabClasses(s.growth_factor, s.chunk_size, s.slab_chunk_max, s.use_cas,
                            whole_pages=not s.no_modern or s.slab_chunk_max != SLAB_PAGE_SIZE)
        self.store = Store(memory_limit=s.memory_limit, item_size_max=s.item_size_max,
                           evict=s.evict, use_cas=s.use_cas, track_sizes=s.track_sizes,
                           segmented=s.lru_segmented,
                           temp_ttl=s.temporary_ttl if s.temp_lru else None, slabs=slabs)
        self.credentials = read_auth_file(s.auth_file) if s.auth_file else None
        self.sasl_credentials = (read_auth_file(s.sasl_pwdb, "the SASL password database")
                                 if s.sasl else None)
        # TLS (-Z): the context new connections are wrapped with; refresh_certs makes
        # a new one, so that a certificate that will not load leaves this one whole.
        self.tls_context = s.ssl_context or (tls_context(s) if s.ssl_enabled else None)
        self.tls_refreshed = time.monotonic()
        self.watchers = Watchers(s.watcher_logbuf_size)
        self.store.on_evict = self.watch_eviction
        self.started = time.time()
        self.lock = threading.Lock()       # guards what follows
        self.connections = set()           # the protocols of the open connections
        self.counters = dict.fromkeys(SERVICE_COUNTERS, 0)
        self.closed_traffic = dict.fromkeys(TRAFFIC, 0)
        # Traffic at the last ``stats reset``: connections own their counts, so a
        # reset records where it happened instead of writing to them.
        self.traffic_at_reset = dict.fromkeys(TRAFFIC, 0)
        self.prefix_stats = {}             # stats detail: prefix -> [gets, hits, sets, deletes]
        self.crawling = False              # a crawl or dump runs (others get BUSY)
        # The maintainer's own crawls: the one under way (its steps), what it has
        # found, when the next begins (the store's clock) and the wait after each,
        # which memcached adapts to what they find.
        self.autocrawl = None
        self.autocrawl_found = {}
        self.next_autocrawl = 0
        self.autocrawl_wait = 0
        if s.lru_maintainer and s.lru_crawler:
            self.autocrawl_step()          # the first, as memcached's, as the server starts
        self.listening = []                # (fd, address, "tcp" or "udp") of each socket
        self.on_shutdown = None            # the engine's request_stop (``shutdown``)

    # -- connections -----------------------------------------------------------

    def new_protocol(self, fd=-1, peer=None, local=None, wake=None):
        """The protocol a new connection begins with (-B: see Protocol)."""
        return PROTOCOLS[self.settings.protocol](self, fd, peer, local, wake)

    def open_connection(self, protocol):
        """Admit a connection (its protocol), or refuse it over the connection limit
        (-c); the engine then sends TOO_MANY_CONNECTIONS and closes it."""
        with self.lock:
            admitted = len(self.connections) < self.settings.max_connections
            self.counters["total_connections" if admitted else "rejected_connections"] += 1
            if admitted:
                self.connections.add(protocol)
        if admitted:
            self.watch_connection("conn_new", protocol)
            if self.settings.verbose > 1:
                print("%s: Client using the ascii protocol" % protocol.name, file=sys.stderr)
        return admitted

    def refuse_connection(self):
        """Count a client the engine could not serve (no thread to be had)."""
        self.count("rejected_connections")

    def close_connection(self, protocol):
        """A connection has closed: its traffic joins the totals."""
        protocol.connection_lost()
        with self.lock:
            if protocol not in self.connections:
                return
            self.connections.remove(protocol)
            for name in TRAFFIC:
                self.closed_traffic[name] += getattr(protocol, name)
        self.watch_connection("conn_close", protocol)
        if self.settings.verbose > 1:
            print("<%s connection closed." % protocol.name, file=sys.stderr)

    def count(self, name):
        with self.lock:
            self.counters[name] += 1

    def count_datagrams(self, received=0, sent=0, meta_commands=0):
        """UDP traffic: datagrams' bytes, and the meta commands they carried."""
        with self.lock:
            self.closed_traffic["bytes_read"] += received
            self.closed_traffic["bytes_written"] += sent
            self.closed_traffic["cmd_meta"] += meta_commands

    def authenticate(self, user, password, credentials=None):
        """Whether user and password match a line of the auth file (-Y), or of the
        credentials given (-S's).  Every password is compared in constant time, so
        that timing reveals nothing."""
        credentials = self.credentials if credentials is None else credentials
        matched = (hmac.compare_digest(password, credentials.get(user, b""))
                   and user in credentials)
        return self.record_authentication(matched)

    def record_authentication(self, succeeded):
        """Count an attempt to authenticate (auth_cmds, auth_errors); returns
        whether it succeeded."""
        with self.lock:
            self.counters["auth_cmds"] += 1
            self.counters["auth_errors"] += not succeeded
        return succeeded

    def refresh_certs(self):
        """refresh_certs: load the certificate and key again, for the connections to
        come; None, or what is wrong, in memcached's words."""
        if self.tls_context is None:
            return "Error TLS not enabled"
        if self.settings.ssl_context is not None:
            return "Error the certificates were given as an SSLContext, not as files"
        try:
            context = tls_context(self.settings)
        except ValueError as error:
            return str(error)
        with self.lock:
            self.tls_context = context
            self.tls_refreshed = time.monotonic()
        return None

    def request_shutdown(self):
        if self.on_shutdown is not None:
            self.on_shutdown()

    # -- the LRU maintainer and the crawler ----------------------------------------

    def begin_crawl(self):
        """Claim the crawler for a crawl or a dump (a start of it); False if one is
        running."""
        with self.lock:
            if self.crawling:
                return False
            self.crawling = True
            self.counters["lru_crawler_starts"] += 1
            return True

    def end_crawl(self):
        with self.lock:
            self.crawling = False

    def sweep(self):
        """The background work of a second (the engines call this every second): what
        a flush dropped is let go after a while, the hash table follows memcached's
        growth, and, as memcached's LRU maintainer thread does it, a run of the
        maintainer over the LRUs (Store.juggle), and the crawls it schedules."""
        settings = self.settings
        self.store.release_flushed()
        self.store.grow_hash_table()
        if not settings.lru_maintainer:
            return
        self.store.juggle(settings.hot_lru_pct, settings.warm_lru_pct,
                          settings.hot_max_factor, settings.warm_max_factor)
        self.count("lru_maintainer_juggles")
        if settings.lru_crawler:
            self.autocrawl_step()
        elif self.autocrawl is not None:         # lru_crawler disable stops it
            self.autocrawl.close()
            self.autocrawl = None
            self.end_crawl()

    def autocrawl_step(self):
        """Go on with the maintainer's crawl, AUTOCRAWL_BATCHES batches of items a
        second, or begin one when it is due and the crawler is free.  As memcached's
        lru_maintainer_crawler_check, the first begins at once and each finished
        crawl sets the wait before the next (schedule_autocrawl)."""
        if self.autocrawl is None:
            if self.store.now() < self.next_autocrawl or not self.begin_crawl():
                return
            self.autocrawl_found = {}
            self.autocrawl = self.store.crawl(tocrawl=self.settings.lru_crawler_tocrawl,
                                              found=self.autocrawl_found)
        for _ in range(AUTOCRAWL_BATCHES):
            if next(self.autocrawl, None) is None:
                self.autocrawl = None
                self.schedule_autocrawl(self.autocrawl_found)
                self.end_crawl()
                return

    def schedule_autocrawl(self, found):
        """memcached's rule for the wait after a crawl: a minute longer (an hour at
        most) while fewer than 1 % of the items with a TTL seen would have expired
        by the end of it, a minute shorter while more would; then five seconds."""
        low_watermark = (found.get("seen", 0) - found.get("noexp", 0)) // 100 + 1
        available = 0
        for minute, expiring in enumerate(found.get("minutes", ())):
            available += expiring
            if available > low_watermark:
                if self.autocrawl_wait < minute * 60:
                    self.autocrawl_wait += 60
                elif self.autocrawl_wait >= 60:
                    self.autocrawl_wait -= 60
                break
        if not available:
            self.autocrawl_wait += 60
        self.autocrawl_wait = min(self.autocrawl_wait, AUTOCRAWL_MAX_WAIT)
        self.next_autocrawl = self.store.now() + self.autocrawl_wait + 5

    # -- watchers -----------------------------------------------------------------

    def watch_connection(self, event, protocol):
        if "connevents" in self.watchers.active:
            peer = protocol.peer
            where = ("rip=%s rport=%d transport=tcp" % peer[:2] if isinstance(peer, tuple)
                     else "rip=unix rport=0 transport=local")
            self.watchers.emit("connevents", "type=%s %s%s cfd=%s" % (
                event, where,
                " reason=" + protocol.close_reason if event == "conn_close" else "",
                protocol.name))

    def watch_eviction(self, key, item, now):
        if "evictions" in self.watchers.active:
            ttl, clsid, item = self.store.ttl(item, now), item[CLASS_BYTE], header(item)
            self.watchers.emit("evictions", (
                "type=eviction key=%s fetch=%s ttl=%d la=%d clsid=%d" % (
                    uri(key), "yes" if item.state & FETCHED else "no", ttl,
                    now - item.atime, clsid)))

    # -- statistics -------------------------------------------------------------

    def record_detail(self, key, counter, hit=False):
        """stats detail: count a get (GETS, and HITS if it hit), a set (SETS) or a
        delete (DELETES) under key's prefix, the part before the first -D
        character; a key without one is not counted (as memcached's, nor one with
        a NUL before it)."""
        prefix, delimiter, _ = key.partition(self.settings.detail_delimiter.encode())
        if not delimiter or 0 in prefix:
            return
        with self.lock:
            counts = self.prefix_stats.setdefault(prefix, [0, 0, 0, 0])
            counts[counter] += 1
            counts[HITS] += hit

    def detail_dump(self):
        """``stats detail dump``: a line per prefix, then END."""
        with self.lock:
            lines = [b"PREFIX %s get %d hit %d set %d del %d\r\n" % ((prefix,) + tuple(counts))
                     for prefix, counts in self.prefix_stats.items()]
        return b"".join(lines) + END

    def reset_stats(self):
        """``stats reset``: every counter to 0, as memcached's (gauges, such as
        curr_items, stay)."""
        self.store.reset_counters()
        self.watchers.reset_counters()
        with self.lock:
            self.prefix_stats.clear()
            self.traffic_at_reset = self._traffic()
            for name in SERVICE_COUNTERS:
                self.counters[name] = 0

    def _traffic(self):
        """Bytes read and written and meta commands since the start, as a dict; the
        caller holds the lock."""
        return {name: self.closed_traffic[name] + sum(
            getattr(protocol, name) for protocol in self.connections) for name in TRAFFIC}

    def general_stats(self):
        """``stats``: memcached's general statistics, every one in memcached's order,
        and those it shows only for some settings under the same settings.  Figures
        of machinery memg does not have are as memcached shows them idle (see
        idle_figures)."""
        now = time.time()
        store = self.store.snapshot()
        settings = self.settings
        with self.lock:
            counters = dict(self.counters)
            crawling = self.crawling
            live = len(self.connections)
            traffic, at_reset = self._traffic(), self.traffic_at_reset
        since_reset = {name: traffic[name] - at_reset[name] for name in TRAFFIC}
        watchers = self.watchers.snapshot()
        usage = os.times()
        # (memg has no reference counts that could lock an item at an LRU's tail, and
        # reads are never queued for the maintainer: lrutail_reflocked and
        # lru_bumps_dropped are 0; an item is moved out of COLD at its second read, so
        # evicted_active is 0 too.)
        maintained = settings.lru_maintainer
        return [
            ("pid", os.getpid()),
            ("uptime", int(now - self.started)),
            ("time", int(now)),
            ("version", VERSION),
            ("libevent", "none"),
            ("pointer_size", 64 if sys.maxsize > 2 ** 32 else 32),
            ("rusage_user", "%.6f" % usage.user),
            ("rusage_system", "%.6f" % usage.system),
            ("max_connections", settings.max_connections),
            ("curr_connections", live),
            ("total_connections", counters["total_connections"]),
            ("rejected_connections", counters["rejected_connections"]),
            ("connection_structures", live),
        ] + idle_figures("response_obj_oom", "response_obj_count", "response_obj_bytes",
                         "read_buf_count", "read_buf_bytes", "read_buf_bytes_free",
                         "read_buf_oom", "reserved_fds") + [
            ("cmd_get", store["cmd_get"]),
            ("cmd_set", store["cmd_set"]),
            ("cmd_flush", store["cmd_flush"]),
            ("cmd_touch", store["cmd_touch"]),
            ("cmd_meta", since_reset["cmd_meta"]),
        ] + [(name, store[name]) for name in (
            "get_hits", "get_misses", "get_expired", "get_flushed", "delete_misses",
            "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
            "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
            "store_too_large", "store_no_memory")
        ] + [
            ("auth_cmds", counters["auth_cmds"]),
            ("auth_errors", counters["auth_errors"]),
        ] + ([("idle_kicks", counters["idle_kicks"])] if settings.idle_timeout else []) + [
            ("bytes_read", since_reset["bytes_read"]),
            ("bytes_written", since_reset["bytes_written"]),
            ("limit_maxbytes", store["limit_maxbytes"]),
            ("accepting_conns", 1),
            ("listen_disabled_num", counters["listen_disabled_num"]),
            # Each time accepting stops, it stops for ACCEPT_BACKOFF.
            ("time_in_listen_disabled_us",
             counters["listen_disabled_num"] * int(ACCEPT_BACKOFF * 1000000)),
            ("threads", settings.threads),
            ("conn_yields", counters["conn_yields"]),
            # memcached's hash table for the same keys (see Store.grow_hash_table),
            # which never has to move its items to a larger one in the background.
            ("hash_power_level", store["hash_power_level"]),
            ("hash_bytes", HASH_BUCKET_SIZE << store["hash_power_level"]),
            ("hash_is_expanding", 0),
            # memcached shows its slab mover's figures unless -o no_slab_reassign, which
            # memg ignores: memg has no pages to move.
        ] + idle_figures("slab_reassign_rescues", "slab_reassign_chunk_rescues",
                         "slab_reassign_evictions_nomem", "slab_reassign_inline_reclaim",
                         "slab_reassign_busy_items", "slab_reassign_busy_deletes",
                         "slab_reassign_running", "slabs_moved") + ([
            ("lru_crawler_running", int(crawling)),
            ("lru_crawler_starts", counters["lru_crawler_starts"]),
        ] if settings.lru_crawler else []) + ([
            ("lru_maintainer_juggles", counters["lru_maintainer_juggles"]),
        ] if maintained else []) + idle_figures("malloc_fails") + [
            # Watched events are made into lines as they happen, none dropped.
            ("log_worker_dropped", 0),
            ("log_worker_written", watchers["log_worker_written"]),
            ("log_watcher_skipped", watchers["log_watcher_skipped"]),
            ("log_watcher_sent", watchers["log_watcher_sent"]),
            ("log_watchers", watchers["log_watchers"]),
        ] + ([
            ("ssl_new_sessions", counters["ssl_new_sessions"]),
        ] if self.tls_context is not None and settings.ssl_session_cache else []) + ([
            ("ssl_handshake_errors", counters["ssl_handshake_errors"]),
            ("time_since_server_cert_refresh", int(time.monotonic() - self.tls_refreshed)),
        ] if self.tls_context is not None else []) + idle_figures(
            "unexpected_napi_ids", "round_robin_fallback"
        ) + [(name, store[name]) for name in ("bytes", "curr_items", "total_items")
        ] + idle_figures("slab_global_page_pool") + [
            (name, store[name]) for name in ("expired_unfetched", "evicted_unfetched")
        ] + (idle_figures("evicted_active") if maintained else []) + [
            (name, store[name]) for name in (
                "evictions", "reclaimed", "crawler_reclaimed", "crawler_items_checked")
        ] + idle_figures("lrutail_reflocked") + ([(name, store[name]) for name in (
            "moves_to_cold", "moves_to_warm", "moves_within_lru", "direct_reclaims")
        ] + idle_figures("lru_bumps_dropped") if maintained else [])

    def settings_stats(self):
        """``stats settings``: the settings as memcached names them, with what is in
        force now: the port bound, the memory limit after ``cache_memlimit``."""
        bound = {transport: address[1] for _, address, transport in reversed(self.listening)
                 if isinstance(address, tuple)}
        current = {"maxbytes": self.store.memory_limit, "tcpport": bound.get("tcp", 0),
                   "udpport": bound.get("udp", 0)}
        return [(name, current.get(name, value)) for name, value in self.settings.stats()]

    def item_stats(self):
        """``stats items``: memcached's figures for each slab class holding items,
        those of the sub-LRUs while the maintainer runs (number_temp with the TEMP
        LRU); mem_requested is memcached's bytes for the items (found by a walk of
        the cache).  (tailrepairs, lrutail_reflocked and evicted_active: see
        general_stats.)"""
        maintained, temp = self.settings.lru_maintainer, self.settings.temp_lru
        names = ["number"] + ([
            "number_hot", "number_warm", "number_cold"] + ["number_temp"] * temp + [
            "age_hot", "age_warm"] if maintained else []) + [
            "age", "mem_requested", "evicted", "evicted_nonzero", "evicted_time",
            "outofmemory", "tailrepairs", "reclaimed", "expired_unfetched",
            "evicted_unfetched"] + ["evicted_active"] * maintained + [
            "crawler_reclaimed", "crawler_items_checked", "lrutail_reflocked"] + ([
                "moves_to_cold", "moves_to_warm", "moves_within_lru", "direct_reclaims",
                "hits_to_hot", "hits_to_warm", "hits_to_cold", "hits_to_temp"]
                if maintained else [])
        requested = self.store.slab_usage().requested
        return [("items:%d:%s" % (slab_class, name),
                 requested[slab_class] if name == "mem_requested" else figures.get(name, 0))
                for slab_class, figures in sorted(self.store.class_stats().items())
                if figures["number"] for name in names]

    def slab_stats(self):
        """``stats slabs``: for each slab class whose chunks the items would take, or
        that has held items (memcached keeps a class's pages when its items go), the
        pages memcached would hold for them (a class grows a page at a time, as
        memcached's; memg frees memory as items go, so a class has the pages that
        its items fill now, one at least), and what the commands did to its items;
        then how many classes and what the pages take."""
        usage = self.store.slab_usage()
        classes = self.store.class_stats(ages=False)
        slabs = self.store.slabs
        rows, malloced = [], 0
        shown = sorted(set(usage.chunks) | set(classes))
        for slab_class in shown:
            used, per_page = usage.chunks[slab_class], slabs.per_page(slab_class)
            pages = max(1, -(-used // per_page))
            malloced += pages * slabs.page_bytes(slab_class)
            figures = classes.get(slab_class, {})
            rows += [("%d:%s" % (slab_class, name), value) for name, value in [
                ("chunk_size", slabs.chunk_sizes[slab_class - 1]),
                ("chunks_per_page", per_page), ("total_pages", pages),
                ("total_chunks", pages * per_page), ("used_chunks", used),
                ("free_chunks", pages * per_page - used), ("free_chunks_end", 0),
            ] + [(name, figures.get(name, 0)) for name in SLAB_COMMAND_STATS]]
        return rows + [("active_slabs", len(shown)), ("total_malloced", malloced)]

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
        for fd, address, transport in self.listening:
            if transport == "udp":           # as memcached's lines for a UDP socket
                rows += [("%d:UDP" % fd, "UDP"), ("%d:addr" % fd, socket_name(address, "udp")),
                         ("%d:state" % fd, "conn_read"), ("%d:secs_since_last_cmd" % fd, 0)]
            else:
                rows += [("%d:addr" % fd, socket_name(address)),
                         ("%d:state" % fd, "conn_listening")]
        with self.lock:
            live = sorted(self.connections, key=lambda protocol: protocol.fd)
        for protocol in live:
            fd = protocol.fd
            rows += [("%d:addr" % fd, socket_name(protocol.peer)),
                     ("%d:listen_addr" % fd, socket_name(protocol.local)),
                     ("%d:state" % fd, protocol.state()),
                     # whole seconds of a coarse clock, as memcached's current_time
                     ("%d:secs_since_last_cmd" % fd, int(now) - int(protocol.last_command))]
        return rows
# --------------------------------------------------------------------------
# 4. The protocol
# --------------------------------------------------------------------------

# A command line longer than this with no newline closes the connection, except for
# get and gets, whose key lists may run up to GET_LINE_LIMIT (as memcached).
LINE_LIMIT = 2048
GET_LINE_LIMIT = 1 * MB
MEMCACHED_READ_BUFFER = 16 * KB
# Replies a connection holds for its client at most before it stops running commands
# until they are sent: a client that pipelines requests without reading the replies
# holds at most this much (and its engine stops reading from it, as memcached does).
OUTPUT_LIMIT = 256 * KB
# stats cachedump stops before its reply reaches this size, as memcached's does.
CACHEDUMP_LIMIT = 2 * MB
# memcached refuses data lengths beyond INT_MAX - 2 as malformed.
VALUE_LENGTH_MAX = 2 ** 31 - 3
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
CRAWLER_BUSY = b"BUSY currently processing crawler request\r\n"
INTERNAL_ERROR = b"SERVER_ERROR internal error\r\n"
OK = b"OK\r\n"
END = b"END\r\n"

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



class DataBlock:
    """The data block a storage command waits for (memcached's conn_nread state):
    the bytes still to come, those come so far, what to call with them once they
    are all there, and whether they end in the text protocol's "\\r\\n"; or
    (parts and then None) the data of a refused command, discarded as it arrives
    (memcached's conn_swallow)."""

    __slots__ = ("remaining", "parts", "then", "args", "terminated")

    def __init__(self, remaining, parts, then, args=(), terminated=False):
        self.remaining = remaining
        self.parts = parts
        self.then = then
        self.args = args
        self.terminated = terminated


class Protocol:
    """One connection's conversation in one of memcached's protocols, without any
    I/O: what the text and the binary protocol share.

    The engine hands it what it receives (``receive_data``; b"" once the input has
    ended) and sends what that returns.  Every command whose input is complete runs
    then, in order, and its replies are returned; the rest of the input waits for
    more.  Afterwards ``closing`` says whether to close the connection once the
    replies are sent, and ``pending`` whether more replies can be made without more
    input: a long reply streamed as the client reads it (a dump, a large
    multi-get), commands held back while the replies before them exceeded
    OUTPUT_LIMIT or after -R commands in a row (see run), or a watcher's log
    lines.  ``data_to_send`` makes them, a bounded step at a time, so that an
    engine can send each step before it asks for the next and serve other clients
    in between.

    Why a state machine fed with bytes, as memcached's connection states and h11,
    rather than blocking handlers over a buffer that rewinds: the same handlers
    then serve a thread that reads its socket and an event loop that is handed
    bytes, a storage command has no effect until its whole data block is there, and
    a value that arrives in many pieces is neither parsed again nor copied again at
    every piece; one over the size limit is discarded as it streams in.

    ``service`` gives the store, the settings and the server-wide state; fd, peer
    and local (the client's and the listener's addresses) only describe the
    connection for ``stats conns``, ``watch`` and -vv; wake, if given, is called
    from any thread when a watcher connection has log lines waiting.

    Each protocol is a subclass with ``next_command``, which runs the command at
    the start of the input if all of it is there.  A connection begins as the
    class ``service.settings.protocol`` names; with "auto", its first byte chooses,
    as memcached's -B auto does: the binary protocol's magic byte makes it a
    BinaryProtocol, anything else a TextProtocol (the object changes class, as
    memcached changes the connection's try_read_command).
    """

    datagram = False               # a UDP request's (see answer_datagram)

    def __init__(self, service, fd=-1, peer=None, local=None, wake=None):
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.fd, self.peer, self.local, self.wake = fd, peer, local, wake
        self.name = str(fd)            # how -vv and watch name this client
        self.buffer = b""              # input received, not yet consumed from pos on
        self.pos = 0
        self.block = None              # the DataBlock being waited for, if any
        self.producer = None           # an iterator of a reply's chunks, if streaming
        self.watcher = None            # once the client sent watch
        self.paused = False            # commands wait: replies before them are over the bound
        self.yielded = False           # commands wait: this connection had its turn (-R)
        self.pending = False           # more replies can be made without more input
        self.eof = False               # the input has ended
        self.closing = False           # close once the replies are sent
        # Why the connection closed, as memcached's watchers are told: "error" unless
        # the client ended it (its end of input, quit), it idled out or shut memg down.
        self.close_reason = "error"
        self.negotiating = service.settings.protocol == "auto"   # until the first byte
        self.authenticated = self.starts_authenticated(service)
        self.out = []                  # replies not yet taken by the engine
        self.out_bytes = 0
        self.noreply = False
        self.last_command = time.monotonic()      # idle timeout, stats conns
        self.bytes_read = self.bytes_written = self.cmd_meta = 0    # the traffic

    # -- the engine's side --------------------------------------------------------

    def receive_data(self, data):
        """Take bytes the client sent (b"": its input has ended) and return the
        replies of the commands they complete."""
        self.feed(data)
        return self.take_output()

    def feed(self, data):
        """receive_data without taking the replies (see take_responses)."""
        if self.closing:
            return                           # what comes after the end is not read
        if data and self.watcher is None:
            self.bytes_read += len(data)
            if self.pos < len(self.buffer):
                data = self.buffer[self.pos:] + data    # a partial line waited
            self.buffer = data
            self.pos = 0
            if self.negotiating:
                self.negotiate()
        elif self.watcher is not None:       # a watcher only listens, until it leaves
            if not data:
                self.closing, self.close_reason = True, "normal"
            return
        else:
            self.eof, self.close_reason = True, "normal"
        self.run()

    def negotiate(self):
        """-B auto: the first byte chooses the protocol (see the class's docstring).
        (A text connection keeps its class: CPython's fast reads of an object's
        attributes start over when its class is assigned, even to the same one,
        and cost a text get 40 % more instructions.)"""
        self.negotiating = False
        if self.buffer[0] == MAGIC_REQUEST:
            self.__class__ = BinaryProtocol
            self.authenticated = self.starts_authenticated(self.service)

    def data_to_send(self):
        """The next step of the replies that ``pending`` promised (b"" if there is
        none yet): a chunk of a streamed reply, the watcher's lines, or the replies
        of commands that waited for room."""
        self.advance()
        return self.take_output()

    def advance(self):
        """data_to_send without taking the replies (see take_responses)."""
        try:
            if self.producer is not None:
                chunk = next(self.producer, None)
                if chunk is None:
                    self.producer = None     # run() goes on with the commands after it
                else:
                    self.queue(chunk)
            elif self.watcher is not None:
                self.queue(self.service.watchers.take(self.watcher))
        except Exception:
            self.internal_error()
        self.run()

    def connection_lost(self):
        """The connection has closed: let go of what it held (its input, a watcher
        slot, a dump's hold of the crawler) at once, whoever still holds it."""
        self.closing = True
        self.buffer, self.pos, self.block = b"", 0, None
        if self.producer is not None:
            self.producer.close()        # its finally clauses release what it held
            self.producer = None
        if self.watcher is not None:
            self.service.watchers.remove(self.watcher)
            self.watcher = None

    def state(self):
        """The connection's state as memcached's ``stats conns`` names it."""
        if self.closing:
            return "conn_closing"
        if self.watcher is not None:
            return "conn_watch"
        if self.block is not None:
            return "conn_nread"
        return "conn_parse_cmd"

    # -- output -----------------------------------------------------------------

    def queue(self, data):
        self.out.append(data)
        self.out_bytes += len(data)

    def reply(self, data):
        """Queue one reply, unless the command asked for none (noreply)."""
        if self.noreply:
            self.noreply = False
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if self.settings.verbose > 1:
            self.log(">", data)

    def error(self, data):
        """Queue an error that noreply does not hide (meta commands' errors)."""
        self.noreply = False
        self.reply(data)

    def stream(self, chunks):
        """Send an iterator's chunks as the client reads them: the commands after
        this one wait until it is exhausted."""
        self.producer = iter(chunks)

    def log(self, direction, data):
        """-vv: a command or the first line of a reply, as memcached logs them."""
        line = bytes(data).split(b"\r\n", 1)[0].decode("latin-1")
        print("%s%s %s" % (direction, self.name, line), file=sys.stderr, flush=True)

    def take_output(self):
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        self.bytes_written += len(data)
        return data

    def take_responses(self):
        """The replies made so far, each command's apart (a get's, a value apiece):
        memcached sends each response of a UDP request as datagrams of its own."""
        responses = self.out
        self.out, self.out_bytes = [], 0
        return responses

    def internal_error(self):
        """A bug in memg: this client gets memcached's severe-error reply and is
        closed; the traceback goes to the server's stderr, never to the wire."""
        traceback.print_exc()
        self.internal_error_reply()
        self.block = None
        self.connection_lost()

    # -- input --------------------------------------------------------------------

    def run(self):
        """Run the commands whose input is complete, until the input runs out, the
        replies reach OUTPUT_LIMIT, or a streamed reply or a watcher takes over; or
        until it has run -R commands in a row: then it yields (counted in
        conn_yields), and the commands left wait for data_to_send, so that a client
        that pipelines many cannot keep the others waiting.  The limit is kept here
        because only the protocol sees where one command ends and the next begins;
        how to let the others go first is the engine's (see ``yielded``)."""
        self.paused = self.yielded = False
        turn = self.settings.reqs_per_event
        try:
            while not self.closing:
                if self.block is not None:
                    if not self.continue_block():
                        break
                    continue
                if self.producer is not None or self.watcher is not None:
                    break
                if self.pos == len(self.buffer):
                    break
                if self.out_bytes >= OUTPUT_LIMIT:
                    self.paused = True
                    break
                if not turn:
                    self.yielded = True
                    self.service.count("conn_yields")
                    break
                if not self.next_command():
                    break
                turn -= 1
        except Exception:
            self.internal_error()
        # Is more to come without input (``pending``), and is the conversation over?
        # (Lines that reach a watcher later are announced by its wake.)
        self.pending = pending = bool(
            self.paused or self.yielded or self.producer is not None
            or (self.watcher is not None and self.watcher.lines))
        if self.eof and not pending:
            self.closing = True          # what is left is an incomplete command
        if self.closing:
            self.buffer, self.pos, self.block = b"", 0, None

    def read_block(self, nbytes, then, *args):
        """Have then(value, *args) called once the next nbytes of input and their
        "\\r\\n" are all there: value is None if the terminator is wrong."""
        data, pos = self.buffer, self.pos
        end = pos + nbytes + 2
        if end <= len(data):                 # the usual case: it came with its line
            self.pos = end
            then(data[pos:end - 2] if data[end - 2:end] == b"\r\n" else None, *args)
            return
        self.block = DataBlock(end - len(data), [data[pos:]], then, args, terminated=True)
        self.pos = len(data)

    def read_body(self, nbytes, then, *args):
        """Have then(body, *args) called once the next nbytes of input are all there
        (the binary protocol's values, which no terminator ends)."""
        data, pos = self.buffer, self.pos
        end = pos + nbytes
        if end <= len(data):
            self.pos = end
            then(data[pos:end], *args)
            return
        self.block = DataBlock(end - len(data), [data[pos:]], then, args, terminated=False)
        self.pos = len(data)

    def discard_block(self, nbytes):
        """Discard the next nbytes of input as they come."""
        self.block = DataBlock(nbytes, None, None)

    def continue_block(self):
        """Take what input there is into the block being waited for; once it is
        complete, call its then.  False if it needs more input."""
        block, data, pos = self.block, self.buffer, self.pos
        taken = min(len(data) - pos, block.remaining)
        if block.parts is not None and taken:
            block.parts.append(data[pos:pos + taken])
        self.pos = pos + taken
        block.remaining -= taken
        if block.remaining:
            return False
        self.block = None
        if block.parts is not None:
            value = b"".join(block.parts)
            if block.terminated:
                value = value[:-2] if value[-2:] == b"\r\n" else None
            block.then(value, *block.args)
        return True

    # -- what both protocols tell watchers ----------------------------------------

    def fetch_watch(self):
        """What the store is to tell of its lookups: watch_fetch while someone
        watches fetchers, else None.  memcached logs an item_get line for every
        lookup, those of storage commands, delete, incr, touch and me included."""
        return self.watch_fetch if "fetchers" in self.service.watchers.active else None

    def watch_fetch(self, key, status, item):
        """A fetchers line for one lookup (see Store._find); the store calls it
        under its lock, as it calls watch_eviction."""
        size = value_size(item) if item else 0
        self.service.watchers.emit("fetchers", (
            "type=item_get key=%s status=%s clsid=%d cfd=%s size=%d" % (
                uri(key), status, item[CLASS_BYTE] if item else 0, self.name, size)))

    def watch_store(self, mode, key, outcome, item, value=None, flags=0, exptime=0):
        """A mutations line: item is what was stored.  When nothing was, memcached
        describes the item the command made, of value (None: none was made, the
        value being too large), flags and exptime."""
        if "mutations" not in self.service.watchers.active:
            return
        now = self.store.now()
        if item is not None:
            size, flags, expires = value_size(item), header(item).flags, header(item).exptime
        else:
            size = len(value or b"")
            expires = self.store.expiry(exptime, now) if exptime else 0
        self.service.watchers.emit("mutations", (
            "type=item_store key=%s status=%s cmd=%s ttl=%d clsid=%d cfd=%s size=%d" % (
                uri(key), outcome.lower(), mode, max(0, expires - now) if expires > 0 else 0,
                0 if item is None and value is None else self.store.slabs.slab_class(
                    len(key), size, flags),
                self.name, size)))

    def watch_delete(self, command, key):
        if "deletions" in self.service.watchers.active:
            self.service.watchers.emit("deletions", (
                "type=deleted key=%s cmd=%s clsid=1 cfd=%s" % (
                    uri(key), command.decode(), self.name)))


class TextProtocol(Protocol):
    """memcached's text protocol: the classic commands and the meta commands."""

    def internal_error_reply(self):
        self.queue(INTERNAL_ERROR)

    @staticmethod
    def starts_authenticated(service):
        """Whether a new connection may send commands before it logs in (-Y)."""
        return service.credentials is None

    def next_command(self):
        data, pos = self.buffer, self.pos
        newline = data.find(b"\n", pos)
        if (newline < 0 or newline - pos > MEMCACHED_READ_BUFFER) and not self.long_line(
                newline):
            return False
        self.pos = newline + 1
        # As memcached: strip "\r\n" or "\n", but a lone "\r\n" keeps its "\r"; a NUL
        # ends the line (C's end of string).
        end = newline - 1 if newline - pos > 1 and data[newline - 1] == 13 else newline
        line = data[pos:end]
        if 0 in line:
            line = strip_at_nul(data[pos:newline + 1])
        self.last_command = monotonic()
        if self.settings.verbose > 1:
            self.log("<", line)
        self.noreply = False
        tokens = line.split(b" ")
        if b"" in tokens:
            tokens = [token for token in tokens if token]
        if not self.authenticated:
            self.authenticate(tokens)
            return True
        try:
            handler, fewest, most = self.COMMANDS[tokens[0]]
        except (KeyError, IndexError):
            self.unknown(tokens)
            return True
        if fewest <= len(tokens) <= most:
            handler(self, tokens)
        else:
            self.reply(ERROR)
        return True

    def long_line(self, newline):
        """Whether a line with no newline yet, or a very long one, may run now (False:
        wait for more of it, or close).  memcached waits for more of a line while
        what came fits its 2 KiB, takes one whose newline is within its 16 KiB read
        buffer, and lets only get and gets lines grow beyond that (to
        GET_LINE_LIMIT); any other closes the connection."""
        length = (newline if newline >= 0 else len(self.buffer)) - self.pos
        if newline < 0 and length <= LINE_LIMIT:
            return False
        start = self.buffer[self.pos:self.pos + LINE_LIMIT]
        command = start.lstrip(b" ")
        if (len(start) - len(command) > 100 or not command.startswith((b"get ", b"gets "))
                or length > GET_LINE_LIMIT):
            self.closing = True
            return False
        return newline >= 0

    def unknown(self, tokens):
        """ERROR, except that a request that looks like HTTP closes the connection
        (as memcached: a browser tricked into talking to the port gets nothing).
        memcached only gets this far for words outside its first-letter branches."""
        if not tokens or len(tokens[0]) < 2:
            self.reply(ERROR)                # memcached's shortest command has two
            return
        first = tokens[0][:1]
        if tokens[-1].startswith(b"HTTP/") and first not in b"gsacidt" and not (
                first == b"m" and len(tokens[0]) == 2):
            self.closing = True
            return
        self.reply(ERROR)

    def authenticate(self, tokens):
        """-Y: until it has authenticated, a client may only send memcached's
        ``set <key> <flags> <exptime> <bytes>`` whose data is ``user password`` (key,
        flags and exptime are ignored).  Data that would not fit memcached's read
        buffer closes the connection, as memcached's does."""
        nbytes = parse_uint32(tokens[4]) if len(tokens) >= 5 and tokens[0] == b"set" else None
        if nbytes is None:
            self.reply(UNAUTHENTICATED)
        elif nbytes + 2 > MEMCACHED_READ_BUFFER:
            self.closing = True
        else:
            self.read_block(nbytes, self.check_credentials)

    def check_credentials(self, payload):
        if payload is None:
            self.reply(BAD_TERMINATION)
            return
        credentials = [token for token in payload.split(b"\0", 1)[0].split(b" ") if token]
        if len(credentials) < 2:
            self.reply(BAD_AUTH_FORMAT)
            return
        self.authenticated = self.service.authenticate(*credentials[:2])
        self.reply(REPLIES[STORED] if self.authenticated else AUTH_FAILURE)

    def check_noreply(self, tokens):
        """memcached's set_noreply_maybe: a last token of "noreply" silences the
        reply, errors included."""
        self.noreply = tokens[-1] == b"noreply"

    def dispatch(self, tokens, table):
        """A sub-command (``stats items``, ``lru_crawler crawl`` ...): its handler
        from table, keyed by the second word (None when there is none), with the
        tokens it takes, as the command table has them; ERROR otherwise."""
        entry = table.get(tokens[1] if len(tokens) > 1 else None)
        if entry is None or not entry[1] <= len(tokens) <= entry[2]:
            self.reply(ERROR)
        else:
            entry[0](self, tokens)

    # -- retrieval: get gets gat gats -------------------------------------------

    def retrieve(self, tokens):
        with_cas, touch = self.RETRIEVALS[tokens[0]]
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
        if keys and max(map(len, keys)) > KEY_MAX_LENGTH:   # (one test for all keys)
            valid = list(itertools.takewhile(lambda key: not bad_key(key), keys))
        watch = self.watch_fetch if "fetchers" in self.service.watchers.active else None
        items = self.store.get_many(valid, exptime, True, watch)    # (fetch_watch, inlined)
        if self.settings.detail_enabled:
            for key, item in zip(valid, items):
                self.service.record_detail(key, GETS, hit=item is not None)
        if valid is not keys:
            self.reply(BAD_FORMAT)
            return
        if self.settings.verbose > 1:
            for key, item in zip(keys, items):
                if item is not None:
                    self.log(">", b"sending key " + key)
            self.log(">", END)
        if len(items) > 1 and sum(map(len, filter(None, items))) > OUTPUT_LIMIT:
            self.stream(self.values(with_cas, keys, items))
            return
        # As memcached, each key has a response of its own (over UDP, datagrams of
        # its own; see answer_datagram), and END ends the last key's.
        if len(items) == 1:                                      # (get has no noreply)
            reply = value_blocks(with_cas, keys, items)[0] + END
            self.out.append(reply)
            self.out_bytes += len(reply)
            return
        responses = value_blocks(with_cas, keys, items) or [b""]      # (gat with no key)
        responses[-1] += END
        self.out.extend(responses)
        self.out_bytes += sum(map(len, responses))

    def values(self, with_cas, keys, items):
        """A large multi-get's reply, made VALUES_PER_CHUNK keys' responses at a time
        (over UDP, one at a time: each is datagrams of its own)."""
        step = 1 if self.datagram else VALUES_PER_CHUNK
        for start in range(0, len(keys), step):
            chunk = b"".join(value_blocks(with_cas, keys[start:start + step],
                                          items[start:start + step]))
            yield chunk + END if start + step >= len(keys) else chunk

    # -- storage: set add replace append prepend cas ------------------------------------

    def update(self, tokens):
        mode = self.UPDATES[tokens[0]]
        self.check_noreply(tokens)
        key = tokens[1]
        flags, exptime, nbytes = numbers = storage_numbers(tokens)
        cas = parse_uint64(tokens[5]) if mode == CAS else 0
        if (len(key) > KEY_MAX_LENGTH or None in numbers or cas is None
                or not 0 <= nbytes <= VALUE_LENGTH_MAX):
            self.reply(BAD_FORMAT)
            return
        if self.settings.detail_enabled:
            self.service.record_detail(key, SETS)
        if self.store.too_large(key, nbytes, flags):
            self.refuse_value(mode, key, nbytes, answer=self.reply, drop_old=mode == SET)
        else:
            self.read_block(nbytes, self.finish_update, mode, key, flags, exptime, cas)

    def finish_update(self, value, mode, key, flags, exptime, cas):
        if value is None:
            self.reply(BAD_CHUNK)
            return
        active = self.service.watchers.active
        outcome, item = self.store.store(
            mode, key, value, flags=flags, exptime=exptime, cas=cas,
            watch=self.watch_fetch if "fetchers" in active else None)   # (fetch_watch)
        if active:
            self.watch_store(mode, key, outcome, item, value, flags, exptime)
        self.reply(REPLIES[outcome])

    def refuse_value(self, mode, key, nbytes, answer, drop_old):
        """A value over the size limit (-I): refused as soon as its command line
        says so, as memcached refuses it (logged, counted, the old value dropped if
        drop_old, the error sent with answer: self.reply, which noreply hides, or
        self.error), then discarded as it arrives, never held."""
        self.watch_store(mode, key, "too_large", None)
        self.store.refuse_too_large(key, drop_old, watch=self.fetch_watch())
        answer(TOO_LARGE_REPLY)
        self.discard_block(nbytes + 2)

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
        if self.settings.detail_enabled:
            self.service.record_detail(tokens[1], DELETES)
        found = self.store.delete(tokens[1], watch=self.fetch_watch()) == STORED
        if found:
            self.watch_delete(b"delete", tokens[1])
        self.reply(DELETED if found else REPLIES[NOT_FOUND])

    def arithmetic(self, tokens):
        incr = tokens[0] == b"incr"
        self.check_noreply(tokens)
        if bad_key(tokens[1]):
            self.reply(BAD_FORMAT)
            return
        delta = parse_uint64(tokens[2])
        if delta is None:
            self.reply(BAD_DELTA)
            return
        outcome, item = self.store.arithmetic(tokens[1], delta, incr=incr,
                                              watch=self.fetch_watch())
        if outcome == STORED:
            self.reply(item[VALUE_START:].rstrip(b" ") + b"\r\n")
        elif outcome == NON_NUMERIC:
            self.reply(NOT_NUMBER)
        elif outcome == NO_MEMORY:
            self.reply(NO_MEMORY_INCR)
        else:
            self.reply(REPLIES[NOT_FOUND])

    def touch(self, tokens):
        self.check_noreply(tokens)
        if bad_key(tokens[1]):
            self.reply(BAD_FORMAT)
            return
        exptime = parse_int32(tokens[2])
        if exptime is None:
            self.reply(BAD_EXPTIME)
            return
        found = self.store.get(tokens[1], exptime, watch=self.fetch_watch()) is not None
        self.reply(b"TOUCHED\r\n" if found else REPLIES[NOT_FOUND])

    # -- meta commands: mg ms md ma mn me ---------------------------------------------

    def meta_key(self, tokens, flag_start, too_long=b"options flags too long",
                 flag_error=None):
        """(key, flags, error) of a meta command: error is the reply to send instead
        of running it, or None (flag_error, if given, replaces the message for any
        bad flag, as md and ma)."""
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return key, None, BAD_FORMAT
        if len(tokens) > META_MAX_TOKENS:
            return key, None, b"CLIENT_ERROR %s\r\n" % too_long
        flags = MetaFlags(tokens[flag_start:])
        error = flags.error and (flag_error or flags.error)
        if error is None and len(flags.get("O", b"")) >= META_OPAQUE_MAX:
            error = b"CLIENT_ERROR opaque token too long\r\n"
        if error is None and "b" in flags:
            key = decode_key(key)
            if key is None:
                error = b"CLIENT_ERROR error decoding key\r\n"
        elif error is None and bad_key(key):
            error = BAD_FORMAT
        if error is None:
            self.noreply = "q" in flags
        return key, flags, error

    def meta_get(self, tokens):
        key, flags, error = self.meta_key(tokens, 2, b"options flags are too long")
        if error:
            self.error(error)
            return
        found = self.store.meta_get(key, exptime=flags.get("T"), bump="u" not in flags,
                                    vivify=flags.get("N"), recache=flags.get("R"),
                                    watch=self.fetch_watch())
        if found is None:
            self.reply(flags.reply(b"EN", key))
            return
        self.noreply = False     # q hides only the miss
        item, view = found
        item = unpack_item(item)
        # The recache markers: Z (another client holds the token), X (stale), W (this
        # client has won the right to recache).
        markers = (b" Z" if view.token_sent else b"") + (b" X" if view.stale else b"") + (
            b" W" if view.won else b"")
        line = flags.reply(b"VA %d" % len(item.value) if "v" in flags else b"HD", key, {
            b"s": len(item.value), b"t": view.ttl, b"c": item.cas, b"f": item.flags,
            b"l": view.last_access, b"h": view.hit_before}, markers)
        self.reply(line + item.value + b"\r\n" if "v" in flags else line)

    META_MODES = {None: SET, b"S": SET, b"E": ADD, b"A": APPEND, b"P": PREPEND,
                  b"R": REPLACE}

    def meta_set(self, tokens):
        if len(tokens) == 2:
            self.error(BAD_FORMAT)
            return
        # These errors leave the data to be read as commands; later ones discard it.
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
        key, flags, error = self.meta_key(tokens, 3)
        mode = flags and self.META_MODES.get(flags.get("M"))
        if error is None and mode is None:
            error = b"CLIENT_ERROR invalid mode for ms M token\r\n"
        if error:
            self.error(error)
            self.discard_block(nbytes + 2)
            return
        if self.store.too_large(key, nbytes, flags.get("F")):
            self.refuse_value(mode, key, nbytes, answer=self.error, drop_old=True)
            return
        self.read_block(nbytes, self.finish_meta_set, key, flags, mode)

    def finish_meta_set(self, value, key, flags, mode):
        if value is None:
            self.error(BAD_CHUNK)
            return
        cas = flags.get("C") or 0
        if "C" in flags and mode in (SET, REPLACE):
            mode = CAS          # even C0: it compares, and nothing has CAS 0
        outcome, item = self.store.store(
            mode, key, value, flags=flags.get("F") or 0, exptime=flags.get("T") or 0,
            cas=cas, new_cas=flags.get("E") or 0, invalidate="I" in flags,
            vivify=flags.get("N"), watch=self.fetch_watch())
        self.watch_store(mode, key, outcome, item, value, flags.get("F") or 0,
                         flags.get("T") or 0)
        if outcome == NO_MEMORY:
            self.error(NO_MEMORY_REPLY)
            return
        if outcome != STORED:
            self.noreply = False
        self.reply(flags.reply(META_CODES[outcome], key,
                               {b"c": header(item).cas if item else 0}))

    def meta_delete(self, tokens):
        key, flags, error = self.meta_key(tokens, 2, flag_error=BAD_META_FLAG)
        if error:
            self.error(error)
            return
        if "I" in flags or "x" in flags:
            outcome = self.store.invalidate(key, cas=flags.get("C"), exptime=flags.get("T"),
                                            new_cas=flags.get("E") or 0,
                                            drop_value="x" in flags, watch=self.fetch_watch())
        else:
            outcome = self.store.delete(key, flags.get("C"), watch=self.fetch_watch())
            if outcome == STORED:
                self.watch_delete(b"md", key)
        if outcome != STORED:
            self.noreply = False
        self.reply(flags.reply(META_CODES[outcome], key))

    def meta_arithmetic(self, tokens):
        key, flags, error = self.meta_key(tokens, 2, flag_error=BAD_META_FLAG)
        if error:
            self.error(error)
            return
        mode = flags.get("M")
        if mode not in (None, b"I", b"+", b"D", b"-"):
            self.error(b"CLIENT_ERROR invalid mode for ma M token\r\n")
            return
        delta = flags.get("D")
        outcome, item = self.store.arithmetic(
            key, 1 if delta is None else delta, incr=mode not in (b"D", b"-"),
            cas=flags.get("C") or 0, vivify=flags.get("N"), initial=flags.get("J") or 0,
            new_cas=flags.get("E") or 0, exptime=flags.get("T"), watch=self.fetch_watch())
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
            b"c": header(item).cas, b"t": self.store.ttl(item, self.store.now())})
        self.reply(line + number + b"\r\n" if "v" in flags else line)

    def meta_noop(self, tokens):
        self.reply(b"MN\r\n")

    def meta_debug(self, tokens):
        if len(tokens) < 2 or len(tokens[1]) > KEY_MAX_LENGTH:
            self.reply(BAD_FORMAT)
            return
        key = tokens[1]
        if len(tokens) > 2 and tokens[2] == b"b":
            key = decode_key(key)
            if key is None:
                self.reply(BAD_FORMAT)
                return
        # memcached 1.6.18 counts cmd_meta here alone, for a me that looks its key up.
        self.cmd_meta += 1
        item = self.store.peek(key, watch=self.fetch_watch())
        if item is None:
            self.reply(b"EN\r\n")
            return
        now = self.store.now()
        self.reply(b"ME %s %s\r\n" % (tokens[1], item_description(key, item, now)))

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
        self.reply(OK)

    def version(self, tokens):
        self.reply(b"VERSION %s\r\n" % VERSION.encode())

    def verbosity(self, tokens):
        self.check_noreply(tokens)
        level = parse_uint32(tokens[1])
        if level is None:
            self.reply(BAD_FORMAT)
            return
        self.settings.verbose = min(level, 2)
        self.reply(OK)

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
            self.reply(OK)

    def debugtime(self, tokens):
        """memcached-debug's clock, moved N seconds ahead (--debug-commands; memcached's
        ordinary build knows no such command)."""
        seconds = parse_int32(tokens[1])
        if not self.settings.debug_commands or seconds is None:
            self.reply(ERROR)
            return
        self.store.move_clock(seconds)
        self.reply(OK)

    def refresh_certs(self, tokens):
        """TLS: load the certificate and key again, for the connections to come."""
        self.check_noreply(tokens)
        problem = self.service.refresh_certs()
        self.reply(OK if problem is None else problem.encode() + b"\r\n")

    def quit(self, tokens):
        self.queue(b"")            # memcached's empty response: over UDP, a datagram
        self.closing, self.close_reason = True, "normal"

    def shutdown(self, tokens):
        if not self.settings.enable_shutdown:
            self.reply(b"ERROR: shutdown not enabled\r\n")
        elif len(tokens) == 1 or (len(tokens) == 2 and tokens[1] == b"graceful"):
            self.service.request_shutdown()
            self.closing, self.close_reason = True, "shutdown"
        else:
            self.reply(b"CLIENT_ERROR invalid shutdown mode\r\n")

    # -- stats -----------------------------------------------------------------------

    def report(self, rows):
        self.reply(b"".join(b"STAT %s %s\r\n" % (str(name).encode(), str(value).encode())
                            for name, value in rows) + END)

    def stats_reset(self, tokens):
        self.service.reset_stats()
        self.reply(b"RESET\r\n")

    def stats_detail(self, tokens):
        switch = tokens[2] if len(tokens) > 2 else None
        if switch in (b"on", b"off"):
            self.settings.detail_enabled = switch == b"on"
            self.reply(OK)
        elif switch == b"dump":
            self.reply(self.service.detail_dump())
        else:
            self.reply(b"CLIENT_ERROR usage: stats detail on|off|dump\r\n")

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
        elif slab >= SLAB_CLASSES:
            self.reply(b"CLIENT_ERROR Illegal slab id\r\n")
        else:
            self.stream(self.cachedump(slab, limit or None))

    def cachedump(self, slab, limit):
        """``stats cachedump slab limit``: the class's items in COLD (memcached's
        dump reads COLD alone: in the segmented LRU, items that have not yet cooled
        are not there), most recently used first, at most limit of them (None:
        all), and as memcached's, no larger than CACHEDUMP_LIMIT."""
        size, shown = len(END), 0
        for batch in self.store.walk((COLD,), classes={slab}):
            lines = []
            for key, item in batch:
                line = b"ITEM %s [%d b; %d s]\r\n" % (key, value_size(item),
                                                      header(item).exptime)
                size += len(line)
                if size > CACHEDUMP_LIMIT or shown == limit:
                    yield b"".join(lines) + END
                    return
                lines.append(line)
                shown += 1
            yield b"".join(lines)
        yield END

    # -- lru_crawler, slabs, lru ---------------------------------------------------

    def crawler_switch(self, tokens):
        """lru_crawler enable|disable: the crawler's crawls, and the maintainer's
        (memcached's crawler thread cannot be started twice)."""
        if tokens[1] == b"enable" and self.settings.lru_crawler:
            self.reply(b"ERROR failed to start lru crawler thread\r\n")
            return
        self.settings.lru_crawler = tokens[1] == b"enable"
        self.reply(OK)

    def crawler_tuning(self, tokens):
        """lru_crawler sleep|tocrawl N, checked as memcached does."""
        number = parse_uint32(tokens[2])
        if number is None:
            self.reply(BAD_FORMAT)
        elif tokens[1] == b"sleep" and number > 1000000:
            self.reply(b"CLIENT_ERROR sleep must be one second or less\r\n")
        else:
            setattr(self.settings, "lru_crawler_" + tokens[1].decode(), number)
            self.reply(OK)

    def crawl(self, tokens):
        """lru_crawler crawl|metadump all|hash|<class,...>: the crawler looks at the
        items of those classes, streamed a batch at a time; one crawl at a time in
        the server, as memcached's.  (hash walks memcached's hash table, which only a
        dump may: here it is every class.)"""
        metadump = tokens[1] == b"metadump"
        if self.datagram and metadump:
            return           # as memcached's crawler: no datagram (nor an amplifier)
        classes = None
        if tokens[2] not in (b"all", b"hash"):
            classes = set(map(parse_uint32, tokens[2].split(b",")))
        if not self.settings.lru_crawler:
            self.reply(b"CLIENT_ERROR lru crawler disabled\r\n")
        elif metadump and not self.settings.dump_enabled:
            self.reply(b"ERROR metadump not allowed\r\n")
        elif metadump and self.out:
            # memcached streams a dump from its crawler's thread: the replies of
            # commands before it, not yet sent, would be lost.
            self.reply(b"ERROR cannot pipeline other commands before metadump\r\n")
        elif classes is not None and not all(
                number is not None and 0 < number < SLAB_CLASSES for number in classes):
            self.reply(b"BADCLASS invalid class id\r\n")
        elif tokens[2] == b"hash" and not metadump:
            self.reply(b"ERROR an unknown error happened\r\n")
        elif not self.service.begin_crawl():
            self.reply(CRAWLER_BUSY)
        elif metadump:
            self.stream(self.metadump(classes))
        else:
            self.stream(self.reclaim(classes))

    def reclaim(self, classes):
        """lru_crawler crawl: OK, then the expired items of those classes reclaimed, a
        batch at a time (memcached's crawler too answers before it has crawled)."""
        try:
            yield OK
            for _ in self.store.crawl(classes, self.settings.lru_crawler_tocrawl):
                yield b""
        finally:
            self.service.end_crawl()

    def metadump(self, classes):
        """lru_crawler metadump: a line per item of the slab classes (None: all)."""
        try:
            for batch in self.store.walk(classes=classes):
                now = self.store.now()
                yield b"".join(b"key=%s %s\n" % (uri(key).encode(), item_description(
                    key, item, now, absolute=True)) for key, item in batch)
            yield END
        finally:
            self.service.end_crawl()

    def slabs_reassign(self, tokens):
        """memg has no pages to move, so slabs reassign and automove answer as
        memcached does with nothing to do, and change nothing."""
        source, target = parse_int32(tokens[2]), parse_int32(tokens[3])
        if source is None or target is None:
            self.reply(BAD_FORMAT)
        elif source == target:
            self.reply(b"SAME src and dst class are identical\r\n")
        elif not (-1 <= source < SLAB_CLASSES and 0 <= target < SLAB_CLASSES):
            self.reply(b"BADCLASS invalid src or dst class id\r\n")
        else:
            self.reply(b"NOSPARE source class has no spare pages\r\n")

    def slabs_automove(self, tokens):
        self.check_noreply(tokens)
        level = parse_uint32(tokens[2])
        if tokens[2] == b"ratio":
            ratio = parse_float(tokens[3]) if len(tokens) >= 4 else None
            self.reply(ERROR if ratio is None else OK)
        elif level is None:
            self.reply(BAD_FORMAT)
        else:
            self.reply(OK if level <= 2 else ERROR)

    def lru(self, tokens):
        """lru tune|mode|temp_ttl: the LRU's settings, changed while serving; mode and
        temp_ttl only while the maintainer runs, as in memcached."""
        self.check_noreply(tokens)
        self.dispatch(tokens, self.LRU)

    def lru_tune(self, tokens):
        hot, warm = parse_uint32(tokens[2]), parse_uint32(tokens[3])
        hot_factor, warm_factor = parse_float(tokens[4]), parse_float(tokens[5])
        if None in (hot, warm, hot_factor, warm_factor):
            self.reply(ERROR)
        elif hot + warm > 80:
            self.reply(b"ERROR hot and warm pcts must not exceed 80\r\n")
        elif hot_factor <= 0 or warm_factor <= 0:
            self.reply(b"ERROR hot/warm age factors must be greater than 0\r\n")
        else:
            settings = self.settings
            settings.hot_lru_pct, settings.warm_lru_pct = hot, warm
            settings.hot_max_factor, settings.warm_max_factor = hot_factor, warm_factor
            self.reply(OK)

    def lru_mode(self, tokens):
        if not self.settings.lru_maintainer or tokens[2] not in (b"flat", b"segmented"):
            self.reply(ERROR)
            return
        self.settings.lru_segmented = self.store.segmented = tokens[2] == b"segmented"
        self.reply(OK)

    def lru_temp_ttl(self, tokens):
        """lru temp_ttl N: items whose TTL is at most N go to the TEMP LRU from now
        on; a negative N turns it off."""
        ttl = parse_int32(tokens[2])
        if not self.settings.lru_maintainer or ttl is None:
            self.reply(ERROR)
            return
        settings = self.settings
        settings.temp_lru = ttl >= 0
        if settings.temp_lru:
            settings.temporary_ttl = ttl
        self.store.temp_ttl = ttl if settings.temp_lru else None
        self.reply(OK)

    # -- watch: the server's events as log lines ------------------------------------

    def watch(self, tokens):
        """Turn this connection into a watcher of the given kinds of event: from now
        on it is sent log lines, and what it sends is ignored."""
        if not self.settings.watch_enabled:
            self.reply(b"CLIENT_ERROR watch commands not allowed\r\n")
            return
        if self.datagram:
            return                 # as memcached: a UDP request is answered once, or not
        kinds = {token.decode("latin-1") for token in tokens[1:]} or {"fetchers"}
        if not kinds <= WATCH_KINDS:
            self.reply(ERROR)
            return
        self.watcher = self.service.watchers.add(kinds, self.wake or (lambda: None))
        self.reply(OK)

    # The command tables: word -> (handler, fewest tokens, most tokens).  Commands that
    # differ by a switch share a handler, as in memcached's proto_text.c, which looks
    # its switches up by the command's word (a table here, rather than a lambda per
    # word: that would cost every request one more call).  A command with
    # sub-commands has a table of its own, keyed by its second word, which
    # ``dispatch`` reads.
    ANY = 1 << 30
    RETRIEVALS = {b"get": (False, False), b"gets": (True, False), b"gat": (False, True),
                  b"gats": (True, True)}                    # (with CAS, touch)
    UPDATES = {b"set": SET, b"add": ADD, b"replace": REPLACE, b"append": APPEND,
               b"prepend": PREPEND, b"cas": CAS}
    STATS = {
        None: (lambda self, tokens: self.report(self.service.general_stats()), 1, ANY),
        b"settings": (lambda self, tokens: self.report(self.service.settings_stats()), 2, ANY),
        b"items": (lambda self, tokens: self.report(self.service.item_stats()), 2, ANY),
        b"slabs": (lambda self, tokens: self.report(self.service.slab_stats()), 2, ANY),
        b"conns": (lambda self, tokens: self.report(self.service.connection_stats()), 2, ANY),
        b"sizes": (lambda self, tokens: self.report(self.service.size_stats()), 2, ANY),
        b"reset": (stats_reset, 2, ANY),
        b"detail": (stats_detail, 2, ANY),
        b"cachedump": (stats_cachedump, 2, ANY),
    }
    LRU_CRAWLER = {
        b"enable": (crawler_switch, 2, 2),
        b"disable": (crawler_switch, 2, 2),
        b"sleep": (crawler_tuning, 3, 3),
        b"tocrawl": (crawler_tuning, 3, 3),
        b"crawl": (crawl, 3, 3),
        b"metadump": (crawl, 3, 3),
    }
    SLABS = {
        b"reassign": (slabs_reassign, 4, 4),
        b"automove": (slabs_automove, 3, ANY),
    }
    LRU = {
        b"tune": (lru_tune, 6, ANY),
        b"mode": (lru_mode, 3, ANY),
        b"temp_ttl": (lru_temp_ttl, 3, ANY),
    }
    COMMANDS = {
        b"get": (retrieve, 2, ANY),
        b"gets": (retrieve, 2, ANY),
        b"gat": (retrieve, 2, ANY),
        b"gats": (retrieve, 2, ANY),
        b"set": (update, 5, 6),
        b"add": (update, 5, 6),
        b"replace": (update, 5, 6),
        b"append": (update, 5, 6),
        b"prepend": (update, 5, 6),
        b"cas": (update, 6, 7),
        b"delete": (delete, 2, 4),
        b"incr": (arithmetic, 3, 4),
        b"decr": (arithmetic, 3, 4),
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
        b"stats": (lambda self, tokens: self.dispatch(tokens, self.STATS), 1, ANY),
        b"quit": (quit, 1, ANY),
        b"shutdown": (shutdown, 1, ANY),
        b"lru_crawler": (lambda self, tokens: self.dispatch(tokens, self.LRU_CRAWLER), 1, ANY),
        b"slabs": (lambda self, tokens: self.dispatch(tokens, self.SLABS), 1, ANY),
        b"lru": (lru, 2, ANY),
        b"watch": (watch, 1, ANY),
        b"refresh_certs": (refresh_certs, 1, ANY),
        b"debugtime": (debugtime, 2, ANY),
    }


DELETED = b"DELETED\r\n"


def strip_at_nul(line):
    """A command line (with its newline) cut at its first NUL, as memcached's C
    strings end there, then stripped of "\\r\\n" or "\\n" as memcached strips it."""
    if 0 in line:
        line = line[:line.index(0)] + b"\n"
    return line[:-2] if line[-2:-1] == b"\r" and len(line) > 2 else line[:-1]


# A get's VALUE block, and a gets's (with the CAS unique).
VALUE = b"VALUE %s %d %d\r\n%s\r\n"
VALUE_CAS = b"VALUE %s %d %d %d\r\n%s\r\n"
# A multi-get's reply larger than OUTPUT_LIMIT is made this many items at a time.
VALUES_PER_CHUNK = 64


def value_blocks(with_cas, keys, items):
    """Each key's response in a get's reply (gets's, with_cas): its VALUE block, or
    nothing for a miss."""
    blocks = []
    for key, item in zip(keys, items):
        if item is None:
            blocks.append(b"")
        else:
            cas, _, _, flags, _ = item_fields(item)
            value = item[VALUE_START:]
            blocks.append(VALUE_CAS % (key, flags, len(value), cas, value) if with_cas
                          else VALUE % (key, flags, len(value), value))
    return blocks


def item_description(key, item, now, absolute=False):
    """An item as ``me`` and ``lru_crawler metadump`` describe it: expiry (the time
    left, or with absolute the Unix time; -1 for never), last access (seconds ago,
    or the Unix time), CAS, whether it was fetched, slab class and size charged."""
    cas, exptime, atime, _, state = item_fields(item)
    if absolute:
        expires, accessed = exptime or -1, atime
    else:
        expires, accessed = -1 if exptime == 0 else exptime - now, now - atime
    return b"exp=%d la=%d cas=%d fetch=%s cls=%d size=%d" % (
        expires, accessed, cas, b"yes" if state & FETCHED else b"no",
        state >> CLASS_SHIFT, item_cost(key, value_size(item)))


# -- the binary protocol -------------------------------------------------------------

# A packet's header: magic, opcode, key length, extras length, data type, vbucket
# (status, in a response), body length, opaque, CAS.  Big-endian, 24 bytes.
HEADER = struct.Struct(">BBHBBHIIQ")
MAGIC_REQUEST, MAGIC_RESPONSE = 0x80, 0x81

# Response statuses, with the text memcached sends in an error's body.
SUCCESS = 0x00
KEY_ENOENT, KEY_EEXISTS, E2BIG, EINVAL, BINARY_NOT_STORED, DELTA_BADVAL = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
AUTH_ERROR, AUTH_CONTINUE, UNKNOWN_COMMAND, ENOMEM = 0x20, 0x21, 0x81, 0x82
INTERNAL_ERROR_STATUS = 0x84               # (memg's own trouble: a bug)
# What memcached's binary protocol says when memory runs out (its text protocol's
# SERVER_ERROR lines, without SERVER_ERROR).
OUT_OF_MEMORY_ITEM = b"Out of memory allocating item"
OUT_OF_MEMORY_NEW_ITEM = b"Out of memory allocating new item"
OUT_OF_MEMORY_INCR = b"Out of memory incrementing value"
STATUS_TEXT = {
    KEY_ENOENT: b"Not found", KEY_EEXISTS: b"Data exists for key.", E2BIG: b"Too large.",
    EINVAL: b"Invalid arguments", BINARY_NOT_STORED: b"Not stored.",
    DELTA_BADVAL: b"Non-numeric server-side value for incr or decr",
    AUTH_ERROR: b"Auth failure.", UNKNOWN_COMMAND: b"Unknown command",
    ENOMEM: b"Out of memory",
}
# The binary statuses of the store's outcomes, for each storage mode (memcached
# reports an add that found the key as "exists", a replace that did not as "not
# found", and any other refusal as "not stored").
STORE_STATUS = {EXISTS: KEY_EEXISTS, NOT_FOUND: KEY_ENOENT, NO_MEMORY: ENOMEM}
REFUSED_STATUS = {ADD: KEY_EEXISTS, REPLACE: KEY_ENOENT}
SASL_MECHANISMS = b"PLAIN"
SASL_MECHANISM_MAX = 32
INCR_EXTRAS = struct.Struct(">QQI")        # delta, initial value, expiration
NO_AUTO_CREATE = 0xFFFFFFFF                # an incr's expiration that creates nothing
U32 = struct.Struct(">I")
FLAGS_EXPTIME = struct.Struct(">II")


# The lengths memcached accepts for each kind of request: check(extras length, key
# length, body length).
def no_body(extlen, keylen, bodylen):
    return extlen == 0 and keylen == 0 and bodylen == 0


def key_only(extlen, keylen, bodylen):
    return extlen == 0 and 0 < keylen == bodylen


def key_and_value(extlen, keylen, bodylen):
    return extlen == 0 and keylen > 0


def storage_lengths(extlen, keylen, bodylen):
    return extlen == 8 and keylen > 0 and bodylen >= keylen + 8


def incr_lengths(extlen, keylen, bodylen):
    return extlen == INCR_EXTRAS.size and keylen > 0 and bodylen == keylen + extlen


def touch_lengths(extlen, keylen, bodylen):
    return extlen == 4 and keylen > 0


def flush_lengths(extlen, keylen, bodylen):
    return extlen in (0, 4) and keylen == 0 and bodylen == extlen


def stat_lengths(extlen, keylen, bodylen):
    return extlen == 0


class BinaryProtocol(Protocol):
    """memcached's binary protocol: a 24-byte header, extras, key and value.

    Each command has a handler of its own in OPCODES, with the checks memcached
    makes of its lengths; a quiet command (getq, setq ...) is its loud one with
    ``quiet`` set, which hides what memcached hides.  The operations are the same
    store operations the text protocol runs; SASL (-S) authenticates a connection
    with PLAIN against the password database."""

    # What this connection is in the middle of: the request's header fields, and
    # where its SASL conversation stands (see finish_sasl).
    opcode = opaque = request_cas = 0
    quiet = False
    sasl_started = sasl_done = False

    @staticmethod
    def starts_authenticated(service):
        """Whether a new connection may send commands before it authenticates (-S)."""
        return service.sasl_credentials is None

    def next_command(self):
        data, pos = self.buffer, self.pos
        if len(data) - pos < HEADER.size:
            return False
        magic, opcode, keylen, extlen, _, _, bodylen, opaque, cas = HEADER.unpack_from(
            data, pos)
        if magic != MAGIC_REQUEST:
            self.closing = True                 # as memcached: no reply, the end
            return False
        start = pos + HEADER.size
        if len(data) - start < extlen + keylen:
            return False                        # the rest of extras and key are to come
        self.pos = start + extlen + keylen
        self.last_command = monotonic()
        self.opcode, self.opaque, self.request_cas = opcode, opaque, cas
        extras, key = data[start:start + extlen], data[start + extlen:self.pos]
        if self.settings.verbose > 1:
            self.log("<", b"binary opcode 0x%02x key %s" % (opcode, key))
        if keylen > bodylen or keylen + extlen > bodylen:
            self.fail(UNKNOWN_COMMAND, close=True)
            return True
        handler, self.quiet, check = self.OPCODES.get(opcode, (None, False, None))
        if not self.authenticated and opcode not in self.WITHOUT_AUTHENTICATION:
            self.fail(AUTH_ERROR, close=True)
        elif keylen > KEY_MAX_LENGTH:
            self.fail(EINVAL, close=True)
        elif handler is None:
            # As memcached: the body is discarded, though its extras and key were
            # read already, so that as many bytes again after it go too.
            self.fail(UNKNOWN_COMMAND)
            self.discard(bodylen)
        elif not check(extlen, keylen, bodylen):
            self.fail(EINVAL, close=True)       # lengths that do not fit the command
        else:
            handler(self, extras, key, bodylen - extlen - keylen)
        return True

    # -- replies ------------------------------------------------------------------

    def respond(self, status=SUCCESS, extras=b"", key=b"", value=b"", cas=0):
        """A response to the current request."""
        self.queue(self.packet(status, extras, key, value, cas))

    def packet(self, status=SUCCESS, extras=b"", key=b"", value=b"", cas=0):
        return (HEADER.pack(MAGIC_RESPONSE, self.opcode, len(key), len(extras), 0, status,
                            len(extras) + len(key) + len(value), self.opaque, cas)
                + extras + key + value)

    def succeed(self, **response):
        """A success response, unless the command is quiet (then an empty one, as
        memcached's: over UDP, a datagram with no data)."""
        if self.quiet:
            self.queue(b"")
        else:
            self.respond(**response)

    def discard(self, size):
        """Discard the body of a refused request as it arrives.  memcached holds the
        length in a signed int, so that one of 2 GB or more discards nothing, and
        what follows is read as the next request."""
        if size < 2 ** 31:
            self.discard_block(size)

    def internal_error_reply(self):
        self.respond(INTERNAL_ERROR_STATUS, value=b"Internal error")

    def fail(self, status, close=False, text=None):
        """An error response (quiet commands get them too), with memcached's text."""
        self.respond(status, value=text or STATUS_TEXT[status])
        if close:
            self.closing = True

    # -- retrieval: get getk gat gatk touch, and their quiet forms ------------------

    def retrieve(self, extras, key, _):
        opcode = self.opcode
        touch = opcode in self.TOUCHES
        item = self.store.get(key, U32.unpack(extras)[0] if touch else None,
                              watch=self.fetch_watch())
        if self.settings.detail_enabled:
            self.service.record_detail(key, GETS, hit=item is not None)
        with_key = opcode in self.WITH_KEY
        if item is None:
            if self.quiet:
                self.queue(b"")                  # (see succeed)
                return
            if with_key:
                self.respond(KEY_ENOENT, key=key)
            else:
                self.fail(KEY_ENOENT)
            return
        cas, _, _, flags, _ = item_fields(item)
        self.respond(extras=U32.pack(flags), key=key if with_key else b"",
                     value=b"" if opcode == TOUCH else item[VALUE_START:], cas=cas)

    # -- storage: set add replace append prepend (and cas, by the header's CAS) -------

    def update(self, extras, key, size):
        mode = self.MODES[self.opcode]
        flags, exptime = FLAGS_EXPTIME.unpack(extras) if extras else (0, 0)
        if self.settings.detail_enabled:
            self.service.record_detail(key, SETS)
        if self.store.too_large(key, size, flags):
            self.watch_store(mode, key, "too_large", None)
            self.store.refuse_too_large(key, drop_old=mode == SET, watch=self.fetch_watch())
            self.fail(E2BIG)
            self.discard(size)
            return
        # As memcached: any CAS in the header makes a set, add or replace a CAS, and
        # under -C (no CAS kept) a store has none to compare.
        cas = self.request_cas if self.store.use_cas else 0
        if cas and mode in (SET, ADD, REPLACE):
            mode = CAS
        self.read_body(size, self.finish_update, mode, key, flags, exptime, cas)

    def finish_update(self, value, mode, key, flags, exptime, cas):
        outcome, item = self.store.store(mode, key, value, flags=flags, exptime=exptime,
                                         cas=cas, watch=self.fetch_watch())
        if self.service.watchers.active:
            self.watch_store(mode, key, outcome, item, value, flags, exptime)
        if outcome == STORED:
            self.succeed(cas=header(item).cas)
        elif outcome == NOT_STORED:
            self.fail(REFUSED_STATUS.get(self.MODES[self.opcode], BINARY_NOT_STORED))
        elif outcome == NO_MEMORY:
            self.fail(ENOMEM, text=OUT_OF_MEMORY_ITEM)
        else:
            self.fail(STORE_STATUS[outcome])

    # -- delete, increment, decrement -------------------------------------------------

    def delete(self, extras, key, _):
        if self.settings.detail_enabled:
            self.service.record_detail(key, DELETES)
        outcome = self.store.delete(key, self.request_cas or None, watch=self.fetch_watch())
        if outcome == STORED:
            self.watch_delete(b"delete", key)
            self.succeed()
        else:
            self.fail(STORE_STATUS[outcome])

    def arithmetic(self, extras, key, _):
        delta, initial, expiration = INCR_EXTRAS.unpack(extras)
        vivify = None if expiration == NO_AUTO_CREATE else expiration
        outcome, item = self.store.arithmetic(
            key, delta, incr=self.opcode in (INCREMENT, INCREMENTQ), cas=self.request_cas,
            vivify=vivify, initial=initial, watch=self.fetch_watch())
        if outcome == STORED:
            self.succeed(value=struct.pack(">Q", int(item[VALUE_START:])),
                         cas=header(item).cas)
        elif outcome == NON_NUMERIC:
            self.fail(DELTA_BADVAL)
        elif outcome == NO_MEMORY:
            self.fail(ENOMEM, text=OUT_OF_MEMORY_NEW_ITEM if vivify is not None
                      else OUT_OF_MEMORY_INCR)
        else:
            self.fail(STORE_STATUS[outcome])

    # -- everything else -----------------------------------------------------------------

    def flush(self, extras, key, _):
        if not self.settings.flush_enabled:
            self.fail(AUTH_ERROR)               # (memcached's status for a refused flush)
            return
        self.store.flush(U32.unpack(extras)[0] if extras else 0)
        self.succeed()

    def noop(self, extras, key, _):
        self.respond()

    def version(self, extras, key, _):
        self.respond(value=VERSION.encode())

    def quit(self, extras, key, _):
        self.succeed()
        self.closing, self.close_reason = True, "normal"

    def stat(self, extras, key, _):
        """A packet per statistic (its name the key, its value the value), then an
        empty one, all one response (over UDP, as memcached, datagrams of their
        own); ``reset`` answers with the empty one alone."""
        packets = []
        if key == b"reset":
            self.service.reset_stats()
        elif key.startswith(b"detail"):
            # As memcached: "detail on" and "detail off" answer with the end packet
            # alone, "detail dump" with the dump under the key "detailed".
            switch = key[len(b"detail"):]
            if switch in (b" on", b" off"):
                self.settings.detail_enabled = switch == b" on"
            elif switch == b" dump":
                packets.append(self.packet(key=b"detailed", value=self.service.detail_dump()))
            else:
                self.fail(KEY_ENOENT)
                return
        else:
            report = self.STATS.get(key)
            if report is None:
                self.fail(KEY_ENOENT)
                return
            packets.extend(self.packet(key=str(name).encode(), value=str(value).encode())
                           for name, value in report(self.service))
        packets.append(self.packet())
        self.queue(b"".join(packets))

    # -- SASL: PLAIN against the password database (-S) ------------------------------

    def sasl_mechanisms(self, extras, key, size):
        if self.service.sasl_credentials is None:
            self.fail(UNKNOWN_COMMAND)
            self.discard(size)
            return
        self.respond(value=SASL_MECHANISMS)

    def sasl_auth(self, extras, key, size):
        """SASL auth and step, PLAIN, as memcached with Cyrus SASL answers them: a
        mechanism's name over 32 bytes is refused, and so is a message too large
        for an item of half the -I limit, each discarded as it arrives."""
        if self.service.sasl_credentials is None:
            self.fail(UNKNOWN_COMMAND)
            self.discard(size)
        elif len(key) > SASL_MECHANISM_MAX:
            self.fail(EINVAL)
            self.discard(size)
        elif len(key) + size + ITEM_HEADER_SIZE > self.settings.item_size_max // 2:
            self.fail(ENOMEM)
            self.discard(size)
        else:
            self.read_body(size, self.finish_sasl, key)

    def finish_sasl(self, message, mechanism):
        """Where a conversation stands (as Cyrus keeps it): started (an auth came)
        and done (one succeeded).  Every auth or step first makes the connection
        unauthenticated.  An auth without data starts one and is answered
        "continue"; with data (PLAIN: an identity to act as, empty or the user's
        own, the user, the password) it is checked, unless one is done already,
        which ends it.  A step carries the data of a started conversation."""
        self.authenticated = False
        if self.opcode != SASL_STEP:
            if not message:
                self.sasl_started = True
                self.respond(AUTH_CONTINUE)
                return
            if self.sasl_done or mechanism.upper() != SASL_MECHANISMS:
                self.sasl_started = self.sasl_done = False
                self.refuse_sasl()
                return
            self.sasl_started = True
        elif not self.sasl_started or self.sasl_done:
            self.refuse_sasl()
            return
        fields = message.split(b"\0")
        if len(fields) == 3 and fields[0] in (b"", fields[1]) and self.service.authenticate(
                fields[1], fields[2], self.service.sasl_credentials):
            self.authenticated = self.sasl_done = True
            self.respond(value=b"Authenticated")
            return
        if len(fields) != 3 or fields[0] not in (b"", fields[1]):
            self.service.record_authentication(False)
        if self.opcode != SASL_STEP:
            self.sasl_started = False            # (a failed step leaves it started)
        self.fail(AUTH_ERROR)

    def refuse_sasl(self):
        self.service.record_authentication(False)
        self.fail(AUTH_ERROR)

    # opcode -> (handler, quiet, the lengths memcached accepts for it).
    OPCODES = {
        0x00: (retrieve, False, key_only),               # get
        0x09: (retrieve, True, key_only),                # getq
        0x0C: (retrieve, False, key_only),               # getk
        0x0D: (retrieve, True, key_only),                # getkq
        0x1C: (retrieve, False, touch_lengths),          # touch
        0x1D: (retrieve, False, touch_lengths),          # gat
        0x1E: (retrieve, True, touch_lengths),           # gatq
        0x23: (retrieve, False, touch_lengths),          # gatk
        0x24: (retrieve, True, touch_lengths),           # gatkq
        0x01: (update, False, storage_lengths),                  # set
        0x02: (update, False, storage_lengths),                  # add
        0x03: (update, False, storage_lengths),                  # replace
        0x11: (update, True, storage_lengths),                   # setq
        0x12: (update, True, storage_lengths),                   # addq
        0x13: (update, True, storage_lengths),                   # replaceq
        0x0E: (update, False, key_and_value),                 # append
        0x0F: (update, False, key_and_value),                 # prepend
        0x19: (update, True, key_and_value),                  # appendq
        0x1A: (update, True, key_and_value),                  # prependq
        0x04: (delete, False, key_only),                 # delete
        0x14: (delete, True, key_only),                  # deleteq
        0x05: (arithmetic, False, incr_lengths),                 # increment
        0x06: (arithmetic, False, incr_lengths),                 # decrement
        0x15: (arithmetic, True, incr_lengths),                  # incrementq
        0x16: (arithmetic, True, incr_lengths),                  # decrementq
        0x07: (quit, False, no_body),                      # quit
        0x17: (quit, True, no_body),                       # quitq
        0x08: (flush, False, flush_lengths),             # flush
        0x18: (flush, True, flush_lengths),              # flushq
        0x0A: (noop, False, no_body),                      # noop
        0x0B: (version, False, no_body),                   # version
        0x10: (stat, False, stat_lengths),               # stat
        0x20: (sasl_mechanisms, False, no_body),           # sasl list mechs
        0x21: (sasl_auth, False, key_and_value),              # sasl auth
        0x22: (sasl_auth, False, key_and_value),              # sasl step
    }
    MODES = {0x01: SET, 0x11: SET, 0x02: ADD, 0x12: ADD, 0x03: REPLACE, 0x13: REPLACE,
             0x0E: APPEND, 0x19: APPEND, 0x0F: PREPEND, 0x1A: PREPEND}
    TOUCHES = {0x1C, 0x1D, 0x1E, 0x23, 0x24}
    WITH_KEY = {0x0C, 0x0D, 0x23, 0x24}
    WITHOUT_AUTHENTICATION = {0x20, 0x21, 0x22, 0x0B}        # sasl's, and version
    STATS = {
        b"": Service.general_stats, b"settings": Service.settings_stats,
        b"items": Service.item_stats, b"slabs": Service.slab_stats,
        b"sizes": Service.size_stats,             # (memcached's binary stat has no conns)
    }


TOUCH, INCREMENT, INCREMENTQ, SASL_STEP = 0x1C, 0x05, 0x15, 0x22
# The class a new connection begins as, by -B (see Protocol).
PROTOCOLS = {"ascii": TextProtocol, "binary": BinaryProtocol, "auto": TextProtocol}


# -- memcached's UDP ---------------------------------------------------------------

# A datagram's frame: request id, sequence number, datagrams in all, reserved (0).
UDP_HEADER = struct.Struct(">HHHH")
# What a reply datagram carries at most after its frame (memcached's UDP_DATA_SIZE:
# datagrams of 1,400 bytes in all), and the most datagrams a request is answered with.
UDP_DATA_SIZE = 1392
UDP_DATAGRAMS_MAX = 0xFFFF
# The largest request datagram read (memcached's UDP_READ_BUFFER_SIZE).
UDP_READ_SIZE = 64 * KB


def answer_datagram(service, datagram, peer=None, fd=-1):
    """The datagrams that answer one of memcached's UDP requests, made as they are
    sent.  A request is one datagram: a frame, then commands in either protocol
    (its first byte chooses); one of several datagrams, or with nothing after its
    frame, is dropped, as memcached drops it.  As memcached, every response goes
    in datagrams of its own, each of UDP_DATA_SIZE bytes at most and framed with
    the request's id, its sequence number and their count; a response with nothing
    in it (a quiet binary command's) is sent as a bare frame, unless a datagram went
    before it.  A partial command, which a datagram cannot complete, is dropped."""
    if len(datagram) <= UDP_HEADER.size:
        return
    request_id, _, count, _ = UDP_HEADER.unpack_from(datagram)
    if count != 1:
        return
    payload = datagram[UDP_HEADER.size:]
    protocol = (BinaryProtocol if payload[0] == MAGIC_REQUEST else TextProtocol)(
        service, fd, peer)
    protocol.negotiating, protocol.datagram = False, True
    service.count_datagrams(received=len(datagram))
    sent = 0                       # datagrams
    try:
        protocol.feed(payload)
        while sent < UDP_DATAGRAMS_MAX:
            for response in protocol.take_responses():
                if not response and sent:
                    continue
                starts = range(0, len(response), UDP_DATA_SIZE) or range(1)
                replies = [UDP_HEADER.pack(request_id, sequence, min(len(starts), 0xFFFF)
                                           if response else 0, 0)
                           + response[start:start + UDP_DATA_SIZE]
                           for sequence, start in enumerate(starts[:UDP_DATAGRAMS_MAX - sent])]
                # Counted before they go: a client that has read them sees them in stats.
                service.count_datagrams(sent=sum(map(len, replies)),
                                        meta_commands=protocol.cmd_meta)
                protocol.cmd_meta = 0
                yield from replies
                sent += len(replies)
            if not protocol.pending:
                break
            protocol.advance()
    finally:
        protocol.connection_lost()
        service.count_datagrams(meta_commands=protocol.cmd_meta)


# --------------------------------------------------------------------------
# 5. The engines: what moves the bytes
# --------------------------------------------------------------------------

# Each connection's input buffer (threads) and the most an event loop reads at once.
READ_BUFFER = 64 * KB
# How often the engines run the service's background work (Service.sweep: the LRU
# maintainer, and its crawls).
SWEEP_INTERVAL = 1.0
# How long an engine waits before it tries to accept again when the process is out of
# file descriptors (memcached stops accepting for a while too).
ACCEPT_BACKOFF = 0.1


def parse_listen(spec, port):
    """-l: a comma-separated list of host, host:port or [ipv6]:port, each perhaps
    after notls: (a plain listener, under -Z); as (host, port, plain) triples."""
    addresses = []
    for part in spec.split(","):
        part = part.strip()
        plain = part.startswith("notls:")
        if plain:
            part = part[len("notls:"):]
        host, _, rest = part.rpartition("]") if part.startswith("[") else ("", "", part)
        if host:
            host = host[1:]
            port_text = rest[1:] if rest.startswith(":") else ""
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        else:
            host, port_text = rest, ""
        addresses.append((host, int(port_text) if port_text else port, plain))
    return addresses


class Engine:
    """What every engine does alike: open the listening sockets, run ``serve`` in
    the calling thread or a background one, and stop.  An engine accepts
    connections, gives each a TextProtocol of the service, moves bytes between the
    two, and enforces what is about connections: the connection limit (-c), the idle
    timeout, the bound on replies held for a client that does not read, the
    back-off when the process is out of file descriptors, a clean stop.

    A subclass provides ``serve()`` (accept and serve until ``stopping``), and
    ``close_connections(deadline)`` if serve() leaves connections open; a new engine
    is one such class and one row of ENGINES."""

    def __init__(self, service):
        self.service = service
        self.settings = service.settings
        self.listeners = []
        self.plain_listeners = set()   # those -l named with notls: (under -Z)
        self.datagram_sockets = []     # -U's
        # Written by request_stop, from any thread (the signals' too): a flag and a
        # byte on a socket pair, nothing that takes a lock.
        self.stopping = False
        self.wakeup = None             # (read end, write end)
        self.thread = None             # the background thread of start()
        service.on_shutdown = self.request_stop

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
        self.wakeup = socket.socketpair()
        for end in self.wakeup:
            end.setblocking(False)
        try:
            if s.unix_socket:
                if os.path.exists(s.unix_socket):
                    os.unlink(s.unix_socket)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.listeners.append(listener)
                listener.bind(s.unix_socket)
                os.chmod(s.unix_socket, s.unix_mask)
            else:
                for host, port, plain in (parse_listen(s.host, s.port) if s.port is not None
                                          else ()):
                    listener = self.bound(host, port, socket.SOCK_STREAM)
                    self.listeners.append(listener)
                    if plain:
                        self.plain_listeners.add(listener)
                for host, _, _ in parse_listen(s.host, 0) if s.udp_port is not None else ():
                    self.datagram_sockets.append(self.bound(host, s.udp_port,
                                                            socket.SOCK_DGRAM))
            for listener in self.listeners:
                listener.listen(s.backlog)
        except BaseException:
            self.close_sockets()
            raise
        self.service.listening = [
            (sock.fileno(), sock.getsockname(), transport) for sock, transport in
            [(listener, "tcp") for listener in self.listeners]
            + [(sock, "udp") for sock in self.datagram_sockets]]

    def bound(self, host, port, kind):
        """A socket of kind (TCP or UDP) bound to host and port (0: a free one)."""
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=kind, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self):
        """Bind and serve from a background thread; returns self."""
        self.bind()
        self.thread = threading.Thread(target=self.serve, name="memg-" + ENGINE_NAMES[
            type(self)], daemon=True)
        self.thread.start()
        return self

    def serve_forever(self):
        """Bind (if not yet bound) and serve from this thread until stopped."""
        if self.wakeup is None:    # (a server with TCP off has no listeners)
            self.bind()
        self.serve()

    def request_stop(self):
        """Ask the engine to stop, from any thread, at any moment, stop() included:
        it takes no lock, only sets a flag and writes a byte to wake the engine
        (when one is already waiting there, this one is not needed)."""
        self.stopping = True
        wakeup = self.wakeup
        if wakeup is not None:
            try:
                wakeup[1].send(b"\0")
            except OSError:
                pass

    def stop(self, timeout=2.0):
        """Stop accepting, close every connection, join the threads, free the port.
        (Not for signal handlers: request_stop is.)"""
        deadline = time.monotonic() + timeout
        self.request_stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self.close_connections(deadline)
        self.close_sockets()
        if self.settings.unix_socket and os.path.exists(self.settings.unix_socket):
            with contextlib.suppress(OSError):
                os.unlink(self.settings.unix_socket)

    def close_connections(self, deadline):
        """Close the connections serve() leaves open, by deadline: none, for an
        engine whose serve() closes them as it ends (asyncio, in its loop's thread)."""

    def close_sockets(self):
        for sock in self.listeners + self.datagram_sockets + list(self.wakeup or ()):
            sock.close()
        self.listeners, self.datagram_sockets = [], []

    # -- what every engine does with a new connection ---------------------------

    def new_protocol(self, sock, address, wake):
        """A protocol for an accepted socket, admitted by the service; None if it
        was turned away over the connection limit."""
        try:
            local = sock.getsockname()
        except OSError:
            local = None
        protocol = self.service.new_protocol(sock.fileno(), address, local, wake)
        if not self.service.open_connection(protocol):
            self.turn_away(sock)
            return None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):          # (a client already gone)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol

    @staticmethod
    def turn_away(sock):
        """memcached's reply to a client it cannot take, then the close."""
        with contextlib.suppress(OSError):
            sock.send(TOO_MANY_CONNECTIONS)
        sock.close()

    def serves_tls(self, listener):
        """Whether the clients of listener are served over TLS."""
        return self.service.tls_context is not None and listener not in self.plain_listeners

    def handshake_failed(self):
        """A TLS handshake failed or stalled: it costs that connection, and counts."""
        self.service.count("ssl_handshake_errors")

    def handshake_done(self, tls):
        """A TLS handshake succeeded (tls: its SSLSocket or SSLObject): a session not
        resumed counts (ssl_new_sessions)."""
        if not tls.session_reused:
            self.service.count("ssl_new_sessions")

    def answer(self, sock):
        """Answer the UDP requests waiting on sock (see answer_datagram); a reply
        datagram the socket has no room for is lost, as UDP may lose it."""
        for _ in range(self.settings.backlog):
            try:
                datagram, peer = sock.recvfrom(UDP_READ_SIZE)
            except OSError:          # (none left, or the socket closed)
                return
            for reply in answer_datagram(self.service, datagram, peer, sock.fileno()):
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    break

    def accept_failed(self, error):
        """An accept failed: out of file descriptors counts (listen_disabled_num)
        and means waiting ACCEPT_BACKOFF before accepting again, rather than
        spinning; anything else (a client gone before it was accepted) is passed."""
        if error.errno in (errno.EMFILE, errno.ENFILE):
            self.service.count("listen_disabled_num")
            return True
        return False


# -- a thread per connection --------------------------------------------------------

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
    does not take at once then goes through socket.sendall, which waits."""
    try:
        import ctypes
        send = ctypes.PyDLL(None).send
        flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
    except (ImportError, OSError, TypeError, AttributeError):
        return (lambda fileno, data, size, flags: 0), 0
    send.restype = ctypes.c_ssize_t
    return send, flags


def give_way():
    """Let the other connections' threads run before this one goes on (it yielded,
    -R): the interpreter's lock and the processor both, where the system can give
    up the processor; otherwise the lock alone."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()
    else:
        time.sleep(0)


SEND_MAX = 1 << 30
# How long a TLS watcher's check for its client's end waits for a whole record.
PEER_CHECK_TIMEOUT = 0.1


class ThreadConnection:
    """A client served by a thread of its own: its socket, its protocol, its input
    buffer, and the event that wakes it when it watches and has lines to send.

    The buffer is an anonymous memory map of the connection's own, not heap memory:
    a thousand clients coming and going, each with a heap buffer, leave the heap
    full of holes (over ten rounds of tests/soak.py, resident memory grew 35 to 56 %
    with 64 KiB heap buffers, 7 % with maps), while a map goes back to the system
    whole when the connection closes."""

    def __init__(self, engine, sock, address, tls=False):
        self.engine = engine
        self.sock = sock
        self.tls = tls                   # served over TLS
        self.event = threading.Event()
        self.protocol = engine.new_protocol(sock, address, self.event.set)
        self.buffer = mmap.mmap(-1, READ_BUFFER) if self.protocol else None

    def serve(self):
        """Read, run and reply until the client leaves or is sent away, then close."""
        engine, protocol = self.engine, self.protocol
        view = memoryview(self.buffer)
        idle_timeout = engine.settings.idle_timeout
        try:
            if self.tls and not self.handshake():
                return
            sock = self.sock
            while not protocol.closing:
                if protocol.watcher is not None:
                    self.stream()
                    break
                if idle_timeout:
                    # As in memcached, a client is idle from its last command, so one
                    # that trickles a line a byte at a time is idle too.
                    left = idle_timeout - (time.monotonic() - protocol.last_command)
                    if left <= 0:
                        raise socket.timeout
                    sock.settimeout(left)
                received = sock.recv_into(view)
                self.send(protocol.receive_data(self.buffer[:received]))
                while protocol.pending and protocol.watcher is None:
                    if protocol.yielded:
                        give_way()
                    self.send(protocol.data_to_send())
        except socket.timeout:
            engine.service.count("idle_kicks")
            protocol.close_reason = "idle_timeout"
        except OSError:
            pass             # reset by the peer, or closed by stop(): nothing to say
        finally:
            view.release()
            self.close()

    def close(self):
        self.engine.service.close_connection(self.protocol)
        if self.tls:
            self.close_notify()
        self.sock.close()
        self.buffer.close()

    def close_notify(self):
        """Tell a TLS client the session ends, as memcached's SSL_shutdown does,
        without waiting for its answer (the socket no longer blocks, so the second
        half of unwrap fails at once, as it may on a session already broken)."""
        import ssl
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.sock.setblocking(False)
            self.sock.unwrap()

    def handshake(self):
        """TLS: wrap the socket and shake hands, within the idle timeout if there is
        one (a client that never does costs its connection until then)."""
        import ssl
        with self.engine.service.lock:                  # (refresh_certs swaps it)
            context = self.engine.service.tls_context
        self.sock = context.wrap_socket(self.sock, server_side=True,
                                        do_handshake_on_connect=False)
        self.sock.settimeout(self.engine.settings.idle_timeout or None)
        try:
            self.sock.do_handshake()
        except (ssl.SSLError, OSError):
            self.engine.handshake_failed()
            return False
        self.engine.handshake_done(self.sock)
        return True

    def send(self, data):
        """Send replies, in one send if the socket takes them at once; sendall sends
        any rest (or all of them after an error, which it reports).  (Over TLS, the
        socket's own sendall: the C library's send would bypass the encryption.)"""
        if data and self.tls:
            self.sock.sendall(data)
        elif data:
            sent = self.engine.send(self.sock.fileno(), data, min(len(data), SEND_MAX),
                                    self.engine.send_flags)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[max(sent, 0):])

    def stream(self):
        """Send a watcher its log lines until it leaves or the server stops."""
        self.sock.settimeout(self.engine.settings.idle_timeout or None)
        while not self.engine.stopping:
            self.event.wait(1.0)
            self.event.clear()
            self.send(self.protocol.data_to_send())      # (pending says if more is left)
            while self.protocol.pending:
                self.send(self.protocol.data_to_send())
            if self.peer_closed():
                return

    def peer_closed(self):
        """Whether the client has closed its end (a watcher only ever listens, so
        what else it sends may be read and dropped)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        if not self.tls:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        self.sock.settimeout(PEER_CHECK_TIMEOUT)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False             # (a part of a TLS record: not an end)
        finally:
            self.sock.settimeout(self.engine.settings.idle_timeout or None)


class ThreadsEngine(Engine):
    """A thread per connection, blocking in its socket's reads and writes: the
    design card's shape, and the default.  The calling thread accepts, and answers
    UDP requests (-U); one more thread runs the LRU maintainer every second."""

    def __init__(self, service):
        super().__init__(service)
        self.lock = threading.Lock()             # guards connections
        self.connections = {}                    # ThreadConnection -> its thread
        self.send, self.send_flags = replies_sender()
        self.sweeper = None
        self.swept = threading.Event()           # set by stop(): the sweeper ends

    def serve(self):
        """The accept loop: one thread per client, up to the connection limit."""
        self.sweeper = threading.Thread(target=self.sweep, name="memg-sweep", daemon=True)
        self.sweeper.start()
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                selector.register(listener, selectors.EVENT_READ, self.accept)
            for sock in self.datagram_sockets:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, self.answer)
            selector.register(self.wakeup[0], selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in selector.select():
                    if key.fileobj is self.wakeup[0]:
                        with contextlib.suppress(OSError):
                            self.wakeup[0].recv(4096)
                    elif not self.stopping and key.data(key.fileobj):
                        return

    def accept(self, listener):
        """Take one client.  Returns True when --single has served its one."""
        try:
            sock, address = listener.accept()
        except OSError as error:
            if self.accept_failed(error):
                time.sleep(ACCEPT_BACKOFF)
            return False
        connection = ThreadConnection(self, sock, address, self.serves_tls(listener))
        if connection.protocol is None:
            return False
        if self.settings.single:
            # In the calling thread, so that a profiler there sees the work.
            with self.lock:
                self.connections[connection] = None
            self.run(connection)
            return True
        thread = threading.Thread(target=self.run, args=(connection,), daemon=True,
                                  name="memg-conn-%d" % connection.protocol.fd)
        with self.lock:
            self.connections[connection] = thread
        try:
            thread.start()
        except RuntimeError:
            # The system would not give another thread (RLIMIT_NPROC, memory): this
            # client is turned away as if over the limit, and the server goes on.
            with self.lock:
                del self.connections[connection]
            self.turn_away(sock)
            connection.close()
            self.service.refuse_connection()
        return False

    def run(self, connection):
        try:
            connection.serve()
        finally:
            with self.lock:
                del self.connections[connection]

    def sweep(self):
        while not self.swept.wait(SWEEP_INTERVAL):
            self.service.sweep()

    def close_connections(self, deadline):
        self.swept.set()
        with self.lock:
            connections = list(self.connections.items())
        for connection, _ in connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
            connection.event.set()
        for thread in [thread for _, thread in connections] + [self.sweeper]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


# -- an asyncio event loop -------------------------------------------------------

class AsyncioConnection(asyncio.BufferedProtocol):
    """A client served by the event loop: asyncio's protocol callbacks, handing
    what arrives to the TextProtocol and writing what it returns.  While the
    transport holds more than OUTPUT_LIMIT unsent, it stops reading and making
    replies (pause_writing), so that a client that does not read costs a bounded
    amount; a long reply is made a step per turn of the loop, so that other clients
    are served in between.

    The loop reads into the engine's one buffer (a BufferedProtocol's get_buffer),
    whose bytes are taken out at once: the standard library's loop otherwise reads
    into a new 256 KiB object each time, and a thousand clients coming and going
    left the heap 28 % larger after ten rounds of tests/soak.py (uvloop's, 12 %)."""

    def __init__(self, engine, sock, address):
        self.engine = engine
        self.protocol = engine.new_protocol(sock, address, self.wake)
        self.transport = None
        self.writing_paused = False
        self.input_held = False          # reading stopped while -R's commands wait
        self.scheduled = False           # a send_more waits in the loop

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=OUTPUT_LIMIT)
        self.engine.connections.add(self)

    def get_buffer(self, sizehint):
        return self.engine.read_view

    def buffer_updated(self, nbytes):
        protocol = self.protocol
        out = protocol.receive_data(self.engine.read_buffer[:nbytes])
        if out:
            self.transport.write(out)
        if protocol.pending or protocol.closing:
            self.after_output()

    def eof_received(self):
        out = self.protocol.receive_data(b"")
        if out:
            self.transport.write(out)
        self.after_output()
        return True                      # (the transport closes once the replies are out)

    def after_output(self):
        protocol = self.protocol
        self.hold_input(protocol.yielded)
        if protocol.pending:
            if not self.writing_paused and not self.scheduled:
                self.scheduled = True
                self.engine.loop.call_soon(self.send_more)
        elif protocol.closing:
            self.transport.close()

    def send_more(self):
        self.scheduled = False
        if self.writing_paused or self.transport.is_closing():
            return
        out = self.protocol.data_to_send()
        if out:
            self.transport.write(out)
        self.after_output()

    def wake(self):
        """A watcher has lines: from any thread, have the loop send them."""
        with contextlib.suppress(RuntimeError):      # the loop has closed
            self.engine.loop.call_soon_threadsafe(self.send_more)

    def hold_input(self, held):
        """Read no more while commands already read wait for their turn (the
        protocol yielded after -R of them): the loop would otherwise go on reading
        whatever a client pipelines, faster than the commands run, into memory
        (a client writing six times -m of small sets took 270 MB)."""
        if held != self.input_held and not self.writing_paused:
            with contextlib.suppress(RuntimeError, AttributeError):
                if held:
                    self.transport.pause_reading()
                else:
                    self.transport.resume_reading()
            self.input_held = held

    def pause_writing(self):
        self.writing_paused = True
        with contextlib.suppress(RuntimeError, AttributeError):
            self.transport.pause_reading()

    def resume_writing(self):
        self.writing_paused = self.input_held = False
        with contextlib.suppress(RuntimeError, AttributeError):
            self.transport.resume_reading()
        # Not after_output: its protocol.pending does not know of a watcher's lines
        # that came while writing was paused (their wake found it paused).
        if not self.scheduled:
            self.scheduled = True
            self.engine.loop.call_soon(self.send_more)

    def kick(self):
        """-o idle_timeout: close this client, idle too long."""
        self.engine.service.count("idle_kicks")
        self.protocol.close_reason = "idle_timeout"
        self.transport.abort()

    def connection_lost(self, error):
        self.engine.connections.discard(self)
        self.engine.service.close_connection(self.protocol)


class TLSTransport:
    """What an AsyncioTLSConnection writes to and closes in the place of the loop's
    transport: what is written is encrypted, and what TLS has to send (records,
    handshake messages, alerts) goes to the plain transport below."""

    def __init__(self, transport, tls, outgoing):
        self.transport = transport       # the loop's, plain
        self.tls = tls                   # the connection's ssl.SSLObject
        self.outgoing = outgoing         # its MemoryBIO of what it has to send

    def write(self, data):
        self.tls.write(data)
        self.transport.write(self.outgoing.read())

    def flush(self):
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())

    def close(self):
        """Close once what is buffered is sent, a close_notify last if the session
        is sound (as memcached's SSL_shutdown: the client's is not awaited); after a
        failure, what TLS had to say (an alert, perhaps) is buffered already."""
        import ssl
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()
        self.flush()
        self.transport.close()

    def abort(self):
        """Close at once (what is buffered is dropped), with a close_notify if the
        session is sound and the socket takes it now: memcached's SSL_shutdown comes
        with every close, and a client told nothing may write into a reset."""
        import ssl
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()
        self.flush()
        self.transport.abort()

    def is_closing(self):
        return self.transport.is_closing()

    def pause_reading(self):
        self.transport.pause_reading()

    def resume_reading(self):
        self.transport.resume_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        self.transport.set_write_buffer_limits(high, low)


class AsyncioTLSConnection(AsyncioConnection):
    """A client served over TLS by the event loop: memg's own TLS (an ssl.SSLObject
    between two memory buffers) over the loop's plain transport.  The loop's TLS
    transports close a connection whose handshake fails without sending the alert
    that tells the client why, which memcached sends; here what TLS has to send is
    always sent, then the connection closes.

    What arrives is decrypted into the engine's read buffer and taken as a plain
    connection's input is; the protocol's replies, TLSTransport encrypts.
    Nothing reaches the protocol before the handshake is done, which the idle
    timeout bounds: a failed or stalled handshake counts in ssl_handshake_errors."""

    def connection_made(self, transport):
        import ssl
        with self.engine.service.lock:                  # (refresh_certs swaps it)
            context = self.engine.service.tls_context
        self.incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, outgoing, server_side=True)
        self.handshaking = True
        super().connection_made(TLSTransport(transport, self.tls, outgoing))

    def buffer_updated(self, nbytes):
        self.incoming.write(self.engine.read_view[:nbytes])
        self.decrypt()

    def eof_received(self):
        self.incoming.write_eof()
        self.decrypt()
        return True                      # (closed by now, or once the replies are out)

    def decrypt(self):
        """Take what has arrived: the handshake until it is done, then the data of
        every whole record, decrypted into the engine's read buffer, until the input
        ends (a close_notify).  When TLS fails (a bad handshake; garbage, or an end
        without close_notify, after one), what it has to say is sent and the
        connection closes."""
        import ssl
        tls, incoming, protocol = self.tls, self.incoming, self.protocol
        try:
            if self.handshaking:
                tls.do_handshake()
                self.handshaking = False
                self.engine.handshake_done(tls)
            # A read takes one whole record (OpenSSL reads no further, and a record's
            # data fits the buffer): once the incoming buffer is empty, another would
            # only raise SSLWantReadError, which costs more than the read.
            while incoming.pending or incoming.eof:
                if protocol.eof or protocol.closing:
                    break                # (what comes after the end is not read)
                received = tls.read(READ_BUFFER, self.engine.read_view)
                if received:
                    super().buffer_updated(received)
                else:
                    super().eof_received()           # (a close_notify)
        except ssl.SSLWantReadError:
            pass                         # (the rest of a record is still to come)
        except ssl.SSLError:
            if self.handshaking:
                self.engine.handshake_failed()
            self.transport.close()
        self.transport.flush()

    def kick(self):
        if self.handshaking:             # (a stalled handshake is a failed one)
            self.engine.handshake_failed()
            self.transport.abort()
        else:
            super().kick()


def event_loop_factory(choice):
    """What makes the event loop: uvloop's when it is installed (choice "auto") or
    asked for, else the standard library's.  (Imported when the engine is made,
    before the memg command drops its privileges: after, the files may be out of
    reach.)"""
    if choice != "stdlib":
        try:
            import uvloop
            return uvloop.new_event_loop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--event-loop uvloop: uvloop is not installed "
                                 "(pip install memg[uvloop])")
    return asyncio.new_event_loop


class AsyncioEngine(Engine):
    """Every connection on one asyncio event loop, in the thread that serves: no
    thread per client, no switching between threads.  It accepts by itself (the
    loop's own server would hide the connection limit's reply and the back-off
    when out of file descriptors) and hands each socket to the loop's plain
    transports (TLS is memg's own: AsyncioTLSConnection); the sweep and the idle
    check are timers of the loop."""

    def __init__(self, service):
        super().__init__(service)
        self.new_event_loop = event_loop_factory(self.settings.event_loop)
        self.loop = None
        self.read_buffer = self.read_view = None   # what every connection reads into
        self.connections = set()            # AsyncioConnections; the loop's thread only
        self.connecting = set()             # tasks handing accepted sockets to the loop

    def serve(self):
        self.loop = loop = self.new_event_loop()
        loop.set_exception_handler(self.loop_error)
        self.read_buffer = mmap.mmap(-1, READ_BUFFER)
        self.read_view = memoryview(self.read_buffer)
        try:
            for listener in self.listeners:
                listener.setblocking(False)
                loop.add_reader(listener.fileno(), self.accept, listener)
            for sock in self.datagram_sockets:
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self.answer, sock)
            loop.add_reader(self.wakeup[0].fileno(), self.woken)
            loop.call_later(SWEEP_INTERVAL, self.sweep)
            if self.settings.idle_timeout:
                loop.call_later(self.idle_check_interval(), self.kick_idle)
            if not self.stopping:
                loop.run_forever()
        finally:
            self.shut_down()

    @staticmethod
    def loop_error(loop, context):
        """The loop's report of an error it caught: a client going away is nothing
        to print; anything else is memg's bug, printed as the loop prints it."""
        if isinstance(context.get("exception"), (ConnectionError, TimeoutError, OSError)):
            return
        loop.default_exception_handler(context)

    def woken(self):
        with contextlib.suppress(OSError):
            self.wakeup[0].recv(4096)
        if self.stopping:
            self.loop.stop()

    def accept(self, listener):
        """Take the clients waiting on a listener."""
        for _ in range(self.settings.backlog):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if self.accept_failed(error):
                    self.loop.remove_reader(listener.fileno())
                    self.loop.call_later(ACCEPT_BACKOFF, self.resume_accepting, listener)
                return
            connection = (AsyncioTLSConnection if self.serves_tls(listener)
                          else AsyncioConnection)(self, sock, address)
            if connection.protocol is None:
                continue                         # turned away
            sock.setblocking(False)
            task = self.loop.create_task(self.connect(sock, connection))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    def resume_accepting(self, listener):
        if not self.stopping and listener.fileno() >= 0:
            self.loop.add_reader(listener.fileno(), self.accept, listener)

    async def connect(self, sock, connection):
        """Hand an accepted socket to the loop's transports."""
        try:
            await self.loop.connect_accepted_socket(lambda: connection, sock)
        except BaseException:
            # Stopped before the loop took the socket: it is ours to close.
            sock.close()
            self.service.close_connection(connection.protocol)

    def sweep(self):
        self.service.sweep()
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    def idle_check_interval(self):
        return min(1.0, self.settings.idle_timeout / 4)

    def kick_idle(self):
        """-o idle_timeout: close the clients idle since their last command longer
        than that (watchers, which only listen, excepted)."""
        oldest = time.monotonic() - self.settings.idle_timeout
        for connection in list(self.connections):
            protocol = connection.protocol
            if protocol.watcher is None and protocol.last_command < oldest:
                connection.kick()
        self.loop.call_later(self.idle_check_interval(), self.kick_idle)

    def shut_down(self):
        """Close every connection, let the loop deliver their ends, close it."""
        loop = self.loop
        for sock in self.listeners + self.datagram_sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
        for task in list(self.connecting):
            task.cancel()
        for connection in list(self.connections):
            connection.transport.abort()
        if self.connecting or self.connections:
            loop.call_soon(loop.stop)
            loop.run_forever()
        loop.close()
        self.read_view.release()
        self.read_buffer.close()


ENGINES = {"threads": ThreadsEngine, "asyncio": AsyncioEngine}
ENGINE_NAMES = {engine: name for name, engine in ENGINES.items()}


class Server:
    """A memg server: a Service and the engine that serves it.
    ``Server(port=0).start()`` serves from a background thread, ``serve_forever()``
    from the calling thread; ``stop()`` ends both.  Every setting of the command
    line is a keyword argument (see Settings), ``engine`` among them."""

    def __init__(self, host="127.0.0.1", port=0, **settings):
        self.settings = Settings(host=host, port=port, **settings)
        self.service = Service(self.settings)
        self.store = self.service.store
        self.engine = ENGINES[self.settings.engine](self.service)
        # memory_file (-e): the snapshot there is read now, and written at stop().
        self.keeping = self.settings.memory_file is not None
        if self.keeping:
            self.restore_memory_file()

    def save(self, path):
        """Write a snapshot of the cache to path, while serving (see save_snapshot);
        returns how many items it holds."""
        return save_snapshot(self.store, path)

    def load(self, path):
        """Add the items of the snapshot at path to the cache, while serving (see
        Store.restore); returns how many were linked.  SnapshotError if it is not
        one."""
        return self.store.restore(*read_snapshot(path))

    def restore_memory_file(self):
        """Start from the snapshot in memory_file, if there is one.  One that cannot
        be read whole is never half-loaded: memg says so on stderr, moves it aside
        and starts empty."""
        path = self.settings.memory_file
        # memcached's -e keeps its cache in FILE and how to read it back in FILE.meta:
        # memg can read neither, and its snapshot would take FILE's place.
        if os.path.lexists(path + ".meta"):
            raise ValueError("%s.meta is memcached's restart metadata: memg cannot read "
                             "the cache memcached saved in %s, and would write over it "
                             "(remove both, or give -e another file)" % (path, path))
        folder = os.path.dirname(os.path.abspath(path))
        if not os.access(folder, os.W_OK):
            raise ValueError("cannot write the memory file's folder %s" % folder)
        # What a crash in the middle of a save left beside the snapshot (which that
        # left whole): a temporary file of no use to anyone.
        for stale in glob.glob(glob.escape(path) + ".*.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        try:
            started = time.monotonic()
            restored = self.load(path)
        except FileNotFoundError:
            return
        except SnapshotError as error:
            aside = path + ".unreadable"
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            print("memg: warning: %s is not a snapshot memg can read (%s): moved to %s; "
                  "starting empty" % (path, error, aside), file=sys.stderr, flush=True)
            return
        except OSError as error:        # (a folder, a file memg may not read: not ours)
            raise ValueError("cannot read the memory file %s: %s" % (
                path, error.strerror or error))
        # Read once, as memcached unlinks its metadata once read: a crash before the
        # next save must not bring back values older than those served since.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if self.settings.verbose:
            print("memg: restored %d items from %s in %.1f s" % (
                restored, path, time.monotonic() - started), file=sys.stderr, flush=True)

    @property
    def address(self):
        return self.engine.address

    def bind(self):
        self.engine.bind()

    def start(self):
        self.engine.start()
        return self

    def serve_forever(self):
        self.engine.serve_forever()

    def request_stop(self):
        self.engine.request_stop()

    def stop(self, timeout=2.0):
        """Stop serving; with memory_file, then write the cache there (once)."""
        self.engine.stop(timeout)
        if self.keeping:
            self.keeping = False
            self.save(self.settings.memory_file)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# --------------------------------------------------------------------------
# 6. The command line
# --------------------------------------------------------------------------

# memcached options that tune machinery memg does not have: accepted, with a warning,
# so that service files written for memcached keep working.
IGNORED_OPTIONS = {
    "-r": (False, "core dump limits"), "-k": (False, "memory locking"),
    "-L": (False, "large pages"),
}
# memcached -o options memg accepts and ignores (slab, hash and extstore tuning).
IGNORED_EXTENDED = {
    "maxconns_fast", "no_maxconns_fast", "hashpower", "tail_repair_time", "hash_algorithm",
    "read_buf_mem_limit", "worker_logbuf_size", "no_hashexpand", "sock_cookie_id",
    "slab_reassign",
    "no_slab_reassign", "slab_automove", "slab_automove_ratio", "slab_automove_window",
    "slab_automove_freeratio", "relaxed_privileges", "no_relaxed_privileges",
    "drop_privileges", "no_drop_privileges", "inline_ascii_response",
    "meta_response_old", "no_inline_ascii_resp", "bind_protocol",
}
# -o options that set more than their own setting, as memcached's do: the LRU
# maintainer comes with the segmented LRU, a temporary_ttl turns the TEMP LRU on, and
# no_modern brings back memcached 1.4's defaults (of those memg has: a flat LRU, no
# maintainer, no crawler).  "no_" before the name of a setting on by default turns it off.
EXTENDED_ALSO = {
    "lru_maintainer": {"lru_segmented": True},
    "no_lru_maintainer": {"lru_segmented": False},
    "temporary_ttl": {"temp_lru": True},
    "modern": {"no_modern": False},
    "no_modern": {"lru_segmented": False, "lru_maintainer": False, "lru_crawler": False},
}


def build_parser():
    """memcached's command line, built from the Settings fields (each with its
    flags, help and choices), plus -o, -h, -V and the options memg ignores."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit("memg: %s (see memg -h)" % message)

    parser = Parser(
        prog="memg", allow_abbrev=False, add_help=False,
        description="memg %s: a memcached-compatible server in one Python file." % __version__)
    add = parser.add_argument
    for field in SETTINGS_FIELDS.values():
        meta = field.metadata
        if not meta["flags"]:
            continue
        options = dict(dest=field.name, help=meta["help"], default=argparse.SUPPRESS)
        if isinstance(field.default, bool):          # the flag flips the default
            options.update(action="store_const", const=not field.default)
        elif field.name == "verbose":
            options.update(action="count")
        else:
            choices = meta["choices"]
            options.update(metavar=meta["metavar"],
                           choices=choices() if callable(choices) else choices)
        add(*meta["flags"], **options)
    add("-o", "--extended", action="append", default=[], metavar="OPTIONS",
        help="comma separated options: " + "; ".join(
            field.metadata["help"] for field in SETTINGS_FIELDS.values()
            if field.metadata["extended"])
        + "; memcached's slab, LRU and hash tuning options are accepted and ignored")
    add("-h", "--help", action="help", help="print this help and exit")
    add("-V", "--version", action="version", version="memg %s (memcached protocol %s)"
        % (__version__, VERSION), help="print version and exit")
    for flag, (takes_value, what) in IGNORED_OPTIONS.items():
        add(flag, dest="option_" + flag[1], help="ignored: memg has no %s" % what,
            **({"metavar": "X"} if takes_value else {"action": "store_true"}))
    return parser


def parse_command_line(argv):
    """Settings from memcached-style arguments, and warnings to print.  Raises
    SystemExit with a one-line message for anything memg cannot honour."""
    args = vars(build_parser().parse_args(argv))
    warnings = []
    for flag, (_, what) in IGNORED_OPTIONS.items():
        if args.pop("option_" + flag[1]):
            warnings.append("%s ignored: memg has no %s" % (flag, what))
    values = {}
    if args.get("sasl"):
        args["sasl_pwdb"] = os.environ.get("MEMCACHED_SASL_PWDB")
    for group in args.pop("extended"):
        for option in filter(None, group.split(",")):
            name, _, text = option.partition("=")
            field = SETTINGS_FIELDS.get(name)
            negated = SETTINGS_FIELDS.get(name[3:]) if name.startswith("no_") else None
            if field is not None and field.metadata["extended"]:
                args[name] = True if isinstance(field.default, bool) else text
                args.update(EXTENDED_ALSO.get(name, {}))
            elif negated is not None and negated.metadata["extended"] and (
                    negated.default is True):
                args[negated.name] = False            # memcached's -o no_NAME
                args.update(EXTENDED_ALSO.get(name, {}))
            elif name in EXTENDED_ALSO:
                args.update(EXTENDED_ALSO[name])
            elif name in IGNORED_EXTENDED or name.startswith("ext_"):
                warnings.append("-o %s ignored: memg has no such tuning" % name)
            else:
                raise SystemExit("memg: unknown -o option %r" % name)
    for name, value in args.items():
        parse = SETTINGS_FIELDS[name].metadata["parse"]
        try:
            values[name] = parse(value) if parse and isinstance(value, str) else value
        except ValueError:
            raise SystemExit("memg: %s: bad value %r" % (Settings.flag(name), value))
    if "verbose" in values:
        values["verbose"] = min(values["verbose"], 2)
    if values.get("udp_port") is not None and "port" not in values:
        values["port"] = values["udp_port"]       # memcached's rule: -U alone sets both
    try:
        settings = Settings(**values)
    except ValueError as error:
        raise SystemExit("memg: %s" % error)
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
# can hold the others back that much longer.
SWITCH_INTERVAL = 0.05

# glibc gives a process up to eight malloc arenas per core so that threads seldom wait
# for each other's allocations.  Under the GIL they seldom would anyway, and with a
# thread per connection every arena keeps holes of its own: with two, resident memory
# over tests/soak.py's rounds of a thousand clients grows half as much.
MALLOC_ARENAS = 2
# glibc's mallopt parameter numbers.
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3


def mallopt(parameter, value):
    """Set a parameter of glibc's malloc, where there is one (Linux; not musl, which
    has no mallopt, nor other systems)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).mallopt(parameter, value)
        except (ImportError, OSError, AttributeError):
            pass                 # no ctypes, or a C library without mallopt


def tune_for_threads():
    """What the memg command does for the threads engine, before any thread starts."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    with contextlib.suppress(ValueError, RuntimeError):   # where sizes cannot be set
        threading.stack_size(THREAD_STACK_SIZE)
    mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def tune_malloc():
    """Keep glibc's threshold for giving a block pages of its own at MMAP_THRESHOLD.
    By default it rises to the size of any such block freed, up to 32 MB, so that
    once a sub-LRU's dict has replaced its table, its next tables come from the
    heap; and the heap keeps the pages of a block freed below its top, so that
    tables the dicts had left stayed resident: under churn, a cache of 100-byte
    values took 1.2 times -m, of 1-byte values with the threads engine 1.65 (1.01
    with the threshold fixed).  With pages of its own, a table gives them back as
    soon as it is replaced.  1 MiB: below the table of any cache of 20,000 keys,
    above what a connection reads at once and the values -I allows by default:
    with 128 KiB, every copy of a 500 KB value had pages of its own, and a set and
    a get of one took twice as long with threads.  (Values above it are charged
    by the page: ``allocated``.)"""
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def write_port_file(path, listening):
    """MEMCACHED_PORT_FILENAME: the ports bound, in memcached's lines ("TCP INET:
    11211"), written whole under another name first, as memcached does, so that a
    reader never finds half of it."""
    with open(path + ".lck", "w") as ports:
        for _, address, transport in listening:
            if isinstance(address, tuple):
                ports.write("%s INET%s: %d\n" % (transport.upper(),
                                                "6" if ":" in address[0] else "", address[1]))
    os.replace(path + ".lck", path)


def beyond_loopback(settings):
    """Whether the server listens on an address other machines can reach."""
    if settings.unix_socket:
        return False
    return any(not (host.startswith("127.") or host in ("localhost", "::1"))
               for host, _, _ in parse_listen(settings.host, settings.port))


# (SIGUSR1 is memcached's graceful stop, the one that keeps a -e cache.)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM} | (
    {signal.SIGUSR1} if hasattr(signal, "SIGUSR1") else set())


class StopSignals:
    """SIGINT and SIGTERM ask the server to stop, however many arrive and whenever:
    before there is a server, while it serves, while it stops.

    Where the system allows, they are blocked in every thread and taken by one
    thread of their own with sigwait, so that no handler ever runs in the middle
    of the main thread's steps: a handler can deadlock on a lock the main thread
    holds, a storm of signals runs handlers inside handlers up to Python's
    recursion limit, and one that arrives while the handler is being changed
    raises an error anywhere.  What a signal does (Engine.request_stop) takes no
    lock either: it sets a flag and writes a byte.  Where there is no sigwait
    (Windows), a plain handler does the same."""

    def __init__(self):
        self.received = False
        self.engine = None
        if hasattr(signal, "pthread_sigmask"):
            # Before any other thread starts: threads inherit the mask.  Signals that
            # come before serve() wait, blocked, for the thread it starts.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        else:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.stop)

    def wait(self):
        while True:
            signal.sigwait(STOP_SIGNALS)
            self.stop()

    def stop(self, *_):
        self.received = True
        engine = self.engine
        if engine is not None:
            engine.request_stop()

    def serve(self, engine):
        """Have the signals stop engine from now on (one that came already, at once).
        The thread that takes them starts here, after -d's fork: a fork keeps only
        the thread that calls it."""
        self.engine = engine
        if hasattr(signal, "pthread_sigmask"):
            threading.Thread(target=self.wait, name="memg-signals", daemon=True).start()
        if self.received:
            engine.request_stop()


def write_pid_file(path, pid):
    """-P: the process id, written whole under another name first, as memcached
    does, so that a reader never finds the file empty."""
    try:
        with open(path + ".tmp", "w") as pid_file:
            pid_file.write("%d\n" % pid)
        os.replace(path + ".tmp", path)
    except OSError as error:
        raise SystemExit("memg: cannot write the pid file %s: %s" % (
            path, error.strerror or error))


def daemonize(settings):
    """-d: go on in a child process, in a session of its own (no terminal to hang
    up on it), with stdin and stdout on /dev/null, and stderr too unless -v, as
    memcached's -d; this process exits 0 once the child's pid file (-P) is written,
    so that what started memg finds both the pid file and the listening sockets as
    soon as memg returns (clients that come before the child serves wait in the
    listen queue).  The working folder stays: the files -e, -P and -s name relative
    to it are written and removed again at the stop.  Call it before any thread
    starts: a fork keeps only the thread that calls it."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        if settings.pid_file:
            try:
                write_pid_file(settings.pid_file, child)
            except SystemExit:
                os.kill(child, signal.SIGTERM)   # (a daemon no one could find)
                raise
        os._exit(0)
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1) if settings.verbose else (0, 1, 2):
        os.dup2(null, stream)
    os.close(null)


def main(argv=None):
    """The memg command: memcached's options, then serve until SIGINT or SIGTERM."""
    signals = StopSignals()
    settings, warnings = parse_command_line(sys.argv[1:] if argv is None else argv)
    tune_malloc()
    if settings.engine == "threads":
        tune_for_threads()
    for warning in warnings:
        print("memg: warning: " + warning, file=sys.stderr)
    try:
        server = Server(**dataclasses.asdict(settings))
        server.bind()
    except ValueError as error:
        raise SystemExit("memg: %s" % error)
    except OSError as error:
        raise SystemExit("memg: cannot listen on %s: %s" % (
            settings.unix_socket or "%s port %s" % (settings.host, ", ".join(
                str(port) for port in (settings.port, settings.udp_port) if port is not None)),
            error.strerror or error))
    if os.environ.get("MEMCACHED_PORT_FILENAME"):
        write_port_file(os.environ["MEMCACHED_PORT_FILENAME"], server.service.listening)
    if settings.user:
        drop_privileges(settings.user)
    raise_open_file_limit(settings.max_connections)
    if beyond_loopback(settings) and not (settings.auth_file or settings.sasl):
        print("memg: warning: listening beyond loopback (%s) with no authentication: "
              "anyone who can reach the port can read and change the cache"
              % settings.host, file=sys.stderr)
    if beyond_loopback(settings) and settings.udp_port is not None:
        print("memg: warning: serving UDP beyond loopback (%s): UDP's source addresses "
              "can be forged, so anyone can have memg send replies to a third party"
              % settings.host, file=sys.stderr)
    if settings.daemonize:
        daemonize(settings)
    elif settings.pid_file:
        write_pid_file(settings.pid_file, os.getpid())
    signals.serve(server.engine)
    if settings.verbose:
        print("memg %s listening on %s (%s engine)" % (__version__, ", ".join(
            socket_name(address, transport) for _, address, transport
            in server.service.listening) or "nothing", settings.engine), file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        try:
            server.stop()
        except OSError as error:                 # the memory file's disk, full or gone
            raise SystemExit("memg: cannot write %s: %s" % (
                settings.memory_file, error.strerror or error))
        finally:
            if settings.pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(settings.pid_file)
    return 0


# --------------------------------------------------------------------------
# 7. The pytest plugin
# --------------------------------------------------------------------------
# ``pip install memg`` registers this module with pytest (entry point pytest11).  The
# fixture ``memg_server`` is a memg serving from the test process, started once per
# session and emptied before every test.  Its settings are those of the session
# fixture ``memg_settings``, none by default: a project that wants others overrides
# it in its conftest.py, with any of Server's keyword arguments (see Settings), e.g.
# SASL against a file of user:password lines:
#
#     @pytest.fixture(scope="session")
#     def memg_settings():
#         return {"sasl": True, "sasl_pwdb": "tests/memcached-users"}
#
# (--memg-external uses the server it names as it is.)  memg imports pytest only when
# pytest calls.

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
    def memg_settings():
        """The keyword arguments of the session's memg.Server: override this fixture
        to choose settings (see memg.Settings)."""
        return {}

    @pytest.fixture(scope="session")
    def memg_session_server(memg_settings):
        external = config.getoption("memg_external")
        if external:
            yield ExternalServer(external)
            return
        with Server(port=0, **memg_settings) as server:
            yield server

    @pytest.fixture
    def memg_server(memg_session_server):
        """A running memcached-compatible server, empty at the start of the test;
        connect to ``memg_server.address``."""
        flush(memg_session_server)
        return memg_session_server

    # pytest finds fixtures among a plugin module's attributes.
    fixtures = types.ModuleType("memg_fixtures")
    fixtures.memg_settings = memg_settings
    fixtures.memg_session_server, fixtures.memg_server = memg_session_server, memg_server
    config.pluginmanager.register(fixtures, "memg-fixtures")


if __name__ == "__main__":
    sys.exit(main())
