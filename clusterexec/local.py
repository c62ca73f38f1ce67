"""Local mode: a private master and worker node for one executor, on 127.0.0.1.

    user process                              clusterexec.master.run_local  (one child process)
    ClusterExecutor(max_workers=N)            ┌─────────────────────────────────────────────┐
      LocalCluster ──stdin: config, key──────▶│ Master on 127.0.0.1:0 + Agent, N task procs │
                   ◀──pipe: "port"────────────│                                             │
      ClientConnection ═══TCP, authenticated═▶│                                             │
        lender ◀═══Unix socket pair══════════▶│ Agent lends an idle task process: its socket │
        └─▶ a borrowed task process's socket  │ goes to the client (see supervisor.py)       │
      stdin closed (shutdown, GC, exit, or   ─▶ stops: kills its task processes, exits      │
      even SIGKILL of the user process)       └─────────────────────────────────────────────┘

The key is fresh and random, and travels over the pipe, never on a command line. Because the child
stops when its stdin reaches end-of-file, no process outlives the user's program however it ends. The
socket pair is inherited, so only this client can borrow; CLUSTEREXEC_LEND=0 turns borrowing off.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import subprocess
import sys
import time

from . import shm
from .errors import ClusterUnavailable


class LocalCluster:
    """Start and stop the private master and node of a local-mode executor."""

    def __init__(self, nprocs: int, startup_timeout: float = 60.0):
        self.key = secrets.token_bytes(32)
        self.nprocs = nprocs
        # Large arguments and results go through shared memory rather than the sockets (see shm.py).
        self.shm_prefix = shm.new_prefix() if shm.available() else None
        # The client borrows idle task processes from the agent over a socket pair (see supervisor.py).
        self.lender: socket.socket | None = None
        read_fd = -1
        try:
            read_fd, write_fd = os.pipe()
            theirs = None
            try:
                passed: tuple[int, ...] = (write_fd,)
                if os.environ.get("CLUSTEREXEC_LEND", "1") != "0":
                    self.lender, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    passed += (theirs.fileno(),)
                self.process = subprocess.Popen(
                    [sys.executable, "-c", "from clusterexec.master import run_local; run_local()", *map(str, passed)],
                    stdin=subprocess.PIPE, pass_fds=passed, close_fds=True)
            finally:
                os.close(write_fd)
                if theirs is not None:
                    theirs.close()
        except BaseException:
            if read_fd >= 0:
                os.close(read_fd)
            if self.lender is not None:
                self.lender.close()
            if self.shm_prefix:
                shm.remove_prefix(self.shm_prefix)  # (its directory, made above)
            raise
        try:
            config = {"key": self.key.hex(), "nprocs": nprocs, "sys_path": sys.path, "shm_prefix": self.shm_prefix}
            self.process.stdin.write(json.dumps(config).encode() + b"\n")
            self.process.stdin.flush()
            port = self._read_port(read_fd, startup_timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(read_fd)
        self.address = ("127.0.0.1", port)

    def _read_port(self, fd: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterUnavailable(f"the local cluster did not start within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 64)
                if not chunk:
                    code = self.process.wait(5)
                    raise ClusterUnavailable(f"the local cluster process exited during start-up (exit code {code}); "
                                             "see its error output above")
                data += chunk
        return int(data)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the child's stdin, which makes it stop its node and exit; kill it if it does not."""
        proc = self.process
        if self.lender is not None:
            self.lender.close()
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self.shm_prefix:
            shm.remove_prefix(self.shm_prefix)
