#!/usr/bin/env python3
"""Soak test: does a memg server stay correct, and its memory flat, through rounds of
a thousand clients connecting at once, working, and leaving?

    python tests/soak.py [--rounds 10] [--clients 1000] [--threshold 5]
                         [--engine threads|asyncio|asyncio-stdlib]

Starts ``python memg.py`` on a free loopback port, serving with the engine asked for
(the names and arguments of conftest.ENGINES, as the test passes use them).  In each round every client
connects (all of them are open at once: the round waits until the server counts
them all), runs 14 commands whose replies are checked byte for byte, and closes;
the round then waits until the server has let every connection go.  One line per
round gives its seconds, the commands answered correctly, the errors (a wrong
reply, a refused or reset connection, a timeout, or a server count that is off)
and the server's resident memory.  Exits non-zero if there was any error, if the
server wrote anything to stderr (memg prints tracebacks there), or if the resident
memory after the last round differs from that after round 2 by more than the
threshold in percent: what a leak per connection or per round would show.

Not collected by pytest (no test_ prefix): it takes a minute or two.  It needs what
the tests need to import conftest (pytest), and for the asyncio engine a Python with
uvloop: where this one has none, memg runs on the test environment's (.venv-test,
which tests/run.py creates).  The clients are asyncio streams in this one process:
a thousand open sockets cost no thread each, so the server is what is measured
(the summary prints both processes' CPU time to show it).
"""

import argparse
import asyncio
import importlib.util
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import ENGINES, MEMG, ROOT, free_port, parse_stats  # noqa: E402 (after the path)

TEST_PYTHON = os.path.join(ROOT, ".venv-test", "bin", "python")

TIMEOUT = 15.0              # seconds for any one connect, reply or wait
COMMANDS_PER_CLIENT = 14
SHARED = b"soak:shared"     # every client increments it once a round
GETS_REPLY = re.compile(rb"VALUE (\S+) (\d+) (\d+) (\d+)\r\n(.*)\r\nEND\r\n", re.S)
NUMBER_REPLY = re.compile(rb"\d+\r\n")


class WrongReply(Exception):
    pass


# --------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------

def raise_file_limit(needed):
    """Allow this process, and the server it starts, needed open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit("soak: needs %d open files, the hard limit is %d" % (needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def server_python(engine_args):
    """The Python to run memg with: this one, unless the engine needs uvloop and this
    Python has none while the test environment has it."""
    if ("uvloop" in engine_args and importlib.util.find_spec("uvloop") is None
            and os.path.exists(TEST_PYTHON)):
        print("soak: this Python has no uvloop; memg runs on " + TEST_PYTHON)
        return TEST_PYTHON
    return sys.executable


def start_memg(clients, engine_args, stderr):
    """``python memg.py`` on an engine, with room for every client and the probe, once
    it answers."""
    port = free_port()
    argv = [server_python(engine_args), MEMG, "-p", str(port), "-c", str(clients + 64),
            "-b", str(max(1024, clients))] + engine_args
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stderr.seek(0)
                sys.exit("soak: memg did not start (exit code %s): %s" % (
                    process.poll(), stderr.read().decode(errors="replace").strip()))
            time.sleep(0.05)


def process_status(pid, field):
    """A number from /proc/PID/status (VmRSS in kB, Threads, ...)."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s for process %d" % (field, pid))


def resident_mb(pid):
    return process_status(pid, "VmRSS") / 1024


async def wait_for_threads(pid, expected):
    """Wait until the server runs only its expected threads again: a connection is
    uncounted just before its thread ends, and memory is measured after that."""
    deadline = time.monotonic() + TIMEOUT
    while process_status(pid, "Threads") > expected:
        if time.monotonic() > deadline:
            return "the server still runs %d threads, expected %d" % (
                process_status(pid, "Threads"), expected)
        await asyncio.sleep(0.02)
    return None


def cpu_seconds(pid):
    """User plus system CPU time of a process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

class Connection:
    """One client's socket, with requests whose replies must match exactly."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.answered = 0

    @classmethod
    async def open(cls, port):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(reader, writer)

    async def request(self, data):
        """Send a command; its reply (up to END for retrievals and stats).  The
        caller bounds the time: a wait_for per request would cost the clients more
        CPU than the server spends answering."""
        self.writer.write(data)
        end = b"END\r\n" if data.startswith((b"get", b"stats")) else b"\r\n"
        return await self.reader.readuntil(end)

    async def expect(self, data, expected):
        """Send a command whose reply must be expected: its bytes, or a test the
        reply must pass.  Returns the reply."""
        reply = await self.request(data)
        if not (expected(reply) if callable(expected) else reply == expected):
            raise WrongReply("%r answered %r, expected %r" % (
                data[:60], reply[:200], expected.__doc__ if callable(expected) else expected))
        self.answered += 1
        return reply

    async def stats(self):
        return parse_stats(await asyncio.wait_for(self.request(b"stats\r\n"), TIMEOUT))

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass          # a reset at close has already been counted, or is harmless


def value_for(round_number, client):
    """A value of 10 to 1509 bytes that says whose it is."""
    tag = b"r%d-c%d." % (round_number, client)
    size = 10 + (client * 37 + round_number * 101) % 1500
    return (tag * (size // len(tag) + 1))[:size]


def a_number(reply):
    """a number"""
    return NUMBER_REPLY.fullmatch(reply) is not None


async def work(connection, round_number, client):
    """The client's 14 commands, each reply checked; raises on the first wrong one."""
    key, number = b"soak:%d" % client, b"soak:%d:n" % client
    flags = client
    first = value_for(round_number, client)
    appended = first + b"+a"
    replaced = value_for(round_number + 1000, client)
    ask = connection.expect

    def stored(value):
        return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(value), value)

    def appended_with_unique(reply):
        """the appended value with a CAS unique"""
        match = GETS_REPLY.fullmatch(reply)
        return match is not None and match.group(1, 2, 3, 5) == (
            key, b"%d" % flags, b"%d" % len(appended), appended)

    await ask(b"set %s %d 0 %d\r\n%s\r\n" % (key, flags, len(first), first), b"STORED\r\n")
    await ask(b"get %s\r\n" % key, stored(first))
    await ask(b"append %s 0 0 2\r\n+a\r\n" % key, b"STORED\r\n")
    reply = await ask(b"gets %s\r\n" % key, appended_with_unique)
    unique = GETS_REPLY.fullmatch(reply).group(4)
    await ask(b"cas %s %d 0 %d %s\r\n%s\r\n" % (key, flags, len(replaced), unique, replaced),
              b"STORED\r\n")
    await ask(b"cas %s %d 0 1 %s\r\nx\r\n" % (key, flags, unique), b"EXISTS\r\n")
    await ask(b"set %s 0 0 2\r\n40\r\n" % number, b"STORED\r\n")
    await ask(b"incr %s 7\r\n" % number, b"47\r\n")
    await ask(b"decr %s 40\r\n" % number, b"7\r\n")
    await ask(b"incr %s 1\r\n" % SHARED, a_number)
    await ask(b"delete %s\r\n" % number, b"DELETED\r\n")
    await ask(b"get %s\r\n" % number, b"END\r\n")
    await ask(b"touch %s 0\r\n" % key, b"TOUCHED\r\n")
    await ask(b"get %s\r\n" % key, stored(replaced))


class Round:
    """One round's clients and what went wrong for them."""

    def __init__(self, number, clients, port):
        self.number, self.clients, self.port = number, clients, port
        self.connections = []
        self.errors = []

    def fail(self, what, error):
        self.errors.append("%s: %s: %s" % (what, type(error).__name__, error))

    async def connect(self, client):
        try:
            self.connections.append((client, await Connection.open(self.port)))
        except (OSError, asyncio.TimeoutError) as error:
            self.fail("client %d connect" % client, error)

    async def run_client(self, client, connection):
        try:
            await asyncio.wait_for(work(connection, self.number, client), TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, WrongReply) as error:
            self.fail("client %d" % client, error)

    async def run(self, probe):
        await asyncio.gather(*(self.connect(client) for client in range(self.clients)))
        # All open at once: the server must count every one (and the probe).
        await self.wait_for_connections(probe, len(self.connections) + 1, "connected")
        await asyncio.gather(*(self.run_client(client, connection)
                               for client, connection in self.connections))
        await asyncio.gather(*(connection.close() for _, connection in self.connections))
        await self.wait_for_connections(probe, 1, "closed")

    async def wait_for_connections(self, probe, expected, when):
        deadline = time.monotonic() + TIMEOUT
        while True:
            current = int((await probe.stats())["curr_connections"])
            if current == expected:
                return
            if time.monotonic() > deadline:
                self.errors.append("%s: the server counts %d connections, expected %d"
                                   % (when, current, expected))
                return
            await asyncio.sleep(0.05)

    @property
    def answered(self):
        return sum(connection.answered for _, connection in self.connections)


async def check_totals(probe, round_number, clients, stats_before):
    """What the server's counts must be after a round of clients all served: one
    item per client plus the shared counter, every client counted as a connection,
    and the shared counter incremented by each of them."""
    stats = await probe.stats()
    problems = []
    if int(stats["curr_items"]) != clients + 1:
        problems.append("curr_items %s, expected %d" % (stats["curr_items"], clients + 1))
    accepted = int(stats["total_connections"]) - int(stats_before["total_connections"])
    if accepted != clients:
        problems.append("%d connections accepted, expected %d" % (accepted, clients))
    expected_total = b"%d" % (round_number * clients)
    shared = await asyncio.wait_for(probe.request(b"get %s\r\n" % SHARED), TIMEOUT)
    if not shared.endswith(b"\r\n%s\r\nEND\r\n" % expected_total):
        problems.append("%r holds %r, expected %s" % (SHARED, shared, expected_total))
    return stats, problems


# --------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------

async def soak(pid, port, rounds, clients, results):
    """Run the rounds, adding (seconds, commands answered, errors, RSS MB) for each
    to results."""
    probe = await Connection.open(port)
    await probe.expect(b"set %s 0 0 1\r\n0\r\n" % SHARED, b"STORED\r\n")
    stats = await probe.stats()
    idle_threads = process_status(pid, "Threads")
    print("round  seconds  commands  errors  RSS MB  curr_conn  total_conn  curr_items")
    for number in range(1, rounds + 1):
        started = time.monotonic()
        this = Round(number, clients, port)
        await this.run(probe)
        seconds = time.monotonic() - started
        stats, problems = await check_totals(probe, number, clients, stats)
        this.errors += problems
        lingering = await wait_for_threads(pid, idle_threads)
        if lingering:
            this.errors.append(lingering)
        rss = resident_mb(pid)
        results.append((seconds, this.answered, len(this.errors), rss))
        print("%5d  %7.2f  %8d  %6d  %6.1f  %9s  %10s  %10s" % (
            number, seconds, this.answered, len(this.errors), rss,
            stats["curr_connections"], stats["total_connections"], stats["curr_items"]))
        for error in this.errors[:5]:
            print("       " + error)
    await probe.close()


def summarize(results, threshold, server_cpu, client_cpu, server_errors, lost):
    """Print the summary; returns the exit code."""
    errors = sum(result[2] for result in results) + (lost is not None)
    commands = sum(result[1] for result in results)
    seconds = sum(result[0] for result in results)
    print()
    if lost is not None:
        print("lost the server after %d rounds: %s" % (len(results), lost))
    change = 0.0
    if results:
        baseline = min(2, len(results))
        base_rss, last_rss = results[baseline - 1][3], results[-1][3]
        change = 100.0 * (last_rss - base_rss) / base_rss
        print("RSS after round %d: %.1f MB; after round %d: %.1f MB; change %+.2f %% "
              "(threshold %.1f %%)" % (baseline, base_rss, len(results), last_rss,
                                       change, threshold))
    print("commands answered: %d in %.1f s; errors: %d" % (commands, seconds, errors))
    print("CPU seconds: server %.1f, clients %.1f" % (server_cpu, client_cpu))
    if server_errors:
        print("the server wrote to stderr:\n" + server_errors)
    failed = errors > 0 or not results or abs(change) > threshold or bool(server_errors)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


def stop(process):
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=5.0,
                        help="largest RSS change from round 2 to the last, in percent")
    parser.add_argument("--engine", choices=list(ENGINES), default="threads",
                        help="the engine memg serves with (default: threads)")
    args = parser.parse_args()
    raise_file_limit(args.clients + 256)
    results, lost = [], None
    with tempfile.TemporaryFile() as stderr:
        process, port = start_memg(args.clients, ENGINES[args.engine][0], stderr)
        print("memg (pid %d) serving with the %s engine" % (process.pid, args.engine))
        try:
            asyncio.run(soak(process.pid, port, args.rounds, args.clients, results))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                WrongReply) as error:
            # The probe itself failed: the server is gone or stuck.
            lost = "%s: %s (exit code %s)" % (type(error).__name__, error, process.poll())
        finally:
            server_cpu = cpu_seconds(process.pid) if process.poll() is None else 0.0
            stop(process)
        stderr.seek(0)
        server_errors = stderr.read().decode(errors="replace")
    client_cpu = sum(os.times()[:2])
    return summarize(results, args.threshold, server_cpu, client_cpu, server_errors, lost)


if __name__ == "__main__":
    sys.exit(main())
