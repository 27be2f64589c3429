"""The command line and the server's life cycle, as a user sees them.

Every test starts ``python memg.py`` as a real process with the options under test
and talks to it over real sockets; processes are always stopped at teardown.
"""

import contextlib
import itertools
import os
import pstats
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

import memg
from conftest import (ENGINE_ARGS, MEMG, RawClient, copy_project, free_port, require_tool,
                      start_memg, stats, wait_for)
from test_udp import DatagramClient

KB = 1024
MB = 1024 * KB


# -- helpers -----------------------------------------------------------------

@pytest.fixture
def launch():
    """start_memg, with every server it started stopped at teardown."""
    started = []

    def start(*args, port=None):
        server = start_memg(*args, port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def processes():
    """A list to put Popen objects in; any still running are killed at teardown."""
    popens = []
    yield popens
    for process in popens:
        if process.poll() is None:
            process.kill()
        process.communicate()


def run_memg(*args, timeout=10):
    """Run memg on the suite's engine to completion (it is expected to exit by
    itself): (code, out, err)."""
    process = subprocess.Popen([sys.executable, MEMG] + ENGINE_ARGS + list(args),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail("memg %s did not exit by itself; stderr: %r" % (" ".join(args), err))
    return process.returncode, out.decode(), err.decode()


def wait_exit(process, timeout=5.0):
    """The exit code and stderr of a process expected to end by itself."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail("process did not exit within %s s; stderr: %r" % (timeout, err))
    return process.returncode, err


def connect_admitted(address, family=socket.AF_INET, timeout=5.0):
    """A connection the server has taken in (it answered ``version``), retrying while
    the server is still busy with connections that are on their way out."""
    deadline = time.monotonic() + timeout
    while True:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
                continue
            client = RawClient.__new__(RawClient)
            client.sock = sock
        else:
            client = RawClient(address)
        try:
            reply = client.request(b"version\r\n")
        except OSError:
            reply = b""
        if reply.startswith(b"VERSION "):
            return client
        client.close()
        if time.monotonic() > deadline:
            pytest.fail("server never admitted a connection; last reply %r" % reply)
        time.sleep(0.05)


def one_line(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1, "expected one line on stderr, got %r" % err
    return lines[0]


def listening_addresses(port):
    """Local addresses of the TCP sockets listening on port (Linux /proc)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] == "0A" and int(port_hex, 16) == port:
                    found.append(address)
    return found


# -- -h and -V ---------------------------------------------------------------

HELP_OPTIONS = ["-p", "-U", "-s", "-a", "-A", "-l", "-u", "-m", "-M", "-c", "-I", "-t",
                "-v", "-vv", "-V", "-o", "-P", "-C", "-b", "-B", "-F", "-X", "--single",
                "--engine", "--event-loop", "-h", "-f", "-n",
                # memcached's options that memg ignores or refuses
                "-r", "-k", "-L", "-D", "-R", "-W", "-d", "-S", "-Y", "-Z", "-e"]


def test_help_lists_every_option():
    code, out, err = run_memg("-h")
    assert code == 0
    assert "Traceback" not in err
    missing = [option for option in HELP_OPTIONS
               if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option), out)]
    assert missing == [], "options missing from -h: %s\n%s" % (missing, out)


def test_help_says_which_options_are_ignored():
    code, out, _ = run_memg("-h")
    assert code == 0
    assert "ignored" in out


def test_version_prints_and_exits_zero():
    code, out, err = run_memg("-V")
    assert code == 0
    assert "Traceback" not in err
    assert re.search(r"\d+\.\d+\.\d+", out + err)
    assert "memg %s" % memg_version() in out + err


def memg_version():
    source = open(MEMG).read()
    return re.search(r'^__version__ = "([^"]+)"', source, re.M).group(1)


def test_verbose_start_names_memgs_version(launch):
    # (stats shows memcached's figures alone: memg's version is here and in -V.)
    server = launch("-v")
    with connect_admitted(server.address) as client:
        assert "memg_version" not in stats(client)
    _, err = server.stop()
    assert "memg %s listening on" % memg_version() in err.decode()


# -- refused command lines -------------------------------------------------------

BAD_COMMAND_LINES = [
    ["--bogus"],
    ["-p", "notanumber"],
    ["-m", "x"],
    ["-I", "0"],
    ["-I", "2000m"],
    ["-c", "0"],
    ["-R", "0"],
    ["-o", "nosuch=1"],
    ["-B", "bogus"],
    ["-S"],                          # without MEMCACHED_SASL_PWDB
    ["-S", "-B", "ascii"],           # SASL is the binary protocol's
    ["-Y", "/dev/null", "-B", "binary"],     # and -Y the text protocol's
    ["-Y", "/nonexistent/memg-auth"],
    ["--engine", "gevent"],
    ["--gevent"],                    # retired: asyncio took its place
    ["--event-loop", "tornado"],
    ["-U", "70000"],
    ["-U", "-2"],
    ["-p", "-2"],
    ["-U", "x"],
    ["-o", "no_track_sizes"],        # no_NAME turns off only what is on by default
    ["-f", "1.0"],                   # slab classes that would not grow
    ["-f", "x"],
    ["-n", "0"],
    ["-o", "slab_chunk_max=48"],     # no room beside a chunk's header
    ["-o", "slab_chunk_max=2097152"],    # over a page
    ["-o", "no_modern,temporary_ttl=30"],        # the TEMP LRU needs the maintainer
    ["-o", "hot_lru_pct=70"],                    # with warm's 40: over 80
    ["-o", "hot_max_factor=0"],
    ["-o", "lru_crawler_sleep=2000000"],
    ["-o", "temporary_ttl"],
]


@pytest.mark.parametrize("args", BAD_COMMAND_LINES, ids=" ".join)
def test_bad_command_line_exits_with_one_line(args):
    code, out, err = run_memg("-p", str(free_port()), *args)
    assert code != 0
    assert "Traceback" not in err
    one_line(err)


# -- ignored memcached options ---------------------------------------------------

@pytest.mark.parametrize("args", [["-L"]], ids=" ".join)
def test_ignored_option_starts_with_one_warning(launch, args):
    server = launch(*args)
    with connect_admitted(server.address) as client:
        assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    code, err = server.stop()
    err = err.decode()
    line = one_line(err)
    assert args[0] in line
    assert "warning" in line.lower() or "ignored" in line.lower()


def test_ignored_extended_options_start_with_warnings(launch):
    server = launch("-o", "hashpower=20,slab_automove=1")
    with connect_admitted(server.address) as client:
        assert client.request(b"get k\r\n") == b"END\r\n"
    _, err = server.stop()
    err = err.decode()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # One warning line per ignored option at most, naming what was ignored.
    assert 1 <= len(lines) <= 2, err
    assert "hashpower" in err and "slab_automove" in err
    for line in lines:
        assert "warning" in line.lower() or "ignored" in line.lower()


def test_the_lru_options_are_memcacheds_and_start_without_a_warning(launch):
    server = launch("-o", "no_modern,lru_crawler,lru_crawler_tocrawl=5,hot_lru_pct=10")
    with connect_admitted(server.address) as client:
        assert client.request(b"lru_crawler crawl all\r\n") == b"OK\r\n"
        assert client.request(b"lru mode segmented\r\n") == b"ERROR\r\n"   # no maintainer
    _, err = server.stop()
    assert err == b""


# -- listening -------------------------------------------------------------------

def test_default_listens_on_loopback_only(launch):
    server = launch()
    with connect_admitted(server.address) as client:
        assert stats(client, b"settings")["inter"] == "127.0.0.1"
    assert listening_addresses(server.port) == ["0100007F"]
    _, err = server.stop()
    assert b"loopback" not in err


def test_port_in_use_exits_with_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code, _, err = run_memg("-p", str(port))
    assert code != 0
    one_line(err)


def test_listen_everywhere_warns_about_no_authentication(launch):
    server = launch("-l", "0.0.0.0")
    with connect_admitted(("127.0.0.1", server.port)) as client:
        assert client.request(b"get k\r\n") == b"END\r\n"
    _, err = server.stop()
    err = err.decode()
    assert "Traceback" not in err
    warning = [line for line in err.splitlines() if "loopback" in line]
    assert len(warning) == 1, err
    assert "auth" in warning[0].lower()


def test_auth_file_demands_credentials_and_needs_no_loopback_warning(launch, tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("alice:secret\n")
    server = launch("-l", "0.0.0.0", "-Y", str(auth))
    with RawClient(("127.0.0.1", server.port)) as client:
        assert client.request(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
        assert client.request(b"set k 0 0 12\r\nalice secret\r\n") == b"STORED\r\n"
        assert stats(client, b"settings")["auth_enabled_ascii"] == str(auth)
        assert client.request(b"get k\r\n") == b"END\r\n"
    _, err = server.stop()
    assert b"loopback" not in err
    assert b"Traceback" not in err


# -- ports, as memcached's command line takes them ---------------------------------
# memcached's rules, which scripts and test harnesses written for it rely on (its
# t/issue_67.t checks them): -p 0 turns TCP off, -p -1 and -U -1 pick free ports,
# -U 0 is no UDP (the default), -U alone puts TCP on the same port; the ports bound
# are written to the file $MEMCACHED_PORT_FILENAME names, a "TCP INET: 40123" line
# each.  (Rules that need the default port 11211 free are left to t/issue_67.t, which
# skips them when it is taken: the memcached suite runs it.)

PORT_RULES = [
    ("tcp", ["-p", "{tcp}"], {"TCP INET": "{tcp}"}),
    ("udp-alone-sets-tcp-too", ["-U", "{udp}"], {"TCP INET": "{udp}", "UDP INET": "{udp}"}),
    ("free-tcp", ["-p", "-1"], {"TCP INET": "free"}),
    ("free-udp-and-tcp", ["-U", "-1"], {"TCP INET": "free", "UDP INET": "free"}),
    ("tcp-off", ["-p", "0"], {}),
    ("tcp-and-udp", ["-p", "{tcp}", "-U", "{udp}"], {"TCP INET": "{tcp}", "UDP INET": "{udp}"}),
    ("udp-off", ["-p", "{tcp}", "-U", "0"], {"TCP INET": "{tcp}"}),
    ("free-tcp-and-udp", ["-p", "-1", "-U", "{udp}"], {"TCP INET": "free", "UDP INET": "{udp}"}),
    ("tcp-and-free-udp", ["-p", "{tcp}", "-U", "-1"], {"TCP INET": "{tcp}", "UDP INET": "free"}),
    ("udp-only", ["-p", "0", "-U", "{udp}"], {"UDP INET": "{udp}"}),
    ("free-udp-only", ["-p", "0", "-U", "-1"], {"UDP INET": "free"}),
]


def sockets_bound(pid):
    """(kind, port) of each socket process pid holds, sorted: TCP sockets listening
    and UDP sockets, named as the port file names them (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        with contextlib.suppress(OSError):
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for kind, table in (("TCP INET", "tcp"), ("TCP INET6", "tcp6"), ("UDP INET", "udp"),
                        ("UDP INET6", "udp6")):
        with open("/proc/net/" + table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes and (kind.startswith("UDP") or fields[3] == "0A"):
                    found.append((kind, int(fields[1].split(":")[1], 16)))
    return sorted(found)


def start_with_port_file(argv, path, processes):
    """Start argv with $MEMCACHED_PORT_FILENAME set to path; once the file is there,
    (the process, {kind: port} of its lines)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "MEMCACHED_PORT_FILENAME": str(path)})
    processes.append(process)
    deadline = time.monotonic() + 10
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("no port file from %s: %r" % (argv, process.communicate()))
        time.sleep(0.02)
    ports = {}
    for line in path.read_text().splitlines():
        kind, port = line.split(": ")
        assert kind not in ports, path.read_text()
        ports[kind] = int(port)
    return process, ports


def answers_version(kind, port):
    """Whether a server answers ``version`` over TCP or UDP on port."""
    if kind == "TCP INET":
        with connect_admitted(("127.0.0.1", port)):
            return True
    with DatagramClient(port) as client:
        return client.responses(b"version\r\n")[0].startswith(b"VERSION ")


@pytest.mark.parametrize("args, expected", [rule[1:] for rule in PORT_RULES],
                         ids=[rule[0] for rule in PORT_RULES])
@pytest.mark.parametrize("server", ["memg", "memcached"])
def test_ports_follow_memcacheds_rules(tmp_path, processes, server, args, expected):
    fixed = {"tcp": free_port(), "udp": free_port()}
    args = [arg.format(**fixed) for arg in args]
    if server == "memg":
        argv = [sys.executable, MEMG] + ENGINE_ARGS + args
    else:
        # (One worker thread: with more, memcached may answer the UDP client's
        # sentinel before its request; see test_differential.)
        argv = [require_tool("memcached"), "-l", "127.0.0.1", "-t", "1"] + (
            ["-u", "root"] if os.geteuid() == 0 else []) + args
    process, ports = start_with_port_file(argv, tmp_path / "ports", processes)
    assert set(ports) == set(expected)
    for kind, port in ports.items():
        if expected[kind] == "free":
            # (not the port named for the same transport; one picked by free_port but
            # not named is free again, and the kernel may hand it out)
            flag = "-p" if kind.startswith("TCP") else "-U"
            named = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
            assert port not in (0, 11211) and str(port) not in named
        else:
            assert port == int(expected[kind].format(**fixed)), kind
        assert answers_version(kind, port)
    # Exactly the sockets the file names, and no other.
    assert sockets_bound(process.pid) == sorted(ports.items())
    process.send_signal(signal.SIGTERM)
    code, err = wait_exit(process)
    if server == "memg":
        assert (code, err) == (0, b"")


def test_udp_beyond_loopback_warns_of_reflection(launch):
    # Listening on every interface for as short a time as it takes; the traffic is
    # loopback's.
    server = launch("-l", "0.0.0.0", "-U", "-1")
    _, err = server.stop()
    warning = [line for line in err.decode().splitlines() if "UDP" in line]
    assert len(warning) == 1, err
    assert "loopback" in warning[0] and "warning" in warning[0]
    server = launch("-l", "0.0.0.0")
    _, err = server.stop()
    assert b"UDP" not in err


def test_sasl_with_udp_is_refused_in_one_line(tmp_path, monkeypatch):
    # As memcached: UDP has no SASL.
    passwords = tmp_path / "pwdb"
    passwords.write_text("alice:secret\n")
    monkeypatch.setenv("MEMCACHED_SASL_PWDB", str(passwords))
    code, _, err = run_memg("-p", str(free_port()), "-S", "-U", "-1")
    assert code != 0
    line = one_line(err)
    assert "-U" in line and "-S" in line


# -- Unix socket -------------------------------------------------------------------

def test_unix_socket_serves_and_is_removed(tmp_path, processes):
    path = str(tmp_path / "memg.sock")
    port = free_port()
    process = subprocess.Popen([sys.executable, MEMG, "-p", str(port), "-s", path,
                                "-a", "600"] + ENGINE_ARGS,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    processes.append(process)
    client = connect_admitted(path, family=socket.AF_UNIX)
    with client:
        assert client.request(b"set k 0 0 5\r\nhello\r\n") == b"STORED\r\n"
        assert client.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 5\r\nhello\r\nEND\r\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    # -s replaces TCP.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    process.send_signal(signal.SIGTERM)
    code, err = wait_exit(process)
    assert code == 0
    assert b"Traceback" not in err
    assert not os.path.exists(path)


# -- shutdown command -----------------------------------------------------------------

def test_shutdown_command_with_A_exits_zero(launch):
    server = launch("-A")
    with connect_admitted(server.address) as client:
        client.send(b"shutdown\r\n")
        assert client.is_closed(timeout=5)
    code, err = wait_exit(server.process)
    assert code == 0
    assert b"Traceback" not in err


def test_shutdown_command_without_A_is_refused(launch):
    server = launch()
    with connect_admitted(server.address) as client:
        assert client.request(b"shutdown\r\n") == b"ERROR: shutdown not enabled\r\n"
        assert client.request(b"version\r\n").startswith(b"VERSION ")
    assert server.process.poll() is None


# -- signals ------------------------------------------------------------------------

def clients_mid_command(server, idle=3):
    """Clients of a running server caught mid-command: idle ones (served once), one
    half through a value, one half through a command line, one that never spoke."""
    clients = [connect_admitted(server.address) for _ in range(idle)]
    busy_value = connect_admitted(server.address)
    busy_value.send(b"set k 0 0 10\r\nabc")            # data block half sent
    busy_line = connect_admitted(server.address)
    busy_line.send(b"get fo")                          # command line half sent
    return clients + [busy_value, busy_line, RawClient(server.address)]


def signal_with_clients_connected(launch, signum):
    server = launch()
    clients = clients_mid_command(server)
    try:
        time.sleep(0.1)                                # let the partial sends arrive
        sent = time.monotonic()
        server.process.send_signal(signum)
        try:
            server.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pytest.fail("memg did not exit within 2 s of signal %d" % signum)
        elapsed = time.monotonic() - sent
        code, err = server.stop()
        assert code == 0
        assert b"Traceback" not in err, err
        assert elapsed <= 2.0
        for client in clients:
            assert client.is_closed(timeout=2)
    finally:
        for client in clients:
            client.close()


def test_sigterm_with_clients_exits_zero_quickly(launch):
    signal_with_clients_connected(launch, signal.SIGTERM)


def test_sigint_with_clients_exits_zero_quickly(launch):
    signal_with_clients_connected(launch, signal.SIGINT)


def signal_storm(process, signums, duration=0.3, deadline=2.0):
    """Send process the signals in turn, as fast as os.kill goes, for duration
    seconds, through its shutdown and after it (an exited process not yet waited
    for still takes them); then wait for it to exit.  Returns its exit code and
    stderr, or None and stderr if it was still running deadline seconds after the
    first signal (it is then killed)."""
    started = time.monotonic()
    for signum in itertools.cycle(signums):
        if time.monotonic() - started > duration:
            break
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            break
    try:
        _, err = process.communicate(timeout=max(0.0, started + deadline - time.monotonic()))
        return process.returncode, err
    except subprocess.TimeoutExpired:
        process.kill()
        return None, process.communicate()[1]


# SIGTERM alone, SIGINT alone, and the two interleaved.
STORMS = [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGINT)]


def test_signal_storms_end_in_exit_zero_within_2_s(launch):
    # Signals arrive at any moment: while memg serves, while it closes connections,
    # joins threads or closes its event loop.  A handler that took a lock the
    # interrupted code held would hang the process for good (as it did: 16 of 30
    # processes sent SIGTERM in a loop for 0.3 s never exited).  Every other round
    # has clients caught mid-command, so that there are connections to close.
    failures = []
    rounds = 12
    for round_number in range(rounds):
        signums = STORMS[round_number % len(STORMS)]
        server = launch()
        clients = clients_mid_command(server) if round_number % 2 else []
        try:
            code, err = signal_storm(server.process, signums)
        finally:
            for client in clients:
                client.close()
        if code != 0 or err:
            failures.append("round %d, %s%s: %s; stderr %r" % (
                round_number, "+".join(signal.Signals(n).name for n in signums),
                " with clients" if clients else "",
                "still running after 2 s" if code is None else "exit %d" % code,
                err.decode(errors="replace")[-300:]))
    assert failures == [], "%d of %d rounds failed:\n%s" % (
        len(failures), rounds, "\n".join(failures))


# -- --single (the threads engine's: it serves its one client in the main thread) ------

def first_connection(port, process, timeout=10.0):
    """Connect to a --single server without wasting its one connection on a probe."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return RawClient(("127.0.0.1", port))
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                _, err = process.communicate()
                pytest.fail("memg --single did not start: %r" % err)
            time.sleep(0.02)


SINGLE = ["--single", "--engine", "threads"]


def test_single_serves_one_connection_then_exits(processes):
    port = free_port()
    process = subprocess.Popen([sys.executable, MEMG, "-p", str(port)] + SINGLE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    processes.append(process)
    first = first_connection(port, process)
    with first:
        assert first.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert first.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
        second = None
        try:
            second = RawClient(("127.0.0.1", port))
            second.send(b"version\r\n")
        except OSError:
            pass                 # refused outright: also not served
        # The first connection is still served while the second waits.
        assert first.request(b"version\r\n").startswith(b"VERSION ")
    code, err = wait_exit(process)
    assert code == 0
    assert b"Traceback" not in err
    if second is not None:
        with second:
            second.sock.settimeout(2)
            try:
                reply = second.read_to_eof()
            except (ConnectionResetError, socket.timeout):
                reply = b""
            assert b"VERSION" not in reply


def test_single_under_cprofile_shows_the_command_path(tmp_path, processes):
    port = free_port()
    profile = str(tmp_path / "memg.prof")
    process = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", profile, MEMG,
                                "-p", str(port)] + SINGLE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    processes.append(process)
    with first_connection(port, process) as client:
        for i in range(20):
            assert client.request(b"set k%d 0 0 2\r\nab\r\n" % i) == b"STORED\r\n"
        assert client.request(b"get k1\r\n", b"END\r\n") == b"VALUE k1 0 2\r\nab\r\nEND\r\n"
    code, err = wait_exit(process, timeout=10)
    assert code == 0, err
    assert b"Traceback" not in err
    assert os.path.getsize(profile) > 0
    functions = pstats.Stats(profile).stats
    in_memg = {name for filename, _, name in functions
               if os.path.basename(filename) == "memg.py"}
    assert "main" in in_memg
    # The command path, run in the profiled thread: the protocol's bytes in and its
    # command loop, down to the store that the sets reached.
    assert {"receive_data", "run", "store"} <= in_memg, sorted(in_memg)


def test_single_is_refused_on_the_asyncio_engine():
    code, _, err = run_memg("--single", "--engine", "asyncio", "-p", str(free_port()))
    assert code == 1
    assert one_line(err) == "memg: --single needs the threads engine"


# -- the asyncio engine ---------------------------------------------------------------------

def os_threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


@pytest.mark.parametrize("event_loop", ["uvloop", "stdlib"])
def test_asyncio_serves_many_clients_from_one_thread(launch, event_loop):
    # (The options given here come after the suite's engine options, and win.)
    server = launch("--engine", "asyncio", "--event-loop", event_loop)
    with server.connect() as first:      # answered: memg serves, its threads all started
        assert first.request(b"version\r\n").startswith(b"VERSION ")
    idle = os_threads(server.process.pid)
    clients = [server.connect() for _ in range(50)]
    try:
        for number, client in enumerate(clients):
            client.send(b"set k%d 0 0 2\r\n%02d\r\n" % (number, number))
        for number, client in enumerate(clients):
            assert client.recv_until() == b"STORED\r\n"
            assert client.request(b"get k%d\r\n" % number, b"END\r\n") == \
                b"VALUE k%d 0 2\r\n%02d\r\nEND\r\n" % (number, number)
        # Every connection, the sweep and the idle checks on the main thread's loop:
        # 50 clients add no thread, nor does uvloop (libuv's pool is only for DNS).
        # Beside the main thread, memg has at most the one that waits for signals.
        assert os_threads(server.process.pid) == idle <= 2
    finally:
        for client in clients:
            client.close()
    code, err = server.stop()
    assert code == 0 and err == b"", err


def test_uvloop_missing_exits_with_one_line():
    # A Python that cannot import uvloop (None in sys.modules makes any import fail).
    process = subprocess.run(
        [sys.executable, "-c", "import runpy, sys; sys.modules['uvloop'] = None; "
         "sys.argv = ['memg', '--engine', 'asyncio', '--event-loop', 'uvloop', '-p', '0']; "
         "runpy.run_path(%r, run_name='__main__')" % MEMG], capture_output=True, timeout=10)
    assert process.returncode == 1
    assert process.stderr == (b"memg: --event-loop uvloop: uvloop is not installed "
                              b"(pip install memg[uvloop])\n")


# -- -c: connection limit ------------------------------------------------------------------

def test_connection_limit(launch):
    server = launch("-c", "3")
    admitted = [connect_admitted(server.address) for _ in range(3)]
    try:
        with RawClient(server.address) as extra:
            assert extra.recv_until() == b"ERROR Too many open connections\r\n"
            assert extra.is_closed(timeout=5)
        for client in admitted:
            assert client.request(b"version\r\n").startswith(b"VERSION ")
        admitted.pop().close()
        admitted.append(connect_admitted(server.address))
        assert stats(admitted[-1])["rejected_connections"] != "0"
        for client in admitted:
            assert client.request(b"get k\r\n") == b"END\r\n"
    finally:
        for client in admitted:
            client.close()


# -- -I: item size limit ---------------------------------------------------------------------

def test_item_size_limit_raised_with_I(launch):
    server = launch("-I", "2m")
    value = b"x" * (1536 * KB)
    with connect_admitted(server.address) as client:
        assert client.request(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) \
            == b"STORED\r\n"
        reply = client.request(b"get big\r\n", b"END\r\n")
        assert reply == b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)


def test_default_item_size_limit_rejects_big_value(launch):
    server = launch()
    value = b"x" * (1536 * KB)
    with connect_admitted(server.address) as client:
        assert client.request(b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) \
            == b"SERVER_ERROR object too large for cache\r\n"
        assert client.request(b"version\r\n").startswith(b"VERSION ")
        assert client.request(b"set small 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert client.request(b"get big\r\n") == b"END\r\n"


# -- -m and -M: memory limit ---------------------------------------------------------------------

def fill(client, total, size=10 * KB, batch=64):
    """Set total bytes of size-byte values, batch by batch; the replies, in order."""
    value = b"v" * size
    replies = []
    count = total // size
    for start in range(0, count, batch):
        keys = range(start, min(start + batch, count))
        client.send(b"".join(b"set key%d 0 0 %d\r\n%s\r\n" % (i, size, value) for i in keys))
        received = b""
        while received.count(b"\r\n") < len(keys):
            chunk = client.sock.recv(65536)
            assert chunk, "connection closed after %r" % received
            received += chunk
        replies += [line + b"\r\n" for line in received.split(b"\r\n")[:-1]]
    return replies, value


def test_memory_limit_evicts(launch):
    server = launch("-m", "8")
    with connect_admitted(server.address) as client:
        replies, value = fill(client, 48 * MB)
        assert set(replies) == {b"STORED\r\n"}
        numbers = stats(client)
        assert int(numbers["limit_maxbytes"]) == 8 * MB
        assert int(numbers["bytes"]) <= int(numbers["limit_maxbytes"])
        assert int(numbers["evictions"]) > 0
        last = len(replies) - 1
        for i in range(last - 9, last + 1):
            assert client.request(b"get key%d\r\n" % i, b"END\r\n") \
                == b"VALUE key%d 0 %d\r\n%s\r\nEND\r\n" % (i, len(value), value)
        assert client.request(b"get key0\r\n") == b"END\r\n"


def test_memory_limit_without_eviction_runs_out(launch):
    server = launch("-M", "-m", "8")
    with connect_admitted(server.address) as client:
        replies, _ = fill(client, 48 * MB)
        assert b"SERVER_ERROR out of memory storing object\r\n" in replies
        assert set(replies) <= {b"STORED\r\n", b"SERVER_ERROR out of memory storing object\r\n"}
        assert replies[0] == b"STORED\r\n"
        numbers = stats(client)
        assert int(numbers["evictions"]) == 0
        assert int(numbers["bytes"]) <= int(numbers["limit_maxbytes"])
        assert client.request(b"get key0\r\n", b"END\r\n").startswith(b"VALUE key0 ")


# -- -o idle_timeout ---------------------------------------------------------------------------

def test_idle_timeout_closes_idle_connections(launch):
    server = launch("-o", "idle_timeout=1")
    with connect_admitted(server.address) as idle:
        assert idle.is_closed(timeout=5)
    with connect_admitted(server.address) as client:
        numbers = stats(client)
        assert int(numbers["idle_kicks"]) >= 1
        assert stats(client, b"settings")["idle_timeout"] == "1"


# -- -vv, -P, -C, -F, -X, -t, stats settings ------------------------------------------------------

def test_very_verbose_logs_commands_and_replies(launch):
    server = launch("-vv")
    with connect_admitted(server.address) as client:
        assert client.request(b"get foo\r\n") == b"END\r\n"
    _, err = server.stop()
    err = err.decode()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert any("get foo" in line for line in lines), err
    assert any("END" in line for line in lines), err


def test_pid_file(launch, tmp_path):
    path = str(tmp_path / "memg.pid")
    server = launch("-P", path)
    with connect_admitted(server.address) as client:
        assert client.request(b"get k\r\n") == b"END\r\n"
        with open(path) as pid_file:
            assert pid_file.read().strip() == str(server.process.pid)
        assert stats(client)["pid"] == str(server.process.pid)


def test_the_pid_file_goes_at_a_clean_stop(launch, tmp_path):
    path = tmp_path / "memg.pid"
    server = launch("-P", str(path))
    # (written once memg listens, as memcached writes it: a client may come first)
    wait_for(path.exists, what="the pid file")
    assert path.read_text() == "%d\n" % server.process.pid
    assert server.stop()[0] == 0
    assert not path.exists()


# -- -d: a daemon ----------------------------------------------------------------------

def process_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def daemon(*args, pid_file):
    """Start memg -d with args; yields the daemon's pid, read from its pid file.  The
    command must return at once, with nothing of the daemon's on its output (a
    daemon that kept them would keep this run waiting); a daemon still there at the
    end is killed."""
    started = subprocess.run([sys.executable, MEMG, "-d", "-P", str(pid_file)]
                             + ENGINE_ARGS + list(args), capture_output=True, timeout=20)
    assert (started.returncode, started.stdout, started.stderr) == (0, b"", b"")
    pid = int(pid_file.read_text())
    try:
        yield pid
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_daemon_is_found_by_its_pid_file_and_stops_cleanly(tmp_path):
    port = free_port()
    pid_file = tmp_path / "memg.pid"
    with daemon("-p", str(port), "-e", str(tmp_path / "cache"), pid_file=pid_file) as pid:
        with connect_admitted(("127.0.0.1", port)) as client:
            assert stats(client)["pid"] == str(pid)
            assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert os.getsid(pid) == pid                  # a session of its own
        assert [os.readlink("/proc/%d/fd/%d" % (pid, fd)) for fd in (0, 1, 2)] == [
            os.devnull] * 3
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: process_gone(pid), what="the daemon's end")
    assert not pid_file.exists()
    assert [key for key, _ in memg.read_snapshot(str(tmp_path / "cache"))[0]] == [b"k"]


def test_a_daemon_that_cannot_listen_is_reported_by_the_command(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_memg("-d", "-P", str(tmp_path / "memg.pid"),
                                "-p", str(taken.getsockname()[1]))
    assert code != 0
    assert one_line(err).startswith("memg: cannot listen on 127.0.0.1 port")
    assert not (tmp_path / "memg.pid").exists()


@pytest.mark.parametrize("args", [[], ["-d"]], ids=["foreground", "daemon"])
def test_a_pid_file_that_cannot_be_written_stops_memg_with_one_line(tmp_path, args):
    port = free_port()
    path = tmp_path / "no-such-folder" / "memg.pid"
    code, _, err = run_memg(*args, "-p", str(port), "-P", str(path))
    assert code == 1
    assert one_line(err) == "memg: cannot write the pid file %s: No such file or directory" % (
        path)
    wait_for(lambda: not listening_addresses(port), what="the end of a daemon no one could find")


def test_where_there_is_no_fork_d_is_refused_with_one_line():
    """Windows has no fork: the same memg, on an interpreter without os.fork."""
    code = ("import os, sys; del os.fork; sys.path.insert(0, %r); import memg; "
            "sys.exit(memg.main(['-d', '-p', '-1']))" % os.path.dirname(MEMG))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode != 0
    assert one_line(result.stderr) == ("memg: -d needs fork(), which this platform does not "
                                      "have: run memg under a service manager instead")


def test_disable_cas(launch):
    server = launch("-C")
    with connect_admitted(server.address) as client:
        assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert client.request(b"gets k\r\n", b"END\r\n") == b"VALUE k 0 1 0\r\nv\r\nEND\r\n"
        assert stats(client, b"settings")["cas_enabled"] == "no"


def test_disable_flush_all(launch):
    server = launch("-F")
    with connect_admitted(server.address) as client:
        assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert client.request(b"flush_all\r\n") == b"CLIENT_ERROR flush_all not allowed\r\n"
        assert client.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_disable_cachedump(launch):
    server = launch("-X")
    with connect_admitted(server.address) as client:
        assert client.request(b"stats cachedump 1 1\r\n") \
            == b"CLIENT_ERROR stats cachedump not allowed\r\n"


def test_threads_reported(launch):
    server = launch("-t", "8")
    with connect_admitted(server.address) as client:
        assert stats(client)["threads"] == "8"
        assert stats(client, b"settings")["num_threads"] == "8"


def test_no_options_turn_off_memcacheds_default_on_settings(launch):
    server = launch("-o", "no_lru_crawler,no_lru_maintainer")
    with connect_admitted(server.address) as client:
        settings = stats(client, b"settings")
        assert (settings["lru_crawler"], settings["lru_maintainer_thread"]) == ("no", "no")
    _, err = server.stop()
    assert "ignored" not in err.decode()


def test_stats_settings_reflect_command_line(launch):
    server = launch("-m", "16", "-c", "50", "-I", "2m")
    with connect_admitted(server.address) as client:
        settings = stats(client, b"settings")
        assert settings["maxbytes"] == str(16 * MB)
        assert settings["maxconns"] == "50"
        assert settings["item_size_max"] == str(2 * MB)
        assert settings["tcpport"] == str(server.port)
        numbers = stats(client)
        assert numbers["limit_maxbytes"] == str(16 * MB)
        assert numbers["max_connections"] == "50"


@pytest.mark.parametrize("args, shown, smallest", [
    ([], ("1.25", "48", "524288"), "96"),
    (["-f", "2", "-n", "100", "-o", "slab_chunk_max=65536"], ("2.00", "100", "65536"), "152"),
    (["-o", "no_modern"], ("1.25", "48", "1048576"), "96"),          # memcached 1.4's page
    (["-o", "no_modern", "-I", "2m"], ("1.25", "48", "524288"), "96"),   # half again over 1m
], ids=["defaults", "-f -n -o slab_chunk_max", "-o no_modern", "-o no_modern -I 2m"])
def test_slab_options_shape_the_classes_stats_report(launch, args, shown, smallest):
    server = launch(*args)
    with connect_admitted(server.address) as client:
        settings = stats(client, b"settings")
        assert (settings["growth_factor"], settings["chunk_size"],
                settings["slab_chunk_max"]) == shown
        # The smallest class's chunk: memcached's 48-byte item header, then -n, 8-aligned.
        assert client.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert stats(client, b"slabs")["1:chunk_size"] == smallest


def test_user_option_drops_root_after_binding(launch):
    """As root, -u becomes that user; otherwise, as in memcached, it changes nothing."""
    import pwd
    server = launch("-u", "nobody")
    # Served first: the listening socket takes connections from bind() on, before
    # memg has dropped root; it serves only after.
    with server.connect() as client:
        assert client.request(b"set a 0 0 1\r\n1\r\n") == b"STORED\r\n"
    with open("/proc/%d/status" % server.process.pid) as status:
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert set(uids) == {str(expected)}


def test_unknown_user_exits_with_one_line():
    code, _, err = run_memg("-u", "no-such-user-here", "-p", str(free_port()))
    assert code != 0
    assert err.strip() == "memg: unknown user 'no-such-user-here' (-u)"


def test_pip_builds_a_wheel_with_the_module_the_command_and_the_plugin(tmp_path):
    import zipfile
    source = copy_project(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("memg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "memg.py" in names
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"memg = memg:main" in entry_points
    assert b"[pytest11]\nmemg = memg" in entry_points
