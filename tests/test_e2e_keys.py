"""Only the right peer gets in, through the real daemons on loopback: an authorised source
migrates; an unknown key is refused with a reason the source can read and no guest ever
exists at the destination (until the operator allows the key and sends SIGHUP); a wiretap
between the daemons sees guest memory without keys and none with them; a stranger flooding
the destination's port does not stop a migration."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import zmq

from common.constants import REFUSAL_LOG_LINES_PER_S
from common.control import request
from common.guest.workload import Fill, WorkloadConfig, boot
from common.keys import curve_client, generate, load_public, load_secret
from common.units import parse_size
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from faultinject.proxy import FaultProxy
from source_node.demo import free_port
from tests.e2e import (
    SMALL_GUEST,
    SOURCE,
    Dest,
    Finished,
    Keys,
    busy_small_guest,
    make_keys,
    reference,
    run_source,
    same_guest,
    start_source,
)

pytestmark = pytest.mark.slow
RANDOM_GUEST = ["--ram", "16MiB", "--working-set", "2MiB", "--fill", "random", "--seed", "9"]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """A destination, an allowed source and a stranger."""
    return make_keys(tmp_path / "keys", "stranger")


def guest_sample() -> bytes:
    """64 bytes the guest of RANDOM_GUEST holds at boot (random data: lz4 leaves it as is)."""
    config = WorkloadConfig(seed=9, working_set_bytes=parse_size("2MiB"), fill=Fill.RANDOM)
    guest = boot(parse_size("16MiB"), config)
    pages = np.flatnonzero(guest.memory.data_populated)
    page = guest.memory.pages[pages[len(pages) // 2]]
    return bytes(page[1024:1088])


@pytest.mark.parametrize("with_keys", [True, False], ids=["curve", "clear"])
def test_a_wiretap_sees_guest_memory_only_without_keys(tmp_path: Path, keys: Keys, with_keys: bool) -> None:
    sample = guest_sample()
    dest_keys = keys.dest_args() if with_keys else []
    source_keys = keys.source_args() if with_keys else []
    dest = Dest(tmp_path, "--stop-at-step", "0", *dest_keys)
    try:
        with FaultProxy(("127.0.0.1", dest.port), capture_bytes=64 << 20) as tap:
            src = run_source(
                tmp_path, *RANDOM_GUEST, "--stop-at-step", "0", "--migrate-to", tap.uri, *source_keys
            )
            captured = bytes(tap.captured)
        got = dest.finish()
    finally:
        dest.kill()
    assert src.code == 0 and src.report["status"] == "completed", src.report.get("error")
    assert same_guest(got.report["guest"], src.report["guest"])
    assert len(captured) > 2 << 20, "the tap saw the migration"
    if with_keys:
        assert sample not in captured, "guest memory crossed the wire readable"
        assert "peer key admitted" in got.stderr and '"peer": "source"' in got.stderr
    else:
        assert sample in captured, "the sample is guest memory: a tap without keys must see it"


def test_an_unknown_key_is_refused_until_the_operator_allows_it(tmp_path: Path, keys: Keys) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "0", *keys.dest_args())

    def stranger_migrates(stop: str) -> Finished:
        return run_source(
            tmp_path,
            *SMALL_GUEST,
            "--stop-at-step",
            stop,
            "--migrate-to",
            dest.uri,
            *keys.source_args("stranger"),
            timeout=60,
        )

    try:
        refused = stranger_migrates("300")
        assert refused.code == 1 and refused.report["status"] == "failed"
        assert "refused this node's key" in refused.report["error"]
        assert "--allow directory" in refused.report["error"], "it says what to do"
        assert refused.report["guest"]["here"] is True, "the guest stayed where it was"
        status = request(dest.control, "status")["result"]
        assert status["guest"] is None and status["phase"] == "waiting", "no guest was ever made there"
        assert status["ram"]["wire_bytes"] == 0

        # the operator allows the key and tells the destination: the same source gets in
        shutil.copy(keys.public("stranger"), keys.allow)
        dest.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        admitted = stranger_migrates("0")
        got = dest.finish()
    finally:
        dest.kill()
    assert admitted.code == 0 and admitted.report["status"] == "completed", admitted.report.get("error")
    assert got.report["status"] == "completed"
    assert "peer key refused" in got.stderr and "allow-list reloaded" in got.stderr


def test_keys_are_checked_before_anything_starts(tmp_path: Path, keys: Keys) -> None:
    """Mistakes with keys are usage errors that name the file or the rule, before a guest boots."""
    port = 47000 + os.getpid() % 1000
    cases = [
        (["dest_node.cli", "--listen", f"tcp://0.0.0.0:{port}"], "--insecure"),
        (
            ["dest_node.cli", "--listen", f"tcp://127.0.0.1:{port}", "--key", keys.secret("dest")],
            "needs --allow",
        ),
        (
            [
                "dest_node.cli",
                "--listen",
                f"tcp://127.0.0.1:{port}",
                "--key",
                keys.public("dest"),
                "--allow",
                keys.allow,
            ],
            "holds no secret key",
        ),
        (
            [
                "dest_node.cli",
                "--listen",
                f"tcp://127.0.0.1:{port}",
                "--control",
                f"tcp://0.0.0.0:{port + 1}",
            ],
            "--control-allow",
        ),
        (["source_node.cli", *SMALL_GUEST, "--migrate-to", f"tcp://10.9.9.9:{port}"], "leaves this machine"),
        (
            [
                "source_node.cli",
                *SMALL_GUEST,
                "--migrate-to",
                f"tcp://127.0.0.1:{port}",
                "--key",
                keys.secret("source"),
            ],
            "--peer-key",
        ),
    ]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for argv, _ in cases
    ]
    for (argv, words), run in zip(cases, runs, strict=True):
        _, err = run.communicate(timeout=30)
        assert run.returncode == 2, (argv, err)
        assert words in err and "Traceback" not in err, err


class Flood:
    """A stranger on the destination's port, as fast as one thread can go. Without keys at the
    destination: garbage, lies and messages of endless frames. With keys: handshakes, each
    from a fresh connection offering a fresh unknown key (libzmq does not retry a refused one)."""

    def __init__(self, uri: str, server_key: bytes | None = None) -> None:
        self.uri = uri
        self.server_key = server_key
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run if server_key is None else self._handshakes, daemon=True
        )
        self.thread.start()

    def _messages(self, rng: random.Random) -> list[list[bytes]]:
        fake = framing.envelope(rng.randbytes(8), 5, heartbeat=pb.Heartbeat())
        return [
            [rng.randbytes(rng.randrange(1, 200))],
            [rng.randbytes(32)] * 200,  # many frames
            framing.encode(fake),
            [b"MTEM" + rng.randbytes(60), rng.randbytes(4096)],
        ]

    def _run(self) -> None:
        rng = random.Random(7)
        messages = self._messages(rng)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(self.uri)
        while not self.stop.is_set():
            try:
                sock.send_multipart(messages[self.sent % len(messages)], flags=zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                time.sleep(0.0005)
            if self.sent % 64 == 0:
                time.sleep(0)  # let the daemons' threads in
        sock.close(linger=0)

    def _handshakes(self) -> None:
        live: list[zmq.Socket[bytes]] = []
        while not self.stop.is_set():
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = self.server_key
            sock.connect(self.uri)
            live.append(sock)
            self.sent += 1
            if len(live) > 32:
                live.pop(0).close(linger=0)
            time.sleep(0.002)
        for sock in live:
            sock.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.ctx.term()


@pytest.mark.faults
@pytest.mark.parametrize("with_keys", [False, True], ids=["clear", "curve"])
def test_a_stranger_flooding_the_port_does_not_stop_the_migration(
    tmp_path: Path, keys: Keys, with_keys: bool
) -> None:
    """Without keys the stranger's garbage reaches the destination and is refused; with keys it
    never gets past the handshake, and its handshakes are refused by the thousand."""
    guest = busy_small_guest(seed=4, stop=1500, pace="1500")
    expected = reference(tmp_path, *guest)
    dest_keys = keys.dest_args() if with_keys else []
    source_keys = keys.source_args() if with_keys else []
    dest = Dest(tmp_path, "--stop-at-step", "1500", *dest_keys)
    flood = Flood(dest.uri, load_public(keys.public("dest")) if with_keys else None)
    try:
        time.sleep(0.3)  # the flood is on before the source arrives
        src = run_source(tmp_path, *guest, "--migrate-to", dest.uri, *source_keys, timeout=120)
        got = dest.finish(timeout=60)
    finally:
        flood.close()
        dest.kill()
    assert src.code == 0 and src.report["status"] == "completed", src.report.get("error")
    assert same_guest(got.report["guest"], expected)
    lines = [json.loads(line) for line in got.stderr.splitlines() if line.startswith("{")]
    if with_keys:
        assert got.report["refused_messages"] == 0, "no stranger's message got past the handshake"
        one_by_one = sum(1 for e in lines if e["event"] == "peer key refused")
        counted = sum(e["count"] for e in lines if e["event"] == "peer keys refused")
        assert one_by_one + counted > 100, (one_by_one, counted)
        stamps = [datetime.fromisoformat(e["timestamp"]) for e in lines]
        seconds = (max(stamps) - min(stamps)).total_seconds()
        assert one_by_one <= REFUSAL_LOG_LINES_PER_S * (seconds + 1), "a few lines a second, then counts"
    else:
        assert flood.sent > 1000, flood.sent
        assert got.report["refused_messages"] > 100
        # the log says so in counts, not a line per message
        assert got.stderr.count("messages refused") < got.report["refused_messages"] / 10


def test_a_control_endpoint_off_this_machine_answers_known_keys_only(tmp_path: Path, keys: Keys) -> None:
    """Bound on every interface (reached here over loopback): only a key in --control-allow
    gets an answer; that user starts a keyed migration with `ctl migrate --peer-key`."""
    ctl_allow = tmp_path / "ctl-allow"
    ctl_allow.mkdir()
    ops_public, ops_secret = generate(str(tmp_path / "ops"))
    shutil.copy(ops_public, ctl_allow)
    port = free_port()
    reach = f"tcp://127.0.0.1:{port}"
    source = subprocess.Popen(
        [
            *SOURCE,
            *SMALL_GUEST,
            "--stop-at-step",
            "0",
            "--control",
            f"tcp://0.0.0.0:{port}",
            "--key",
            keys.secret("source"),
            "--control-allow",
            str(ctl_allow),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    dest = Dest(tmp_path, "--stop-at-step", "0", "--key", keys.secret("dest"), "--allow", keys.allow)
    ops = (load_secret(ops_secret), load_public(keys.public("source")))
    try:
        deadline = time.monotonic() + 20
        while not request(reach, "status", timeout_s=1.0, curve=ops).get("ok"):
            assert time.monotonic() < deadline and source.poll() is None, "source-node did not come up"
        assert not request(reach, "status", timeout_s=1.0).get("ok"), "no key: no answer"
        stranger = (load_secret(keys.secret("stranger")), ops[1])
        assert not request(reach, "status", timeout_s=1.0, curve=stranger).get("ok"), "unknown key: no answer"
        source_public = str(keys.public("source"))
        ctl = [*SOURCE, "ctl", "--control", reach, "--key", str(ops_secret), "--control-key", source_public]
        started = subprocess.run(
            [*ctl, "migrate", dest.uri, "--peer-key", keys.public("dest")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert started.returncode == 0, started.stderr
        got = dest.finish(timeout=60)
        assert got.report["status"] == "completed" and "peer key admitted" in got.stderr
    finally:
        dest.kill()
        source.send_signal(signal.SIGTERM)
        _, err = source.communicate(timeout=30)
    assert "peer key refused" in err and '"domain": "control"' in err


def test_an_allowed_key_cannot_take_over_another_keys_session_by_naming_it(
    tmp_path: Path, keys: Keys
) -> None:
    """The key a connection proved (the ZAP user id) reaches the session: a second allowed
    source that names a running session, even under its connection's routing id and a newer
    epoch, is refused, and the migration goes on with its own source."""
    shutil.copy(keys.public("stranger"), keys.allow)
    dest = Dest(tmp_path, "--stop-at-step", "2000", *keys.dest_args())
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    try:
        proc, report = start_source(
            tmp_path,
            *SMALL_GUEST,
            "--stop-at-step",
            "2000",
            "--steps-per-second",
            "1000",
            "--max-bandwidth",
            "4MiB",
            "--migrate-to",
            dest.uri,
            *keys.source_args(),
        )
        assert proc.stderr is not None
        session = ""
        for line in proc.stderr:
            if '"migration started"' in line:
                session = json.loads(line)["session"]
                break
        assert session, "the source said which session it opened"
        deadline = time.monotonic() + 20
        while request(dest.control, "status")["result"]["phase"] != "receiving":
            assert time.monotonic() < deadline, "the destination opened the session"
            time.sleep(0.02)
        sid = bytes.fromhex(session)
        stranger.setsockopt(zmq.ROUTING_ID, sid + (9).to_bytes(4, "big"))
        curve_client(stranger, load_secret(keys.secret("stranger")), load_public(keys.public("dest")))
        stranger.connect(dest.uri)
        takeover = framing.envelope(sid, 0, resume=pb.Resume(epoch=9))
        takeover.epoch = 9
        stranger.send_multipart(framing.encode(takeover))
        assert stranger.poll(10_000), "the destination answers the stranger"
        answer = framing.decode(stranger.recv_multipart())
        assert answer.kind == "abort" and answer.envelope.abort.code == pb.ERROR_UNAUTHORIZED
        assert answer.envelope.abort.reason == "this session belongs to another source's key"
        rest = proc.stderr.read()
        proc.wait(timeout=60)
        got = dest.finish(timeout=60)
    finally:
        stranger.close(linger=0)
        ctx.term()
        dest.kill()
    src_report = json.loads(report.read_text())
    assert proc.returncode == 0 and src_report["status"] == "completed", rest[-2000:]
    assert got.report["status"] == "completed" and got.report["link"]["resumes"] == 0
