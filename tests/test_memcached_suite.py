"""memcached 1.6.18's own tests (files of its t/ folder, run with prove) against memg.

memcached's harness (t/lib/MemcachedTest.pm) takes its working folder for a build
folder: it runs ``./timedrun 600 ./memcached-debug ARGS`` there, ARGS being each
test's options plus a unix socket (-s) or a port pair (-p, -U), ``-u root`` when run
as root and ``-o relaxed_privileges``.  Here a temporary folder holds memcached's t/
and stand-ins for those two programs that run memg on the suite's engine with the
same arguments.  The source comes from Debian 12's memcached source package:
tests/fetch_memcached_source.sh (run by .ci/run) unpacks it into
$MEMG_MEMCACHED_SOURCE, by default ~/.cache/memg/memcached-1.6.18.
"""

import concurrent.futures
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ENGINE, ENGINE_ARGS, MEMG

VERSION = "1.6.18"
SOURCE = os.environ.get("MEMG_MEMCACHED_SOURCE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "memg", "memcached-" + VERSION)

# The files of memcached's t/ that memg runs: (file, over TLS).  With SSL_TEST=1 the
# harness serves and reaches its TCP port over TLS, with t/'s own certificates; the
# ssl_*.t files test nothing without it.
MEMCACHED_TESTS = [(name, False) for name in ["t/00-startup.t", "t/binary.t", "t/issue_50.t",
                                              "t/issue_67.t", "t/udp.t", "t/expirations.t",
                                              "t/line-lengths.t", "t/lru-crawler.t",
                                              "t/lru-maintainer.t", "t/issue_163.t",
                                              "t/issue_183.t"]] + [
    (name, True) for name in ["t/ssl_cert_refresh.t", "t/ssl_ports.t", "t/ssl_proto_version.t",
                              "t/ssl_session_resumption.t", "t/ssl_settings.t",
                              "t/ssl_verify_modes.t", "t/binary.t"]]

# How many files run at once (memcached's tests mostly wait: on sleeps, and a second for
# each server they start on a unix socket).
PARALLEL = 4

# The most one file may take (the harness's own timedrun gives a server 600 s).
FILE_TIMEOUT = 600


def write_script(path, command):
    with open(path, "w") as script:
        script.write("#!/bin/sh\nexec %s \"$@\"\n" % command)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def make_build_folder(folder):
    """memcached's t/ and the two programs its harness runs, in folder."""
    harness = os.path.join(SOURCE, "t", "lib", "MemcachedTest.pm")
    if not os.path.isfile(harness):
        pytest.fail("memcached %s's tests are not in %s (no t/lib/MemcachedTest.pm): run "
                    "tests/fetch_memcached_source.sh as root on Debian 12 (.ci/run does), "
                    "or set MEMG_MEMCACHED_SOURCE to an unpacked memcached-%s source tree"
                    % (VERSION, SOURCE, VERSION), pytrace=False)
    with open(os.path.join(SOURCE, "version.m4")) as version:
        if "[%s]" % VERSION not in version.read():
            pytest.fail("%s is not memcached %s's source" % (SOURCE, VERSION), pytrace=False)
    # (doc/protocol.txt too: t/line-lengths.t reads it.)
    for part in ("t", "doc"):
        shutil.copytree(os.path.join(SOURCE, part), os.path.join(folder, part))
    # memcached-debug is memcached's debug build: memg with its debug commands.
    write_script(os.path.join(folder, "memcached-debug"), " ".join(
        shlex.quote(arg) for arg in [sys.executable, MEMG, "--debug-commands"] + ENGINE_ARGS))
    # timedrun SECONDS COMMAND...: coreutils' timeout takes the same arguments, and
    # passes on the SIGINT and SIGTERM the harness stops its servers with.
    write_script(os.path.join(folder, "timedrun"), "timeout")


def prove(folder, test_file, tls):
    # (T_MEMD_USE_DAEMON would point the harness at a running server instead.)
    env = {name: value for name, value in os.environ.items()
           if name not in ("T_MEMD_USE_DAEMON", "SSL_TEST")}
    if tls:
        env["SSL_TEST"] = "1"
    return subprocess.run(["prove", test_file], cwd=folder, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=FILE_TIMEOUT)


@pytest.fixture(scope="module")
def proven(request, tmp_path_factory):
    """prove's run of each selected file, PARALLEL at a time, as they finish."""
    folder = str(tmp_path_factory.mktemp("memcached-build"))
    make_build_folder(folder)
    selected = [(item.callspec.params["test_file"], item.callspec.params["tls"])
                for item in request.session.items
                if getattr(item, "function", None) is test_memcached_file]
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        yield {case: pool.submit(prove, folder, *case) for case in selected}


@pytest.mark.parametrize("test_file, tls", MEMCACHED_TESTS,
                         ids=[name + ("-tls" if tls else "") for name, tls in MEMCACHED_TESTS])
def test_memcached_file(proven, test_file, tls):
    result = proven[test_file, tls].result()
    if result.returncode != 0:
        pytest.fail("memcached %s's %s fails against memg (the %s engine%s):\n%s" % (
            VERSION, test_file, ENGINE, ", SSL_TEST=1" if tls else "",
            result.stdout.decode(errors="replace")), pytrace=False)
