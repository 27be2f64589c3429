"""memg as a node of a cluster: three memg processes behind twemproxy (Debian's
``nutcracker``, with a ketama configuration written here), and behind the clients
that hash keys over servers themselves (pylibmc with ketama, pymemcache's
HashClient).  memcached's servers never talk to each other, and neither do memg's:
a cluster is the proxy's or the client's, and each node must serve it as memcached
would.
"""

import os
import subprocess

import pylibmc
import pytest
from pymemcache.client.hash import HashClient

from conftest import RawClient, free_port, require_tool, start_memg, stats, wait_for

KEYS = [b"user:%d" % number for number in range(600)]


@pytest.fixture
def nodes():
    """Three memg processes on free ports."""
    started = [start_memg() for _ in range(3)]
    yield started
    for node in started:
        node.stop()


class Nutcracker:
    """nutcracker proxying a pool of memcached servers, with ketama over fnv1a_64 as
    twemproxy's README configures it: a node that fails once is ejected for
    retry_ms, and its keys go to the others meanwhile.  (A node that answers late
    fails too: the timeout is long, so that only a dead node is ejected.)"""

    def __init__(self, folder, nodes, retry_ms=60000):
        self.port = free_port()
        config = os.path.join(folder, "nutcracker.yml")
        with open(config, "w") as file:
            file.write("memg:\n  listen: 127.0.0.1:%d\n  hash: fnv1a_64\n"
                       "  distribution: ketama\n  timeout: 10000\n  auto_eject_hosts: true\n"
                       "  server_retry_timeout: %d\n  server_failure_limit: 1\n"
                       "  servers:\n" % (self.port, retry_ms))
            # Named, so that ketama places keys by the names, as twemproxy recommends,
            # not by the free ports the nodes happen to get.
            for number, node in enumerate(nodes):
                file.write("   - 127.0.0.1:%d:1 node%d\n" % (node.port, number))
        self.process = subprocess.Popen(
            [require_tool("nutcracker"), "-c", config, "-s", str(free_port()),
             "-a", "127.0.0.1", "-o", os.path.join(folder, "nutcracker.log"),
             "-p", os.path.join(folder, "nutcracker.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.listening, what="nutcracker to listen")

    def listening(self):
        try:
            RawClient(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def connect(self):
        return RawClient(("127.0.0.1", self.port))

    def stop(self):
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def proxy(tmp_path, nodes):
    started = Nutcracker(str(tmp_path), nodes)
    yield started
    started.stop()


def holder(nodes, key):
    """The node that holds key (asked directly), or None."""
    found = []
    for node in nodes:
        with node.connect() as client:
            if client.request(b"get %s\r\n" % key, b"END\r\n") != b"END\r\n":
                found.append(node)
    assert len(found) <= 1, key
    return found[0] if found else None


# -- behind nutcracker --------------------------------------------------------------------------

# (What nutcracker forwards of the text protocol, and what memg answers through it.)
FORWARDED = [
    (b"set k 5 0 5\r\nhello\r\n", b"STORED\r\n"),
    (b"get k\r\n", b"VALUE k 5 5\r\nhello\r\nEND\r\n"),
    (b"add k 0 0 1\r\nx\r\n", b"NOT_STORED\r\n"),
    (b"replace k 6 0 5\r\nworld\r\n", b"STORED\r\n"),
    (b"append k 0 0 1\r\n!\r\n", b"STORED\r\n"),
    (b"prepend k 0 0 1\r\n<\r\n", b"STORED\r\n"),
    (b"get k\r\n", b"VALUE k 6 7\r\n<world!\r\nEND\r\n"),
    (b"cas k 0 0 1 1\r\nz\r\n", b"EXISTS\r\n"),
    (b"set n 0 0 2\r\n10\r\n", b"STORED\r\n"),
    (b"incr n 5\r\n", b"15\r\n"),
    (b"decr n 20\r\n", b"0\r\n"),
    (b"touch n 100\r\n", b"TOUCHED\r\n"),
    (b"delete n\r\n", b"DELETED\r\n"),
    (b"delete n\r\n", b"NOT_FOUND\r\n"),
    (b"incr nope 1\r\n", b"NOT_FOUND\r\n"),
    (b"set q 0 0 1 noreply\r\nq\r\nget q\r\n", b"VALUE q 0 1\r\nq\r\nEND\r\n"),
]


def test_every_command_nutcracker_forwards_works_through_it(proxy, nodes):
    with proxy.connect() as client:
        for command, expected in FORWARDED:
            assert client.request(command, expected) == expected, command
        # gets, and a cas with the unique it gave.
        unique = client.request(b"gets k\r\n", b"END\r\n").split(b"\r\n")[0].split()[4]
        assert client.request(b"cas k 1 0 1 %s\r\nc\r\n" % unique) == b"STORED\r\n"
        assert client.request(b"get k\r\n", b"END\r\n") == b"VALUE k 1 1\r\nc\r\nEND\r\n"
    # Each key is on one node, the one the proxy chose.
    assert holder(nodes, b"k") is not None


def test_a_multi_get_through_nutcracker_gathers_keys_from_every_node(proxy, nodes):
    with proxy.connect() as client:
        for key in KEYS:
            assert client.request(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(key), key)) == (
                b"STORED\r\n")
        reply = client.request(b"get " + b" ".join(KEYS) + b" missing\r\n", b"END\r\n")
    assert reply == b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(key), key)
                             for key in KEYS) + b"END\r\n"
    held = [int(stats(node)["curr_items"]) for node in nodes]
    assert sum(held) == len(KEYS)
    assert min(held) > len(KEYS) / 10              # spread over all three


def test_a_node_killed_mid_run_costs_only_its_own_keys(proxy, nodes):
    with proxy.connect() as client:
        for key in KEYS:
            client.request(b"set %s 0 0 1\r\nv\r\n" % key)
        placed = {key: holder(nodes, key) for key in KEYS}
        dead = nodes[1]
        dead.process.kill()
        dead.process.wait(10)
        lost = [key for key in KEYS if placed[key] is dead]
        kept = [key for key in KEYS if placed[key] is not dead]
        assert lost and kept
        # The others' keys keep serving, whatever happens to the dead node's.
        for key in kept[:100]:
            assert client.request(b"get %s\r\n" % key, b"END\r\n") == (
                b"VALUE %s 0 1\r\nv\r\nEND\r\n" % key)
        # The dead node's keys: the proxy answers an error until it has ejected
        # the node, then a miss; no wrong value, ever.
        for key in lost[:50]:
            reply = client.request(b"get %s\r\n" % key, b"\r\n")
            if reply.startswith(b"SERVER_ERROR"):
                continue
            assert reply == b"END\r\n" or client.recv_until(b"END\r\n") == b"END\r\n"
        # Once ejected, writes of its keys land on the survivors.
        survivors = [node for node in nodes if node is not dead]
        for key in lost[:50]:
            assert wait_for(lambda: client.request(b"set %s 0 0 1\r\nw\r\n" % key) == (
                b"STORED\r\n"), what="the proxy to eject the dead node")
            assert holder(survivors, key) is not None
        # (The dead node stays dead: its fixture's stop finds it gone.)
        for key in kept[:100]:
            assert client.request(b"get %s\r\n" % key, b"END\r\n") == (
                b"VALUE %s 0 1\r\nv\r\nEND\r\n" % key)


# -- behind clients that hash keys themselves ----------------------------------------------

def pylibmc_ketama(nodes):
    return pylibmc.Client(["127.0.0.1:%d" % node.port for node in nodes],
                          behaviors={"ketama": True})


def pymemcache_hash(nodes):
    # (Replies awaited: pymemcache sets with noreply unless told otherwise.)
    return HashClient([("127.0.0.1", node.port) for node in nodes], default_noreply=False)


@pytest.mark.parametrize("make_client", [pylibmc_ketama, pymemcache_hash],
                         ids=["pylibmc-ketama", "pymemcache-HashClient"])
def test_a_hashing_client_spreads_keys_and_a_fourth_node_moves_a_quarter(nodes,
                                                                          make_client):
    keys = [key.decode() for key in KEYS]
    client = make_client(nodes)
    for key in keys:
        assert client.set(key, key)
    held = [int(stats(node)["curr_items"]) for node in nodes]
    assert sum(held) == len(keys)
    assert min(held) > len(keys) / 50
    # With a fourth node, a key the client now looks for elsewhere misses.
    fourth = start_memg()
    try:
        grown = make_client(nodes + [fourth])
        found = {key: grown.get(key) for key in keys}
        moved = [key for key in keys if found[key] is None]
        assert all(found[key] in (key, key.encode()) for key in keys if key not in moved)
        assert 0.1 < len(moved) / len(keys) < 0.45       # about a quarter, not all
        # The moved keys are those the client now sends to the fourth node.
        for key in moved[:20]:
            assert grown.set(key, "again")
            assert holder([fourth], key.encode()) is fourth
    finally:
        fourth.stop()
