"""Fixtures that start real master and worker processes on 127.0.0.1 and clean them up by PID."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_key_file(tmp_path_factory):
    """Never touch the user's ~/.clusterexec: the default key file lives in a temporary directory."""
    path = tmp_path_factory.mktemp("home") / "authkey"
    old = os.environ.get("CLUSTEREXEC_AUTHKEY_FILE")
    os.environ["CLUSTEREXEC_AUTHKEY_FILE"] = str(path)
    os.environ.pop("CLUSTEREXEC_AUTHKEY", None)
    yield path
    if old is None:
        os.environ.pop("CLUSTEREXEC_AUTHKEY_FILE", None)
    else:
        os.environ["CLUSTEREXEC_AUTHKEY_FILE"] = old


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Let worker processes import test modules (functions defined in tests are pickled by reference).
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class Cluster:
    """A master and worker nodes started from the command line, exactly as a user would."""

    def __init__(self, tmp_path: Path, key: str | None = None):
        self.key = key or secrets.token_hex(16)
        self.key_file = tmp_path / "cluster.key"
        self.key_file.write_text(self.key)
        self.key_file.chmod(0o600)
        self.log_dir = tmp_path
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_master(self, port: int = 0, *extra: str, preexec_fn=None) -> subprocess.Popen:
        log = open(self.log_dir / "master.log", "ab")
        self.master = subprocess.Popen(
            [sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", str(port),
             "--authkey-file", str(self.key_file), *extra],
            stdout=subprocess.PIPE, stderr=log, env=_env(), preexec_fn=preexec_fn)
        line = self.master.stdout.readline().decode()
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        if not m:
            raise RuntimeError(f"master did not start: {line!r}; see {self.log_dir / 'master.log'}")
        self.port = int(m.group(1))
        return self.master

    def start_worker(self, nprocs: int = 2, *extra: str, wait: bool = True) -> subprocess.Popen:
        log = open(self.log_dir / f"worker{len(self.workers)}.log", "ab")
        before = len(self.info()["workers"]) if wait else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "clusterexec.worker", self.address, "--nprocs", str(nprocs),
             "--authkey-file", str(self.key_file), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
        self.workers.append(proc)
        if wait:
            self.wait_for(lambda info: len(info["workers"]) > before, what="the worker to join")
        return proc

    def executor(self, **kwargs):
        from clusterexec import ClusterExecutor

        return ClusterExecutor(self.address, authkey=self.key, **kwargs)

    def info(self) -> dict:
        from clusterexec.address import parse_address
        from clusterexec.client import ClientConnection

        conn = ClientConnection(parse_address(self.address), self.key.encode(), name="test-probe")
        try:
            return conn.status()
        finally:
            conn.close()

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "the cluster") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if predicate(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}: {info}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in [*self.workers, self.master]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.master]:
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def cluster(tmp_path):
    """A master with one worker node of 2 task processes, started from the command line."""
    c = Cluster(tmp_path)
    try:
        c.start_master()
        c.start_worker(2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def empty_cluster(tmp_path):
    """A master with no worker node yet."""
    c = Cluster(tmp_path)
    try:
        c.start_master()
        yield c
    finally:
        c.stop()


@pytest.fixture
def debug_cluster(tmp_path):
    """Like `cluster`, but master and worker log at DEBUG level (to check what the logs may contain)."""
    c = Cluster(tmp_path)
    try:
        c.start_master(0, "--log-level", "DEBUG")
        c.start_worker(2, "--log-level", "DEBUG")
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------------------ shared helpers


def agent_children(agent_pid: int) -> set[int]:
    """The live task processes of a node agent."""
    import psutil

    live = set()
    for p in psutil.Process(agent_pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def wait_until(predicate, timeout: float = 10.0, what: str = "the condition"):
    """Poll `predicate` until it returns something true (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def die_leaving_a_child_that_holds_the_socket(pid_dir):
    """A task that exits with code 3 while a process it forked lives on (8 s) with a copy of its socket, so
    no end-of-file tells anyone it died. The child's pid is the name of a file in `pid_dir`."""
    child = os.fork()
    if child == 0:
        time.sleep(8)
        os._exit(0)
    Path(pid_dir, str(child)).touch()
    os._exit(3)


def kill_children_named_in(pid_dir: Path) -> None:
    """Kill the processes `die_leaving_a_child_that_holds_the_socket` left, by the pids it wrote down."""
    for marker in pid_dir.iterdir():
        if marker.name.isdigit():
            try:
                os.kill(int(marker.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def reap(proc: subprocess.Popen) -> None:
    """End a process the test started if it still runs, collect it, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def stop_gently(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process the test started, if it still runs; kill it if it is not gone within `grace`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_gone(pid: int) -> bool:
    """The process has exited (or is a zombie nobody has reaped yet)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def recv_exact(sock, n: int) -> bytes:
    """Exactly n bytes from a raw socket (for tests that speak the protocol by hand)."""
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += part
    return buf


def read_frame(sock):
    """The next whole frame from a raw socket, as a protocol Message."""
    from clusterexec import protocol as P

    reader = P.FrameReader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole frame arrived")
        msgs = reader.feed(data)
        if msgs:
            return msgs[0]


# ------------------------------------------------------------------------------------------ TLS certificates

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "3", "-subj", f"/CN=clusterexec test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=directory)


def _make_leaf(directory: Path, name: str, ca: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN=clusterexec test {name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial",
             str(int.from_bytes(name.encode(), "big")), "-days", "3", "-extfile", "leaf.ext",
             "-out", f"{name}.pem", cwd=directory)
    (directory / f"{name}.key").chmod(0o600)


class Certs:
    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def flags(self, who: str, ca: str = "ca") -> list[str]:
        """--tls-* arguments for a master or worker presenting certificate `who` and trusting CA `ca`."""
        return ["--tls-cert", self.path(f"{who}.pem"), "--tls-key", self.path(f"{who}.key"),
                "--tls-ca", self.path(f"{ca}.pem")]

    def kwargs(self, who: str = "client", ca: str = "ca") -> dict[str, str]:
        """ClusterExecutor arguments for certificate `who`, trusting CA `ca`."""
        return {"tls_cert": self.path(f"{who}.pem"), "tls_key": self.path(f"{who}.key"),
                "tls_ca": self.path(f"{ca}.pem")}

    def context(self, who: str = "client", ca: str = "ca") -> ssl.SSLContext:
        from clusterexec.auth import tls_context

        kw = self.kwargs(who, ca)
        return tls_context(server=False, cert=kw["tls_cert"], key=kw["tls_key"], ca=kw["tls_ca"])


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    """A cluster CA with master, worker and client certificates, and a rogue CA with a certificate of its own."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is needed to generate the test certificates")
    directory = tmp_path_factory.mktemp("tls")
    (directory / "leaf.ext").write_text(_LEAF_EXTENSIONS)
    _make_ca(directory, "ca")
    for name in ("master", "worker", "client"):
        _make_leaf(directory, name, "ca")
    _make_ca(directory, "rogue-ca")
    _make_leaf(directory, "rogue", "rogue-ca")
    return Certs(directory)


@contextlib.contextmanager
def private_package(tmp_path: Path, monkeypatch, name: str, files: dict[str, str]):
    """A package importable in this process only (its folder on our sys.path, not on the worker nodes'):
    `files` maps its file names to their source. Yields the imported package; forgets it afterwards."""
    root = tmp_path / "src"
    pkg = root / name
    pkg.mkdir(parents=True)
    for filename, source in files.items():
        (pkg / filename).write_text(source)
    monkeypatch.syspath_prepend(str(root))
    try:
        yield importlib.import_module(name)
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
