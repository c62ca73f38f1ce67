"""Keys, the authentication handshake, and hostile or broken input reaching the master.

Every test runs a real master (see conftest.py) and talks to it either as a normal client or over raw
sockets on 127.0.0.1. Whatever one connection sends, only that connection may suffer.
"""

from __future__ import annotations

import os
import platform
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import read_frame, recv_exact, wait_until

import clusterexec
from clusterexec import AuthenticationError, ClusterExecutor, ClusterUnavailable, ProtocolError, VersionMismatch
from clusterexec import protocol as P

pytestmark = pytest.mark.timeout(40)

HERE = Path(__file__).resolve().parent


def square(x):
    return x * x


# ================================================================================================ helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CLUSTEREXEC_AUTHKEY", None)
    env.update(extra)
    return env


def _raw(cluster) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=5)
    return sock


def _peer_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _authenticate(sock: socket.socket, key: bytes) -> None:
    hello = recv_exact(sock, P.SERVER_HELLO.size)
    mine = P.new_challenge()
    sock.sendall(P.client_proof(key, hello, mine))
    P.client_check(key, mine, recv_exact(sock, P.SERVER_VERDICT_SIZE))


def _assert_closed_by_master(sock: socket.socket, within: float = 5.0) -> None:
    """The master closes the connection: recv reaches end-of-file (or a reset) before the deadline."""
    deadline = time.monotonic() + within
    sock.settimeout(within)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return
        except TimeoutError:
            data = None
        if data == b"":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the master did not close the connection within {within} s")


def _log(cluster) -> str:
    return (cluster.log_dir / "master.log").read_text(errors="replace")


def _wait_for_log(cluster, needle: str, *, after: int = 0, within: float = 5.0) -> str:
    """The first master log line, written after offset `after`, that contains `needle`."""
    deadline = time.monotonic() + within
    while True:
        for line in _log(cluster)[after:].splitlines():
            if needle in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no master log line containing {needle!r}; log:\n{_log(cluster)[after:]}")
        time.sleep(0.02)


def _assert_cluster_works(cluster, ex=None) -> None:
    with cluster.executor() as fresh:
        assert fresh.submit(square, 9).result(timeout=15) == 81
        assert len(fresh.cluster_info()["workers"]) == 1
    if ex is not None:
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    assert cluster.master.poll() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _fake_server(handler):
    """A one-connection TCP server on 127.0.0.1 running `handler(conn)` in a thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    errors: list[BaseException] = []

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError as e:
            errors.append(e)
            return
        with conn:
            try:
                handler(conn)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(10)


# ================================================================================================ keys


def test_client_with_wrong_key_gets_authentication_error_and_master_keeps_serving(cluster):
    with cluster.executor() as good:
        assert good.submit(square, 2).result(timeout=15) == 4
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="rejected our authentication key") as info:
            ClusterExecutor(cluster.address, authkey="certainly-not-the-key")
        assert time.monotonic() - t0 < 5
        assert isinstance(info.value, clusterexec.AuthenticationError)
        line = _wait_for_log(cluster, "rejected connection")
        assert "wrong key" in line
        # The good client's connection was not disturbed, and new ones are still accepted.
        assert good.submit(square, 3).result(timeout=15) == 9
        _assert_cluster_works(cluster, good)


def test_a_wrong_key_message_says_what_that_kind_of_peer_can_set(cluster, tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.key"
    wrong.write_text("certainly-not-the-key")
    wrong.chmod(0o600)
    monkeypatch.setenv("CLUSTEREXEC_AUTHKEY_FILE", str(wrong))
    # A program: authkey= and the environment, and where the key it used came from; no command-line flag.
    with pytest.raises(AuthenticationError) as info:
        ClusterExecutor(cluster.address)
    message = str(info.value)
    assert "authkey=" in message and "CLUSTEREXEC_AUTHKEY" in message and str(wrong) in message, message
    assert "--authkey" not in message, message
    # The status command and a worker: their flags.
    for command in (["clusterexec.status", cluster.address], ["clusterexec.worker", cluster.address,
                                                              "--connect-timeout", "5"]):
        proc = subprocess.run([sys.executable, "-m", *command, "--authkey-file", str(wrong)], capture_output=True,
                              text=True, timeout=20, env=_env())
        assert proc.returncode != 0
        assert "rejected our authentication key" in proc.stderr and "--authkey-file" in proc.stderr, proc.stderr
        assert "authkey=" not in proc.stderr, proc.stderr


def test_worker_with_wrong_key_exits_nonzero_with_a_clear_message(cluster, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_text("certainly-not-the-key")
    wrong.chmod(0o600)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "clusterexec.worker", cluster.address, "--nprocs", "1",
         "--authkey-file", str(wrong), "--connect-timeout", "5"],
        capture_output=True, text=True, timeout=20, env=_env())
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
    assert "rejected our authentication key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "certainly-not-the-key" not in proc.stderr + proc.stdout
    assert "wrong key" in _wait_for_log(cluster, "rejected connection")
    info = cluster.info()
    assert len(info["workers"]) == 1, "the rejected worker must not have joined"
    _assert_cluster_works(cluster)


def test_key_never_appears_in_logs_or_output(debug_cluster, tmp_path):
    cluster = debug_cluster
    key = cluster.key
    with cluster.executor() as ex:
        assert list(ex.map(square, range(30))) == [x * x for x in range(30)]
        ex.cluster_info()
        with pytest.raises(AuthenticationError):
            ClusterExecutor(cluster.address, authkey=key[:-1] + ("0" if key[-1] != "0" else "1"))
    # A worker given the key through the environment, as a user might.
    env_worker = subprocess.Popen(
        [sys.executable, "-m", "clusterexec.worker", cluster.address, "--nprocs", "1", "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(CLUSTEREXEC_AUTHKEY=key))
    try:
        cluster.wait_for(lambda info: len(info["workers"]) == 2, what="the second worker")
    finally:
        env_worker.terminate()
        env_worker_out, _ = env_worker.communicate(10)
    for worker in cluster.workers:
        worker.terminate()
        worker.wait(10)
    cluster.master.terminate()
    cluster.master.wait(10)
    master_out = cluster.master.stdout.read().decode(errors="replace")
    texts = {path.name: path.read_text(errors="replace") for path in cluster.log_dir.glob("*.log")}
    texts["master stdout"] = master_out
    texts["env worker output"] = env_worker_out.decode(errors="replace")
    assert "master.log" in texts and "worker0.log" in texts
    assert any("DEBUG" in t or "INFO" in t for t in texts.values())
    for name, text in texts.items():
        assert key not in text, f"the key leaked into {name}"


def test_connecting_where_nothing_listens_fails_quickly_with_cluster_unavailable():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterUnavailable) as info:
        ClusterExecutor(f"127.0.0.1:{port}", authkey="any-key", connect_timeout=30)  # (not waited for)
    assert time.monotonic() - t0 < 3
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "cannot connect" in message and "clusterexec.master" in message
    assert "nothing listens there; a program does not wait for a master to start" in message, message


def test_server_that_never_answers_gives_cluster_unavailable_after_connect_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # the kernel completes the TCP handshake; nobody ever says a word
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ClusterUnavailable, match="did not answer"):
            ClusterExecutor(address, authkey="any-key", connect_timeout=1)
        assert time.monotonic() - t0 < 4
    finally:
        listener.close()


def test_server_that_is_not_clusterexec_is_reported_as_such():
    def http_server(conn):
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)

    with _fake_server(http_server) as address:
        with pytest.raises(ProtocolError, match="not a clusterexec master"):
            ClusterExecutor(address, authkey="any-key", connect_timeout=5)


def test_server_that_hangs_up_during_the_handshake_gives_a_clear_error():
    with _fake_server(lambda conn: None) as address:
        with pytest.raises(ClusterUnavailable, match="closed the connection"):
            ClusterExecutor(address, authkey="any-key", connect_timeout=5)


def test_server_speaking_another_protocol_version_is_refused_by_the_client():
    def future_master(conn):
        conn.sendall(P.SERVER_HELLO.pack(P.MAGIC, P.PROTOCOL_VERSION + 1, P.new_challenge()))
        time.sleep(0.5)

    with _fake_server(future_master) as address:
        with pytest.raises(VersionMismatch, match="protocol"):
            ClusterExecutor(address, authkey="any-key", connect_timeout=5)


def test_client_refuses_a_server_that_cannot_prove_it_knows_the_key():
    """Mutual authentication: an impostor that says "OK" without knowing the key is not trusted."""
    def impostor(conn):
        conn.sendall(P.server_hello(P.new_challenge()))
        recv_exact(conn, P.CLIENT_PROOF.size)
        conn.sendall(P.VERDICT_OK + os.urandom(P.DIGEST_SIZE))
        time.sleep(0.5)

    with _fake_server(impostor) as address:
        with pytest.raises(AuthenticationError, match="could not prove"):
            ClusterExecutor(address, authkey="any-key", connect_timeout=5)


def test_worker_with_no_master_to_reach_exits_nonzero_after_its_connect_timeout(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("some-key")
    key_file.chmod(0o600)
    port = _free_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "clusterexec.worker", f"127.0.0.1:{port}", "--nprocs", "1",
         "--authkey-file", str(key_file), "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=20, env=_env())
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
    assert f"127.0.0.1:{port}" in proc.stderr and "cannot reach the master" in proc.stderr


def test_master_creates_the_default_key_file_owner_only_and_worker_and_client_find_it(tmp_path, monkeypatch):
    key_file = tmp_path / "fresh-home" / ".clusterexec" / "authkey"
    env = _env(CLUSTEREXEC_AUTHKEY_FILE=str(key_file))
    master = subprocess.Popen(
        [sys.executable, "-m", "clusterexec.master", "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "master.log", "wb"), env=env)
    worker = None
    try:
        first_line = master.stdout.readline().decode()
        assert "listening on 127.0.0.1:" in first_line, first_line
        port = int(first_line.split("listening on 127.0.0.1:")[1].split()[0])
        assert key_file.exists()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) & 0o077 == 0
        key = key_file.read_text().strip()
        assert len(key) >= 32
        assert key not in first_line
        assert str(key_file) in first_line  # says where the key came from
        worker = subprocess.Popen(
            [sys.executable, "-m", "clusterexec.worker", f"127.0.0.1:{port}", "--nprocs", "1"],
            stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env)
        monkeypatch.setenv("CLUSTEREXEC_AUTHKEY_FILE", str(key_file))
        monkeypatch.delenv("CLUSTEREXEC_AUTHKEY", raising=False)
        with ClusterExecutor(f"127.0.0.1:{port}") as ex:  # no key given: found in the default key file
            deadline = time.monotonic() + 15
            while not ex.cluster_info()["workers"]:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "the worker did not join"
                time.sleep(0.05)
            assert ex.submit(square, 12).result(timeout=15) == 144
        # A restarted master reuses the file rather than replacing it.
        assert key_file.read_text().strip() == key
    finally:
        for proc in (worker, master):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        master.stdout.close()
    logs = (tmp_path / "master.log").read_text() + (tmp_path / "worker.log").read_text()
    assert key not in logs


def test_key_file_readable_by_others_is_warned_about(cluster, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_text(cluster.key)
    loose.chmod(0o644)
    worker = subprocess.Popen(
        [sys.executable, "-m", "clusterexec.worker", cluster.address, "--nprocs", "1",
         "--authkey-file", str(loose)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        cluster.wait_for(lambda info: len(info["workers"]) == 2, what="the worker with a loose key file")
    finally:
        worker.terminate()
        out, _ = worker.communicate(10)
    out = out.decode(errors="replace")
    assert "readable by other users" in out and "chmod 600" in out
    assert cluster.key not in out


def test_missing_key_file_makes_the_worker_exit_with_a_clear_message(cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clusterexec.worker", cluster.address, "--nprocs", "1"],
        capture_output=True, text=True, timeout=20,
        env=_env(CLUSTEREXEC_AUTHKEY_FILE=str(tmp_path / "does-not-exist")))
    assert proc.returncode != 0
    assert "no authentication key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--authkey-file" in proc.stderr and "authkey=" not in proc.stderr  # what a command can be given


def test_a_program_without_a_key_is_told_what_a_program_can_be_given(cluster, tmp_path, monkeypatch):
    from clusterexec import MissingKeyError

    monkeypatch.setenv("CLUSTEREXEC_AUTHKEY_FILE", str(tmp_path / "does-not-exist"))
    with pytest.raises(MissingKeyError) as info:
        ClusterExecutor(cluster.address)
    assert "authkey=" in str(info.value) and "--authkey-file" not in str(info.value)


# ================================================================================================ malformed input


def _pre_auth_random_bytes(sock, key):
    recv_exact(sock, P.SERVER_HELLO.size)
    sock.sendall(os.urandom(P.CLIENT_PROOF.size + 100))


def _pre_auth_random_bytes_without_reading_the_hello(sock, key):
    sock.sendall(os.urandom(1000))


def _truncated_handshake_then_close(sock, key):
    hello = recv_exact(sock, P.SERVER_HELLO.size)
    proof = P.client_proof(key, hello, P.new_challenge())
    sock.sendall(proof[:20])
    sock.shutdown(socket.SHUT_WR)


def _valid_frame_before_authentication(sock, key):
    recv_exact(sock, P.SERVER_HELLO.size)
    sock.sendall(P.encode_bytes({"t": "hello", "role": "client", "name": "x" * 100}))


def _oversized_header_length(sock, key):
    _authenticate(sock, key)
    sock.sendall(struct.pack("!HI", 0, 0xFFFFFFFF) + b"{")


def _oversized_buffer_length(sock, key):
    _authenticate(sock, key)
    header = b'{"t":"submit","tasks":[]}'
    sock.sendall(struct.pack("!HI", 2, len(header)) + struct.pack("!QQ", 2**63, 2**63) + header)


def _unknown_message_type_before_hello(sock, key):
    _authenticate(sock, key)
    sock.sendall(P.encode_bytes({"t": "launch-the-missiles"}))


def _invalid_json_header(sock, key):
    _authenticate(sock, key)
    junk = b"{this is not json\xff"
    sock.sendall(struct.pack("!HI", 0, len(junk)) + junk)


def _header_without_a_type(sock, key):
    _authenticate(sock, key)
    head = b"[1, 2, 3]"
    sock.sendall(struct.pack("!HI", 0, len(head)) + head)


def _hello_with_an_unknown_role(sock, key):
    _authenticate(sock, key)
    sock.sendall(P.encode_bytes({"t": "hello", "role": "emperor"}))


def _worker_hello_with_bad_nprocs(sock, key):
    _authenticate(sock, key)
    sock.sendall(P.encode_bytes({"t": "hello", "role": "worker", "nprocs": 0}))


def _as_client(sock, key):
    _authenticate(sock, key)
    sock.sendall(P.encode_bytes({"t": "hello", "role": "client", "name": "raw-test"}))
    assert read_frame(sock).type == "welcome"


_AFTER_HELLO = {}


def _after_hello(fn):
    _AFTER_HELLO[fn.__name__] = fn
    return fn


@_after_hello
def _client_sends_unknown_message_type(sock, key):
    sock.sendall(P.encode_bytes({"t": "launch-the-missiles"}))


@_after_hello
def _client_sends_truncated_frame_then_closes(sock, key):
    sock.sendall(struct.pack("!HI", 0, 100) + b'{"t": "sub')
    sock.shutdown(socket.SHUT_WR)


@_after_hello
def _client_sends_oversized_length_prefix(sock, key):
    sock.sendall(struct.pack("!HI", 1, 10) + struct.pack("!Q", 2**64 - 1))


@_after_hello
def _client_submits_task_referring_to_a_blob_never_sent(sock, key):
    sock.sendall(P.encode_bytes({"t": "submit", "tasks": [[1, ["0" * 32], [0], 0, None]]}))


@_after_hello
def _client_submits_task_claiming_a_missing_buffer(sock, key):
    sock.sendall(P.encode_bytes({"t": "submit", "tasks": [[1, ["0" * 32], [1], 0, None]]}))


@_after_hello
def _client_submits_malformed_task_entries(sock, key):
    sock.sendall(P.encode_bytes({"t": "submit", "tasks": [["one", "two"]]}))


@_after_hello
def _client_sends_infinite_number(sock, key):
    sock.sendall(P.encode_bytes({"t": "cancel", "req": float("inf"), "ids": []}))


@_after_hello
def _client_sends_cancel_without_fields(sock, key):
    sock.sendall(P.encode_bytes({"t": "cancel"}))


def _nested_header(depth: int = 200_000) -> bytes:
    """A frame whose JSON header nests `depth` lists deep: too deep for Python's JSON parser to recurse."""
    head = b'{"t":"submit","tasks":' + b"[" * depth + b"]" * depth + b"}"
    return struct.pack("!HI", 0, len(head)) + head


@_after_hello
def _client_sends_a_header_nested_200000_deep(sock, key):
    sock.sendall(_nested_header())


_CASES = [
    _pre_auth_random_bytes,
    _pre_auth_random_bytes_without_reading_the_hello,
    _truncated_handshake_then_close,
    _valid_frame_before_authentication,
    _oversized_header_length,
    _oversized_buffer_length,
    _unknown_message_type_before_hello,
    _invalid_json_header,
    _header_without_a_type,
    _hello_with_an_unknown_role,
    _worker_hello_with_bad_nprocs,
    *_AFTER_HELLO.values(),
]


@pytest.mark.parametrize("case", _CASES, ids=[c.__name__.strip("_") for c in _CASES])
def test_malformed_input_closes_that_connection_alone_and_is_logged(cluster, case):
    key = cluster.key.encode()
    with cluster.executor() as bystander:
        assert bystander.submit(square, 5).result(timeout=15) == 25
        sock = _raw(cluster)
        try:
            peer = _peer_name(sock)
            if case.__name__ in _AFTER_HELLO:
                _as_client(sock, key)
                _wait_for_log(cluster, f"connected from {peer}")
            offset = len(_log(cluster))
            case(sock, key)
            _assert_closed_by_master(sock)
        finally:
            sock.close()
        line = _wait_for_log(cluster, peer, after=offset)
        assert "WARNING" in line or "INFO" in line, line
        assert "Traceback" not in _log(cluster)[offset:]
        # The connection that was already open and new connections both still work.
        assert bystander.submit(square, 6).result(timeout=15) == 36
        _assert_cluster_works(cluster, bystander)


def _serve_one_worker_session(listener: socket.socket, key: bytes) -> socket.socket:
    """Accept a worker node on `listener`, authenticate it as a master would, and welcome its hello."""
    sock, _ = listener.accept()
    sock.settimeout(10)
    challenge = P.new_challenge()
    sock.sendall(P.server_hello(challenge))
    verdict = P.server_check(key, challenge, recv_exact(sock, P.CLIENT_PROOF.size))
    assert verdict.startswith(P.VERDICT_OK)
    sock.sendall(verdict)
    hello = read_frame(sock)
    assert hello.header["role"] == "worker"
    sock.sendall(P.encode_bytes({"t": "welcome", "id": 1, "heartbeat": [1.0, 30.0], "max_frame": 1 << 20}))
    return sock


@pytest.mark.timeout(60)
def test_worker_closes_a_master_connection_whose_header_nests_too_deep_and_reconnects(tmp_path):
    """A header nested 200,000 deep is a malformed frame like any other: the node agent closes that
    connection with one log line, no traceback, and reconnects."""
    key = b"a-key-for-the-fake-master"
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(30)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "clusterexec.worker", f"127.0.0.1:{listener.getsockname()[1]}", "--nprocs", "1",
             "--authkey-file", str(key_file), "--reconnect-window", "30"],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
    first = second = None
    try:
        first = _serve_one_worker_session(listener, key)
        first.sendall(_nested_header())
        _assert_closed_by_master(first, within=10)  # (closed by the worker, here)
        second = _serve_one_worker_session(listener, key)  # it came back, as after any lost connection
        assert worker.poll() is None
    finally:
        for sock in (first, second, listener):
            if sock is not None:
                sock.close()
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "Fatal error" not in text, text
    closing = [line for line in text.splitlines() if "closing connection" in line]
    assert len(closing) == 1 and "header" in closing[0], text


def test_many_hostile_connections_at_once_do_not_disturb_a_running_map(cluster):
    key = cluster.key.encode()
    with cluster.executor() as ex:
        results = ex.map(square, range(200))
        socks = []
        try:
            for i in range(30):
                case = _CASES[i % len(_CASES)]
                sock = _raw(cluster)
                socks.append(sock)
                if case.__name__ in _AFTER_HELLO:
                    _as_client(sock, key)
                case(sock, key)
            for sock in socks:
                _assert_closed_by_master(sock)
        finally:
            for sock in socks:
                sock.close()
        assert list(results) == [x * x for x in range(200)]
        _assert_cluster_works(cluster, ex)


def test_a_blob_sent_under_another_functions_hash_is_refused_and_cannot_poison_other_clients(cluster):
    """A key holder sends other code under the content hash of math.factorial. The master checks each blob
    against its hash before it caches or forwards it: the forger's connection is closed (its own alone), and
    another client's map(math.factorial, ...) computes factorials, not the forger's values."""
    import math

    import cloudpickle

    from clusterexec import serialization as S

    key = cluster.key.encode()
    honest_hash = S.function_blob(math.factorial).hash
    forged = cloudpickle.dumps(lambda *args: "forged")
    assert P.blob_hash(forged) != honest_hash
    with cluster.executor() as bystander:
        assert bystander.submit(square, 4).result(timeout=15) == 16
        sock = _raw(cluster)
        try:
            peer = _peer_name(sock)
            _authenticate(sock, key)
            sock.sendall(P.encode_bytes({"t": "hello", "role": "client", "name": "forger",
                                         "python": platform.python_version(), "cloudpickle": cloudpickle.__version__}))
            assert read_frame(sock).type == "welcome"
            _wait_for_log(cluster, f"connected from {peer}")
            offset = len(_log(cluster))
            args = S.dumps(((5,), {}), "pickling the arguments")
            sock.sendall(P.encode_bytes({"t": "submit", "tasks": [[1, [honest_hash], [1], len(args), None]]},
                                        [forged, *args]))
            # Without the check, the forged task runs on the worker node (which caches the blob by that
            # hash) and its result comes back; with it, the master hangs up at once.
            sock.settimeout(10)
            reader = P.FrameReader()
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                for msg in reader.feed(data):
                    assert msg.type != "results", f"the master ran a forged blob: {msg.header}"
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        line = _wait_for_log(cluster, peer, after=offset)
        assert "does not match its hash" in line, line
        with cluster.executor() as honest:
            assert list(honest.map(math.factorial, range(12))) == [math.factorial(n) for n in range(12)]
        assert list(bystander.map(math.factorial, range(12), chunksize=3)) == [math.factorial(n) for n in range(12)]
        assert bystander.submit(square, 6).result(timeout=15) == 36


def test_version_mismatch_in_the_handshake_is_rejected(cluster):
    key = cluster.key.encode()
    sock = _raw(cluster)
    try:
        peer = _peer_name(sock)
        hello = recv_exact(sock, P.SERVER_HELLO.size)
        magic, version, challenge = P.SERVER_HELLO.unpack(hello)
        assert (magic, version) == (P.MAGIC, P.PROTOCOL_VERSION)
        mine = P.new_challenge()
        digest = P.CLIENT_PROOF.unpack(P.client_proof(key, hello, mine))[2]
        sock.sendall(P.CLIENT_PROOF.pack(P.MAGIC, P.PROTOCOL_VERSION + 1, digest, mine))
        verdict = recv_exact(sock, P.SERVER_VERDICT_SIZE)
        with pytest.raises(VersionMismatch):
            P.client_check(key, mine, verdict)
        _assert_closed_by_master(sock)
    finally:
        sock.close()
    assert "wrong protocol version" in _wait_for_log(cluster, peer)
    _assert_cluster_works(cluster)


def test_proof_made_with_a_guessed_key_is_rejected(cluster):
    """Knowing the protocol is not enough: a proof made with another key is refused."""
    sock = _raw(cluster)
    try:
        hello = recv_exact(sock, P.SERVER_HELLO.size)
        mine = P.new_challenge()
        sock.sendall(P.client_proof(b"guessed-key", hello, mine))
        verdict = recv_exact(sock, P.SERVER_VERDICT_SIZE)
        with pytest.raises(AuthenticationError, match="rejected our authentication key"):
            P.client_check(b"guessed-key", mine, verdict)
        assert verdict[2:] == bytes(P.DIGEST_SIZE), "a rejection must not carry a key-derived digest"
        _assert_closed_by_master(sock)
    finally:
        sock.close()
    _assert_cluster_works(cluster)


def test_replayed_proof_from_another_connection_is_rejected(cluster):
    """Each connection has a fresh challenge, so a proof observed on the wire cannot be reused."""
    key = cluster.key.encode()
    first = _raw(cluster)
    second = _raw(cluster)
    try:
        hello1 = recv_exact(first, P.SERVER_HELLO.size)
        hello2 = recv_exact(second, P.SERVER_HELLO.size)
        assert hello1 != hello2
        mine = P.new_challenge()
        proof = P.client_proof(key, hello1, mine)
        second.sendall(proof)
        verdict = recv_exact(second, P.SERVER_VERDICT_SIZE)
        with pytest.raises(AuthenticationError):
            P.client_check(key, mine, verdict)
        _assert_closed_by_master(second)
    finally:
        first.close()
        second.close()
    _assert_cluster_works(cluster)


@pytest.mark.timeout(30)
def test_connection_that_never_authenticates_is_closed_after_the_handshake_timeout(cluster):
    from clusterexec.connection import HANDSHAKE_TIMEOUT

    sock = _raw(cluster)
    try:
        peer = _peer_name(sock)
        recv_exact(sock, P.SERVER_HELLO.size)
        t0 = time.monotonic()
        _assert_closed_by_master(sock, within=HANDSHAKE_TIMEOUT + 5)
        assert HANDSHAKE_TIMEOUT - 1 < time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 5
    finally:
        sock.close()
    assert "no authentication" in _wait_for_log(cluster, peer)
    _assert_cluster_works(cluster)


@pytest.mark.timeout(60)
def test_more_unauthenticated_connections_than_the_master_holds_close_the_oldest_and_keep_nobody_out(cluster):
    """Past UNAUTHENTICATED_MAX connections that never answer the hello, each new one closes the oldest:
    a real client still gets in at once, and the master says what it did."""
    import resource

    from clusterexec.connection import HANDSHAKE_TIMEOUT
    from clusterexec.master import UNAUTHENTICATED_MAX

    extra = 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = UNAUTHENTICATED_MAX + extra + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test opens {need} connections; the open-files limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(UNAUTHENTICATED_MAX + extra):
            socks.append(_raw(cluster))
            if len(socks) == 1:
                first_opened = time.monotonic()
        for sock in (socks[0], socks[-1]):
            recv_exact(sock, P.SERVER_HELLO.size)
        with cluster.executor() as ex:  # authenticates within milliseconds, before anyone can push it out
            assert ex.submit(square, 5).result(timeout=15) == 25
        # Closed to make room, not by the handshake timeout (HANDSHAKE_TIMEOUT after it opened).
        _assert_closed_by_master(socks[0], within=max(0.1, first_opened + HANDSHAKE_TIMEOUT - 1 - time.monotonic()))
        socks[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):  # the newest is still open (for HANDSHAKE_TIMEOUT)
            socks[-1].recv(1)
    finally:
        for sock in socks:
            sock.close()
    line = _wait_for_log(cluster, "unauthenticated connections to make room")
    assert int(line.split("closed ")[1].split()[0]) >= extra, line


def test_master_memory_stays_bounded_under_a_stream_of_malformed_connections(cluster):
    import psutil

    master = psutil.Process(cluster.master.pid)
    key = cluster.key.encode()

    def one_round():
        for i in range(60):
            sock = _raw(cluster)
            try:
                if i % 3 == 0:
                    sock.sendall(os.urandom(4096))  # garbage before authentication
                else:
                    _authenticate(sock, key)
                    if i % 3 == 1:  # claims a 1 GiB buffer, then sends a little of it and goes away
                        sock.sendall(struct.pack("!HI", 1, 2) + struct.pack("!Q", 1 << 30) + b"{}" + b"x" * 65536)
                    else:
                        sock.sendall(P.encode_bytes({"t": "hello", "role": "client"}) + P.encode_bytes({"t": "??"}))
            except OSError:
                pass
            finally:
                sock.close()

    one_round()  # let allocator pools and log buffers settle
    time.sleep(0.5)
    before = master.memory_info().rss
    for _ in range(3):
        one_round()
    time.sleep(0.5)
    grown = master.memory_info().rss - before
    assert grown < 8 * 1024 * 1024, f"the master grew by {grown / 2**20:.1f} MiB over 180 bad connections"
    with cluster.executor() as ex:
        assert ex.submit(pow, 2, 5).result(timeout=10) == 32


def _limit_open_files(soft: int, hard: int):
    """A preexec_fn that starts a process with RLIMIT_NOFILE (soft, hard)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.mark.timeout(60)
def test_master_raises_its_soft_open_files_limit_to_the_hard_limit(tmp_path):
    from conftest import Cluster

    cluster = Cluster(tmp_path)
    try:
        cluster.start_master(preexec_fn=_limit_open_files(64, 256))
        assert _open_files_limit(cluster.master.pid) == (256, 256)
    finally:
        cluster.stop()


@pytest.mark.timeout(90)
def test_master_out_of_file_descriptors_logs_a_line_per_interval_and_serves_again_once_they_close(tmp_path):
    """At its open-files limit a master cannot accept; asyncio then logged ~100 tracebacks a second. It must
    say so in a line at most every interval, and accept again once connections close."""
    from conftest import Cluster

    cluster = Cluster(tmp_path)
    socks: list[socket.socket] = []
    try:
        cluster.start_master(preexec_fn=_limit_open_files(64, 64))
        cluster.info()
        offset = len(_log(cluster))
        for _ in range(120):  # more than the master can hold open: some wait, unaccepted, in its backlog
            socks.append(socket.create_connection(("127.0.0.1", cluster.port), timeout=5))
        _wait_for_log(cluster, "open files", after=offset, within=20)
        time.sleep(3.5)  # three of asyncio's one-second accept retries, all failing
        held = _log(cluster)[offset:]
        assert len(held.splitlines()) <= 3, f"{len(held.splitlines())} lines in 3.5 s:\n{held[:3000]}"
        assert "Traceback" not in held
        for sock in socks:
            sock.close()
        socks.clear()
        wait_until(lambda: _serves(cluster), timeout=20, what="the master to serve again")
        assert cluster.master.poll() is None
    finally:
        for sock in socks:
            sock.close()
        cluster.stop()


def _serves(cluster) -> bool:
    try:
        return "workers" in cluster.info()
    except (OSError, ClusterUnavailable):
        return False


@pytest.mark.timeout(60)
def test_a_key_file_being_created_is_never_seen_empty(tmp_path):
    """Master and workers started at the same moment: a reader finds no key file or the whole key."""

    from clusterexec.auth import create_key_file, read_key_file

    seen: list[object] = []
    for i in range(200):
        path = tmp_path / f"key{i}"
        stop = threading.Event()

        def reader(path=path, stop=stop):
            while not stop.is_set():
                if path.exists():
                    try:
                        seen.append(read_key_file(path))
                    except Exception as e:  # noqa: BLE001 - what a worker would have died of
                        seen.append(e)
                    return

        t = threading.Thread(target=reader)
        t.start()
        key = create_key_file(path)
        stop.set()
        t.join()
        assert not [s for s in seen if not isinstance(s, bytes) or s != key], seen
        seen.clear()
    assert not list(tmp_path.glob(".key*")), "temporary files left behind"
