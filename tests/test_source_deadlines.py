"""When the source asks to be woken (`next_deadline`, what the daemon sleeps on), to the
millisecond, in each phase; and the operator's postcopy verbs at their edges."""

from __future__ import annotations

import pytest

from common.constants import PROTOCOL_VERSION
from common.guest.workload import Fill
from common.protocol.events import Reconnect
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.protocol.source import SourceSession
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeSourceHost, busy_guest
from tests.test_source_session import PARAMS, active, from_dest, sent, started


def test_an_idle_or_ended_source_sleeps_an_hour() -> None:
    idle = SourceSession(busy_guest(), FakeSourceHost(), PARAMS, 0.0)
    assert idle.next_deadline(5.0) == 3605.0
    src, _ = active()
    src.cancel(0.02)
    assert src.next_deadline(7.0) == 3607.0


def test_setup_wakes_to_resend_the_hello_not_for_heartbeats() -> None:
    src, _ = started(
        MigrationParameters(peer_timeout_s=3.0, retransmit_after_s=1.0, heartbeat_interval_s=0.25)
    )
    assert src.next_deadline(0.1) == 1.0, "the hello's retransmission, not a heartbeat at 0.25"
    src.poll(1.1)
    sent(src)
    assert src.next_deadline(1.2) == pytest.approx(2.1)
    src.poll(2.2)
    sent(src)
    assert src.next_deadline(2.3) == pytest.approx(3.0), "then the peer timeout: setup gives up"


def test_a_source_with_pages_to_send_and_room_for_them_is_due_now() -> None:
    src, _ = active()
    assert src.precopy.pass_ is not None and src.in_flight < src.params.window
    assert src.next_deadline(0.1) == 0.1, "before the heartbeat due at 0.26"
    src.poll(0.1)  # fills the window of two
    sent(src)
    assert src.in_flight >= src.params.window
    assert src.next_deadline(0.1) > 0.1, "a full window waits for an ack"


def test_a_capped_source_wakes_when_its_budget_allows_the_next_batch() -> None:
    params = MigrationParameters(peer_timeout_s=10.0, reconnect_timeout_s=20.0, max_bandwidth=1 << 20)
    src = SourceSession(busy_guest(ram=16 << 20, fill=Fill.RANDOM), FakeSourceHost(), params, 0.0)
    src.start(0.0)
    ack = pb.HelloAck(accepted=True, protocol_version=PROTOCOL_VERSION, initial_credit=2)
    src.receive(from_dest(src, 1, received=1, hello_ack=ack), 0.01)
    t = 0.02
    send_at = t
    while send_at <= t and t < 0.5:  # the 1 MiB burst is spent within moments
        src.poll(t)
        for m in sent(src):
            if m.envelope.seq:
                src.receive(from_dest(src, 0, received=1, ack=pb.Ack()), t)
        send_at = next(timer.at for timer in src.timers(t) if timer.name == "send")
        t += 0.001
    assert send_at > t - 0.001, "the cap holds the next batch back"
    assert src.next_deadline(t) == pytest.approx(min(send_at, src.link.t_last_sent + 0.5))


def test_an_active_source_with_nothing_to_send_sleeps_until_its_heartbeat() -> None:
    src, _ = active()
    src.precopy.pass_ = None
    assert src.next_deadline(0.05) == pytest.approx(0.01 + PARAMS.heartbeat_interval_s)


def test_a_disconnected_source_wakes_for_its_next_resume() -> None:
    src, _ = active()
    src.precopy.pass_ = None
    src.poll(1.02)
    assert [e for e in src.take_events() if isinstance(e, Reconnect)]
    assert not src.connected
    assert src.next_deadline(1.03) == pytest.approx(src.reconnector.next_at)


# -- the operator's postcopy verbs --------------------------------------------------------------
def test_postcopy_start_is_refused_in_precopy_and_after_the_end() -> None:
    src, _ = active()
    with pytest.raises(
        RuntimeError, match=r"did not allow postcopy: cancel it .*ctl migrate URI --mode postcopy"
    ):
        src.start_postcopy(0.1)
    post, _ = active(MigrationParameters(postcopy=True, postcopy_after_rounds=5))
    post.cancel(0.1)
    with pytest.raises(RuntimeError, match="postcopy cannot start in phase cancelled"):
        post.start_postcopy(0.2)


def test_postcopy_start_during_setup_switches_over_as_soon_as_the_destination_answers() -> None:
    src, _ = started(MigrationParameters(postcopy=True, postcopy_after_rounds=5))
    src.start_postcopy(0.005)
    assert src.phase is SourcePhase.SETUP, "nothing to switch over yet"
    ack = pb.HelloAck(
        accepted=True, protocol_version=PROTOCOL_VERSION, initial_credit=2, features=[pb.FEATURE_POSTCOPY]
    )
    src.receive(from_dest(src, 1, received=1, hello_ack=ack), 0.01)
    assert src.phase is SourcePhase.POSTCOPY and src.round == 0, "no precopy round at all"


def test_recover_is_refused_when_there_is_nothing_to_recover() -> None:
    src, _ = active()
    with pytest.raises(RuntimeError, match=r"nothing to recover \(phase active\)"):
        src.recover(0.1)
