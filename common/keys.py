"""CURVE keys on disk, in ZeroMQ's certificate format (what pyzmq's zmq.auth and czmq read):
`NAME.key` holds a public key, `NAME.key_secret` the pair and is readable by its owner alone.
Also which addresses may go without keys: only this machine's (loopback, ipc://)."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq
from zmq.utils import z85

from common.endpoints import check_endpoint

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_CHARS = 40


class KeyFileError(ValueError):
    """A key file that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes

    @property
    def fingerprint(self) -> str:
        """What a person compares: the start of the public key, as in logs and errors."""
        return self.public[:8].decode()


def _certificate(kind: str, public: bytes, secret: bytes | None) -> str:
    lines = [
        f"#   ZeroMQ CURVE {kind} Certificate, written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "#   by mte-migration keygen" + ("; never give this file to anyone" if secret else ""),
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def generate(prefix: str) -> tuple[Path, Path]:
    """Write PREFIX.key and PREFIX.key_secret (mode 0600 from the start: never readable by
    others, not even for a moment); refuses to overwrite either."""
    public_path, secret_path = Path(prefix + PUBLIC_SUFFIX), Path(prefix + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if path.exists():
            raise KeyFileError(f"{path} exists: keygen never overwrites a key (remove it first)")
    if not public_path.parent.is_dir():
        raise KeyFileError(f"{public_path.parent} is not a directory")
    public, secret = zmq.curve_keypair()
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(_certificate("Secret", public, secret))
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(_certificate("Public", public, None))
    return public_path, secret_path


def is_z85_key(text: bytes) -> bool:
    """A CURVE key as ZeroMQ writes it: 40 Z85 characters for 32 bytes. Anything else would
    make libzmq refuse the socket option with an error deep inside a running daemon."""
    if len(text) != Z85_KEY_CHARS:
        return False
    try:
        return len(z85.decode(text)) == 32
    except (ValueError, KeyError, UnicodeError):
        return False


def _read_keys(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read it ({exc.strerror})") from None
    found: dict[bytes, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        name, value = (part.strip() for part in line.split(b"=", 1))
        if name in (b"public-key", b"secret-key"):
            value = value.strip(b"\"'")
            if not is_z85_key(value):
                raise KeyFileError(f"{path}: its {name.decode()} is not a 40-character Z85 key")
            found[name] = value
    return found.get(b"public-key"), found.get(b"secret-key")


def load_secret(path: str | Path) -> KeyPair:
    """This node's own key pair, from a .key_secret file only its owner can read."""
    path = Path(path)
    public, secret = _read_keys(path)
    if secret is None or public is None:
        raise KeyFileError(
            f"{path} holds no secret key: give this node's {SECRET_SUFFIX} file "
            f"(the {PUBLIC_SUFFIX} file is for the peer)"
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} can be read by others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: its public key does not belong to its secret key")
    return KeyPair(public, secret)


def load_public(path: str | Path) -> bytes:
    """A peer's public key, from its .key file (a .key_secret works too; only the public half
    is taken)."""
    public, _ = _read_keys(Path(path))
    if public is None:
        raise KeyFileError(f"{path} holds no public key")
    return public


def load_allowed(directory: str | Path) -> dict[bytes, str]:
    """The public keys admitted, each with the name of its file (what logs call the peer).
    Files that are not keys are skipped; a directory without any is refused (it would admit
    nobody, which is never what was meant)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{directory} is not a directory of {PUBLIC_SUFFIX} files")
    allowed: dict[bytes, str] = {}
    for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
        allowed[load_public(path)] = path.stem
    if not allowed:
        raise KeyFileError(f"{directory} holds no {PUBLIC_SUFFIX} file: it would admit no one")
    return allowed


def is_local(uri: str) -> bool:
    """Whether an endpoint stays on this machine: ipc://, or tcp:// on a loopback address.
    (The fault tests' namespace addresses are not: they cross a real, if virtual, link.)"""
    check_endpoint(uri, "address")
    if uri.startswith("ipc://"):
        return True
    host = uri[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface: it may reach anywhere


def require_keys_unless_local(uri: str, what: str, *, have_keys: bool, insecure: bool) -> None:
    """Guest memory crosses this endpoint: in the clear only on this machine, or when asked."""
    if have_keys or insecure or is_local(uri):
        return
    raise KeyFileError(
        f"{what} {uri} leaves this machine: give keys (--key, and --peer-key or --allow) "
        "so that guest memory is encrypted and only known peers get in, or --insecure to "
        "send it in the clear on a network you trust"
    )


def curve_client(sock: zmq.Socket[bytes], own: KeyPair, server_public: bytes) -> None:
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.curve_serverkey = server_public


def curve_server(sock: zmq.Socket[bytes], own: KeyPair, domain: str) -> None:
    """Before bind: every connection must prove a key; the ZAP handler bound in the same
    context decides which keys get in (domain: which allow-list)."""
    sock.curve_server = True
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.zap_domain = domain.encode()


DATA_DOMAIN = "migration"  # the ZAP domain of a destination's listening socket
CONTROL_DOMAIN = "control"  # and of a control endpoint that leaves the machine


@dataclass(frozen=True)
class Security:
    """One daemon's keys and allow-lists, and the rules that follow from them."""

    key: KeyPair | None = None
    allow: str | None = None  # directory of the public keys of sources admitted (dest-node)
    control_allow: str | None = None  # directory of the public keys that may use the control endpoint
    insecure: bool = False  # guest memory in the clear beyond this machine, by request

    def allow_lists(self) -> dict[str, dict[bytes, str]]:
        lists = {}
        if self.allow:
            lists[DATA_DOMAIN] = load_allowed(self.allow)
        if self.control_allow:
            lists[CONTROL_DOMAIN] = load_allowed(self.control_allow)
        return lists

    @property
    def needs_zap(self) -> bool:
        return self.key is not None and bool(self.allow or self.control_allow)

    def check_listen(self, uri: str) -> None:
        """A destination's --listen: keys and an allow-list together, or a local address."""
        if self.key is not None and not self.allow:
            raise KeyFileError(
                "--key on a destination needs --allow DIR: the public keys of the sources it admits"
            )
        if self.allow and self.key is None:
            raise KeyFileError("--allow needs --key: this node's own key pair (dest-node keygen PREFIX)")
        require_keys_unless_local(uri, "--listen", have_keys=self.key is not None, insecure=self.insecure)

    def check_peer(self, uri: str, peer_key: bytes | None, insecure: bool | None = None) -> None:
        """An outgoing migration's destination; `insecure`: this migration's own choice, over
        the node's."""
        if peer_key is not None and self.key is None:
            raise KeyFileError("--peer-key needs --key: this node's own key pair (source-node keygen PREFIX)")
        if self.key is not None and peer_key is None:
            raise KeyFileError(
                f"{uri}: with --key, the destination's public key is needed too (--peer-key FILE)"
            )
        require_keys_unless_local(
            uri, "destination", have_keys=peer_key is not None, insecure=self.insecure or bool(insecure)
        )

    def check_control(self, uri: str) -> None:
        """A control endpoint steers the guest and can send it anywhere: beyond this machine
        only with keys on both ends, and never merely --insecure."""
        if is_local(uri):
            return
        if self.key is None or not self.control_allow:
            raise KeyFileError(
                f"control endpoint {uri} leaves this machine: it needs --key and --control-allow DIR "
                "(the public keys of those who may steer this node), or an ipc:// or 127.0.0.1 address"
            )

    def control_curve(self, uri: str) -> KeyPair | None:
        """The key a control endpoint serves with: only off this machine (ctl on the same host
        needs no key)."""
        return None if is_local(uri) else self.key
