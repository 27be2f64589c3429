#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: ``python3 tests/run.py [pytest args]``.

Creates a virtual environment in .venv-test (once), installs memg with its test
extra into it (uvloop among them), and runs pytest there in passes, one per engine
(see conftest.ENGINE): every suite with memg serving from threads, the default;
the suites that serve over sockets again on the asyncio engine (uvloop); and the
differential and hostile suites once more on the standard library's event loop.
memcached's own tests run beside those passes, for the threads and asyncio engines,
and so do the passes after the first and the other Pythons' sessions, two at a time:
most tests wait (on sleeps, on servers starting), so that one after the other, two
cores were mostly idle.
The system tools the suite drives (Debian's memcached, libmemcached-tools, sasl2-bin
and perl's prove) must be installed, and memcached 1.6.18's source unpacked for its
own tests (tests/test_memcached_suite.py); .ci/run does both.
"""

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test")
PYTHON = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")

# (engine, the test files of its pass; None: every one the engine runs)
PASSES = [
    ("threads", None),
    ("asyncio", None),
    ("asyncio-stdlib", ["tests/test_differential.py", "tests/test_server_hostile.py",
                        "tests/test_engines.py"]),
]
# memcached's own test files mostly wait (on sleeps, on servers starting): in a whole
# run, their passes (one per engine, side by side) run beside the others instead of
# within them.
BESIDE = "tests/test_memcached_suite.py"
# How many of the other sessions (the passes after the first, the other Pythons') run
# at once beside the first pass.
STREAMS = 2

# The other Pythons memg supports (README), each in a session of its own beside the
# passes, with nothing but pytest and Hypothesis: the suites that need no client
# library on the oldest and the newest (on the threads engine and the standard
# library's event loop), and those that need no sockets on the others.
OTHER_PYTHONS = ["3.9", "3.10", "3.12", "3.13"]
SOCKETLESS = ["tests/test_store.py", "tests/test_store_concurrency.py", "tests/test_protocol.py",
              "tests/test_binary.py", "tests/test_protocol_fuzz.py"]
STDLIB_SERVING = ["tests/test_engines.py", "tests/test_snapshot.py"]


def pytest(engine, args, python=PYTHON, **popen):
    return subprocess.Popen([python, "-m", "pytest"] + args, cwd=ROOT,
                            env=dict(os.environ, MEMG_TEST_ENGINE=engine), **popen)


def find_python(version):
    """The path of CPython version's interpreter (pyenv's, or on PATH), or None."""
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("pyenv") else ""
    found = sorted(glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python")))
    return found[-1] if found and root else shutil.which("python" + version)


def python_sessions(args):
    """(title, engine, the session's python, its pytest args) for each other Python; a
    title alone for one this machine lacks."""
    for number, version in enumerate(OTHER_PYTHONS):
        python = find_python(version)
        if python is None:
            yield ("Python %s: not on this machine, not tested" % version, None, None, None)
            continue
        home = os.path.join(ROOT, ".venv-test-" + version)
        session = os.path.join(home, "bin", "python")
        if not os.path.exists(session):
            subprocess.run([python, "-m", "venv", home], check=True)
        subprocess.run([session, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "pytest>=7", "hypothesis>=6"], check=True)
        files = SOCKETLESS
        if number in (0, len(OTHER_PYTHONS) - 1):            # the oldest and the newest
            files = files + STDLIB_SERVING
            yield ("Python %s, the asyncio engine (stdlib)" % version, "asyncio-stdlib",
                   session, args + STDLIB_SERVING)
        yield ("Python %s, the threads engine" % version, "threads", session, args + files)


def run_session(title, engine, python, args):
    """(title, exit code, output) of one pytest session (python None: one this
    machine cannot run, which fails)."""
    if python is None:
        return title, 1, b""
    process = pytest(engine, args, python, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.communicate()[0]
    return title, process.returncode, output


def run_beside(engines, sessions, args, results):
    """Run BESIDE on each engine, the engines side by side (the suite keeps its
    fixed-port file to one at a time), while sessions, (title, engine, python,
    pytest args) each, then the other Pythons' run STREAMS at a time; results gets
    (title, exit code, output) of each, in that order."""
    suites = []
    for engine in engines:                  # (to files: a full pipe would stall them)
        output = tempfile.TemporaryFile()
        suites.append(("memcached's own tests, memg serving with the %s engine" % engine,
                       pytest(engine, args + [BESIDE], stdout=output,
                              stderr=subprocess.STDOUT), output))
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as streams:
        done = [streams.submit(run_session, *session)
                for session in sessions + list(python_sessions(args))]
    for title, process, output in suites:
        process.wait()
        output.seek(0)
        results.append((title, process.returncode, output.read()))
    results += [future.result() for future in done]


def main(args):
    if not os.path.exists(PYTHON):
        venv.create(VENV, with_pip=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", ROOT + "[test]"], check=True)
    chosen = any(not arg.startswith("-") for arg in args)      # files or tests named
    beside = [] if chosen else [engine for engine, files in PASSES
                                if files is None or BESIDE in files]
    passes = [("memg serving with the %s engine" % engine, engine, PYTHON, args + (
        ["--ignore=" + BESIDE] if engine in beside else []) + (
        [] if files is None or chosen else files)) for engine, files in PASSES]
    # (files or tests named: every pass here, one after the other; else the first here,
    # the others beside it)
    here, later = (passes, []) if chosen else (passes[:1], passes[1:])
    results = []
    thread = threading.Thread(target=run_beside, args=(beside, later, args, results))
    if not chosen:
        thread.start()
    failed = 0
    for title, engine, python, session_args in here:
        print("== %s ==" % title, flush=True)
        failed |= pytest(engine, session_args, python).wait()
    if not chosen:
        thread.join()
    for title, code, output in results:
        print("== %s ==" % title, flush=True)
        sys.stdout.buffer.write(output)
        sys.stdout.flush()
        failed |= code
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
