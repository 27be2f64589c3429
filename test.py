#!/usr/bin/env python3
"""The seed's check and timing recipe: ``python test.py [N]`` against a memcached-
compatible server on 127.0.0.1:11211 (start one with ``python memg.py``).

A miss raises KeyError, a string with CR LF in it round-trips, and N integers are
set and then read back over one pylibmc connection.  Prints the elapsed time.
"""

import sys
import time

import pylibmc


def main(n=10, address="127.0.0.1:11211"):
    client = pylibmc.Client([address])
    try:
        client["no such key"]
    except KeyError:
        pass
    else:
        raise AssertionError("a missing key did not raise KeyError")
    client["crlf"] = "one\r\ntwo"
    assert client["crlf"] == "one\r\ntwo", "a str with CR LF did not round-trip"

    start = time.perf_counter()
    for i in range(n):
        client[str(i)] = i
    for i in range(n):
        assert client[str(i)] == i, "key %d did not round-trip" % i
    elapsed = time.perf_counter() - start
    print("%d sets and %d gets in %.3f s" % (n, n, elapsed))
    return elapsed


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10,
         sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:11211")
