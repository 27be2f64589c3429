#!/usr/bin/env python3
"""The floors for ``tests/bench.py --floor``: for each of memg's engines, the least
a Python server on that engine must do to serve the benchmark's load, and nothing
more.

    python3 tests/floor_server.py -p PORT [--engine threads|asyncio]
                                  [--event-loop auto|uvloop|stdlib]

It answers get (one key or many), set, version and stats (cmd_get, cmd_set and
curr_items: what the benchmark reads) from a dict: no expiry, no memory limit, no
LRU, no CAS, no other command, no statistics beyond those, no care for bad input
(a malformed line may raise and drop the connection).  The engines, chosen with
memg's own flags:

threads (the default)
    A thread per connection reading lines from the socket's makefile, the dict
    under a lock: what CPython's threads cost.
asyncio
    One ``asyncio.Protocol`` per connection on an event loop (``loop.create_server``),
    handed bytes and answering every complete command in them: what the loop costs,
    uvloop's (--event-loop uvloop, or auto when it is installed) or the standard
    library's (--event-loop stdlib).

What a floor costs beside memcached in the same run, before any of memg's protocol
work, bounds what memg can reach on that engine.  Not a server to use; the
benchmark starts it on loopback.  tests/instructions.py counts the instructions of
``handle`` and of ``FloorProtocol``.
"""

import argparse
import asyncio
import socket
import threading


def stats_reply(counts, items):
    numbers = dict(counts, curr_items=len(items))
    return b"".join(b"STAT %s %d\r\n" % (name.encode(), number)
                    for name, number in numbers.items()) + b"END\r\n"


def values_reply(found):
    """A get's reply for the (key, flags, value) entries found."""
    return b"".join(b"VALUE %s %s %d\r\n%s\r\n" % (key, flags, len(value), value)
                    for key, flags, value in found) + b"END\r\n"


# -- threads ----------------------------------------------------------------------

def handle(conn, items, lock, counts):
    """Serve one connection: items maps key -> (flags, value) under lock."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rfile = conn.makefile("rb")
    for line in rfile:
        words = line.split()
        if words[0] == b"get":
            with lock:
                counts["cmd_get"] += len(words) - 1
                found = [(key,) + items[key] for key in words[1:] if key in items]
            conn.sendall(values_reply(found))
        elif words[0] == b"set":
            value = rfile.read(int(words[4]) + 2)[:-2]
            with lock:
                counts["cmd_set"] += 1
                items[words[1]] = (words[2], value)
            conn.sendall(b"STORED\r\n")
        elif words[0] == b"stats":
            with lock:
                reply = stats_reply(counts, items)
            conn.sendall(reply)
        elif words[0] == b"version":
            conn.sendall(b"VERSION floor\r\n")
        else:
            conn.sendall(b"ERROR\r\n")
    conn.close()


def serve_threads(port):
    items, lock = {}, threading.Lock()
    counts = {"cmd_get": 0, "cmd_set": 0}
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, items, lock, counts), daemon=True).start()


# -- asyncio ------------------------------------------------------------------------

class FloorProtocol(asyncio.Protocol):
    """One connection on the event loop: items maps key -> (flags, value); one
    thread runs every connection, so there is no lock.  What arrives is kept until
    its commands are complete (a set's data may come after its line), then they all
    run and their replies go out in one write."""

    def __init__(self, items, counts):
        self.items, self.counts = items, counts
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        data = self.buffer + data if self.buffer else data
        items, counts = self.items, self.counts
        replies = []
        pos = 0
        while True:
            newline = data.find(b"\n", pos)
            if newline < 0:
                break
            words = data[pos:newline].split()
            line_start, pos = pos, newline + 1
            if words[0] == b"get":
                counts["cmd_get"] += len(words) - 1
                replies.append(values_reply(
                    [(key,) + items[key] for key in words[1:] if key in items]))
            elif words[0] == b"set":
                end = pos + int(words[4]) + 2
                if end > len(data):
                    pos = line_start            # its data is still to come
                    break
                counts["cmd_set"] += 1
                items[words[1]] = (words[2], data[pos:end - 2])
                replies.append(b"STORED\r\n")
                pos = end
            elif words[0] == b"stats":
                replies.append(stats_reply(counts, items))
            elif words[0] == b"version":
                replies.append(b"VERSION floor\r\n")
            else:
                replies.append(b"ERROR\r\n")
        self.buffer = data[pos:]
        if replies:
            self.transport.write(b"".join(replies))


def new_event_loop(choice):
    """uvloop's loop (asked for, or auto when it is installed) or the standard
    library's, as memg's --event-loop chooses."""
    if choice != "stdlib":
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("floor: --event-loop uvloop: uvloop is not installed")
    return asyncio.new_event_loop()


def serve_asyncio(port, event_loop):
    loop = new_event_loop(event_loop)
    items, counts = {}, {"cmd_get": 0, "cmd_set": 0}
    loop.run_until_complete(loop.create_server(
        lambda: FloorProtocol(items, counts), "127.0.0.1", port, backlog=1024))
    loop.run_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", dest="port", type=int, required=True)
    parser.add_argument("--engine", choices=("threads", "asyncio"), default="threads",
                        help="a thread per connection, or an asyncio event loop")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "stdlib"),
                        default="auto", help="the asyncio engine's loop, as memg's")
    args, _ = parser.parse_known_args()     # the benchmark's -m and -c mean nothing here
    if args.engine == "asyncio":
        serve_asyncio(args.port, args.event_loop)
    else:
        serve_threads(args.port)


if __name__ == "__main__":
    main()
