"""Where the shared key comes from, and the key file the master creates.

Order of precedence, the same for master, worker and client:

    1. the key given explicitly (`authkey=` / `--authkey`)
    2. the key file given explicitly (`--authkey-file`)
    3. the CLUSTEREXEC_AUTHKEY environment variable
    4. the default key file: $CLUSTEREXEC_AUTHKEY_FILE, else ~/.clusterexec/authkey

Only the master creates the default key file (owner-only permissions) when no key exists anywhere; on a
cluster with a shared home directory every worker and client then finds it without configuration.
The key itself is never printed or logged.

TLS (optional, on top of the key): `tls_context` builds the SSL context of either end from a certificate, its
key and the cluster's CA; `tls_failure` turns a failed handshake into a sentence saying whose fault it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import ssl
import stat
from pathlib import Path

log = logging.getLogger("clusterexec.auth")

ENV_KEY = "CLUSTEREXEC_AUTHKEY"
ENV_KEY_FILE = "CLUSTEREXEC_AUTHKEY_FILE"


class MissingKeyError(RuntimeError):
    """No authentication key was given and no key file exists (exported as `clusterexec.MissingKeyError`)."""


def default_key_file() -> Path:
    env = os.environ.get(ENV_KEY_FILE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".clusterexec" / "authkey"


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by other users; run: chmod 600 %s", path, path)
    key = path.read_bytes().strip()
    if not key:
        raise MissingKeyError(f"key file {path} is empty")
    return key


def create_key_file(path: Path) -> bytes:
    """Write a fresh random key readable by its owner only; returns it. Never overwrites a file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    # Written whole under a temporary name, then linked into place (which fails if the file exists): a
    # worker started at the same moment finds either no key file or the whole key, never an empty file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return key


# What to do when the master rejects our key, for each kind of peer (see protocol.client_check).
PROGRAM_KEY_ADVICE = (f"give this program the master's key: ClusterExecutor(..., authkey=...), ${ENV_KEY}, or the "
                      f"master's key file at ${ENV_KEY_FILE} or ~/.clusterexec/authkey")
COMMAND_KEY_ADVICE = (f"give the master's key with --authkey-file FILE (or --authkey, ${ENV_KEY}, or the master's "
                      f"key file copied to ~/.clusterexec/authkey)")


def resolve_key(authkey: str | bytes | None = None, key_file: str | os.PathLike | None = None,
                *, create: bool = False, advice: str = COMMAND_KEY_ADVICE) -> tuple[bytes, str]:
    """The key to use and a description of where it came from (for messages, never the key itself).
    `advice`: how the one asking can be given a key, should none be found."""
    if authkey is not None:
        key = _as_bytes(authkey)
        if not key:
            raise MissingKeyError("the authentication key is empty")
        return key, "the given key"
    if key_file is not None:
        path = Path(key_file).expanduser()
        if not path.exists():
            if not create:
                raise MissingKeyError(f"key file {path} does not exist")
            try:
                create_key_file(path)
                log.info("created key file %s", path)
            except FileExistsError:
                pass  # another master made it just now: use theirs
        return read_key_file(path), f"key file {path}"
    env = os.environ.get(ENV_KEY)
    if env:
        return _as_bytes(env), f"${ENV_KEY}"
    path = default_key_file()
    if path.exists():
        return read_key_file(path), f"key file {path}"
    if create:
        try:
            key = create_key_file(path)
        except FileExistsError:  # another master made it just now: use theirs
            return read_key_file(path), f"key file {path}"
        log.info("created key file %s", path)
        return key, f"key file {path} (new)"
    raise MissingKeyError(f"no authentication key: {advice} (the master creates its key file when it first starts; "
                          f"there is none at {path})")


# ---------------------------------------------------------------------------------------------- TLS


class TLSConfigError(ValueError):
    """The TLS options are incomplete or name files that cannot be used (exported as `clusterexec.TLSConfigError`)."""


_TLS_ARGS = (("cert", "tls_cert / --tls-cert"), ("key", "tls_key / --tls-key"), ("ca", "tls_ca / --tls-ca"))


def tls_context(server: bool, cert: str | os.PathLike | None, key: str | os.PathLike | None,
                ca: str | os.PathLike | None) -> ssl.SSLContext:
    """A TLS context for one end of a clusterexec connection: TLS 1.2 or newer, mutual authentication.

    `cert` and `key` are this machine's certificate and private key (PEM, the key unencrypted); `ca` is the
    certificate of the cluster's own CA (a PEM file, or a directory prepared with `openssl rehash`). Each side
    requires the other to present a certificate signed by that CA and nothing else: the system's public CAs are
    never trusted. Host names are not checked (nodes are often reached by IP address or short name), so every
    certificate the cluster CA signs is a member of the cluster; the shared key is still required on top.

    >>> ctx = tls_context(server=False, cert="me.pem", key="me.key", ca="ca.pem")  # doctest: +SKIP
    """
    given = {"cert": cert, "key": key, "ca": ca}
    missing = [flag for name, flag in _TLS_ARGS if not given[name]]
    if missing:
        raise TLSConfigError(
            f"TLS needs a certificate, its private key and the cluster's CA certificate together; missing: "
            f"{', '.join(missing)}")
    paths = {name: Path(value).expanduser() for name, value in given.items()}
    for name, flag in _TLS_ARGS:
        path = paths[name]
        if not (path.is_file() or (name == "ca" and path.is_dir())):
            raise TLSConfigError(f"{flag}: {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise TLSConfigError(f"{flag}: {path} is not readable by this user")
    if paths["key"].stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("TLS private key %s is readable by other users; run: chmod 600 %s", paths["key"], paths["key"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # OpenSSL picks 1.3 whenever both ends have it
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a non-blocking client cannot serve renegotiation mid-stream
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # the peer is verified against the cluster CA only (see the docstring)
    else:
        ctx.num_tickets = 0  # nobody resumes sessions: do not send tickets
    try:
        if paths["ca"].is_dir():
            ctx.load_verify_locations(capath=str(paths["ca"]))
        else:
            ctx.load_verify_locations(cafile=str(paths["ca"]))
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"tls_ca / --tls-ca: {paths['ca']} holds no usable CA certificate (PEM): {e}") from None
    if not paths["ca"].is_dir() and not ctx.get_ca_certs():
        raise TLSConfigError(f"tls_ca / --tls-ca: {paths['ca']} holds no CA certificate")

    def no_password() -> bytes:
        raise TLSConfigError(f"tls_key / --tls-key: {paths['key']} is encrypted; clusterexec needs an unencrypted "
                             "key (keep it readable by you only: chmod 600)")

    try:
        ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]), password=no_password)
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"cannot use the TLS certificate {paths['cert']} with the key {paths['key']}: {e.reason or e} "
            "(both must be PEM files, and the key must be the certificate's)") from None
    return ctx


# OpenSSL reasons that say the peer refused our certificate (it arrives as an alert from the peer).
_PEER_REFUSED = {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                 "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                 "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
                 "TLSV1_ALERT_DECRYPT_ERROR"}
# ...and reasons that say the peer does not speak TLS at all (it sent something else first).
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL",
            "HTTP_REQUEST", "WRONG_SSL_VERSION", "UNEXPECTED_RECORD", "RECORD_LENGTH_MISMATCH"}


def tls_failure(error: ssl.SSLError, peer: str) -> tuple[str, bool]:
    """Explain a failed TLS handshake with `peer` ("the master at HOST:PORT"): a message, and whether the
    failure is final (a certificate or configuration problem that retrying cannot fix)."""
    reason = getattr(error, "reason", None) or ""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"TLS handshake with {peer} failed: its certificate is not trusted "
                f"({error.verify_message}); it must be signed by the CA given as tls_ca / --tls-ca"), True
    if reason in _PEER_REFUSED:
        return (f"TLS handshake with {peer} failed: it refused our certificate ({reason}); ours must be signed "
                "by the CA it trusts (its --tls-ca)"), True
    if reason in _NOT_TLS:
        return (f"TLS handshake with {peer} failed: it does not speak TLS ({reason}); start it with --tls-cert, "
                "--tls-key and --tls-ca, or connect without TLS"), True
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return f"{peer} closed the connection during the TLS handshake ({error})", False
    if "ALERT" in reason or "VERSION" in reason or "PROTOCOL" in reason or "CIPHER" in reason:
        return f"TLS handshake with {peer} failed: {reason}", True
    return f"TLS handshake with {peer} failed: {error}", False


def add_tls_arguments(parser: argparse.ArgumentParser, whose: str) -> None:
    """--tls-cert, --tls-key, --tls-ca, the same for every command line."""
    parser.add_argument("--tls-cert", metavar="PEM", help=f"{whose} TLS certificate, signed by the cluster's CA; "
                                                          "with --tls-key and --tls-ca, every connection uses TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (unencrypted, chmod 600)")
    parser.add_argument("--tls-ca", metavar="PEM", help="the cluster CA's certificate: peers must present a "
                                                        "certificate it signed")


def tls_from_arguments(args: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    """The context for parsed --tls-* arguments, or None when none was given."""
    if not (args.tls_cert or args.tls_key or args.tls_ca):
        return None
    return tls_context(server, args.tls_cert, args.tls_key, args.tls_ca)
