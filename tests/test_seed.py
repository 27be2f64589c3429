"""The seed's own check and timing recipe, test.py, run against a real memg."""

import importlib.util
import os
import re
import subprocess
import sys

from conftest import ROOT, RawClient

SEED = os.path.join(ROOT, "test.py")
TIMING_LINE = re.compile(r"^(\d+) sets and (\d+) gets in \d+\.\d{3} s$")


def load_seed():
    """test.py as a module (not ``import test``, which is the standard library's)."""
    spec = importlib.util.spec_from_file_location("memg_seed_test", SEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_script_passes_against_memg(memg):
    result = subprocess.run(
        [sys.executable, SEED, "200", "127.0.0.1:%d" % memg.port],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    match = TIMING_LINE.match(lines[0])
    assert match, lines[0]
    assert match.groups() == ("200", "200")


def test_seed_main_returns_the_elapsed_time(memg, capsys):
    seed = load_seed()
    elapsed = seed.main(50, "127.0.0.1:%d" % memg.port)
    assert isinstance(elapsed, float)
    assert elapsed >= 0
    out = capsys.readouterr().out
    assert TIMING_LINE.match(out.strip()), out
    # What main wrote is really in memg: the CR LF string and the 50 integers.
    with RawClient(memg.address) as raw:
        reply = raw.request(b"get crlf 0 49 50\r\n", b"END\r\n")
    values = re.findall(rb"VALUE (\S+) \d+ \d+\r\n(.*?)\r\n(?=VALUE|END)", reply, re.S)
    assert values == [(b"crlf", b"one\r\ntwo"), (b"0", b"0"), (b"49", b"49")]
