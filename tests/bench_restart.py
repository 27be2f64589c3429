#!/usr/bin/env python3
"""How long a warm restart (-e FILE) takes: memg beside memcached, same items.

    python3 tests/bench_restart.py [--items 1000000] [--value-size 100]
                                   [--engine threads] [--folder /dev/shm]

Each server is started on a free loopback port with ``-m 1024 -e FOLDER/FILE``, filled
with --items sets of distinct keys (``key:N``) and --value-size-byte values, sent
pipelined with noreply over one connection, then stopped with SIGUSR1 (memcached's
graceful stop).  Then it is started again with the same arguments.  Reported, per
server: the seconds from SIGUSR1 to the process's exit (the save), the file's size,
how many items came back, and the seconds from the new process's start until it
answers ``stats`` with every item there (the restore, interpreter start-up
included), or with fewer that stay fewer for a second.  memcached (Debian's
/usr/bin/memcached, if there) keeps its item memory in the file it mmaps, so its
save is a flush of that; memg writes a snapshot of its own format.  A figure, not a
test: nothing is asserted.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(sock, data, end):
    sock.sendall(data)
    reply = b""
    while not reply.endswith(end):
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed after %r" % reply[-200:])
        reply += chunk
    return reply


def items_held(port):
    """curr_items of the server on port, or None while it does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            reply = request(sock, b"stats\r\n", b"END\r\n")
    except OSError:
        return None
    for line in reply.split(b"\r\n"):
        if line.startswith(b"STAT curr_items "):
            return int(line.split()[2])
    return None


def fill(port, items, value):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for start in range(0, items, 10000):
            sock.sendall(b"".join(b"set key:%d 0 0 %d noreply\r\n%s\r\n" % (
                number, len(value), value) for number in range(start, min(items, start + 10000))))
            request(sock, b"mn\r\n", b"MN\r\n")


def measure(name, argv, items, value, path):
    """(save seconds, file bytes, restore seconds) for one server."""
    port = free_port()
    argv = argv + ["-p", str(port), "-m", "1024", "-e", path]
    server = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    while items_held(port) is None:
        time.sleep(0.05)
    fill(port, items, value)
    held = items_held(port)
    started = time.monotonic()
    server.send_signal(signal.SIGUSR1)
    server.wait(600)
    saved = time.monotonic() - started
    size = os.path.getsize(path)
    started = time.monotonic()
    server = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        # Until every item is back; a server that answers with fewer for a second
        # restored no more (memcached 1.6.18 may refuse its own file).
        answered = None
        while True:
            back = items_held(port)
            if back == held:
                break
            if server.poll() is not None:
                raise RuntimeError("%s exited on restart" % name)
            if back is not None:
                answered = answered or time.monotonic()
                if time.monotonic() - answered > 1:
                    break
            time.sleep(0.01)
        restored = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(600)
    print("%s: %d items, saved in %.2f s (%.0f MB), %d restored in %.2f s"
          % (name, held, saved, size / 1e6, back, restored), file=sys.stderr)
    return saved, size, back, restored


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--engine", default="threads")
    parser.add_argument("--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    value = b"v" * args.value_size
    servers = [("memg (%s)" % args.engine, [sys.executable, os.path.join(ROOT, "memg.py"),
                                            "--engine", args.engine])]
    if shutil.which("memcached"):
        servers.append(("memcached", [shutil.which("memcached"), "-l", "127.0.0.1"] + (
            ["-u", "nobody"] if os.geteuid() == 0 else [])))
    folder = tempfile.mkdtemp(dir=args.folder)
    os.chmod(folder, 0o777)                      # (memcached may run as nobody)
    try:
        print("| server | items | save (s) | file (MB) | items back | restore (s) |")
        print("|---|---|---|---|---|---|")
        for name, argv in servers:
            saved, size, back, restored = measure(name, argv, args.items, value,
                                                  os.path.join(folder, "cache"))
            print("| %s | %d | %.2f | %.0f | %d | %.2f |" % (
                name, args.items, saved, size / 1e6, back, restored), flush=True)
            os.unlink(os.path.join(folder, "cache"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
