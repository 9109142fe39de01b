"""The pure parts under the link: the bandwidth cap, parameter checks, the phase table."""

from __future__ import annotations

import math

import pytest

from common.protocol.params import MigrationParameters
from common.protocol.phases import (
    DEST_MOVES,
    DEST_TRIGGERS,
    SOURCE_FAILURES,
    SOURCE_MOVES,
    SOURCE_TRIGGERS,
    DestPhase,
    PhaseMachine,
    ProtocolError,
    SourcePhase,
)
from common.protocol.ratelimit import TokenBucket
from tests.protocol_harness import Pair, busy_guest
from tests.test_protocol import assert_handed_over


def sent_in(bucket: TokenBucket, start: float, seconds: float, size: int = 1 << 16) -> int:
    """Bytes a sender that sends whenever allowed gets through in `seconds`."""
    now, sent = start, 0
    while now < start + seconds:
        ready = bucket.ready_at(now)
        if ready is not None:
            now = ready
            continue
        bucket.spend(size, now)
        sent += size
    return sent


@pytest.mark.parametrize("rate", [1 << 20, 50 << 20])
def test_the_cap_holds_over_any_second(rate: int) -> None:
    bucket = TokenBucket(rate, 0.0, min_burst=1 << 16)
    assert sent_in(bucket, 0.0, 2.0) == pytest.approx(2 * rate, rel=0.05)


def test_a_lowered_cap_takes_effect_at_once_and_a_raised_one_too() -> None:
    bucket = TokenBucket(100 << 20, 0.0, min_burst=1 << 16)
    sent_in(bucket, 0.0, 1.0)
    bucket.set_rate(1 << 20, 1.0)
    # no debt from the faster past: the next second carries the new rate, not nothing
    assert sent_in(bucket, 1.0, 1.0) == pytest.approx(1 << 20, rel=0.1)
    bucket.set_rate(0, 2.0)
    assert bucket.ready_at(2.0) is None


def test_the_cap_does_not_stretch_the_downtime() -> None:
    cap = 2 << 20
    params = MigrationParameters(max_bandwidth=cap, downtime_limit_ms=60_000)  # switch over at once
    pair = Pair(
        busy_guest(seed=9, ram=16 << 20, working_set=4 << 20, dirty_pages_per_step=32),
        params=params,
        guest_speed=2000,
    ).run()
    assert_handed_over(pair)
    report = pair.src.report(pair.now)
    last_pass = report["ram"]["downtime_bytes"]
    assert last_pass > cap // 8, "the switchover pass is big enough to tell"
    # at the cap it would take last_pass / cap seconds; it takes a fraction of that
    assert report["downtime_ms"] < 1000 * last_pass / cap / 4


@pytest.mark.parametrize(
    "name",
    ["downtime_limit_ms", "peer_timeout_s", "reconnect_timeout_s", "convergence_timeout_s", "throttle_max"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_parameters_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        MigrationParameters(**{name: value}).check()


def test_set_parameters_takes_sizes_and_names_what_it_refuses() -> None:
    params = MigrationParameters()
    assert params.updated({"max_bandwidth": "20MiB"}).max_bandwidth == 20 << 20
    assert params.updated({"downtime_limit_ms": "50"}).downtime_limit_ms == 50.0
    with pytest.raises(ValueError, match="max_bandwidth: 'fast' is not a size"):
        params.updated({"max_bandwidth": "fast"})
    with pytest.raises(ValueError, match="convergence_timeout_s must be a finite number"):
        params.updated({"convergence_timeout_s": "nan"})
    with pytest.raises(ValueError, match="cannot set window"):
        params.updated({"window": 3})


def test_every_phase_can_end_and_no_move_leaves_a_terminal_phase() -> None:
    for moves, phases in ((SOURCE_MOVES, SourcePhase), (DEST_MOVES, DestPhase)):
        assert set(moves) == set(phases), "every phase is in the table"
        for phase in phases:
            if phase is DestPhase.RUNNING:
                # the migration is over, but the copy here stops if the source's operator takes
                # the guest back ('ctl settle here'), or it would run twice
                assert moves[phase] == {DestPhase.FAILING}
            elif phase.terminal:
                assert not moves[phase]
            else:
                assert moves[phase], f"{phase} has a way out"


def test_a_move_the_table_does_not_list_is_refused_and_changes_nothing() -> None:
    machine = PhaseMachine(SourcePhase.ACTIVE, SOURCE_MOVES, SOURCE_TRIGGERS, SOURCE_FAILURES)
    with pytest.raises(ProtocolError, match="no move from active to committing"):
        machine.move(SourcePhase.COMMITTING)
    assert machine.phase is SourcePhase.ACTIVE
    machine.move(SourcePhase.SWITCHOVER)
    assert machine.phase is SourcePhase.SWITCHOVER


def test_a_trigger_leads_only_where_the_table_says_and_failing_is_always_open() -> None:
    machine = PhaseMachine(SourcePhase.ACTIVE, SOURCE_MOVES, SOURCE_TRIGGERS, SOURCE_FAILURES)
    with pytest.raises(ProtocolError, match="abort in phase active may not lead to switchover"):
        machine.fire("abort", lambda: machine.move(SourcePhase.SWITCHOVER))
    assert machine.phase is SourcePhase.ACTIVE
    with pytest.raises(ProtocolError, match="verify_result is not handled in phase active"):
        machine.fire("verify_result", lambda: None)
    machine.fire("send", lambda: machine.move(SourcePhase.SWITCHOVER))
    assert machine.phase is SourcePhase.SWITCHOVER
    machine.fire("abort", lambda: machine.move(SourcePhase.FAILING))
    assert machine.phase is SourcePhase.FAILING, "a failure needs no listing"
    machine.move(SourcePhase.FAILED)  # outside any trigger: the move table alone


def test_a_phase_arms_only_the_timers_its_row_lists() -> None:
    """SETUP has no heartbeat (the hello, resent, is one) and no convergence clock; a handover
    done at the destination leaves only Started to resend."""
    pair = Pair(busy_guest(seed=2), MigrationParameters(max_bandwidth=1 << 20))
    pair.src.start(pair.now)
    in_setup = {timer.name for timer in pair.src.timers(pair.now)}
    assert in_setup and in_setup <= set(SOURCE_TRIGGERS[SourcePhase.SETUP])
    assert "send-heartbeat" not in in_setup and "give-up" not in in_setup
    pair.run_until(lambda: pair.src.phase is SourcePhase.ACTIVE)
    active = {timer.name for timer in pair.src.timers(pair.now)}
    assert {"convergence", "send-heartbeat", "give-up"} <= active and "setup-timeout" not in active
    for phase in SourcePhase:
        pair.src.machine.phase = phase
        names = {timer.name for timer in pair.src.timers(pair.now)}
        assert names <= set(SOURCE_TRIGGERS.get(phase, {})), phase
    for phase in DestPhase:
        pair.dst.machine.phase = phase
        names = {timer.name for timer in pair.dst.timers(pair.now)}
        assert names <= set(DEST_TRIGGERS.get(phase, {})), phase


@pytest.mark.parametrize("prog, source", [("source-node ctl", True), ("dest-node ctl", False)])
def test_ctl_offers_each_daemon_what_it_answers(
    prog: str, source: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.ctl import ctl_main

    with pytest.raises(SystemExit):
        ctl_main(["--help"], prog, source=source)
    usage = capsys.readouterr().out
    for command in ("status", "cancel", "migrate", "settle", "set-parameters", "postcopy-start", "events"):
        assert command in usage
    with pytest.raises(SystemExit) as bad:
        ctl_main(["--control", "127.0.0.1:1", "status"], prog, source=source)
    assert bad.value.code == 2 and "is not a tcp://HOST:PORT or ipc://PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("accepted", "refused"),
    [
        ({"downtime_limit_ms": 0.001}, {"downtime_limit_ms": 0}),
        ({"max_bandwidth": 0}, {"max_bandwidth": -1}),
        ({"window": 1}, {"window": 0}),
        ({"window": 1024}, {"window": 1025}),
        ({"heartbeat_interval_s": 0.001}, {"heartbeat_interval_s": 0}),
        (
            {"heartbeat_interval_s": 0.99, "peer_timeout_s": 1.0, "reconnect_timeout_s": 1.0},
            {"heartbeat_interval_s": 1.0, "peer_timeout_s": 1.0, "reconnect_timeout_s": 1.0},
        ),
        (
            {"peer_timeout_s": 4.0, "reconnect_timeout_s": 4.0},
            {"peer_timeout_s": 4.0, "reconnect_timeout_s": 3.99},
        ),
        ({"throttle_initial": 0.0}, {"throttle_initial": -0.01}),
        ({"throttle_initial": 0.5, "throttle_max": 0.5}, {"throttle_initial": 0.6, "throttle_max": 0.5}),
        ({"throttle_max": 0.999}, {"throttle_max": 1.0}),
        ({"convergence_timeout_s": 0.001}, {"convergence_timeout_s": 0}),
    ],
)
def test_each_parameter_check_sits_at_its_edge(accepted: dict, refused: dict) -> None:
    assert MigrationParameters(**accepted).check() == MigrationParameters(**accepted)
    with pytest.raises(ValueError):
        MigrationParameters(**refused).check()


def test_set_parameters_converts_what_an_operator_types() -> None:
    params = MigrationParameters()
    assert params.updated({"max_bandwidth": 1000}).max_bandwidth == 1000
    assert params.updated({"reconnect_timeout_s": 20}).reconnect_timeout_s == 20.0
    assert params.updated({}) == params
    with pytest.raises(ValueError, match="downtime_limit_ms: True is not a number"):
        params.updated({"downtime_limit_ms": True})
    with pytest.raises(ValueError, match="downtime_limit_ms: 'soon' is not a number"):
        params.updated({"downtime_limit_ms": "soon"})
    with pytest.raises(ValueError, match="downtime_limit_ms: None is not a number"):
        params.updated({"downtime_limit_ms": None})
    assert params.settable() == {
        "downtime_limit_ms": params.downtime_limit_ms,
        "max_bandwidth": 0,
        "max_postcopy_bandwidth": 0,
        "convergence_timeout_s": params.convergence_timeout_s,
        "reconnect_timeout_s": params.reconnect_timeout_s,
    }


def test_the_bucket_holds_one_window_of_the_rate_and_at_least_one_message() -> None:
    bucket = TokenBucket(1_000_000, 10.0, min_burst=1000)
    assert bucket.burst == 50_000 and bucket.tokens == 50_000
    assert TokenBucket(1000, 10.0, min_burst=1000).burst == 1000
    bucket.spend(50_000, 10.0)
    assert bucket.ready_at(10.0) is None, "an empty bucket is not a debt"
    bucket.spend(20_000, 10.0)
    assert bucket.ready_at(10.0) == pytest.approx(10.02), "the debt, paid back at the rate"
    assert bucket.ready_at(10.01) == pytest.approx(10.02)
    assert bucket.ready_at(10.02) is None
    assert bucket.tokens == pytest.approx(0.0, abs=1e-6)
    bucket.ready_at(9.0)  # a clock read late never refills backwards
    assert bucket.t == 10.02
    assert bucket.ready_at(20.0) is None and bucket.tokens == 50_000, "refills to the burst, no more"
    bucket.spend(50_000.5, 20.0)  # type: ignore[arg-type]
    assert bucket.ready_at(20.0) is None, "half a byte of debt does not keep a sender waiting"
    bucket.set_rate(2_000_000, 20.0)
    assert bucket.burst == 100_000 and bucket.tokens == pytest.approx(-0.5)
    bucket.set_rate(1_000_000, 30.0)
    assert bucket.tokens == 50_000, "a lowered cap drops the tokens saved at the higher one"
    bucket.spend(50_000, 30.0)
    bucket.spend(50_001, 40.0)  # after a long idle: the refill is capped before the cost is taken
    assert bucket.tokens == -1.0 and bucket.ready_at(40.0) == pytest.approx(40.000001), "a whole byte waits"
    unlimited = TokenBucket(0, 0.0, min_burst=1000)
    unlimited.spend(10**9, 0.0)
    assert unlimited.ready_at(0.0) is None and unlimited.tokens == 1000
