#!/usr/bin/env python3
"""CPU instructions per command, counted by valgrind's callgrind: memg's connection
and the floor's (tests/floor_server.py) serving the seed's test.py commands.

    python3 tests/instructions.py [--commands N]

Timings on a shared machine move by 10 to 20 % from run to run; instruction counts
move by well under 1 %, so they show what a change to the command path buys.  Each
side serves N sets and then N gets (test.py's: keys "0", "1", ..., each holding its
integer as pylibmc stores one: its digits, flags 2) from
a fake socket, one command per read, and sends its replies through a real socket
(UDP, to a port nobody reads), as a client that waits for each reply makes it do.
A run with no commands, one with the sets and one with both are counted, so that
start-up cancels out.  Needs valgrind (Debian: ``apt install valgrind``).
"""

import argparse
import io
import os
import re
import socket
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def commands(count, gets):
    keys = [b"%d" % i for i in range(count)]
    sets = [b"set %s 2 0 %d\r\n%s\r\n" % (key, len(key), key) for key in keys]
    return sets + ([b"get %s\r\n" % key for key in keys] if gets else [])


class FakeSocket:
    """A connected socket whose input is the given chunks, one per read, and whose
    output really goes out (through a UDP socket: no reader, no waiting)."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.connect(self.sink.getsockname())

    def recv_into(self, view):
        chunk = next(self.chunks, b"")
        view[:len(chunk)] = chunk
        return len(chunk)

    def makefile(self, mode):
        return io.BufferedReader(socket.SocketIO(self, "rb"))   # as socket.makefile

    def sendall(self, data):
        self.udp.send(data)

    def fileno(self):
        return self.udp.fileno()

    def setsockopt(self, *option):
        pass

    def settimeout(self, timeout):
        pass

    def close(self):
        pass


def serve(side, chunks):
    if side == "memg":
        import memg
        server = memg.Server(port=0)
        memg.Connection(server, FakeSocket(chunks), ("127.0.0.1", 1)).handle()
    else:
        import floor_server
        floor_server.handle(FakeSocket(chunks), {}, threading.Lock(),
                            {"cmd_get": 0, "cmd_set": 0})


def count(side, number, gets):
    """Instructions of a run of this script that serves number sets (and gets)."""
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--serve", side,
         "--commands", str(number)] + (["--gets"] if gets else []),
        env=dict(os.environ, PYTHONHASHSEED="0"),     # the same dicts every run
        capture_output=True, text=True, check=True)
    return int(re.search(r"refs:\s*([\d,]+)", run.stderr).group(1).replace(",", ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=4000,
                        help="sets, and then as many gets (default 4000)")
    parser.add_argument("--serve", choices=("memg", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--gets", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:                          # one counted run, under valgrind
        serve(args.serve, commands(args.commands, args.gets))
        return
    number = args.commands
    print("instructions per command, %d sets then %d gets:" % (number, number))
    for side in ("memg", "floor"):
        none, sets, both = (count(side, 0, False), count(side, number, False),
                            count(side, number, True))
        print("  %-6s set %7d   get %7d" % (
            side, (sets - none) // number, (both - sets) // number))


if __name__ == "__main__":
    main()
