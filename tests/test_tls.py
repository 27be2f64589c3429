"""TLS (-Z), as memcached 1.6.18 serves it, on the suite's engine.

The certificates are made by the session (conftest.certificates: two throwaway CAs,
each with a server certificate for 127.0.0.1 and a client certificate).  What this
file shows:

* both protocols over TLS, byte for byte, with raw TLS sockets, and real clients
  (pymemcache, emcache) storing and reading over TLS;
* an embedded memg.Server and the pytest fixture serve TLS from an ssl.SSLContext or
  from the same file settings as the command line;
* client certificates: ssl_verify_mode=2 turns away a client without one, or with
  one from another CA, before it can run a command, and serves a good one;
* -l notls: keeps a listener plain while the others speak TLS;
* refresh_certs swaps the certificate under live clients, and one that fails
  answers memcached's error and leaves the old certificate serving;
* stats settings shows the ssl_* settings as memcached -Z does;
* failed and stalled handshakes are counted (ssl_handshake_errors) and cost their
  connection only;
* what memg refuses to start with, in one line.

tests/test_differential.py compares memg -Z with memcached -Z, and
tests/test_server_hostile.py sends hostile TLS input.
"""

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import emcache
import pytest
from pymemcache.client.base import Client as PymemcacheClient

from conftest import (ENGINE_ARGS, ENGINE_SETTINGS, MEMG, RawClient, client_hello, embedded,
                      free_port, start_memg, stats, tls_refusal, wait_for)
from test_binary import Op, check, counter, hit, number, parse, request, response, store
from test_differential import both
from test_plugin import USER_CASES

# Longer than a TLS record (16 KiB), so that values and replies span many.
BIG = bytes(range(256)) * 1000


def tls_memg(certificates, *options, **start):
    """memg -Z with the session's server certificate and -o options; its connect()
    speaks TLS with the client certificate."""
    return start_memg(*certificates.server_args(*options),
                      tls=start.pop("tls", None) or certificates.client_context(), **start)


@pytest.fixture(scope="module")
def server(certificates):
    process = tls_memg(certificates)
    yield process
    process.stop()


@pytest.fixture
def memg(server):
    """The module's TLS memg, flushed."""
    with server.connect() as client:
        assert client.request(b"flush_all\r\n") == b"OK\r\n"
    return server


def peer_unit(client):
    """The organisational unit of the certificate's issuer a client was shown:
    "first" (ca) or "other" (other_ca)."""
    issuer = dict(pair for part in client.sock.getpeercert()["issuer"] for pair in part)
    return issuer["organizationalUnitName"]


# -- both protocols over TLS ------------------------------------------------------------

def test_text_protocol_over_tls(memg):
    with memg.connect() as client:
        assert client.sock.version() == "TLSv1.3"          # (no minimum: the newest)
        # Pipelined, commands after a value of many records (memcached 1.6.18 leaves
        # those in OpenSSL's buffer, and stalls), and a reply of many records.
        client.send(b"set big 5 0 %d\r\n%s\r\nset a 0 0 1\r\n1\r\nincr a 41\r\nmg a v\r\n"
                    b"get big a\r\n" % (len(BIG), BIG))
        assert client.recv_until(b"END\r\n") == (
            b"STORED\r\nSTORED\r\n42\r\nVA 2\r\n42\r\nVALUE big 5 %d\r\n%s\r\n"
            b"VALUE a 0 2\r\n42\r\nEND\r\n" % (len(BIG), BIG))


def test_a_multi_get_larger_than_the_output_bound_over_tls(memg):
    # Over 256 KiB of replies: memg makes them a step at a time (protocol.pending).
    keys = [b"k%d" % i for i in range(8)]
    with memg.connect() as client:
        for key in keys:
            assert client.request(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(BIG), BIG)) == (
                b"STORED\r\n")
        reply = client.request(b"get " + b" ".join(keys) + b"\r\n", b"END\r\n")
    assert reply == b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(BIG), BIG)
                             for key in keys) + b"END\r\n"


def test_binary_protocol_over_tls(memg):
    with memg.connect() as client:
        client.send(store(Op.SET, b"k", BIG, flags=3) + counter(Op.INCREMENT, b"n", 2, 40)
                    + counter(Op.INCREMENT, b"n", 2) + request(Op.GET, b"k")
                    + request(Op.GETQ, b"missing") + request(Op.NOOP))
        replies = client.recv_until(response(Op.NOOP))
    cas = [packet.cas for packet in parse(replies)]
    assert 0 < cas[0] < cas[1] < cas[2]
    check(replies, response(Op.SET, cas=cas[0]), number(Op.INCREMENT, 40, cas[1]),
          number(Op.INCREMENT, 42, cas[2]), hit(Op.GET, BIG, flags=3, cas=cas[0]),
          response(Op.NOOP))


def test_a_watcher_over_tls_gets_its_lines_and_leaves_cleanly(memg):
    with memg.connect() as watcher:
        assert watcher.request(b"watch fetchers\r\n") == b"OK\r\n"
        with memg.connect() as client:
            assert client.request(b"get watched\r\n") == b"END\r\n"
        assert b"key=watched" in watcher.recv_until(b"\n")
    with memg.connect() as client:
        # Only this client is left (the watcher's end was seen over TLS).
        wait_for(lambda: stats(client)["curr_connections"] == "1",
                 what="the watcher's connection to close")


# -- real clients -----------------------------------------------------------------------

def test_pymemcache_over_tls(memg, certificates):
    client = PymemcacheClient(memg.address, connect_timeout=5, timeout=5,
                              tls_context=ssl.create_default_context(
                                  cafile=certificates.pem("ca")))
    try:
        assert client.set("greeting", "Hello World", noreply=False)
        assert client.get("greeting") == b"Hello World"
        assert client.set_many({"a": BIG, "b": b"2"}, noreply=False) == []
        assert client.get_many(["a", "b", "c"]) == {"a": BIG, "b": b"2"}
        assert client.incr("b", 40) == 42
        assert client.delete("a", noreply=False)
        assert client.get("a") is None
    finally:
        client.close()


def test_pymemcache_with_a_client_certificate_under_verify_mode_2(certificates):
    server = tls_memg(certificates, "ssl_verify_mode=2", "ssl_ca_cert=" + certificates.pem("ca"))
    try:
        context = ssl.create_default_context(cafile=certificates.pem("ca"))
        context.load_cert_chain(certificates.pem("client"), certificates.key("client"))
        client = PymemcacheClient(server.address, connect_timeout=5, timeout=5,
                                  tls_context=context)
        assert client.set("k", "v", noreply=False)
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.stop()


def test_emcache_over_tls(memg, certificates):
    async def use():
        client = await emcache.create_client(
            [emcache.MemcachedHostAddress(*memg.address)], timeout=5, ssl=True,
            ssl_verify=True, ssl_extra_ca=certificates.pem("ca"))
        try:
            await client.set(b"greeting", b"Hello World", flags=7)
            await client.set(b"big", BIG)
            item = await client.get(b"greeting", return_flags=True)
            items = await client.get_many([b"greeting", b"big", b"missing"])
            return item, {key: value.value for key, value in items.items()}
        finally:
            await client.close()

    item, items = asyncio.run(use())
    assert (item.value, item.flags) == (b"Hello World", 7)
    assert items == {b"greeting": b"Hello World", b"big": BIG}


def test_a_client_that_does_not_trust_the_ca_refuses_memg(memg, certificates):
    with pytest.raises(ssl.SSLCertVerificationError):
        RawClient(memg.address, tls=certificates.client_context(trust=("other_ca",)))


# -- an embedded memg.Server and the pytest fixture ----------------------------------------

def server_context(certificates, name="server"):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.pem(name), certificates.key(name))
    return context


def test_embedded_server_serves_tls_from_an_ssl_context(certificates):
    with embedded(ssl_context=server_context(certificates)) as server:
        with RawClient(server.address, tls=certificates.client_context()) as client:
            assert client.request(b"set k 0 0 1\r\nv\r\nget k\r\n", b"END\r\n") == (
                b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
            assert stats(client, b"settings")["ssl_enabled"] == "yes"
            # The certificate is the context's, not a file's: there is nothing to load.
            assert client.request(b"refresh_certs\r\n").startswith(b"Error ")
            assert client.request(b"version\r\n").startswith(b"VERSION ")
        with RawClient(server.address) as plain:
            plain.send(b"version\r\n")
            assert plain.is_closed()


def test_embedded_server_serves_tls_from_the_file_settings(certificates):
    settings = dict(ssl_enabled=True, ssl_chain_cert=certificates.pem("server"),
                    ssl_key=certificates.key("server"), ssl_verify_mode=2,
                    ssl_ca_cert=certificates.pem("ca"))
    with embedded(**settings) as server:
        with RawClient(server.address, tls=certificates.client_context()) as client:
            assert client.request(b"set k 0 0 1\r\nv\r\nget k\r\n", b"END\r\n") == (
                b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
            assert stats(client, b"settings")["ssl_chain_cert"] == certificates.pem("server")
        assert tls_refusal(server.address, certificates.client_context(cert=None)) is not None


@pytest.mark.parametrize("given", ["context", "files"])
def test_the_pytest_fixture_serves_tls_with_a_projects_settings(pytester, certificates, given):
    tls = {"context": "ssl_context=context", "files": (
        "ssl_enabled=True, ssl_chain_cert=CERT, ssl_key=KEY")}[given]
    pytester.makeconftest('''
        import ssl

        import pytest


        @pytest.fixture(scope="session")
        def memg_settings():
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(CERT, KEY)
            return dict(SETTINGS, TLS)
    '''.replace("SETTINGS", repr(ENGINE_SETTINGS)).replace("TLS", tls)
       .replace("CERT", repr(certificates.pem("server")))
       .replace("KEY", repr(certificates.key("server"))))
    pytester.makepyfile('''
import socket
import ssl

CONTEXT = ssl.create_default_context(cafile=CA)


def request(address, data):
    with socket.create_connection(address, timeout=5) as plain:
        with CONTEXT.wrap_socket(plain, server_hostname=address[0]) as sock:
            sock.sendall(data)
            return sock.makefile("rb").readline()
'''.replace("CA", repr(certificates.pem("ca"))) + USER_CASES)
    pytester.runpytest().assert_outcomes(passed=2)


# -- client certificates ----------------------------------------------------------------

@pytest.fixture(scope="module")
def verifying(certificates):
    """memg requiring a client certificate signed by the first CA."""
    process = tls_memg(certificates, "ssl_verify_mode=2", "ssl_ca_cert=" + certificates.pem("ca"))
    yield process
    process.stop()


TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
@pytest.mark.parametrize("cert", [None, "other_client"], ids=["no-certificate", "other-ca"])
def test_verify_mode_2_turns_away_a_client_before_any_command(verifying, certificates, cert,
                                                              version):
    context = certificates.client_context(cert=cert, maximum=TLS_VERSIONS[version])
    assert tls_refusal(verifying.address, context, b"set refused 0 0 1\r\nx\r\n") is not None
    with verifying.connect() as client:
        assert client.request(b"get refused\r\n") == b"END\r\n"


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
def test_verify_mode_2_serves_a_client_with_a_good_certificate(verifying, certificates, version):
    context = certificates.client_context(maximum=TLS_VERSIONS[version])
    with verifying.connect(tls=context) as client:
        assert client.sock.version() == version
        assert client.request(b"set k 0 0 1\r\nv\r\nget k\r\n", b"END\r\n") == (
            b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n")


def test_verify_mode_1_checks_a_certificate_only_if_given(certificates):
    server = tls_memg(certificates, "ssl_verify_mode=1", "ssl_ca_cert=" + certificates.pem("ca"))
    try:
        assert tls_refusal(server.address, certificates.client_context(cert=None),
                           b"version\r\n") is None
        assert tls_refusal(server.address, certificates.client_context(cert="other_client"),
                           b"version\r\n") is not None
    finally:
        server.stop()


def test_min_version_3_refuses_tls_1_2(certificates):
    server = tls_memg(certificates, "ssl_min_version=3")
    try:
        old = certificates.client_context(maximum=ssl.TLSVersion.TLSv1_2)
        assert tls_refusal(server.address, old, b"version\r\n") is not None
        with server.connect() as client:
            assert client.sock.version() == "TLSv1.3"
    finally:
        server.stop()


def test_ssl_ciphers_chooses_the_tls_1_2_cipher(certificates):
    cipher = "ECDHE-ECDSA-AES128-GCM-SHA256"
    server = tls_memg(certificates, "ssl_ciphers=" + cipher)
    try:
        with server.connect(tls=certificates.client_context(
                maximum=ssl.TLSVersion.TLSv1_2)) as client:
            assert client.sock.cipher()[0] == cipher
            assert client.request(b"version\r\n").startswith(b"VERSION ")
    finally:
        server.stop()


# -- notls: ------------------------------------------------------------------------------

def test_notls_keeps_one_listener_plain(certificates):
    plain_port = free_port()
    server = start_memg("-l", "notls:127.0.0.1:%d,127.0.0.1" % plain_port,
                        *certificates.server_args(), tls=certificates.client_context())
    try:
        with server.connect() as secure:
            assert secure.request(b"set k 0 0 7\r\nsecured\r\n") == b"STORED\r\n"
        with RawClient(("127.0.0.1", plain_port)) as plain:
            assert plain.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 7\r\nsecured\r\nEND\r\n"
        # The TLS listener takes no plain text.
        with RawClient(server.address) as plain:
            plain.send(b"get k\r\n")
            assert plain.is_closed()
    finally:
        server.stop()


# -- refresh_certs -------------------------------------------------------------------------

@pytest.fixture
def swappable(certificates, tmp_path):
    """put(name): copy certificate name and its key to where a server started with
    args reads them; the first CA's server certificate is there at first."""
    tmp_path.chmod(0o755)
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")

    def put(name):
        shutil.copy(certificates.pem(name), cert)
        shutil.copy(certificates.key(name), key)
        for path in (cert, key):
            os.chmod(path, 0o644)

    put("server")
    put.args = ["-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (cert, key)]
    put.cert, put.key = cert, key
    return put


class Busy:
    """A client doing set/get round trips in a thread while the test runs; finish()
    asserts that every one was answered right."""

    def __init__(self, client):
        self.client = client
        self.rounds = 0
        self.errors = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            while not self.stopping.is_set():
                value = b"%d" % self.rounds
                reply = self.client.request(b"set busy 0 0 %d\r\n%s\r\nget busy\r\n" % (
                    len(value), value), b"END\r\n")
                if reply != b"STORED\r\nVALUE busy 0 %d\r\n%s\r\nEND\r\n" % (len(value), value):
                    self.errors.append(reply)
                self.rounds += 1
                time.sleep(0.005)
        except OSError as error:
            self.errors.append(repr(error))

    def finish(self):
        wait_for(lambda: self.rounds >= 20 or not self.thread.is_alive(),
                 what="the busy client's round trips")
        self.stopping.set()
        self.thread.join(10)
        assert self.errors == []


def test_refresh_certs_swaps_the_certificate_under_live_clients(certificates, swappable):
    both = certificates.client_context(trust=("ca", "other_ca"))
    server = start_memg(*swappable.args, tls=both)
    try:
        before, busy = server.connect(), Busy(server.connect())
        assert peer_unit(before) == "first"
        time.sleep(1.1)            # (time_since_server_cert_refresh counts seconds)
        assert int(stats(before)["time_since_server_cert_refresh"]) >= 1
        swappable("other_server")
        assert before.request(b"refresh_certs\r\n") == b"OK\r\n"
        assert int(stats(before)["time_since_server_cert_refresh"]) == 0
        with server.connect() as after:
            assert peer_unit(after) == "other"
            assert after.request(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        # A client that trusts only the first CA now refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            server.connect(tls=certificates.client_context())
        # The connection made before keeps its session, and is served.
        assert peer_unit(before) == "first"
        assert before.request(b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
        busy.finish()
        before.close()
        busy.client.close()
    finally:
        server.stop()


@pytest.mark.parametrize("spoil", ["chain", "key"])
def test_a_refresh_that_fails_leaves_the_old_certificate_serving(certificates, swappable, spoil):
    server = start_memg(*swappable.args, tls=certificates.client_context())
    try:
        with server.connect() as client:
            with open(swappable.cert if spoil == "chain" else swappable.key, "w") as file:
                file.write("garbage\n")
            reply = client.request(b"refresh_certs\r\n")
            # memcached's words: "Error loading the certificate chain: FILE : why" (the
            # key: "Error loading the key: FILE : why"), one line.
            assert reply.startswith(b"Error loading the ") and reply.count(b"\r\n") == 1, reply
            with server.connect() as later:
                assert peer_unit(later) == "first"
                assert later.request(b"version\r\n").startswith(b"VERSION ")
            swappable("other_server")
            with server.connect() as later:    # (not refreshed yet)
                assert peer_unit(later) == "first"
            assert client.request(b"refresh_certs\r\n") == b"OK\r\n"
            with server.connect(tls=certificates.client_context(trust=("other_ca",))) as later:
                assert peer_unit(later) == "other"
    finally:
        server.stop()


def test_refresh_certs_without_tls_is_an_error(certificates):
    server = start_memg()
    try:
        with server.connect() as client:
            assert client.request(b"refresh_certs\r\n") == b"Error TLS not enabled\r\n"
    finally:
        server.stop()


# -- stats ----------------------------------------------------------------------------------

def ssl_settings(server):
    with server.connect() as client:
        reply = client.request(b"stats settings\r\n", b"END\r\n")
    return [line for line in reply.split(b"\r\n") if line.startswith(b"STAT ssl_")]


@pytest.mark.parametrize("options", [
    [],
    ["ssl_verify_mode=1", "ssl_ca_cert=CA"],
    ["ssl_verify_mode=2", "ssl_ca_cert=CA"],
    ["ssl_verify_mode=3", "ssl_ca_cert=CA"],
    ["ssl_ciphers=ECDHE-ECDSA-AES128-GCM-SHA256", "ssl_min_version=3", "ssl_wbuf_size=64"],
    ["ssl_min_version=1", "ssl_session_cache"],
], ids=lambda options: ",".join(options) or "default")
def test_stats_settings_shows_the_ssl_settings_as_memcached(certificates, options):
    options = [option.replace("CA", certificates.pem("ca")) for option in options]
    with both(lambda start: start(*certificates.server_args(*options),
                                  tls=certificates.client_context(
                                      minimum=ssl.TLSVersion.TLSv1_2))) as servers:
        lines = [ssl_settings(server) for server in servers]
    assert lines[0] == lines[1]
    assert b"STAT ssl_enabled yes" in lines[0]


def test_stats_settings_without_tls_as_memcached():
    with both(lambda start: start()) as servers:
        lines = [ssl_settings(server) for server in servers]
    assert lines[0] == lines[1]
    assert b"STAT ssl_enabled no" in lines[0]


@pytest.mark.parametrize("options", [[], ["ssl_session_cache"]],
                         ids=lambda options: ",".join(options) or "default")
def test_stats_names_the_tls_figures_as_memcached(certificates, options):
    # (t/stats.t counts 85 figures under SSL_TEST=1; ssl_session_cache adds one.)
    def names(server):
        with server.connect() as client:
            return list(stats(client))

    with both(lambda start: start(*certificates.server_args(*options),
                                  tls=certificates.client_context())) as servers:
        memg_names, memcached_names = map(names, servers)
    assert memg_names == memcached_names
    assert ("ssl_new_sessions" in memg_names) == bool(options)
    assert "time_since_server_cert_refresh" in memg_names


def test_stats_counts_new_tls_sessions_not_resumed_ones(certificates):
    context = certificates.client_context(maximum=ssl.TLSVersion.TLSv1_2)
    server = tls_memg(certificates, "ssl_session_cache", tls=context)
    try:
        with server.connect() as first:
            before = int(stats(first)["ssl_new_sessions"])
            session = first.sock.session
        resumed = context.wrap_socket(socket.create_connection(server.address),
                                      server_hostname="127.0.0.1", session=session)
        with resumed:
            assert resumed.session_reused
            with server.connect() as new:
                assert int(stats(new)["ssl_new_sessions"]) == before + 1
    finally:
        server.stop()


def closed_after_all_it_says(client, timeout=5.0):
    """Whether the server closes client within timeout, after whatever it sends."""
    client.sock.settimeout(timeout)
    try:
        while client.sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


def test_failed_and_stalled_handshakes_are_counted_and_closed(certificates):
    server = tls_memg(certificates, "idle_timeout=1")
    try:
        def handshake_errors():
            with server.connect() as client:
                return int(stats(client)["ssl_handshake_errors"])

        assert handshake_errors() == 0
        hello = client_hello()
        failing = {
            "plain text": b"version\r\n",
            "a garbage record": b"\x17\x03\x03\x00\x10" + b"x" * 16,
            "a record header claiming 64 KiB": b"\x16\x03\x01\xff\xff" + b"x" * 100,
            "a ClientHello then garbage": hello + b"\x16\x03\x03\x00\x04junk",
        }
        stalled = {"never a handshake": b"", "a ClientHello cut half-way":
                   hello[:len(hello) // 2]}
        clients = []
        for payload in list(failing.values()) + list(stalled.values()):
            clients.append(RawClient(server.address))
            clients[-1].send(payload)
        for client, name in zip(clients, list(failing) + list(stalled)):
            # (The stalled ones at the idle timeout; an alert may come first.)
            assert closed_after_all_it_says(client), name
            client.close()
        wait_for(lambda: handshake_errors() == len(failing) + len(stalled),
                 what="every failed handshake to count")
        with server.connect() as client:
            assert stats(client)["curr_connections"] == "1"
    finally:
        server.stop()


def test_a_client_closed_by_the_server_is_told_with_a_close_notify(certificates):
    """Every close that memg makes (here: an idle client's, and a protocol error's)
    ends the session with a close_notify, as memcached's SSL_shutdown does: the
    client reads a clean end, not an EOF in violation of the protocol (after which
    a client may write into a reset and die of SIGPIPE, as memcached's own
    t/idle-timeout.t does over TLS)."""
    server = tls_memg(certificates, "idle_timeout=1")
    context = certificates.client_context()
    try:
        idle, erring = (context.wrap_socket(socket.create_connection(server.address, timeout=5),
                                            server_hostname=server.address[0],
                                            suppress_ragged_eofs=False) for _ in range(2))
        with idle, erring:
            idle.sendall(b"version\r\n")
            assert idle.recv(100).startswith(b"VERSION ")
            erring.sendall(b"GET / HTTP/1.1\r\n")
            for client in (erring, idle):
                assert client.recv(100) == b""       # (SSLEOFError without a close_notify)
    finally:
        server.stop()


# -- what memg refuses to start with --------------------------------------------------------

def refusal(*args):
    """memg's stderr when it refuses args (it must exit by itself, not zero)."""
    process = subprocess.run([sys.executable, MEMG] + ENGINE_ARGS + list(args),
                             capture_output=True, text=True, timeout=10)
    assert process.returncode != 0
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    return lines[0]


# (memg's arguments, what its line names); CERT, KEY and CLIENT_KEY stand for the
# session's files.
REFUSALS = [
    ("no-certificate", ["-Z"], "ssl_chain_cert"),
    # memcached: "Error loading the key: FILE : ... key values mismatch".
    ("key-not-the-certificates", ["-Z", "-o", "ssl_chain_cert=CERT,ssl_key=CLIENT_KEY"],
     "CLIENT_KEY"),
    ("no-such-certificate", ["-Z", "-o", "ssl_chain_cert=CERTx,ssl_key=KEY"], "CERTx"),
    ("notls-without-tls", ["-l", "notls:127.0.0.1"], "notls"),
    ("no-tcp-port", ["-p", "0", "-Z", "-o", "ssl_chain_cert=CERT,ssl_key=KEY"], "TCP port"),
    ("bad-verify-mode", ["-Z", "-o", "ssl_chain_cert=CERT,ssl_key=KEY,ssl_verify_mode=4"],
     "ssl_verify_mode"),
    ("bad-ciphers", ["-Z", "-o", "ssl_chain_cert=CERT,ssl_key=KEY,ssl_ciphers=NOPE"], "NOPE"),
]


@pytest.mark.parametrize("args, named", [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
def test_refused_at_start_up_with_one_line(certificates, args, named):
    files = {"CLIENT_KEY": certificates.key("client"), "CERT": certificates.pem("server"),
             "KEY": certificates.key("server")}

    def fill(text):
        for name, path in files.items():
            text = text.replace(name, path)
        return text

    assert fill(named) in refusal("-p", str(free_port()), *map(fill, args))
