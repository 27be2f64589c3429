#!/usr/bin/env python3
"""The floor for ``tests/bench.py --floor``: the least a thread-per-connection
Python server must do to serve the benchmark's load, and nothing more.

    python3 tests/floor_server.py -p PORT [--gevent]

It answers get (one key or many), set, version and stats (cmd_get, cmd_set and
curr_items: what the benchmark reads) over a socket's makefile, from a dict under a lock: no
expiry, no memory limit, no LRU, no CAS, no other command, no care for bad input.
What it costs beside memcached in the same run is what CPython's threads (or, with
--gevent, gevent's greenlets) cost before any of memg's protocol work: a bound for
memg's own figures.  Not a server to use; the benchmark starts it on loopback.
"""

import argparse
import socket
import threading


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
            conn.sendall(b"".join(b"VALUE %s %s %d\r\n%s\r\n" % (key, flags, len(value), value)
                                  for key, flags, value in found) + b"END\r\n")
        elif words[0] == b"set":
            value = rfile.read(int(words[4]) + 2)[:-2]
            with lock:
                counts["cmd_set"] += 1
                items[words[1]] = (words[2], value)
            conn.sendall(b"STORED\r\n")
        elif words[0] == b"stats":
            with lock:
                numbers = dict(counts, curr_items=len(items))
            conn.sendall(b"".join(b"STAT %s %d\r\n" % (name.encode(), number)
                                  for name, number in numbers.items()) + b"END\r\n")
        elif words[0] == b"version":
            conn.sendall(b"VERSION floor\r\n")
        else:
            conn.sendall(b"ERROR\r\n")
    conn.close()


def serve(port):
    items, lock = {}, threading.Lock()
    counts = {"cmd_get": 0, "cmd_set": 0}
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, items, lock, counts), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", dest="port", type=int, required=True)
    parser.add_argument("--gevent", action="store_true",
                        help="run on gevent's greenlets, as memg --gevent")
    args, _ = parser.parse_known_args()     # the benchmark's -m and -c mean nothing here
    if args.gevent:
        from gevent import monkey
        monkey.patch_all()                  # before serve() makes its lock and sockets
    serve(args.port)


if __name__ == "__main__":
    main()
