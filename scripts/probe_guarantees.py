"""Break each guarantee on purpose, one at a time, and check that a test notices.

    python3 scripts/probe_guarantees.py            # every probe
    python3 scripts/probe_guarantees.py one-place  # probes whose name contains a word

Each probe replaces one piece of code in a scratch copy of the tree (the working tree is never
touched), runs the tests that defend that guarantee, and expects them to FAIL. A probe whose
tests pass means a guarantee no test defends: the script exits non-zero and names it. Run it
after changing the code a probe names; a probe whose text no longer matches says so, so that
the probe is moved along with the code rather than silently dropped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Probe:
    name: str
    path: str
    original: str
    broken: str
    tests: tuple[str, ...]


PROTO = "tests/test_protocol_guarantees.py"
PROBES = [
    Probe(
        "one-place: the source resumes its guest after the commit",
        "common/protocol/source_outcome.py",
        "committed = s.phase in (_S.COMMITTING, _S.UNSETTLED) and not after_commit_ok",
        "committed = False",
        (f"{PROTO}::test_a_protocol_error_after_the_commit_never_resumes_the_source",),
    ),
    Probe(
        "link: the source acts on a message that overtook a lost one",
        "common/protocol/source.py",
        "        if intake is Intake.AHEAD:\n            self.link.stats.out_of_order += 1\n"
        "            self.link_side.ask_resend(now)\n            return\n",
        "",
        (f"{PROTO}::test_the_source_never_acts_on_a_message_that_overtook_a_lost_one",),
    ),
    Probe(
        "channels: the destination handles a batch that overtook another at once",
        "common/protocol/dest.py",
        "            if self.channels > 1 and self.reorder.hold(\n"
        "                env.seq, (message, self._arrived_bytes), now, batch=batch, size=self._arrived_bytes\n"
        "            ):\n"
        "                self.link.stats.reordered += 1\n",
        "            if self.channels > 1:\n                self._deliver(message, now)\n",
        (
            "tests/test_channels.py::test_batches_over_three_channels_arrive_out_of_order_and_the_guest_arrives_whole",
        ),
    ),
    Probe(
        "channels: a held batch is never delivered",
        "common/protocol/dest.py",
        "            held = self.reorder.take(self.link.received + 1, now)\n",
        "            held = None\n",
        ("tests/test_channels.py",),
    ),
    Probe(
        "stop gate: the guest stops with messages in flight",
        "common/protocol/precopy.py",
        "if in_flight > 0 and active_for <= params.convergence_timeout_s:",
        "if False:",
        (f"{PROTO}::test_guest_stops_only_when_nothing_is_in_flight",),
    ),
    Probe(
        "vCPU: the destination ignores the vCPU digest",
        "common/protocol/verify.py",
        "ok = bad_blocks.size == 0 and vcpu_ok and",
        "ok = bad_blocks.size == 0 and",
        (f"{PROTO}::test_a_vcpu_state_damaged_in_flight_is_named_and_sent_again",),
    ),
    Probe(
        "vCPU: the source never sends the vCPU state again after a mismatch",
        "common/protocol/precopy_side.py",
        "self.resend_vcpus = result.vcpu_mismatch",
        "self.resend_vcpus = False",
        (f"{PROTO}::test_a_vcpu_state_damaged_in_flight_is_named_and_sent_again",),
    ),
    Probe(
        "zero pages: a page zeroed after round 1 is not zeroed on the destination",
        "common/guest/memory.py",
        "self.pages[populated] = 0",
        "pass",
        (f"{PROTO}::test_a_page_zeroed_after_it_was_sent_is_zeroed_on_the_destination",),
    ),
    Probe(
        "IRG: wrong LFSR taps",
        "common/guest/mte.py",
        "(seed >> 5) ^ (seed >> 3)",
        "(seed >> 4) ^ (seed >> 3)",
        ("tests/test_mte.py", "tests/test_mte_architecture.py"),
    ),
    Probe(
        "faults: sync tag-check faults are never counted",
        "common/guest/workload.py",
        "        except TagCheckFault:\n            self._fault()\n\n    def _store",
        "        except TagCheckFault:\n            pass\n\n    def _store",
        ("tests/test_workload.py::test_faults_are_provoked_in_every_checking_mode",),
    ),
    Probe(
        "hostile: hello page and granule size",
        "common/protocol/handshake.py",
        "if hello.page_size != PAGE_SIZE or hello.granule_size != GRANULE_SIZE:",
        "if False:",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: hello features",
        "common/protocol/handshake.py",
        "    if missing:\n",
        "    if False:\n",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: hello mode",
        "common/protocol/handshake.py",
        "if hello.mode not in (pb.MODE_PRECOPY, pb.MODE_POSTCOPY):",
        "if False:",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: hello RAM size",
        "common/protocol/handshake.py",
        "if not MIN_RAM_BYTES <= hello.ram_bytes <= MAX_RAM_BYTES or hello.ram_bytes % PAGE_SIZE:",
        "if False:",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: hello vCPU count",
        "common/protocol/handshake.py",
        "if not 1 <= hello.vcpu_count <= MAX_VCPUS:",
        "if False:",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: the populated hint's claimed size",
        "common/wire/bitmap.py",
        "if claimed != expected:",
        "if False:",
        (PROTO + "::test_a_bad_hello_is_refused_and_allocates_nothing",),
    ),
    Probe(
        "hostile: the maximum frame size",
        "common/wire/framing.py",
        "if len(first) + len(payload) > MAX_FRAME_BYTES:",
        "if False:",
        ("tests/test_codec.py", "tests/test_wire_hostile.py"),
    ),
    Probe(
        "hostile: device-state vCPU count",
        "common/transfer.py",
        "if len(msg.vcpus) != len(guest.vcpus):",
        "if False:",
        (PROTO + "::test_bad_device_state_fails_the_migration_and_changes_no_register",),
    ),
    Probe(
        "hostile: device-state vCPU indices",
        "common/transfer.py",
        "if sorted(v.index for v in vcpus) != list(range(len(vcpus))):",
        "if False:",
        (PROTO + "::test_bad_device_state_fails_the_migration_and_changes_no_register",),
    ),
    Probe(
        "hostile: an ack of a never-sent message",
        "common/protocol/link.py",
        "if upto >= self.next_seq:",
        "if False:",
        (PROTO + "::test_an_ack_of_a_message_never_sent_fails_the_source_cleanly",),
    ),
    Probe(
        "hostile: the granted credit range",
        "common/protocol/source.py",
        "if not 1 <= ack.initial_credit <= 1024:",
        "if False:",
        (PROTO + "::test_the_granted_window_must_be_sane",),
    ),
    Probe(
        "hostile: the verify result's page digests",
        "common/protocol/verify.py",
        "                block.first_page % DIGEST_BLOCK_PAGES\n",
        "                False\n",
        (PROTO + "::test_a_malformed_verify_result_fails_before_the_commit",),
    ),
    Probe(
        "hostile: the verify result's block count",
        "common/protocol/verify.py",
        "if len(result.page_digests) > self.digests.ram.block_digests.size:",
        "if False:",
        (PROTO + "::test_a_malformed_verify_result_fails_before_the_commit",),
    ),
    Probe(
        "hostile: the verify result's attempt",
        "common/protocol/source.py",
        "if not self.verifier.expects(result):",
        "if False:",
        (PROTO + "::test_a_malformed_verify_result_fails_before_the_commit",),
    ),
    Probe(
        "throttle: auto-converge is never applied to the vCPU",
        "common/guest/runner.py",
        "        if self.throttle:\n",
        "        if False:\n",
        (
            "tests/test_runner.py",
            "tests/test_protocol.py::test_guest_faster_than_the_link_is_throttled_to_convergence",
            "tests/test_e2e_precopy.py::test_guest_faster_than_bandwidth_cap_is_throttled_to_convergence",
        ),
    ),
    Probe(
        "demo: the guest does not advance on the destination",
        "dest_node/guest_host.py",
        "        self.runner = GuestRunner(workload, stop_at_step=self.stop_at_step)\n        self.runner.start()\n",
        "        self.runner = GuestRunner(workload, stop_at_step=self.stop_at_step)\n",
        ("tests/test_e2e_precopy.py::test_demo_runs_a_watchable_migration",),
    ),
    Probe(
        "link: a lost message is never sent again",
        "common/protocol/source_link.py",
        '        self.resend(front.resend_after(s.link, ack, "destination"), now)',
        "        pass",
        ("tests/test_protocol.py::test_lost_messages_are_sent_again",),
    ),
    Probe(
        "link: nothing is retransmitted after a timeout",
        "common/protocol/link.py",
        "return self.t_progress + self.rto_s if self.unacked else None",
        "return None",
        ("tests/test_protocol.py",),
    ),
    Probe(
        "link: a reconnect resumes nothing",
        "common/protocol/source_link.py",
        "        if ack.epoch != s.link.epoch or s.connected:\n            return",
        "        return",
        ("tests/test_protocol.py::test_an_outage_shorter_than_the_reconnect_timeout_is_ridden_out",),
    ),
    Probe(
        "commit: the ack of the commit does not settle the handover",
        "common/protocol/source_link.py",
        "            self.commit_acked = True\n",
        "            pass\n",
        (f"{PROTO}::test_lost_started_replies_are_settled_by_the_ack_of_the_commit",),
    ),
    Probe(
        "cap: the bandwidth cap applies inside the downtime",
        "common/protocol/precopy_side.py",
        "        return not self.s.guest_stopped\n",
        "        return True\n",
        ("tests/test_link_parts.py::test_the_cap_does_not_stretch_the_downtime",),
    ),
    Probe(
        "borrow: batches are sent from guest memory while the guest runs",
        "common/protocol/precopy_side.py",
        "borrow=s.host.guest_quiet())\n            for batch in encode_map(encode, chunks):",
        "borrow=True)\n            for batch in encode_map(encode, chunks):",
        ("tests/test_protocol.py::test_guest_memory_is_borrowed_only_while_the_guest_is_stopped",),
    ),
    Probe(
        "borrow: a page written after it was hashed is placed as if intact",
        "common/guest/pagehash.py",
        "        return pages.size if bad < 0 else int(bad)\n",
        "        return pages.size\n",
        ("tests/test_codec.py::test_a_borrowed_page_written_before_it_left_is_caught_as_damaged",),
    ),
    Probe(
        "table: a trigger leads where its row does not say",
        "common/protocol/phases.py",
        "        if self._firing is not None and to not in self._firing[2] and to not in self._failures:",
        "        if False:",
        (
            "tests/test_link_parts.py::test_a_trigger_leads_only_where_the_table_says_and_failing_is_always_open",
        ),
    ),
    Probe(
        "table: a timer runs in a phase whose row does not list it",
        "common/protocol/source_link.py",
        "        return [self._armed(timer) for timer in timers if s.machine.handles(timer.name)]",
        "        return [self._armed(timer) for timer in timers]",
        ("tests/test_link_parts.py::test_a_phase_arms_only_the_timers_its_row_lists",),
    ),
    Probe(
        "table: a trigger its phase does not list is acted on",
        "common/protocol/phases.py",
        "        if leads is None:\n",
        "        if leads is None and False:\n",
        (
            "tests/test_link_parts.py::test_a_trigger_leads_only_where_the_table_says_and_failing_is_always_open",
        ),
    ),
    Probe(
        "timers: an action leaves its own deadline in the past",
        "common/protocol/dest.py",
        "    def _heartbeat(self, now: float) -> None:\n        self._unsequenced(now, heartbeat=pb.Heartbeat())",
        "    def _heartbeat(self, now: float) -> None:\n        pass",
        ("tests/test_timers.py",),
    ),
    Probe(
        "timers: poll skips a timer that is due",
        "common/protocol/timers.py",
        "        due = next((t for t in timers(now) if t.at <= now and t.name not in acted), None)",
        "        due = next((t for t in timers(now) if t.at < now - 0.5 and t.name not in acted), None)",
        ("tests/test_timers.py",),
    ),
    Probe(
        "blocks: the verification in the downtime hashes every block the migration wrote",
        "common/guest/digest.py",
        "        self.ram.blocks()\n        self.tags.blocks()\n",
        "        pass\n",
        ("tests/test_digest.py::test_after_a_round_only_the_blocks_written_since_are_hashed_again",),
    ),
]


def run_probe(probe: Probe, scratch: Path) -> tuple[str, float]:
    target = scratch / probe.path
    source = (ROOT / probe.path).read_text()
    if source.count(probe.original) != 1:
        return "STALE (the probed code moved: update the probe)", 0.0
    target.write_text(source.replace(probe.original, probe.broken))
    began = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *probe.tests],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        target.write_text(source)
    took = time.monotonic() - began
    if result.returncode == 1:
        return "caught", took
    if result.returncode == 0:
        return "NOT CAUGHT", took
    return f"ERROR (pytest exit {result.returncode}): {result.stdout[-300:]}", took


def main() -> int:
    words = sys.argv[1:]
    chosen = [p for p in PROBES if all(w in p.name for w in words)]
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        scratch = Path(tmp) / "tree"
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", "__pycache__", ".hypothesis"))
        bad = 0
        for probe in chosen:
            verdict, took = run_probe(probe, scratch)
            bad += verdict != "caught"
            print(f"{verdict:12} {took:6.1f} s  {probe.name}", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} broken guarantees caught by a test")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
