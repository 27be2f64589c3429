#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: ``python3 tests/run.py [pytest args]``.

Creates a virtual environment in .venv-test (once), installs memg with its test
extra into it (uvloop among them), and runs pytest there in passes, one per engine
(see conftest.ENGINE): every suite with memg serving from threads, the default;
the suites that serve over sockets again on the asyncio engine (uvloop); and the
differential and hostile suites once more on the standard library's event loop.
memcached's own tests run beside those passes, for the threads and asyncio engines.
The system tools the suite drives (Debian's memcached, libmemcached-tools, sasl2-bin
and perl's prove) must be installed, and memcached 1.6.18's source unpacked for its
own tests (tests/test_memcached_suite.py); .ci/run does both.
"""

import os
import subprocess
import sys
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
# run, their passes run beside the others instead of within them, one engine after
# the other (some of the files listen on fixed ports).
BESIDE = "tests/test_memcached_suite.py"


def pytest(engine, args, **popen):
    return subprocess.Popen([PYTHON, "-m", "pytest"] + args, cwd=ROOT,
                            env=dict(os.environ, MEMG_TEST_ENGINE=engine), **popen)


def run_beside(engines, args, results):
    """Run BESIDE on each engine in turn; results gets (engine, exit code, output)."""
    for engine in engines:
        process = pytest(engine, args + [BESIDE], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        output = process.communicate()[0]
        results.append((engine, process.returncode, output))


def main(args):
    if not os.path.exists(PYTHON):
        venv.create(VENV, with_pip=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", ROOT + "[test]"], check=True)
    chosen = any(not arg.startswith("-") for arg in args)      # files or tests named
    beside = [] if chosen else [engine for engine, files in PASSES
                                if files is None or BESIDE in files]
    results = []
    thread = threading.Thread(target=run_beside, args=(beside, args, results))
    thread.start()
    failed = 0
    for engine, files in PASSES:
        print("== memg serving with the %s engine ==" % engine, flush=True)
        selected = [] if files is None or chosen else files
        ignored = ["--ignore=" + BESIDE] if engine in beside else []
        failed |= pytest(engine, args + ignored + selected).wait()
    thread.join()
    for engine, code, output in results:
        print("== memcached's own tests, memg serving with the %s engine ==" % engine,
              flush=True)
        sys.stdout.buffer.write(output)
        sys.stdout.flush()
        failed |= code
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
