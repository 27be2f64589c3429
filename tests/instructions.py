#!/usr/bin/env python3
"""CPU instructions per command, counted by valgrind's callgrind: memg's protocol
and the floors' handlers (tests/floor_server.py) serving the seed's test.py
commands.

    python3 tests/instructions.py [--commands N]

Timings on a shared machine move by 10 to 20 % from run to run; instruction counts
move by well under 1 %, so they show what a change to the command path buys.  Each
side serves N sets and then N gets (test.py's: keys "0", "1", ..., each holding its
integer as pylibmc stores one: its digits, flags 2), handed one command per read,
as test.py's client sends them, and sends each reply through a real socket (UDP, to
a port nobody reads: the send is a real system call, and never waits), as a client
that waits for each reply makes it do.  The sides:

memg
    memg's TextProtocol, what every engine runs: ``receive_data(command)``, then
    its reply sent.  Neither engine's own part is in it (a thread's recv, an event
    loop's turn); the benchmark's floors show what those cost.
floor-asyncio
    The asyncio floor's protocol: ``FloorProtocol.data_received(command)``, its
    transport's write sending the reply.  The same work as memg's, done as simply
    as it can be: the difference is what memg's protocol costs beyond the least.
floor-threads
    The threaded floor's ``handle``: it reads each command through the socket's
    makefile (a fake socket's recv_into hands it over) and sends the reply with
    sendall.  It has no part without I/O to count alone, so its reads are in.

A run with no commands, one with the sets and one with both are counted, so that
start-up cancels out.  PYTHONHASHSEED is fixed, so that every run builds the same
dicts.  Needs valgrind (Debian: ``apt install valgrind``).
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

SIDES = ("memg", "floor-asyncio", "floor-threads")


def commands(count, gets):
    keys = [b"%d" % i for i in range(count)]
    sets = [b"set %s 2 0 %d\r\n%s\r\n" % (key, len(key), key) for key in keys]
    return sets + ([b"get %s\r\n" % key for key in keys] if gets else [])


def reply_socket():
    """A UDP socket connected to one that nobody reads (returned too, to be kept
    open: a send to a closed port would fail)."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(sink.getsockname())
    return sender, sink


class FakeSocket:
    """For the threaded floor: a connected socket whose input is the given chunks,
    one per read, and whose output really goes out through sender."""

    def __init__(self, chunks, sender):
        self.chunks = iter(chunks)
        self.sender = sender

    def recv_into(self, view):
        chunk = next(self.chunks, b"")
        view[:len(chunk)] = chunk
        return len(chunk)

    def makefile(self, mode):
        return io.BufferedReader(socket.SocketIO(self, "rb"))   # as socket.makefile

    def sendall(self, data):
        self.sender.send(data)

    def setsockopt(self, *option):
        pass

    def close(self):
        pass


class FakeTransport:
    """For the asyncio floor: a transport whose writes really go out through sender."""

    def __init__(self, sender):
        self.write = sender.send


def serve(side, chunks):
    sender, sink = reply_socket()
    if side == "memg":
        import memg
        protocol = memg.TextProtocol(memg.Service(memg.Settings()))
        for chunk in chunks:
            reply = protocol.receive_data(chunk)
            if reply:
                sender.send(reply)
    elif side == "floor-asyncio":
        import floor_server
        protocol = floor_server.FloorProtocol({}, {"cmd_get": 0, "cmd_set": 0})
        protocol.connection_made(FakeTransport(sender))
        for chunk in chunks:
            protocol.data_received(chunk)
    else:
        import floor_server
        floor_server.handle(FakeSocket(chunks, sender), {}, threading.Lock(),
                            {"cmd_get": 0, "cmd_set": 0})
    sink.close()


def count(side, number, gets):
    """Instructions of a run of this script that serves number sets (and gets)."""
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--serve", side,
         "--commands", str(number)] + (["--gets"] if gets else []),
        env=dict(os.environ, PYTHONHASHSEED="0"),     # the same dicts every run
        capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit("instructions: the %s run failed:\n%s" % (side, run.stderr[-3000:]))
    return int(re.search(r"refs:\s*([\d,]+)", run.stderr).group(1).replace(",", ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=4000,
                        help="sets, and then as many gets (default 4000)")
    parser.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--gets", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:                          # one counted run, under valgrind
        serve(args.serve, commands(args.commands, args.gets))
        return
    number = args.commands
    print("instructions per command, %d sets then %d gets:" % (number, number))
    for side in SIDES:
        none, sets, both = (count(side, 0, False), count(side, number, False),
                            count(side, number, True))
        print("  %-13s set %7d   get %7d" % (
            side, (sets - none) // number, (both - sets) // number))


if __name__ == "__main__":
    main()
