#!/usr/bin/env python3
"""Side-by-side benchmark: memg on each of its engines against Debian's memcached,
same load, one run.

    python3 tests/bench.py [--rounds 3] [--seconds 5] [--quick] [--floor] [--memory]
                           [--extra "LABEL=COMMAND" ...] [--chart PATH]
                           [--json PATH] [--memg-args "..."]

The first run creates a virtual environment in .venv-bench (once), installs memg's
``bench`` extra into it (pylibmc, which the seed's test.py needs, matplotlib for
the chart, and uvloop for the asyncio engine) and re-executes itself there, as
tests/run.py does for the test suite.
Needs /usr/bin/memcaslap (Debian's libmemcached-tools); /usr/bin/memcached is
optional: without it memg's figures are printed alone.

Each server is started from the repository root on a free loopback port with the
same ``-m 1024 -c 1100``: memg on each engine (``python memg.py --engine threads
...``; ``--engine asyncio --event-loop uvloop``; ``--engine asyncio --event-loop
stdlib``), each followed by its floor with --floor, then any --extra servers, then
memcached (``memcached -l 127.0.0.1 ...``, with ``-u nobody`` when run as root).
Every figure is measured for the servers in turn, in that order, for a few rounds,
so that drift of the machine (another process, the CPU's clock) hits them all.
Progress goes to stderr; the report, a markdown table with a column per server,
then a column per server of its ratio to memcached (a memg engine's with its target
and whether it is met), goes to stdout.  The figures:

throughput, N conns
    memcaslap's TPS (operations per second, by its own clock) with N connections
    (-c N; -T 2, or -T 1 for one connection), 9 gets to 1 set (an explicit -F
    config), 100-byte values (-X 100), 64-byte keys (memcaslap's default) and a
    window of 1k keys per connection (-w 1k: memcaslap sets a key before it gets it,
    so a small window keeps that set-heavy start short and the run is mostly the 9:1
    mix; each run's share of sets is checked).  Median of the rounds.  Measured at
    1, 16, 200 and 1000 connections, which the chart (tests/bench.png) draws.
multi-get 20
    The same at 16 connections with -d 20: gets go out 20 keys to a request.
    memcaslap counts every key of a multi-get as one get, so the figure is keys
    fetched plus sets per second, not requests (those are about a twentieth of it).
server CPU per op
    The server process's user+system CPU time (/proc/PID/stat: every thread, alive
    or ended) over the 16-connection throughput runs, divided by the operations the
    server counted in the same time (cmd_get + cmd_set from its ``stats``).
    Microseconds per operation; median of the rounds.
test.py 10k
    The seed's recipe, ``python test.py 10000 127.0.0.1:PORT``: 10,000 sets then
    10,000 gets, one at a time over one pylibmc connection.  The seconds test.py
    prints (its own wall clock around the loop; interpreter start-up excluded).
    Median of at least five rounds.
RSS per item
    Fresh servers, started for this alone.  Resident memory (VmRSS) growth after
    300,000 sets of distinct keys (``key:N``) with 100-byte values, sent pipelined
    over one connection in batches whose STORED replies are all read, divided by
    the item count: bytes per item.  One measurement per server.
items held in -m 64, and resident growth / -m (V-byte values, K-byte keys)
    What a server holds in the memory it is given, and what that memory really is.
    Fresh servers with -m 64 (not the floors, which keep everything), one for each
    V of 1, 100, 1000, 10,000 and 500,000 and each K of 10 and 250: keys of K
    bytes (``kkk...0000000042``), all distinct, with V-byte values are written as
    pipelined noreply sets until six times -m has been written, counting each item
    as memcached does (key, value and its 48-byte header): 6.8 million items of one
    byte with 10-byte keys, 805 of 500 KB.  Then the items the server holds
    (curr_items, after a round trip), and the growth of its resident memory (VmRSS)
    from start-up, divided by -m.  One measurement per server.

The targets are the project's, per engine, for memg's ratio to memcached in the
same run (TARGETS).  The threads engine's are "no lower than today's": its ratios in
the README's table measured at d2aea67 on 2026-11-26 (0.22 at 16 and at 200
connections, 0.21 on the multi-get).

--floor puts beside each memg engine its floor: tests/floor_server.py with the same
--engine and --event-loop, the least a Python server on that engine must do to
serve this load (get, set, stats from a dict).  Its ratios to memcached bound what
memg can reach in the same run on the same engine.

--extra "LABEL=COMMAND" (repeatable) adds a server for a one-off comparison, e.g.
the gevent mode memg had at d2aea67:

    git show d2aea67:memg.py > /tmp/memg_old.py
    .venv-bench/bin/pip install gevent
    python3 tests/bench.py --extra "gevent (d2aea67)=python /tmp/memg_old.py --gevent"

The command is run as it is (no shell) with the others' ``-m 1024 -c 1100 -p PORT``
after it; a first word of python or python3 is the benchmark's own interpreter
(.venv-bench's, memg's), so what it imports must be installed there.  Its column
comes after memg's and the floors', before memcached's; it has no target.

A memcaslap run that reports an error (CLIENT_ERROR, SERVER_ERROR, ERROR, a failure
message, or get misses beyond a trace) aborts the benchmark instead of printing a
bogus figure.  The servers are stopped on every exit, Ctrl-C included.

Not collected by pytest (no test_ prefix), and not a timed test: the default run
(four servers) takes about seven minutes on two cores, --floor (seven) about twelve;
each server more adds some 100 s (a 5 s turn at each of 15 memcaslap runs, 5
test.py runs, one fill).
--quick runs each figure once, briefly, to try the script out (the -m rows with
-m 8); its figures are not worth comparing.
--memory measures the memory figures alone (RSS per item and the -m rows): about
twelve minutes for the four servers, most of it memg's on the 1-byte rows.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMG = os.path.join(ROOT, "memg.py")
TEST_PY = os.path.join(ROOT, "test.py")
FLOOR = os.path.join(ROOT, "tests", "floor_server.py")
VENV = os.path.join(ROOT, ".venv-bench")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
MEMCACHED = "/usr/bin/memcached"
MEMCASLAP = "/usr/bin/memcaslap"
REFERENCE = "memcached"     # the server the others are divided by

MB = 1024 * 1024
MEMORY_MB = 1024
MAX_CONNECTIONS = 1100      # -c for both: 1000 memcaslap connections and spare
FILE_LIMIT = 4096           # open files for us and our children (memcaslap, servers)
CONNECTIONS = (1, 16, 200, 1000)
MULTI_GET_KEYS = 20
VALUE_SIZE = 100
MEMORY_ITEMS = 300000
LIMIT_MB = 64               # -m of the memory-limit rows
LIMIT_WRITTEN = 6           # written in each: six times -m
LIMIT_VALUES = (1, 100, 1000, 10000, 500000)
LIMIT_KEYS = (10, 250)
MEMCACHED_ITEM_HEADER = 48  # what memcached adds to an item's key and value
TEST_PY_N = 10000
TEST_PY_ROUNDS = 5
STARTUP_TIMEOUT = 15.0

# memcaslap's -F file: 64-byte keys (its default), 100-byte values (-X 100 says it
# again), and the command mix: type 0 is set, type 1 is get.
MEMCASLAP_CONFIG = """\
key
64 64 1
value
100 100 1
cmd
0 0.1
1 0.9
"""
SET_SHARE = 0.1

# The lines memcaslap prints on a good run; anything else is shown, and a line that
# looks like a failure aborts the figure.
MEMCASLAP_NORMAL = re.compile(
    r"(servers|threads count|concurrency|run time|windows size|set proportion|"
    r"get proportion|cmd_get|cmd_set|get_misses|written_bytes|read_bytes|"
    r"object_bytes|Run time):|$")
MEMCASLAP_FAILURE = re.compile(
    r"\b(CLIENT_ERROR|SERVER_ERROR|ERROR)\b|error|fail|can't|couldn't|unexpected|"
    r"timeout|didn't", re.I)
MEMCASLAP_SUMMARY = re.compile(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)")

# memg's engines, as (name, the flags that choose it); a floor takes the same flags.
ENGINES = (
    ("threads", ["--engine", "threads"]),
    ("asyncio uvloop", ["--engine", "asyncio", "--event-loop", "uvloop"]),
    ("asyncio stdlib", ["--engine", "asyncio", "--event-loop", "stdlib"]),
)
THREADS, UVLOOP, STDLIB = ("memg " + name for name, _ in ENGINES)
# The project's targets for each memg engine's ratio to memcached, by figure (the
# issue's table; a ratio at least this, or at most for the figures where lower is
# better).  The threads engine's throughput targets are "no lower than today's":
# its ratios in the README's table at d2aea67 (measured 2026-11-26).
TARGETS = {
    "throughput_16": {UVLOOP: 0.8, STDLIB: 0.5, THREADS: 0.22},
    "throughput_200": {UVLOOP: 0.7, STDLIB: 0.45, THREADS: 0.22},
    "multi_get_20": {UVLOOP: 0.7, STDLIB: 0.45, THREADS: 0.21},
    "cpu_per_op_16": {UVLOOP: 1.5, STDLIB: 2.0},
    "test_py_10k": {UVLOOP: 1.10},
    "rss_per_item": {UVLOOP: 1.3, STDLIB: 1.3, THREADS: 1.3},
}
# Items held in -m, with 1-byte and with 100-byte values: memg's, on every engine,
# at least this share of memcached's.
TARGETS.update({"items_%d_%d" % (value, key): dict.fromkeys((THREADS, UVLOOP, STDLIB), share)
                for value, share in ((1, 0.6), (100, 0.75)) for key in LIMIT_KEYS})
# Bounds on a memg engine's own figure (not its ratio): -m is a promise.
BOUNDS = {"resident_%d_%d" % (value, key): dict.fromkeys((THREADS, UVLOOP, STDLIB), 1.15)
          for value in LIMIT_VALUES for key in LIMIT_KEYS}


class BenchError(Exception):
    """A figure that cannot be trusted: the run stops with this message."""


# --------------------------------------------------------------------------
# The virtual environment (pylibmc for test.py, matplotlib for the chart)
# --------------------------------------------------------------------------

def in_bench_venv():
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def enter_bench_venv():
    """Create .venv-bench once and re-execute this script with its python."""
    if not os.path.exists(VENV_PYTHON):
        print("bench: creating %s" % VENV, file=sys.stderr)
        venv.create(VENV, with_pip=True)
    os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__)] + sys.argv[1:])


def install_bench_extra():
    """pip install -e ROOT[bench] unless its packages are already there: a second
    run should not wait for pip."""
    if all(importlib.util.find_spec(name) for name in ("pylibmc", "matplotlib", "uvloop")):
        return
    print("bench: installing memg[bench] into %s" % VENV, file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "-e", ROOT + "[bench]"], check=True)


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

def server_list(memg_args, floor=False, extras=(), memory_mb=MEMORY_MB):
    """The servers to compare, as (label, command without -p PORT) entries: memg on
    each engine (each followed by its floor if asked), the extras, memcached, all
    with -m memory_mb.  A variant of memg is one more entry here, and one more
    column in the table."""
    common = ["-m", str(memory_mb), "-c", str(MAX_CONNECTIONS)]
    servers = []
    for name, flags in ENGINES:
        servers.append(("memg " + name, [sys.executable, MEMG] + flags + common + memg_args))
        if floor:
            servers.append(("floor " + name, [sys.executable, FLOOR] + flags + common))
    servers += [(label, command + common) for label, command in extras]
    if os.path.exists(MEMCACHED):
        # memcached listens on every interface by default and refuses to run as
        # root without a user to switch to.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        servers.append((REFERENCE, [MEMCACHED, "-l", "127.0.0.1"] + common + user))
    return servers


def parse_extra(text):
    """--extra "LABEL=COMMAND": (label, command as a list); a first word of python
    or python3 becomes this interpreter, the one memg runs on."""
    label, equals, command = text.partition("=")
    command = shlex.split(command)
    if not equals or not label.strip() or not command:
        raise argparse.ArgumentTypeError("wants LABEL=COMMAND, not %r" % text)
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    return label.strip(), command


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_file_limit():
    """Enough open files for 1000 connections, in this process and (inherited) in
    memcaslap and the servers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(FILE_LIMIT, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < MAX_CONNECTIONS + 64:
        raise BenchError("needs %d open files, the hard limit is %d"
                         % (MAX_CONNECTIONS + 64, hard))


class Server:
    """One running server process: its label, port, pid and stderr."""

    def __init__(self, label, command):
        self.label, self.command = label, command
        self.port = free_port()
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command + ["-p", str(self.port)], cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.pid = self.process.pid
        try:
            self.wait_until_up()
        except BaseException:
            self.stop()
            raise

    def wait_until_up(self):
        """Measure nothing before the server answers ``version``."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                reply = request(self.port, b"version\r\n", b"\r\n")
                if reply.startswith(b"VERSION "):
                    return
                raise BenchError("%s answered version with %r" % (self.label, reply))
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    errors = self.errors()
                    if "No module named" in errors or "pip install" in errors:
                        errors += ("\n(python here is %s: install what the server needs "
                                   "with %s -m pip install PACKAGE)" % (VENV, sys.executable))
                    raise BenchError("%s did not start (exit code %s): %s" % (
                        self.label, self.process.poll(), errors))
                time.sleep(0.05)

    def stats(self):
        try:
            reply = request(self.port, b"stats\r\n", b"END\r\n")
        except OSError as error:
            raise BenchError("%s does not answer stats (%s; exit code %s): %s" % (
                self.label, error, self.process.poll(), self.errors()))
        return dict(re.findall(r"STAT (\S+) (\S+)\r\n", reply.decode()))

    def operations(self):
        """Gets and sets the server has counted (a multi-get counts each key)."""
        stats = self.stats()
        return int(stats["cmd_get"]) + int(stats["cmd_set"])

    def cpu_seconds(self):
        """User + system time of the whole process, every thread (ended ones too)
        included.  /proc/PID/schedstat has nanoseconds but only for the main thread,
        which in memg serves no client."""
        with open("/proc/%d/stat" % self.pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self):
        with open("/proc/%d/status" % self.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise BenchError("no VmRSS for %s" % self.label)

    def errors(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace").strip()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def request(port, data, end, timeout=10.0):
    """Send data on a new connection and read the reply up to end."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while not reply.endswith(end):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed after %r" % reply[-200:])
            reply += chunk
        return reply


class Servers:
    """Start every server of the list; stop them all on leaving, whatever the
    reason (an error, Ctrl-C, SIGTERM)."""

    def __init__(self, entries, stderr_seen):
        self.entries = entries
        self.running = []
        self.stderr_seen = stderr_seen      # label -> what the server wrote to stderr

    def __enter__(self):
        try:
            for label, command in self.entries:
                self.running.append(Server(label, command))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.running

    def __exit__(self, *exc):
        for server in self.running:
            server.stop()
            if server.errors():
                self.stderr_seen.setdefault(server.label, []).append(server.errors())
            server.stderr.close()


# --------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------

def memcaslap(server, connections, seconds, config, keys_per_get=1):
    """One memcaslap run against server, checked; returns its counts and TPS, with
    the server's CPU time and operation count over the same run."""
    threads = 2 if connections % 2 == 0 else 1     # -c must be a multiple of -T
    argv = [MEMCASLAP, "-s", "127.0.0.1:%d" % server.port, "-F", config,
            "-t", "%ds" % seconds, "-T", str(threads), "-c", str(connections),
            "-w", "1k", "-X", str(VALUE_SIZE)]
    if keys_per_get > 1:
        argv += ["-d", str(keys_per_get)]
    operations, cpu = server.operations(), server.cpu_seconds()
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        raise BenchError("memcaslap against %s did not finish: %s"
                         % (server.label, " ".join(argv)))
    cpu = server.cpu_seconds() - cpu
    operations = server.operations() - operations
    output = result.stdout + result.stderr
    run = parse_memcaslap(output, server.label, " ".join(argv))
    if result.returncode != 0:
        raise BenchError("memcaslap against %s exited with %d:\n%s"
                         % (server.label, result.returncode, output))
    run.update(server_cpu_seconds=cpu, server_operations=operations,
               server_cpu_us_per_op=1e6 * cpu / operations if operations else None)
    return run


def parse_memcaslap(output, label, command):
    """The counts of memcaslap's report; BenchError if it shows any failure."""
    odd = [line for line in output.splitlines() if not MEMCASLAP_NORMAL.match(line)]
    failures = [line for line in odd if MEMCASLAP_FAILURE.search(line)]
    if failures:
        raise BenchError("memcaslap against %s reported %d errors (%s), the first:\n%s"
                         % (label, len(failures), command, "\n".join(failures[:10])))
    if odd:
        print("    memcaslap printed: %s" % " | ".join(odd[:5]), file=sys.stderr)
    summary = MEMCASLAP_SUMMARY.search(output)
    if not summary:
        raise BenchError("memcaslap against %s printed no result (%s):\n%s"
                         % (label, command, output))
    counts = {name: int(value) for name, value in
              re.findall(r"^(cmd_get|cmd_set|get_misses): (\d+)$", output, re.M)}
    run = {"seconds": float(summary.group(1)), "ops": int(summary.group(2)),
           "tps": int(summary.group(3)), **counts}
    if run["ops"] == 0:
        raise BenchError("memcaslap against %s did no operation (%s)" % (label, command))
    # A miss means a set that did not stick or a wrong reply: the figure would count
    # work the server did not do.  A trace is tolerated (a set in flight at the end).
    if run["get_misses"] > max(10, run["cmd_get"] // 1000):
        raise BenchError("memcaslap against %s: %d get misses in %d gets (%s)"
                         % (label, run["get_misses"], run["cmd_get"], command))
    # memcaslap sets each new key before it gets it, so a run's start is all sets;
    # if that start were a large part of the run, the figure would not be the 9:1 mix.
    total = run["cmd_get"] + run["cmd_set"]
    run["set_share"] = run["cmd_set"] / total if total else 0.0
    if abs(run["set_share"] - SET_SHARE) > 0.03:
        print("    note: sets were %.1f %% of the operations, not %.0f %%"
              % (100 * run["set_share"], 100 * SET_SHARE), file=sys.stderr)
    return run


def run_test_py(server):
    """The seed's recipe against server; the seconds it prints."""
    argv = [sys.executable, TEST_PY, str(TEST_PY_N), "127.0.0.1:%d" % server.port]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    match = re.search(r"(\d+) sets and (\d+) gets in ([\d.]+) s", result.stdout)
    if result.returncode != 0 or not match:
        raise BenchError("test.py against %s failed (exit code %d):\n%s%s"
                         % (server.label, result.returncode, result.stdout, result.stderr))
    return float(match.group(3))


def fill(server, items, batch=1000):
    """Store items distinct keys with VALUE_SIZE-byte values over one connection,
    a batch of pipelined sets at a time, checking every reply."""
    value = b"x" * VALUE_SIZE
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        for start in range(0, items, batch):
            keys = range(start, min(start + batch, items))
            sock.sendall(b"".join(b"set key:%d 0 0 %d\r\n%s\r\n" % (key, VALUE_SIZE, value)
                                  for key in keys))
            expected = b"STORED\r\n" * len(keys)
            reply = b""
            while len(reply) < len(expected):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("%s closed the connection while filling" % server.label)
                reply += chunk
            if reply != expected:
                raise BenchError("%s did not store every item: %r"
                                 % (server.label, reply.replace(b"STORED\r\n", b"")[:200]))


def memory_per_item(label, command, items, stderr_seen):
    """RSS growth per item in a fresh server filled with items."""
    with Servers([(label, command)], stderr_seen) as (server,):
        before_items = int(server.stats()["curr_items"])
        before = server.rss_bytes()
        fill(server, items)
        # Every STORED has been read, so the server has stored everything; the round
        # trip and the pause let memcached's background hash-table growth finish too.
        request(server.port, b"version\r\n", b"\r\n")
        time.sleep(0.5)
        after = server.rss_bytes()
        stored = int(server.stats()["curr_items"]) - before_items
        if stored != items:
            raise BenchError("%s holds %d items after %d sets" % (label, stored, items))
    return {"rss_before": before, "rss_after": after, "items": items,
            "bytes_per_item": (after - before) / items}


def write_distinct(server, count, key_size, value_size):
    """Store count distinct keys of key_size bytes with value_size-byte values, as
    pipelined noreply sets in batches of about a megabyte, then wait for a round
    trip: the server has read them all."""
    prefix, value = b"k" * (key_size - 10), b"x" * value_size
    batch = max(1, min(5000, MB // (key_size + value_size + 32)))
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        for start in range(0, count, batch):
            sock.sendall(b"".join(
                b"set %s%010d 0 0 %d noreply\r\n%s\r\n" % (prefix, key, value_size, value)
                for key in range(start, min(start + batch, count))))
        sock.sendall(b"version\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("%s closed the connection while filling" % server.label)
            reply += chunk
        if not reply.startswith(b"VERSION "):
            raise BenchError("%s answered the sets with %r" % (server.label, reply[:200]))


def memory_limit_run(label, command, megabytes, key_size, value_size, stderr_seen):
    """A fresh server with -m megabytes after six times that was written: the items
    it holds, and its resident memory's growth from start-up over -m."""
    limit = megabytes * MB
    count = LIMIT_WRITTEN * limit // (key_size + value_size + MEMCACHED_ITEM_HEADER)
    with Servers([(label, command)], stderr_seen) as (server,):
        before = server.rss_bytes()
        write_distinct(server, count, key_size, value_size)
        time.sleep(0.5)             # (memcached's background threads: see memory_per_item)
        after = server.rss_bytes()
        held = int(server.stats()["curr_items"])
    return {"written": count, "items": held, "rss_before": before, "rss_after": after,
            "resident_over_limit": (after - before) / limit}


# --------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------

class Figure:
    """One row of the table: a value per server (from its runs), and the targets
    for memg's engines' ratios to memcached (TARGETS, by the figure's key)."""

    def __init__(self, key, title, unit, summary, higher_is_better=True):
        self.key, self.title, self.unit, self.summary = key, title, unit, summary
        self.targets = TARGETS.get(key, {})     # label -> target for its ratio
        self.bounds = BOUNDS.get(key, {})       # label -> the most its figure may be
        self.higher_is_better = higher_is_better
        self.runs = {}          # label -> list of run records
        self.values = {}        # label -> the figure

    def ratio(self, label):
        if REFERENCE not in self.values or label not in self.values:
            return None
        return self.values[label] / self.values[REFERENCE]

    def met(self, label):
        """Whether label's ratio meets its target; None without either."""
        target, ratio = self.targets.get(label), self.ratio(label)
        if target is None or ratio is None:
            return None
        return ratio >= target if self.higher_is_better else ratio <= target

    def ratio_text(self, label):
        """A table cell: the ratio, with its target and whether it is met."""
        ratio = self.ratio(label)
        if ratio is None:
            return ""
        if label not in self.targets:
            return "%.2f" % ratio
        return "%.2f (%s %.2f: %s)" % (ratio, ">=" if self.higher_is_better else "<=",
                                       self.targets[label],
                                       "met" if self.met(label) else "not met")

    def within(self, label):
        """Whether label's figure is within its bound; None without either."""
        bound, value = self.bounds.get(label), self.values.get(label)
        if bound is None or value is None:
            return None
        return value <= bound

    def value_text(self, label):
        """A table cell: the figure, with its bound and whether it holds."""
        text = number(self.values.get(label), self.unit)
        if label in self.bounds and text:
            text += " (<= %.2f: %s)" % (self.bounds[label],
                                        "met" if self.within(label) else "not met")
        return text

    def as_json(self):
        others = [label for label in self.values if label != REFERENCE]
        return {"title": self.title, "unit": self.unit, "summary": self.summary,
                "targets": self.targets, "higher_is_better": self.higher_is_better,
                "values": self.values, "runs": self.runs,
                "ratios": {label: self.ratio(label) for label in others},
                "met": {label: self.met(label) for label in self.targets},
                "bounds": self.bounds,
                "within": {label: self.within(label) for label in self.bounds}}


def say(text):
    print(text, file=sys.stderr, flush=True)


def throughput_figures(servers, rounds, seconds, config):
    """All the memcaslap figures, the servers taking turns in every round."""
    median = "median of %d" % rounds
    figures = {connections: Figure("throughput_%d" % connections,
                                   "throughput, %d conn%s, 9:1 get:set"
                                   % (connections, "" if connections == 1 else "s"),
                                   "ops/s", median)
               for connections in CONNECTIONS}
    multi = Figure("multi_get_%d" % MULTI_GET_KEYS,
                   "multi-get %d keys, 16 conns" % MULTI_GET_KEYS, "keys+sets/s", median)
    cpu = Figure("cpu_per_op_16", "server CPU per op, 16 conns", "µs/op", median,
                 higher_is_better=False)
    # The 16-connection runs come first: they give two figures (throughput and CPU).
    plan = [(figures[16], 16, 1), (figures[200], 200, 1), (multi, 16, MULTI_GET_KEYS),
            (figures[1], 1, 1), (figures[1000], 1000, 1)]
    for figure, connections, keys_per_get in plan:
        say("%s (%ds runs)" % (figure.title, seconds))
        for number in range(1, rounds + 1):
            for server in servers:
                run = memcaslap(server, connections, seconds, config, keys_per_get)
                figure.runs.setdefault(server.label, []).append(run)
                say("  round %d  %-22s %9d %s  server CPU %.2f µs/op  sets %.1f %%"
                    % (number, server.label, run["tps"], figure.unit,
                       run["server_cpu_us_per_op"] or 0, 100 * run["set_share"]))
        for label, runs in figure.runs.items():
            figure.values[label] = statistics.median(run["tps"] for run in runs)
    for label, runs in figures[16].runs.items():
        cpu.runs[label] = [run["server_cpu_us_per_op"] for run in runs]
        cpu.values[label] = statistics.median(cpu.runs[label])
    return [figures[16], figures[200], multi, cpu, figures[1], figures[1000]]


def test_py_figure(servers, rounds):
    # One connection's round trips swing by half from run to run (how soon an idle
    # core wakes): more rounds, and their median, rather than one lucky run.
    rounds = max(rounds, TEST_PY_ROUNDS)
    figure = Figure("test_py_10k", "test.py %d" % TEST_PY_N, "s", "median of %d" % rounds,
                    higher_is_better=False)
    say(figure.title)
    for number in range(1, rounds + 1):
        for server in servers:
            seconds = run_test_py(server)
            figure.runs.setdefault(server.label, []).append(seconds)
            say("  round %d  %-22s %.3f s" % (number, server.label, seconds))
    figure.values = {label: statistics.median(runs) for label, runs in figure.runs.items()}
    return figure


def memory_figure(entries, items, stderr_seen):
    figure = Figure("rss_per_item", "RSS growth per %d-byte item (%d items)"
                    % (VALUE_SIZE, items), "bytes/item", "fresh server, once",
                    higher_is_better=False)
    say(figure.title)
    for label, command in entries:
        run = memory_per_item(label, command, items, stderr_seen)
        figure.runs[label] = [run]
        figure.values[label] = run["bytes_per_item"]
        say("  %-22s %.1f bytes/item (RSS %.1f -> %.1f MB)" % (
            label, run["bytes_per_item"], run["rss_before"] / 2**20, run["rss_after"] / 2**20))
    return figure


def memory_limit_figures(entries, megabytes, stderr_seen):
    """Items held and resident growth / -m, for every value and key size, memg's
    engines (and the extras) beside memcached; the floors keep everything, so they
    have no such figures."""
    figures = []
    for key_size in LIMIT_KEYS:
        for value_size in LIMIT_VALUES:
            sizes = "%s values, %d B keys" % (size_text(value_size), key_size)
            held = Figure("items_%d_%d" % (value_size, key_size), "items held in -m %d, %s"
                          % (megabytes, sizes), "items", "fresh server, once")
            resident = Figure("resident_%d_%d" % (value_size, key_size),
                              "resident growth / -m, %s" % sizes, "x -m", "fresh server, once",
                              higher_is_better=False)
            say("-m %d, six times written: %s" % (megabytes, sizes))
            for label, command in entries:
                if label.startswith("floor "):
                    continue
                run = memory_limit_run(label, command, megabytes, key_size, value_size,
                                       stderr_seen)
                held.runs[label], resident.runs[label] = [run], [run]
                held.values[label] = run["items"]
                resident.values[label] = run["resident_over_limit"]
                say("  %-22s %9d items of %d written, resident +%.1f MB: %.3f x -m" % (
                    label, run["items"], run["written"],
                    (run["rss_after"] - run["rss_before"]) / MB, run["resident_over_limit"]))
            figures += [held, resident]
    return figures


def size_text(size):
    """1 B, 100 B, 1 KB, 10 KB, 500 KB: sizes as the project's issues name them."""
    return "%d KB" % (size // 1000) if size >= 1000 else "%d B" % size


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

def machine():
    """What the figures were measured on."""
    cpu_model = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memg": describe_memg(),
        "memcached": None,
    }
    if os.path.exists(MEMCACHED):
        info["memcached"] = subprocess.run([MEMCACHED, "-V"], capture_output=True,
                                           text=True).stdout.strip()
    return info


def describe_memg():
    """memg's version and the commit of memg.py, "+changes" if it is edited: the file
    may change between runs."""
    version = subprocess.run([sys.executable, MEMG, "-V"], capture_output=True,
                             text=True).stdout.strip()
    git = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h", "--", "memg.py"],
                         capture_output=True, text=True).stdout.strip()
    edited = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "memg.py"],
                            capture_output=True).returncode != 0
    return "%s (memg.py at %s%s)" % (version, git or "?", "+changes" if edited else "")


def number(value, unit):
    if value is None:
        return ""
    if unit in ("ops/s", "keys+sets/s"):
        return "{:,.0f}".format(value)
    if unit == "s":
        return "%.3f" % value
    if unit in ("bytes/item", "items"):
        return "{:,.0f}".format(value)
    return "%.2f" % value


def table(figures, labels):
    """The markdown table: a column per server, then a column per other server of
    its ratio to memcached; a memg engine's ratio comes with its target for the
    figure and whether it is met, and its figure with its bound where it has one."""
    others = [label for label in labels if label != REFERENCE]
    compare = REFERENCE in labels
    header = ["figure", "unit", "summary"] + labels
    if compare:
        header += ["%s/%s" % (label, REFERENCE) for label in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for figure in figures:
        row = [figure.title, figure.unit, figure.summary]
        row += [figure.value_text(label) for label in labels]
        if compare:
            row += [figure.ratio_text(label) for label in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def chart(path, figures, labels, info):
    """Throughput against connections, a line per server: memg's engines and the
    extras solid, each floor dashed in its engine's colour, memcached black.  The
    solid lines' points carry their figures, moved apart where they are close."""
    import itertools
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    import matplotlib.ticker

    by_connections = {int(figure.key.split("_")[1]): figure for figure in figures
                      if figure.key.startswith("throughput_")}
    connections = sorted(by_connections)
    highest = max(value for f in by_connections.values() for value in f.values.values())
    figure, axes = pyplot.subplots(figsize=(9, 5.5))
    palette = itertools.cycle(pyplot.rcParams["axes.prop_cycle"].by_key()["color"])
    colours = {REFERENCE: "black"}      # an engine (or another server) -> its colour
    numbered = []
    for label in labels:
        engine = label.split(" ", 1)[1] if label.startswith(("memg ", "floor ")) else label
        if engine not in colours:
            colours[engine] = next(palette)
        colour = colours[engine]
        values = [by_connections[c].values.get(label) for c in connections]
        if label.startswith("floor "):          # a reference: dashed, without numbers
            axes.plot(connections, values, marker=".", linestyle="--", alpha=0.6,
                      color=colour, label=label)
        else:
            axes.plot(connections, values, marker="o", color=colour, label=label)
            numbered.append((values, colour))
    # At each connection count, the figures from the lowest up, each at least a
    # line's height above the one below, beside its point (left of the last ones).
    gap = highest * 0.045
    for index, c in enumerate(connections):
        last = index == len(connections) - 1
        free = 0.0              # the lowest height the next figure may take
        for value, colour in sorted((values[index], colour) for values, colour in numbered):
            y = max(value, free)
            free = y + gap
            axes.annotate("{:,.0f}".format(value), (c, y), textcoords="offset points",
                          xytext=(-6 if last else 6, 0), ha="right" if last else "left",
                          va="center", fontsize=7, color=colour,
                          bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none",
                                    alpha=0.7))
    axes.set_xscale("log")
    axes.set_xticks(connections)
    axes.set_xticklabels([str(c) for c in connections])
    axes.minorticks_off()
    axes.set_ylim(0, highest * 1.15)    # room for the top labels under the title
    axes.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda value, _: "{:,.0f}".format(value)))
    axes.set_xlabel("connections (memcaslap -c)")
    axes.set_ylabel("operations per second")
    axes.set_title("memcaslap throughput, 9:1 get:set, 100-byte values, %s\n%s, %d cores, "
                   "Linux %s" % (info["date"][:10], info["cpu"], info["cores"],
                                 info["kernel"]), fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def report(figures, labels, entries, info, settings, stderr_seen):
    print("## memg benchmark, %s" % info["date"])
    print()
    print("machine: %s, %d cores, Linux %s, Python %s" % (
        info["cpu"], info["cores"], info["kernel"], info["python"]))
    print("memg: %s" % info["memg"])
    print("memcached: %s" % (info["memcached"] or "not installed: memg alone"))
    for label, command in entries:
        print("  %s: %s -p PORT" % (label, " ".join(shlex.quote(part) for part in command)))
    if settings["memory_only"]:
        print("memory figures only%s" % (", --quick" if settings["quick"] else ""))
    else:
        print("rounds: %d, memcaslap runs of %d s%s" % (
            settings["rounds"], settings["seconds"], ", --quick" if settings["quick"] else ""))
    print()
    print(table(figures, labels))
    print()
    if not settings["memory_only"]:
        print("Throughput: memcaslap's TPS (-T 2, -w 1k, -X 100, 9:1 get:set); multi-get "
              "counts each key fetched as an op.  CPU per op: the server's utime+stime over "
              "its cmd_get+cmd_set.")
    print("The -m rows: fresh servers with -m %d after six times that was written in "
          "distinct keys (each item counted as memcached counts it); resident growth is "
          "from start-up.  A memg engine's growth shows its bound: -m is a promise."
          % settings["limit_mb"])
    if REFERENCE in labels:
        print("Ratios are to memcached; a memg engine's ratio shows the project's target "
              "for it and whether it is met.  The threads engine's throughput targets "
              "are its ratios at d2aea67 (README, 2026-11-26): no lower than those.")
    else:
        print("No ratios: %s is not installed." % MEMCACHED)
    for label, texts in stderr_seen.items():
        print()
        print("%s wrote to stderr:" % label)
        for text in texts:
            print("\n".join(text.splitlines()[:20]))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def stop_on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so that the finally blocks stop the servers.
    raise KeyboardInterrupt


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns each server takes at each figure (default 3)")
    parser.add_argument("--seconds", type=int, default=5,
                        help="length of each memcaslap run (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="one round of 2 s runs, 50,000 items and -m 8: to try the "
                             "script")
    parser.add_argument("--memory", action="store_true",
                        help="measure the memory figures alone: RSS per item, and items "
                             "held and resident growth in -m 64 at each size")
    parser.add_argument("--chart", default=os.path.join(ROOT, "tests", "bench.png"),
                        help="where to write the throughput chart (default tests/bench.png)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--floor", action="store_true",
                        help="also measure tests/floor_server.py beside each engine: the "
                             "least a Python server on that engine does")
    parser.add_argument("--extra", action="append", default=[], type=parse_extra,
                        metavar="LABEL=COMMAND",
                        help="also measure this server, started as COMMAND -m ... -c ... "
                             "-p PORT (repeatable; a first word python is this "
                             "interpreter), e.g. --extra \"gevent (d2aea67)=python "
                             "/tmp/memg_old.py --gevent\"")
    parser.add_argument("--memg-args", default="",
                        help='extra arguments for memg, e.g. --memg-args "-t 8"')
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 2
    args.items = 50000 if args.quick else MEMORY_ITEMS
    args.limit_mb = 8 if args.quick else LIMIT_MB
    return args


def main():
    args = parse_args()
    if not in_bench_venv():
        enter_bench_venv()          # does not return
    install_bench_extra()
    if not args.memory and not os.path.exists(MEMCASLAP):
        sys.exit("bench: %s is missing: apt-get install libmemcached-tools" % MEMCASLAP)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    started = time.monotonic()
    raise_file_limit()
    entries = server_list(shlex.split(args.memg_args), args.floor, args.extra)
    labels = [label for label, _ in entries]
    info = machine()
    if REFERENCE not in labels:
        say("bench: %s is not installed: measuring memg alone" % MEMCACHED)
    stderr_seen = {}
    loads, test_py = [], []
    if not args.memory:
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="memcaslap-") as config:
            config.write(MEMCASLAP_CONFIG)
            config.flush()
            with Servers(entries, stderr_seen) as running:
                loads = throughput_figures(running, args.rounds, args.seconds, config.name)
                test_py = [test_py_figure(running, args.rounds)]
    memory = memory_figure(entries, args.items, stderr_seen)
    limited = memory_limit_figures(
        server_list(shlex.split(args.memg_args), extras=args.extra, memory_mb=args.limit_mb),
        args.limit_mb, stderr_seen)
    # The rows with a target first, in the order of the project's issues.
    figures = loads[:4] + test_py + [memory] + loads[4:] + limited
    if loads:
        chart(args.chart, figures, labels, info)
    settings = {"rounds": args.rounds, "seconds": args.seconds, "quick": args.quick,
                "floor": args.floor, "extras": [label for label, _ in args.extra],
                "memory_only": args.memory, "memory_items": args.items,
                "limit_mb": args.limit_mb, "memg_args": args.memg_args,
                "elapsed_seconds": round(time.monotonic() - started, 1)}
    report(figures, labels, entries, info, settings, stderr_seen)
    if loads:
        print()
        print("chart: %s" % args.chart)
    if args.json:
        with open(args.json, "w") as output:
            json.dump({"machine": info, "settings": settings,
                       "servers": {label: command for label, command in entries},
                       "figures": {figure.key: figure.as_json() for figure in figures}},
                      output, indent=2)
        print("figures: %s" % args.json)
    print("took %.0f s" % settings["elapsed_seconds"])


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        sys.exit("bench: %s" % error)
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; the servers are stopped")
