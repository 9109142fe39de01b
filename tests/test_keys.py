"""Keys on disk, the allow-list decision and the rules on which addresses need keys: the pure
parts of issue 10's admission, checked without daemons."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import structlog
import zmq
import zmq.auth
from zmq.utils import z85

from common.keys import (
    CONTROL_DOMAIN,
    DATA_DOMAIN,
    KeyFileError,
    KeyPair,
    Security,
    generate,
    is_local,
    load_allowed,
    load_public,
    load_secret,
)
from common.protocol.ratelimit import PerSecond
from common.zap import ZapHandler, decide


def test_keygen_writes_a_pair_zeromq_reads_with_the_secret_private(tmp_path: Path) -> None:
    public_path, secret_path = generate(str(tmp_path / "dest"))
    assert (public_path.name, secret_path.name) == ("dest.key", "dest.key_secret")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) & 0o044, "the public half is for sharing"
    pair = load_secret(secret_path)
    # the format pyzmq's zmq.auth (and czmq) reads
    assert zmq.auth.load_certificate(secret_path) == (pair.public, pair.secret)
    assert zmq.auth.load_certificate(public_path) == (pair.public, None)
    assert load_public(public_path) == pair.public == zmq.curve_public(pair.secret)
    assert b"secret-key" not in public_path.read_bytes()


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path / "a"))
    before = secret_path.read_bytes()
    with pytest.raises(KeyFileError, match="exists"):
        generate(str(tmp_path / "a"))
    assert secret_path.read_bytes() == before
    with pytest.raises(KeyFileError, match="not a directory"):
        generate(str(tmp_path / "missing" / "a"))


def test_secret_keys_are_refused_when_they_are_not_one(tmp_path: Path) -> None:
    public_path, secret_path = generate(str(tmp_path / "n"))
    with pytest.raises(KeyFileError, match="holds no secret key"):
        load_secret(public_path)
    os.chmod(secret_path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_secret(secret_path)
    os.chmod(secret_path, 0o600)
    other_public, _ = zmq.curve_keypair()
    text = secret_path.read_text().replace(load_public(public_path).decode(), other_public.decode())
    secret_path.write_text(text)
    with pytest.raises(KeyFileError, match="does not belong"):
        load_secret(secret_path)
    with pytest.raises(KeyFileError, match="no such key file"):
        load_secret(tmp_path / "nothing.key_secret")
    (tmp_path / "short.key").write_text('public-key = "abc"\n')
    with pytest.raises(KeyFileError, match="40-character"):
        load_public(tmp_path / "short.key")


def test_the_allow_list_names_each_key_by_its_file(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.mkdir()
    with pytest.raises(KeyFileError, match="admit no one"):
        load_allowed(allow)
    a, _ = generate(str(allow / "alpha"))
    b, _ = generate(str(tmp_path / "beta"))
    (allow / "beta.key").write_bytes(b.read_bytes())
    (allow / "notes.txt").write_text("not a key")
    allowed = load_allowed(allow)
    assert allowed == {load_public(a): "alpha", load_public(b): "beta"}
    with pytest.raises(KeyFileError, match="not a directory"):
        load_allowed(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("ipc:///tmp/x.sock", True),
        ("tcp://127.0.0.1:4444", True),
        ("tcp://127.8.9.10:4444", True),
        ("tcp://localhost:4444", True),
        ("tcp://[::1]:4444", True),
        ("tcp://0.0.0.0:4444", False),
        ("tcp://*:4444", False),
        ("tcp://10.0.0.2:4444", False),
        ("tcp://[fe80::1]:4444", False),
        ("tcp://dest.example:4444", False),
        ("tcp://eth0:4444", False),
    ],
)
def test_which_addresses_stay_on_this_machine(uri: str, local: bool) -> None:
    assert is_local(uri) is local


def pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def test_keys_or_a_local_address_or_insecure_by_request(tmp_path: Path) -> None:
    remote, local = "tcp://10.0.0.2:4444", "tcp://127.0.0.1:4444"
    Security().check_listen(local)
    Security().check_peer(local, None)
    with pytest.raises(KeyFileError, match="--insecure"):
        Security().check_listen(remote)
    with pytest.raises(KeyFileError, match="leaves this machine"):
        Security().check_peer(remote, None)
    Security(insecure=True).check_listen(remote)
    Security(insecure=True).check_peer(remote, None)
    with pytest.raises(KeyFileError, match="needs --allow"):
        Security(key=pair()).check_listen(remote)
    with pytest.raises(KeyFileError, match="needs --key"):
        Security(allow=str(tmp_path)).check_listen(local)
    Security(key=pair(), allow=str(tmp_path)).check_listen(remote)
    with pytest.raises(KeyFileError, match="--peer-key"):
        Security(key=pair()).check_peer(remote, None)
    with pytest.raises(KeyFileError, match="needs --key"):
        Security().check_peer(remote, pair().public)
    Security(key=pair()).check_peer(remote, pair().public)


def test_a_control_endpoint_off_this_machine_needs_keys_never_just_insecure(tmp_path: Path) -> None:
    Security().check_control("ipc:///tmp/ctl")
    Security().check_control("tcp://127.0.0.1:5555")
    for security in (Security(), Security(insecure=True), Security(key=pair())):
        with pytest.raises(KeyFileError, match="--control-allow"):
            security.check_control("tcp://0.0.0.0:5555")
    keyed = Security(key=pair(), control_allow=str(tmp_path))
    keyed.check_control("tcp://0.0.0.0:5555")
    assert keyed.control_curve("tcp://0.0.0.0:5555") is keyed.key
    assert keyed.control_curve("tcp://127.0.0.1:5555") is None, "ctl on this host needs no key"


def zap_request(
    key: bytes, *, domain: bytes = DATA_DOMAIN.encode(), mechanism: bytes = b"CURVE"
) -> list[bytes]:
    return [b"1.0", b"req-7", domain, b"10.0.0.9", b"", mechanism, z85.decode(key)]


def test_the_zap_decision() -> None:
    known, stranger = pair(), pair()
    lists = {DATA_DOMAIN: {known.public: "src"}, CONTROL_DOMAIN: {stranger.public: "ops"}}
    reply, verdict = decide(zap_request(known.public), lists)
    assert reply[:3] == [b"1.0", b"req-7", b"200"] and reply[4] == known.public
    assert verdict.allowed and verdict.name == "src" and verdict.address == "10.0.0.9"
    # a key is admitted in its own domain only: the control list does not open the data port
    reply, verdict = decide(zap_request(stranger.public), lists)
    assert reply[2] == b"400" and not verdict.allowed and "not in the allow-list" in verdict.reason
    reply, _ = decide(zap_request(stranger.public, domain=CONTROL_DOMAIN.encode()), lists)
    assert reply[2] == b"200"
    reply, verdict = decide(zap_request(known.public, domain=b"other"), lists)
    assert reply[2] == b"400" and "no allow-list" in verdict.reason
    reply, verdict = decide(zap_request(known.public, mechanism=b"NULL")[:6], lists)
    assert reply[2] == b"400" and "without a CURVE key" in verdict.reason
    reply, verdict = decide([b"1.0", b"r"], lists)
    assert reply[:3] == [b"1.0", b"r", b"500"] and not verdict.allowed
    bad_version = zap_request(known.public)
    bad_version[0] = b"2.0"
    assert decide(bad_version, lists)[0][2] == b"400"


def test_per_second_budgets() -> None:
    budget = PerSecond(3)
    assert [budget.take(10.0 + i * 0.1) for i in range(5)] == [True, True, True, False, False]
    assert budget.take(11.0), "a new second, a new budget"
    assert [budget.take(11.5) for _ in range(3)] == [True, True, False]


def test_a_reload_that_fails_keeps_the_list_in_force(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.mkdir()
    first, _ = generate(str(allow / "first"))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        handler = ZapHandler(ctx, lambda: {DATA_DOMAIN: load_allowed(allow)}, structlog.get_logger())
        second, _ = generate(str(allow / "second"))
        handler.reload()
        assert set(handler.allowed[DATA_DOMAIN].values()) == {"first", "second"}
        first.unlink()
        second.unlink()
        handler.reload()  # an empty directory: refused, the old list stays
        assert set(handler.allowed[DATA_DOMAIN].values()) == {"first", "second"}
        handler.close()
    finally:
        ctx.term()
