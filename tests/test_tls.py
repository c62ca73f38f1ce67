"""TLS: every connection encrypted and mutually authenticated against the cluster's CA, on top of the key.

The suite makes its own certificates with the `openssl` command line (a cluster CA; master, worker and client
certificates it signs; a rogue CA with a certificate of its own) and runs real master and worker processes on
127.0.0.1, as conftest.py's `Cluster` does, with the --tls-* flags.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Certs, Cluster, _env, wait_until

from clusterexec import AuthenticationError, ClusterExecutor, ClusterUnavailable, TLSConfigError
from clusterexec.address import parse_address
from clusterexec.auth import tls_context
from clusterexec.client import ClientConnection

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def echo(data):
    return data


def slow_square(x):
    time.sleep(0.3)
    return x * x


# ================================================================================================ cluster


class TLSCluster(Cluster):
    """conftest's `Cluster` with TLS everywhere: its probe and executors present the client certificate."""

    def __init__(self, tmp_path: Path, certs: Certs):
        super().__init__(tmp_path)
        self.certs = certs

    def start_tls_master(self, port: int = 0, *extra: str):
        return self.start_master(port, *self.certs.flags("master"), *extra)

    def start_tls_worker(self, nprocs: int = 2, *extra: str, wait: bool = True):
        return self.start_worker(nprocs, *self.certs.flags("worker"), *extra, wait=wait)

    def executor(self, **kwargs):
        return ClusterExecutor(self.address, authkey=self.key, **{**self.certs.kwargs(), **kwargs})

    def info(self) -> dict:
        conn = ClientConnection(parse_address(self.address), self.key.encode(), name="test-probe",
                                ssl_context=self.certs.context())
        try:
            return conn.status()
        finally:
            conn.close()

    def master_log(self) -> str:
        return (self.log_dir / "master.log").read_text(errors="replace")


@pytest.fixture
def tls_cluster(tmp_path, certs):
    """A TLS master with one TLS worker node of 2 task processes."""
    c = TLSCluster(tmp_path, certs)
    try:
        c.start_tls_master()
        c.start_tls_worker(2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def tls_master(tmp_path, certs):
    """A TLS master with no worker node."""
    c = TLSCluster(tmp_path, certs)
    try:
        c.start_tls_master()
        yield c
    finally:
        c.stop()


def _run_worker(cluster: Cluster, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a worker node to its end (it is expected to give up) and return its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "clusterexec.worker", cluster.address, "--nprocs", "1",
         "--authkey-file", str(cluster.key_file), "--connect-timeout", "20", "--reconnect-window", "0", *extra],
        capture_output=True, text=True, timeout=timeout, env=_env())


# ================================================================================================ it works


@pytest.mark.timeout(120)
def test_map_and_a_64_mib_round_trip_over_tls(tls_cluster):
    with tls_cluster.executor() as ex:
        assert list(ex.map(square, range(200))) == [x * x for x in range(200)]
        assert list(ex.map(square, range(1000), chunksize=50)) == [x * x for x in range(1000)]
        payload = bytes(range(256)) * (64 * 1024 * 1024 // 256)
        assert ex.submit(echo, payload).result(timeout=100) == payload
        assert len(ex.cluster_info()["workers"]) == 1


@pytest.mark.timeout(30)
def test_master_says_tls_is_on_and_how_to_connect(tmp_path, certs):
    key_file = tmp_path / "k"
    key_file.write_text("secret")
    key_file.chmod(0o600)
    master = subprocess.Popen([sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", "0",
                               "--authkey-file", str(key_file), *certs.flags("master")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        banner = [master.stdout.readline() for _ in range(3)]
    finally:
        master.terminate()
        master.wait(10)
        master.stdout.close()
    assert "with TLS" in banner[0]
    assert "--tls-cert" in banner[1] and "tls_cert=" in banner[2]


@pytest.mark.timeout(60)
def test_traffic_between_client_and_master_is_encrypted(tls_cluster):
    """A recording relay between client and master sees TLS records, never the payload in clear."""
    marker = b"clusterexec-plaintext-marker-" * 64
    recorded = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while not stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    recorded.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", tls_cluster.port))
        threads = [threading.Thread(target=pump, args=(client, upstream, True), daemon=True),
                   threading.Thread(target=pump, args=(upstream, client, True), daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        upstream.close()

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        with ClusterExecutor(f"127.0.0.1:{port}", authkey=tls_cluster.key, reconnect_window=0,
                             **tls_cluster.certs.kwargs()) as ex:
            assert ex.submit(echo, marker).result(timeout=30) == marker
    finally:
        stop.set()
        listener.close()
        relay_thread.join(10)
    assert len(recorded) > len(marker)
    assert recorded[0] == 0x16, "the first bytes on the wire are not a TLS handshake record"
    assert marker[:40] not in recorded
    assert b"CLEX" not in recorded and b'"t":' not in recorded  # neither the key handshake nor a frame header


# ================================================================================================ refused


@pytest.mark.timeout(40)
def test_plaintext_client_is_told_the_master_requires_tls(tls_cluster):
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="requires TLS"):
        ClusterExecutor(tls_cluster.address, authkey=tls_cluster.key, connect_timeout=20)
    assert time.monotonic() - start < 15
    wait_until(lambda: "did not start TLS" in tls_cluster.master_log(), what="the master to log the refusal")
    with tls_cluster.executor() as ex:  # the master goes on serving TLS clients
        assert ex.submit(square, 7).result(timeout=30) == 49


@pytest.mark.timeout(40)
def test_tls_client_is_told_a_plaintext_master_does_not_speak_tls(cluster, certs):
    with pytest.raises(AuthenticationError, match="does not speak TLS"):
        ClusterExecutor(cluster.address, authkey=cluster.key, connect_timeout=10, **certs.kwargs())


@pytest.mark.timeout(40)
def test_client_with_a_certificate_from_another_ca_is_refused_by_the_master(tls_cluster):
    with pytest.raises(AuthenticationError, match="refused our certificate"):
        ClusterExecutor(tls_cluster.address, authkey=tls_cluster.key, connect_timeout=10,
                        **tls_cluster.certs.kwargs("rogue"))
    # The master logs it just after refusing us: give its log a moment.
    wait_until(lambda: "TLS handshake failed" in tls_cluster.master_log(), what="the master to log the refusal")
    with tls_cluster.executor() as ex:
        assert ex.submit(square, 3).result(timeout=30) == 9


@pytest.mark.timeout(40)
def test_client_refuses_a_master_whose_certificate_its_ca_did_not_sign(tls_cluster):
    # The client presents a good certificate but trusts only the rogue CA: the master is not verified.
    with pytest.raises(AuthenticationError, match="certificate is not trusted"):
        ClusterExecutor(tls_cluster.address, authkey=tls_cluster.key, connect_timeout=10,
                        **tls_cluster.certs.kwargs("client", ca="rogue-ca"))


@pytest.mark.timeout(60)
def test_worker_with_a_certificate_from_another_ca_never_joins(tls_master):
    done = _run_worker(tls_master, *tls_master.certs.flags("rogue"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused our certificate" in done.stderr
    wait_until(lambda: "TLS handshake failed" in tls_master.master_log(), what="the master to log the refusal")
    assert tls_master.info()["workers"] == []


@pytest.mark.timeout(60)
def test_worker_refuses_a_master_its_ca_did_not_sign(tls_master):
    done = _run_worker(tls_master, *tls_master.certs.flags("worker", ca="rogue-ca"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "certificate is not trusted" in done.stderr
    assert tls_master.info()["workers"] == []


@pytest.mark.timeout(60)
def test_plaintext_worker_is_told_the_master_requires_tls(tls_master):
    start = time.monotonic()
    done = _run_worker(tls_master)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "requires TLS" in done.stderr
    assert time.monotonic() - start < 15
    assert tls_master.info()["workers"] == []


@pytest.mark.timeout(60)
def test_tls_worker_is_told_a_plaintext_master_does_not_speak_tls(empty_cluster, certs):
    done = _run_worker(empty_cluster, *certs.flags("worker"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "does not speak TLS" in done.stderr


@pytest.mark.timeout(40)
def test_wrong_key_is_still_refused_under_tls(tls_cluster):
    with pytest.raises(AuthenticationError, match="authentication key"):
        ClusterExecutor(tls_cluster.address, authkey="not-the-key", connect_timeout=10, **tls_cluster.certs.kwargs())
    done = _run_worker(tls_cluster, "--authkey", "not-the-key", *tls_cluster.certs.flags("worker"))
    assert done.returncode == 1
    assert "key" in done.stderr
    assert len(tls_cluster.info()["workers"]) == 1


# ================================================================================================ configuration


@pytest.mark.parametrize("given", [("cert",), ("cert", "key"), ("ca",), ("key", "ca")])
def test_partial_tls_arguments_are_a_clear_error(certs, given):
    kwargs = {name: value for name, value in certs.kwargs().items() if name[4:] in given}
    with pytest.raises(TLSConfigError, match="missing: .*tls_"):
        ClusterExecutor("127.0.0.1:1", authkey="k", **kwargs)


def test_missing_or_unusable_tls_files_are_a_clear_error(certs, tmp_path):
    kw = certs.kwargs()
    with pytest.raises(TLSConfigError, match="does not exist"):
        tls_context(False, kw["tls_cert"], str(tmp_path / "nope.key"), kw["tls_ca"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="no usable CA certificate|holds no CA"):
        tls_context(False, kw["tls_cert"], kw["tls_key"], str(garbage))
    with pytest.raises(TLSConfigError, match="cannot use the TLS certificate"):
        tls_context(False, kw["tls_cert"], certs.path("worker.key"), kw["tls_ca"])  # not this certificate's key


def test_local_mode_does_not_take_tls_arguments(certs):
    with pytest.raises(TLSConfigError, match="local mode"):
        ClusterExecutor(max_workers=1, **certs.kwargs())


def test_contexts_require_tls_1_2_and_a_certificate_from_the_peer(certs):
    kw = certs.kwargs()
    for server in (False, True):
        ctx = tls_context(server, kw["tls_cert"], kw["tls_key"], kw["tls_ca"])
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert not ctx.check_hostname
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "clusterexec test ca"),),)]


@pytest.mark.timeout(30)
def test_master_and_worker_reject_partial_or_missing_tls_flags(certs, tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("secret")
    key_file.chmod(0o600)
    for module, extra in (("clusterexec.master", ["--port", "0", "--host", "127.0.0.1"]),
                          ("clusterexec.worker", ["127.0.0.1:1"])):
        done = subprocess.run([sys.executable, "-m", module, *extra, "--authkey-file", str(key_file),
                               "--tls-cert", certs.path("master.pem")],
                              capture_output=True, text=True, timeout=20, env=_env())
        assert done.returncode == 2, done.stderr
        assert "--tls-key" in done.stderr and "--tls-ca" in done.stderr
        done = subprocess.run([sys.executable, "-m", module, *extra, "--authkey-file", str(key_file),
                               *certs.flags("master")[:4], "--tls-ca", str(tmp_path / "missing.pem")],
                              capture_output=True, text=True, timeout=20, env=_env())
        assert done.returncode == 2, done.stderr
        assert "missing.pem does not exist" in done.stderr


# ================================================================================================ resilience


@pytest.mark.timeout(90)
def test_client_and_worker_redo_tls_after_the_master_restarts(tmp_path, certs):
    c = TLSCluster(tmp_path, certs)
    try:
        c.start_tls_master()
        port = c.port
        c.start_tls_worker(2)
        with c.executor(reconnect_window=30) as ex:
            futures = [ex.submit(slow_square, x) for x in range(20)]
            time.sleep(0.5)
            c.master.kill()
            c.master.wait()
            c.master.stdout.close()
            c.start_tls_master(port)
            assert [f.result(timeout=60) for f in futures] == [x * x for x in range(20)]
            assert ex.submit(square, 12).result(timeout=30) == 144
        c.wait_for(lambda info: len(info["workers"]) == 1, what="the worker to rejoin over TLS")
    finally:
        c.stop()


@pytest.mark.timeout(60)
def test_master_with_in_process_workers_serves_tls_clients(tmp_path, certs):
    c = TLSCluster(tmp_path, certs)
    try:
        c.start_tls_master(0, "--workers", "2")
        with c.executor() as ex:
            assert list(ex.map(square, range(50))) == [x * x for x in range(50)]
    finally:
        c.stop()


@pytest.mark.timeout(40)
def test_many_tls_clients_at_once(tls_cluster):
    results: list[list[int]] = []

    def one() -> None:
        with tls_cluster.executor() as ex:
            results.append(list(ex.map(square, range(30))))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[x * x for x in range(30)]] * 6


# The first 7 bytes of a ClientHello: a TLS record header announcing 512 bytes, then 2 of them.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00"


def _listen_queue(port: int) -> int | None:
    """Connections waiting in the kernel for the listener on 127.0.0.1:`port` to accept them."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:  # LISTEN: rx_queue is the accept queue
            return int(queues.split(":")[1], 16)
    return None


def _stall(port: int, n: int) -> list[socket.socket]:
    """`n` connections that each send part of a ClientHello and then nothing."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(PARTIAL_CLIENT_HELLO)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@pytest.mark.timeout(40)
def test_a_clienthello_that_arrives_in_pieces_still_gets_its_handshake(tls_master):
    """The master starts TLS only once the whole first record is there: a ClientHello that trickles in (a
    byte, the rest of the record header, part of the body) waits for the rest rather than being refused."""
    from clusterexec import protocol as P

    key = tls_master.key.encode()
    tls = tls_master.certs.context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        session.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", tls_master.port), timeout=10) as sock:
        for start, end in ((0, 1), (1, 5), (5, 60), (60, len(hello))):
            sock.sendall(hello[start:end])
            time.sleep(0.3)  # each piece in a segment of its own, the master waiting in between

        def pump() -> None:
            if pending := outgoing.read():
                sock.sendall(pending)
            data = sock.recv(65536)
            assert data, "the master closed the connection"
            incoming.write(data)

        while True:
            try:
                session.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()

        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                try:
                    data += session.read(n - len(data))
                except ssl.SSLWantReadError:
                    pump()
            return data

        server_hello = read(P.SERVER_HELLO.size)
        mine = P.new_challenge()
        session.write(P.client_proof(key, server_hello, mine))
        P.client_check(key, mine, read(P.SERVER_VERDICT_SIZE))  # the key handshake, inside TLS, succeeded


@pytest.mark.timeout(150)
def test_stalled_tls_handshakes_cost_the_master_little_keep_nobody_out_and_their_memory_comes_back(tls_cluster):
    """Peers that send part of a ClientHello and stall: the master must not spend memory on each (asyncio's
    TLS gave each a 256 KiB buffer from its first byte, 300 MB per 1,000, kept after they left), a real
    client must still get in while they hang on, and what they cost must come back once they are gone."""
    import resource

    import psutil

    stalled = 1500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < stalled + 200:
        if hard != resource.RLIM_INFINITY and hard < stalled + 200:
            pytest.skip(f"this test opens {stalled} connections; the open-files limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (stalled + 200, hard))
    port = tls_cluster.port
    master = psutil.Process(tls_cluster.master.pid)
    # What a handshake allocates once (and a first burst leaves in the allocator's pools) is not per peer.
    with tls_cluster.executor() as ex:
        assert ex.submit(square, 3).result(timeout=20) == 9
    fds = master.num_fds()
    warm = _stall(port, 300)
    for sock in warm:
        sock.close()
    wait_until(lambda: master.num_fds() <= fds, timeout=20, what="the master to close the first burst")
    before = master.memory_info().rss
    socks = _stall(port, stalled)
    try:
        wait_until(lambda: _listen_queue(port) == 0, timeout=20, what="the master to accept them all")
        during = master.memory_info().rss
        with tls_cluster.executor() as ex:  # a real client, while they hang on
            assert ex.submit(square, 7).result(timeout=30) == 49
            # (They are held for 3 s, TLS_SNIFF_TIMEOUT; all this takes a fraction of a second.)
            held = master.num_fds() - fds
        during = max(during, master.memory_info().rss)
    finally:
        for sock in socks:
            sock.close()
    grown = (during - before) / 2**20
    assert grown < 32, f"the master grew by {grown:.0f} MiB for {stalled} stalled TLS handshakes"
    assert held > 1000, f"the stalled handshakes were gone before the client came ({held} descriptors left)"
    # More than it holds at once: the oldest made room, and said so.
    wait_until(lambda: "unauthenticated connections to make room" in tls_cluster.master_log(), timeout=10,
               what="the master to say it closed some")
    wait_until(lambda: master.num_fds() <= fds, timeout=20, what="the master to close them all")
    wait_until(lambda: master.memory_info().rss - before < 8 << 20, timeout=20,
               what="the master's memory to come back")
    with tls_cluster.executor() as ex:
        assert ex.submit(square, 8).result(timeout=20) == 64


@pytest.mark.timeout(30)
def test_connecting_to_nothing_with_tls_is_still_cluster_unavailable(certs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterUnavailable):
        ClusterExecutor(f"127.0.0.1:{port}", authkey="k", connect_timeout=2, **certs.kwargs())


@pytest.mark.timeout(40)
def test_status_command_over_tls(tls_cluster):
    base = [sys.executable, "-m", "clusterexec.status", tls_cluster.address, "--json",
            "--authkey-file", str(tls_cluster.key_file), "--timeout", "10"]
    done = subprocess.run([*base, *tls_cluster.certs.flags("client")], capture_output=True, text=True, timeout=30,
                          env=_env())
    assert done.returncode == 0, done.stderr
    assert '"workers"' in done.stdout
    done = subprocess.run(base, capture_output=True, text=True, timeout=30, env=_env())
    assert done.returncode != 0
    assert "requires TLS" in done.stderr
