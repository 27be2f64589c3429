"""The pytest plugin (memg.py section 7), as another project's test suite meets it.

``pip install memg`` registers the plugin; a test that names the ``memg_server``
fixture gets a memg serving from the test process, emptied before every test (with
the settings of the ``memg_settings`` fixture, which a project may override), or,
with ``--memg-external HOST:PORT``, a server the run did not start.  These tests run
pytest on small test files: in this environment through pytester, and once in a
fresh virtual environment that has nothing but pip-installed memg and pytest.
"""

import subprocess
import venv

import pytest

from conftest import ENGINES, copy_project, start_memcached

# A test module of the kind a user writes: only the fixture and the standard library;
# its tests (USER_CASES) after how it reaches the server (a ``request`` function).
PLAIN_REQUEST = '''
import socket


def request(address, data):
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        return sock.makefile("rb").readline()
'''
USER_CASES = '''

def test_store(memg_server):
    assert request(memg_server.address, b"set k 0 0 1\\r\\nv\\r\\n") == b"STORED\\r\\n"
    assert request(memg_server.address, b"get k\\r\\n") == b"VALUE k 0 1\\r\\n"


def test_starts_empty(memg_server):
    assert request(memg_server.address, b"get k\\r\\n") == b"END\\r\\n"
'''
USER_TESTS = PLAIN_REQUEST + USER_CASES


def test_fixture_serves_every_test_an_empty_cache(pytester):
    pytester.makepyfile(USER_TESTS)
    pytester.runpytest().assert_outcomes(passed=2)


def test_fixture_is_one_embedded_server_for_the_whole_session(pytester):
    pytester.makepyfile('''
        import memg

        seen = []

        def test_first(memg_server):
            assert isinstance(memg_server, memg.Server)
            seen.append(memg_server)

        def test_second(memg_server):
            assert memg_server is seen[0]
            assert memg_server.address[0] == "127.0.0.1" and memg_server.address[1] > 0
    ''')
    pytester.runpytest().assert_outcomes(passed=2)


def test_fixture_points_at_an_external_memcached(pytester):
    memcached = start_memcached()
    try:
        pytester.makepyfile(USER_TESTS + '''

def test_is_the_real_thing(memg_server):
    assert request(memg_server.address, b"version\\r\\n").startswith(b"VERSION 1.")
    assert b"memg" not in request(memg_server.address, b"version\\r\\n")
''')
        result = pytester.runpytest("--memg-external", "127.0.0.1:%d" % memcached.port)
        result.assert_outcomes(passed=3)
    finally:
        memcached.stop()


def test_a_malformed_external_address_is_reported(pytester):
    pytester.makepyfile(USER_TESTS)
    result = pytester.runpytest("--memg-external", "nowhere")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*--memg-external wants HOST:PORT*"])


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_project_gives_the_server_settings_sasl_among_them(pytester, engine):
    """A project's conftest.py overrides memg_settings: the session's server then
    requires SASL (-S) with the project's password file, and serves bmemcached with
    the password; on each engine, as the project chooses."""
    pytester.path.joinpath("users").write_text("alice:secret\n")
    pytester.makeconftest('''
        import pathlib

        import pytest


        @pytest.fixture(scope="session")
        def memg_settings():
            return dict(SETTINGS, sasl=True,
                        sasl_pwdb=str(pathlib.Path(__file__).parent / "users"))
    '''.replace("SETTINGS", repr(ENGINES[engine][1])))
    pytester.makepyfile('''
        import socket
        import struct

        import bmemcached
        import pytest
        from bmemcached.exceptions import MemcachedException

        HEADER = struct.Struct(">BBHBBHIIQ")


        def test_an_unauthenticated_binary_get_is_refused_and_closed(memg_server):
            with socket.create_connection(memg_server.address, timeout=5) as sock:
                sock.sendall(HEADER.pack(0x80, 0x00, 1, 0, 0, 0, 1, 0, 0) + b"k")
                reply = sock.makefile("rb").read()          # to the close
            assert HEADER.unpack(reply[:24])[5] == 0x20     # auth error
            assert reply[24:] == b"Auth failure."


        def test_the_password_is_served(memg_server):
            client = bmemcached.Client(["%s:%d" % memg_server.address], "alice", "secret")
            assert client.set("k", "v")
            assert client.get("k") == "v"
            client.disconnect_all()


        def test_a_wrong_password_is_refused(memg_server):
            client = bmemcached.Client(["%s:%d" % memg_server.address], "alice", "wrong")
            with pytest.raises(MemcachedException):
                client.set("k", "v")
            client.disconnect_all()


        def test_the_settings_are_the_servers(memg_server):
            assert memg_server.settings.sasl and memg_server.settings.protocol == "binary"
            assert memg_server.settings.engine == ENGINE
    '''.replace("ENGINE", repr(ENGINES[engine][1]["engine"])))
    pytester.runpytest().assert_outcomes(passed=4)


def test_a_test_starts_from_a_prepared_cache(pytester):
    """A project keeps a snapshot of the cache its tests expect (made once with
    memg.Server.save) and loads it into the fixture's server."""
    import memg
    with memg.Server(port=0) as server:
        server.store.store(memg.SET, b"greeting", b"hello", flags=3)
        server.save(str(pytester.path / "prepared.snapshot"))
    pytester.makepyfile(USER_TESTS + '''

import pathlib


def test_prepared(memg_server):
    assert memg_server.load(str(pathlib.Path(__file__).parent / "prepared.snapshot")) == 1
    assert request(memg_server.address, b"get greeting\\r\\n") == b"VALUE greeting 3 5\\r\\n"
''')
    pytester.runpytest().assert_outcomes(passed=3)


def test_the_option_is_in_pytest_help(pytester):
    pytester.runpytest("--help").stdout.fnmatch_lines(["*--memg-external=HOST:PORT*"])


def test_a_fresh_environment_needs_nothing_but_pip_install(tmp_path):
    """The issue's promise: pip install memg (and pytest), and the fixture works."""
    environment = tmp_path / "env"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(copy_project(tmp_path / "source")), "pytest"],
                   check=True, timeout=600)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "test_user.py").write_text(USER_TESTS)
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=str(tmp_path / "project"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
