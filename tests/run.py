#!/usr/bin/env python3
"""Run the whole test suite on a fresh machine: ``python3 tests/run.py [pytest args]``.

Creates a virtual environment in .venv-test (once), installs memg with its test
extra into it, and runs pytest there twice: once with memg processes serving from
threads, the default, then the suites that start memg processes again with
``memg --gevent`` (see conftest.ENGINE).  The system tools the suite drives
(Debian's memcached and libmemcached-tools) must be installed; .ci/run installs them.
"""

import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-test")
PYTHON = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")


def main(args):
    if not os.path.exists(PYTHON):
        venv.create(VENV, with_pip=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-e", ROOT + "[test]"], check=True)
    failed = 0
    for engine in ("threads", "gevent"):
        print("== memg processes serving with %s ==" % engine, flush=True)
        env = dict(os.environ, MEMG_TEST_ENGINE=engine)
        failed |= subprocess.run([PYTHON, "-m", "pytest"] + args, cwd=ROOT, env=env).returncode
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
