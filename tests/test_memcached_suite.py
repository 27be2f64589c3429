"""memcached 1.6.18's own test suite (every file of its t/ folder, run with prove)
against memg, plainly and with SSL_TEST=1 (over TLS).

memcached's harness (t/lib/MemcachedTest.pm) takes its working folder for a build
folder: it runs ``./timedrun 600 ./memcached-debug ARGS`` there, ARGS being each
test's options plus a unix socket (-s) or a port pair (-p, -U), ``-u root`` when run
as root and ``-o relaxed_privileges``.  Here a temporary folder holds memcached's t/
and stand-ins for those two programs that run memg on the suite's engine with the
same arguments.  The source comes from Debian 12's memcached source package:
tests/fetch_memcached_source.sh (run by .ci/run) unpacks it into
$MEMG_MEMCACHED_SOURCE, by default ~/.cache/memg/memcached-1.6.18.

Every file memcached 1.6.18 passes must pass against memg, except those that
tests/memcached_suite_exceptions.txt names, each with the allocator internal it
tests that memg does not have: they are expected to fail, and the test fails if
one passes, so that the list stays true.  A file that skips itself (its ``plan
skip_all``) is reported as skipped when memcached skips it too, or when it is about
extstore, which memg does not have; any other skip fails.
"""

import concurrent.futures
import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import ENGINE, ENGINE_ARGS, MEMG

VERSION = "1.6.18"
SOURCE = os.environ.get("MEMG_MEMCACHED_SOURCE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "memg", "memcached-" + VERSION)
EXCEPTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "memcached_suite_exceptions.txt")


def read_exceptions(path):
    """{file: reason} from a list's ``t/FILE.t: reason`` lines."""
    with open(path) as listed:
        return dict(line.strip().split(": ", 1) for line in listed
                    if line.strip() and not line.startswith("#"))


EXCEPTIONS = read_exceptions(EXCEPTIONS_FILE)

# Why a file may skip itself, by the reason its plan gives: memcached 1.6.18 skips
# each of these too (Debian's build runs extstore's files, but memg has no extstore:
# the harness asks `memcached-debug -h` for its options, README says why).
HARNESS_SKIPS = {
    "extstore not enabled": "memg has no extstore (items on flash)",
    "proxy not enabled": "memg has no proxy (Debian's memcached is built without it too)",
    "Skipping SASL tests": "the SASL file runs only with RUN_SASL_TESTS and a Cyrus sasldb",
    "Privilege drop not supported": "memcached's seccomp privilege drop: a debug hook",
    "SSL testing is not enabled": "a TLS file, run with SSL_TEST=1",
    "Fix for Issue 140 was only an illusion": "memcached skips it always",
    "Only possible to test #260 under artificial conditions": "memcached skips it always",
    "Test is flaky. Needs special hooks.": "memcached skips it always",
    "does not appear to be a memcached git working directory":
        "it checks memcached's own source files for whitespace",
}

# The files that take longest: they start first, so that the last to finish is short.
SLOW = ["t/binary.t", "t/00-startup.t", "t/restart.t", "t/lru-maintainer.t",
        "t/slabs-reassign2.t", "t/lru-crawler.t", "t/flush-all.t", "t/getset.t",
        "t/item_size_max.t", "t/chunked-items.t"]

# Files that listen on fixed ports: never two at once, even from two test sessions
# (tests/run.py runs one per engine side by side), hence a lock file.
FIXED_PORTS = {"t/issue_67.t"}
FIXED_PORTS_LOCK = os.path.join(tempfile.gettempdir(), "memg-memcached-suite-ports.lock")

# How many files run at once (they mostly wait: on sleeps, and a second for each
# server they start on a unix socket).
PARALLEL = 6

# The engine whose pass runs the suite again over TLS (SSL_TEST=1): asyncio's, whose
# TLS is memg's own, over memory BIOs (the threads engine's is the ssl module's
# sockets; tests/test_tls.py covers both).  Once, to keep the run within its budget.
TLS_ENGINE = "asyncio"

# The most one file may take before its processes are killed.
FILE_TIMEOUT = 300


def test_files():
    return sorted(os.path.relpath(path, SOURCE)
                  for path in glob.glob(os.path.join(SOURCE, "t", "*.t")))


def write_script(path, text):
    with open(path, "w") as script:
        script.write("#!/bin/sh\n" + text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def make_build_folder(folder):
    """memcached's t/ and the two programs its harness runs, in folder."""
    # (doc/protocol.txt too: t/line-lengths.t reads it.)
    for part in ("t", "doc"):
        shutil.copytree(os.path.join(SOURCE, part), os.path.join(folder, part))
    # memcached-debug is memcached's debug build: memg with its debug commands.
    write_script(os.path.join(folder, "memcached-debug"), "exec %s \"$@\"\n" % " ".join(
        shlex.quote(arg) for arg in [sys.executable, MEMG, "--debug-commands"] + ENGINE_ARGS))
    # timedrun SECONDS COMMAND... execs COMMAND, so that the signals the harness stops
    # its servers with reach memg itself (coreutils' timeout would not pass on the
    # SIGUSR1 of a graceful stop); the time limit is each file's, on its process group.
    write_script(os.path.join(folder, "timedrun"), "shift\nexec \"$@\"\n")


@contextlib.contextmanager
def fixed_ports(test_file):
    if test_file not in FIXED_PORTS:
        yield
        return
    import fcntl
    with open(FIXED_PORTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# memg's words when the port the harness chose was taken.  The harness (free_port)
# picks ports at random from 30,000 to 50,000, within the kernel's range for the
# local ports of outgoing connections, and checks one by binding it and letting it
# go: with a dozen servers and their clients at work, another process may take it
# before the server binds it (memcached would fail as memg does).
PORT_TAKEN = re.compile(r"memg: cannot listen on [^\n]*: Address already in use")


def prove(folder, test_file, tls):
    """prove's exit code and output for one file, run once more if the port the
    harness chose was taken before memg could bind it (PORT_TAKEN)."""
    code, output = prove_once(folder, test_file, tls)
    if code != 0 and PORT_TAKEN.search(output):
        code, output = prove_once(folder, test_file, tls)
    return code, output


def prove_once(folder, test_file, tls):
    """prove's exit code and output for one file."""
    # (T_MEMD_USE_DAEMON would point the harness at a running server instead.)
    env = {name: value for name, value in os.environ.items()
           if name not in ("T_MEMD_USE_DAEMON", "SSL_TEST", "RUN_SASL_TESTS")}
    if tls:
        env["SSL_TEST"] = "1"
    with fixed_ports(test_file):
        process = subprocess.Popen(["prove", test_file], cwd=folder, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            output = process.communicate(timeout=FILE_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0] + b"\n(killed after %d s)" % FILE_TIMEOUT
        # The harness stops its servers as it ends; whatever a failed file left behind
        # goes with its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output.decode(errors="replace")


CASES = [(name, tls) for tls in (False, True) if not tls or ENGINE == TLS_ENGINE
         for name in test_files()]


@pytest.fixture(scope="module")
def proven(request, tmp_path_factory):
    """prove's run of each selected file, PARALLEL at a time, the slow ones first."""
    if not os.path.isfile(os.path.join(SOURCE, "t", "lib", "MemcachedTest.pm")):
        pytest.fail("memcached %s's tests are not in %s (no t/lib/MemcachedTest.pm): run "
                    "tests/fetch_memcached_source.sh as root on Debian 12 (.ci/run does), "
                    "or set MEMG_MEMCACHED_SOURCE to an unpacked memcached-%s source tree"
                    % (VERSION, SOURCE, VERSION), pytrace=False)
    with open(os.path.join(SOURCE, "version.m4")) as version:
        if "[%s]" % VERSION not in version.read():
            pytest.fail("%s is not memcached %s's source" % (SOURCE, VERSION), pytrace=False)
    folder = str(tmp_path_factory.mktemp("memcached-build"))
    make_build_folder(folder)
    selected = [(item.callspec.params["test_file"], item.callspec.params["tls"])
                for item in request.session.items
                if getattr(item, "function", None) is test_memcached_file]
    selected.sort(key=lambda case: SLOW.index(case[0]) if case[0] in SLOW else len(SLOW))
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        yield {case: pool.submit(prove, folder, *case) for case in selected}


def skip_reason(output):
    """The reason a file gave for skipping itself, or None if it ran."""
    found = re.search(r"^t/\S+ \.+ skipped: (.*)$", output, re.MULTILINE)
    return found and found.group(1).strip()


@pytest.mark.parametrize("test_file, tls", CASES or [("t/ (memcached's source is missing)", False)],
                         ids=[name + ("-tls" if tls else "") for name, tls in CASES] or None)
def test_memcached_file(proven, test_file, tls):
    code, output = proven[test_file, tls].result()
    where = "memcached %s's %s against memg (the %s engine%s)" % (
        VERSION, test_file, ENGINE, ", SSL_TEST=1" if tls else "")
    if test_file in EXCEPTIONS:
        # What memg does not have: the file must fail, or the list is out of date.
        assert code != 0, "%s passes: take it off %s (%s)" % (
            where, os.path.basename(EXCEPTIONS_FILE), EXCEPTIONS[test_file])
        pytest.xfail(EXCEPTIONS[test_file])
    if code != 0:
        pytest.fail("%s fails:\n%s" % (where, output), pytrace=False)
    reason = skip_reason(output)
    if reason is not None:
        known = [why for text, why in HARNESS_SKIPS.items() if text in reason
                 and not (tls and test_file.startswith("t/ssl_"))]
        if not known:
            pytest.fail("%s skips itself, for a reason memcached %s does not: %s" % (
                where, VERSION, reason), pytrace=False)
        pytest.skip("%s skips itself (%s): %s" % (test_file, reason, known[0]))


def test_the_list_is_of_files_of_t_each_with_a_reason_and_in_the_readme():
    with open(EXCEPTIONS_FILE) as lines:
        lines = [line.rstrip("\n") for line in lines if not line.startswith("#")]
    assert all(re.fullmatch(r"t/[\w-]+\.t: \S.*", line) for line in lines), lines
    assert len(EXCEPTIONS) == len(lines)
    if CASES:
        assert set(EXCEPTIONS) <= {name for name, _ in CASES}
    with open(os.path.join(os.path.dirname(EXCEPTIONS_FILE), os.pardir, "README.md")) as readme:
        text = " ".join(readme.read().split())
    for name, reason in EXCEPTIONS.items():
        assert "`%s`: %s" % (name, reason) in text, name
