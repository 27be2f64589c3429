"""Shared fixtures: real server processes on free ports, and a raw socket client.

Tests start ``python memg.py`` (and, for comparisons, Debian's ``memcached``) as
real processes on free loopback ports, and talk to them with real clients and raw
sockets.
"""

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

pytest_plugins = ["pytester"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMG = os.path.join(ROOT, "memg.py")
sys.path.insert(0, ROOT)

# The engine every server-level suite runs memg on: "threads" (the default),
# "asyncio" (on uvloop) or "asyncio-stdlib" (the standard library's loop), set by
# tests/run.py's passes.  Each maps to memg's command-line arguments and to the
# settings of an embedded memg.Server.  The passes other than threads run only the
# suites that serve over sockets (SERVER_SUITES): the others test the module in
# this process, where the engine makes no difference.
ENGINE = os.environ.get("MEMG_TEST_ENGINE", "threads")
ENGINES = {
    "threads": ([], {"engine": "threads"}),
    "asyncio": (["--engine", "asyncio", "--event-loop", "uvloop"],
                {"engine": "asyncio", "event_loop": "uvloop"}),
    "asyncio-stdlib": (["--engine", "asyncio", "--event-loop", "stdlib"],
                       {"engine": "asyncio", "event_loop": "stdlib"}),
}
ENGINE_ARGS, ENGINE_SETTINGS = ENGINES[ENGINE]
SERVER_SUITES = {"test_cli.py", "test_clients.py", "test_cluster.py", "test_differential.py",
                 "test_engines.py", "test_frameworks.py", "test_memcached_suite.py",
                 "test_seed.py", "test_server.py", "test_server_embedded.py",
                 "test_server_hostile.py", "test_snapshot.py", "test_tls.py", "test_udp.py"}


def pytest_report_header(config):
    return "memg engine: %s" % ENGINE


def pytest_collection_modifyitems(config, items):
    if ENGINE != "threads":
        others = [item for item in items if item.path.name not in SERVER_SUITES]
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item.path.name in SERVER_SUITES]


def embedded(**settings):
    """A memg.Server (not started) on a free port unless settings name one, serving
    with the suite's engine."""
    import memg
    return memg.Server(**{**ENGINE_SETTINGS, "port": 0, **settings})


@dataclasses.dataclass
class Point:
    """A user-defined class: only pickling can store it."""

    x: int
    y: int


# Python values of each kind an application stores through a client library, whose
# serialisation must bring each back with its type.
PYTHON_VALUES = {
    "str": "hello world",
    "unicode": "naïve café ☃",
    "bytes": b"\x00\xffraw bytes",
    "int": 42,
    "negative_int": -7,
    "big_int": 2 ** 70,
    "float": 1.5,
    "list": [1, "two", 3.0],
    "dict": {"a": 1, "b": [2, 3]},
    "tuple": (1, 2),
    "object": Point(3, 4),
}


class Clock:
    """A time.time() stand-in for memg.Store that moves only when told to."""

    def __init__(self, now=None):
        self.now = float(int(time.time())) if now is None else now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def converse(protocol, *chunks, end=True):
    """What a memg.TextProtocol answers to chunks received one after another, then
    (with end) to the end of the input: every reply, the pending ones included, as a
    client that reads everything gets them.  Stops where the protocol closes."""
    out = []
    for chunk in chunks + ((b"",) if end else ()):
        out.append(protocol.receive_data(chunk))
        while protocol.pending:
            out.append(protocol.data_to_send())
        if protocol.closing:
            break
    return b"".join(out)


def copy_project(destination):
    """Copy what pip needs to build memg into destination (a build in the checkout
    would leave build/ and *.egg-info behind); returns the copy's path."""
    destination.mkdir()
    for name in ("memg.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), destination)
    return destination


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# How long something that should happen "at once" (a stop, a close, an event) may
# take: generous, to tell "promptly" from "hangs", never fast from slow.
PROMPTLY = 3.0


def proc_status(pid, field):
    """A /proc/PID/status figure: kB fields (VmRSS, VmSize) in bytes, others as int."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                number = int(line.split()[1])
                return number * 1024 if line.rstrip().endswith("kB") else number
    raise AssertionError("no %s for pid %d" % (field, pid))


def wait_for(condition, timeout=5.0, what="condition"):
    """Poll condition until it returns something true, and return that; fail the
    test if timeout seconds pass first (so ``assert wait_for(...)`` reads well too)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(0.02)


def parse_stats(reply):
    """A ``stats`` reply (bytes: STAT lines, then END) as {name: value} of str; fails
    on anything else in it."""
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""], reply[-200:]
    values = {}
    for line in lines[:-2]:
        word, name, value = line.split(b" ", 2)
        assert word == b"STAT", line
        values[name.decode()] = value.decode()
    return values


def require_tool(name):
    """The path of a system tool the suite needs; fails (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail("%s is not installed; .ci/run installs it (Debian: apt-get install "
                    "memcached libmemcached-tools)" % name)
    return path


class ServerProcess:
    """A server process listening on 127.0.0.1:port, started and waited for.  With
    tls (a client's ssl.SSLContext), connect() speaks TLS, and so does the wait for
    the start (a plain probe would count as a failed handshake)."""

    def __init__(self, argv, port, tls=None, stop_signal=signal.SIGTERM, **popen):
        self.port = port
        self.address = ("127.0.0.1", port)
        self.tls = tls
        self.stop_signal = stop_signal
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, **popen)
        deadline = time.monotonic() + 10
        while True:
            try:
                RawClient(self.address, timeout=1, tls=tls).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    out, err = self.process.communicate()
                    raise RuntimeError("server did not start: %r %r" % (out, err))
                time.sleep(0.02)

    def connect(self, tls=None):
        """A RawClient: over TLS with the server's client context, or tls if given."""
        return RawClient(self.address, tls=tls or self.tls)

    def stop(self):
        """Stop the server with its stop_signal; returns (exit code, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
        try:
            _, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def start_memg(*args, port=None, tls=None, **popen):
    """memg on the suite's engine with args; tls: see ServerProcess; popen goes to
    subprocess.Popen (env=, preexec_fn= ...)."""
    port = port or free_port()
    return ServerProcess([sys.executable, MEMG, "-p", str(port)] + ENGINE_ARGS + list(args),
                         port, tls, **popen)


def start_memcached(*args, port=None, tls=None, **popen):
    port = port or free_port()
    argv = [require_tool("memcached"), "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    # (memcached looks at a SIGTERM once a second; how it exits is not under test.)
    return ServerProcess(argv + list(args), port, tls, stop_signal=signal.SIGKILL, **popen)


class RawClient:
    """A TCP connection (plain, or TLS) for byte-exact conversations."""

    def __init__(self, address, timeout=5.0, receive_buffer=None, tls=None):
        """receive_buffer: a small SO_RCVBUF (set before connecting, as the window is
        agreed then), so that the server's replies back up soon when we do not read;
        tls: an ssl.SSLContext to shake hands with once connected (a failed
        handshake raises ssl.SSLError, an OSError)."""
        if receive_buffer is None:
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        if tls is not None:
            try:
                self.sock = tls.wrap_socket(self.sock, server_hostname=address[0])
            except BaseException:
                self.sock.close()
                raise

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        data = bytearray()             # (bytes += would copy it all at every piece)
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def recv_until(self, terminator=b"\r\n"):
        """Bytes up to and including terminator (or whatever came before EOF).  In
        time linear in their length: a streamed dump of many megabytes comes in
        thousands of pieces."""
        chunks, tail = [], b""
        while not tail.endswith(terminator):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            tail = (tail + chunk)[-len(terminator):]
        return b"".join(chunks)

    def request(self, data, terminator=b"\r\n"):
        self.send(data)
        return self.recv_until(terminator)

    def converse(self, data):
        """Send data, close our sending side, and return everything the server says
        until it closes: the whole reply to a script, however it ends."""
        self.send(data)
        self.sock.shutdown(socket.SHUT_WR)
        return self.read_to_eof()

    def read_to_eof(self):
        chunks = []
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def is_closed(self, timeout=2.0):
        """Whether the server closed the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def stats(client_or_address, group=b""):
    """``stats`` (or ``stats <group>``) as {name: value} of str, asked on a RawClient,
    or on a new connection to an address (or to a server's ``.address``)."""
    command = b"stats" + (b" " + group if group else b"") + b"\r\n"
    if isinstance(client_or_address, RawClient):
        return parse_stats(client_or_address.request(command, b"END\r\n"))
    with RawClient(getattr(client_or_address, "address", client_or_address)) as client:
        return parse_stats(client.request(command, b"END\r\n"))


def set_many(client, keys, value, exptime=0, batch=5000):
    """Store value under each key (bytes) over a RawClient, fast: sets pipelined
    with noreply, a batch at a time, each batch ended by ``mn`` and its ``MN``
    awaited, so that all are stored when this returns."""
    keys = list(keys)
    for start in range(0, len(keys), batch):
        client.send(b"".join(b"set %s 0 %d %d noreply\r\n%s\r\n" % (
            key, exptime, len(value), value) for key in keys[start:start + batch]) + b"mn\r\n")
        assert client.recv_until(b"MN\r\n") == b"MN\r\n"


# -- TLS: certificates made for the session ----------------------------------------------

# What each certificate may do (openssl x509 -extfile sections): a CA signs; a server
# certificate is for 127.0.0.1 (by IP address, as clients check it); a client's
# identifies its holder.
CERTIFICATE_EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclasses.dataclass
class Certificates:
    """PEM files made by the openssl command for one test session, valid a few days:
    two CAs, "ca" and "other_ca", each with a server certificate for 127.0.0.1
    ("server", "other_server") and a client certificate ("client", "other_client"),
    and their keys."""

    folder: str

    def pem(self, name):
        return os.path.join(self.folder, name + ".pem")

    def key(self, name):
        return os.path.join(self.folder, name + ".key")

    def server_args(self, *options, cert="server"):
        """memg's and memcached's -Z with this session's server certificate (and, as
        -o options, any other of options)."""
        return ["-Z", "-o", ",".join(("ssl_chain_cert=" + self.pem(cert),
                                      "ssl_key=" + self.key(cert)) + options)]

    def client_context(self, cert="client", trust=("ca",), minimum=None, maximum=None):
        """A client's TLS context that trusts the CAs named in trust and shows the
        certificate cert (None: none), checking that the server is 127.0.0.1."""
        context = ssl.create_default_context(cafile=self.pem(trust[0]))
        for name in trust[1:]:
            context.load_verify_locations(self.pem(name))
        if cert is not None:
            context.load_cert_chain(self.pem(cert), self.key(cert))
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        return context


def make_certificates(folder, days=3):
    """A Certificates in folder, made with the openssl command (EC keys: quick)."""
    openssl = require_tool("openssl")
    extensions = os.path.join(folder, "extensions.cnf")
    with open(extensions, "w") as file:
        file.write(CERTIFICATE_EXTENSIONS)

    def run(*args):
        subprocess.run([openssl] + list(args), cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def make(name, kind, subject, issuer=None):
        run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", name + ".key", "-out", name + ".csr", "-subj", subject)
        signer = (["-CA", issuer + ".pem", "-CAkey", issuer + ".key"] if issuer
                  else ["-signkey", name + ".key"])
        run("x509", "-req", "-in", name + ".csr", "-days", str(days), "-sha256",
            "-set_serial", "0x" + secrets.token_hex(8), "-extfile", extensions,
            "-extensions", kind, "-out", name + ".pem", *signer)
        os.unlink(os.path.join(folder, name + ".csr"))

    for prefix, unit in (("", "first"), ("other_", "other")):
        organisation = "/O=memg tests/OU=" + unit
        make(prefix + "ca", "ca", "/CN=memg test CA" + organisation)
        make(prefix + "server", "server", "/CN=127.0.0.1" + organisation, prefix + "ca")
        make(prefix + "client", "client", "/CN=memg test client" + organisation,
             prefix + "ca")
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)     # memcached may read as another user
    os.chmod(folder, 0o755)
    return Certificates(folder)


def tls_refusal(address, context, command=b"set refused 0 0 1\r\nx\r\n"):
    """How a TLS client with context that sends command is turned away: the reason of
    the TLS error (the server's alert) that ends its handshake or its first read (a
    server checks a TLS 1.3 client's certificate after the client has finished its
    part of the handshake), "closed" if the connection just ends, None if command
    is answered."""
    try:
        client = RawClient(address, tls=context)
    except ssl.SSLError as error:
        return "closed" if isinstance(error, ssl.SSLEOFError) else error.reason
    except ConnectionError:
        return "closed"
    with client:
        try:
            client.send(command)
        except OSError:
            pass                     # closed already: what it said is still to be read
        try:
            return None if client.sock.recv(4096) else "closed"
        except ssl.SSLError as error:
            return "closed" if isinstance(error, ssl.SSLEOFError) else error.reason
        except ConnectionError:
            return "closed"


def client_hello(context=None):
    """The first bytes a TLS client sends (its ClientHello record)."""
    context = context or ssl.create_default_context()
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake finished without a server")


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    return make_certificates(str(tmp_path_factory.mktemp("certificates")))


@pytest.fixture(scope="session")
def memg_process():
    server = start_memg()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def memcached_process():
    server = start_memcached()
    yield server
    server.stop()


@pytest.fixture
def memg(memg_process):
    """The shared memg process, flushed: each test starts with an empty cache."""
    with memg_process.connect() as client:
        assert client.request(b"flush_all\r\n") == b"OK\r\n"
    return memg_process


@pytest.fixture
def client(memg):
    """A raw connection to an empty memg."""
    with memg.connect() as raw:
        yield raw
