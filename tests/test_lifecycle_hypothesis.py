"""Hypothesis drives random interleavings of queueing, submitting, cancelling, waiting, dropping
references and collecting garbage on one real ring, and checks after every step that the ring's
bookkeeping matches a model: each op ends exactly once, pins live exactly as long as the op is in
flight, and a finished op answers result() consistently."""

from __future__ import annotations

import gc
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import saferring
from saferring import OperationStateError, OpState
from saferring.unsafe import ffi

TERMINAL = {OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED}


class LifeCycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring = saferring.Ring(4)  # tiny: the SQ fills and the CQ overflows often
        self.pipes = [os.pipe() for _ in range(2)]
        self.kept: list[saferring.Operation[object]] = []  # ops we still reference
        self.sizes: dict[int, int] = {}  # user_data -> pinned bytes, for in-flight reads
        self.expected_open: set[int] = set()  # user_data of ops not yet seen finished
        self.finished: set[int] = set()  # user_data returned by wait()/run()

    # -- actions ---------------------------------------------------------------------------

    @rule()
    def queue_nop(self) -> None:
        op = self.ring.nop()
        self.kept.append(op)
        self.expected_open.add(op.user_data)

    @rule(count=st.integers(1, 40))
    def queue_nop_batch(self, count: int) -> None:
        op = self.ring.nop_many(count)
        self.kept.append(op)
        self.expected_open.add(op.user_data)
        # the batch's C bookkeeping (sr_batch struct and int32 results) is pinned with it
        # the sr_batch struct with its count int32 results inline
        self.sizes[op.user_data] = max(ffi.sizeof("sr_batch"),
                                       ffi.offsetof("sr_batch", "res") + 4 * count)

    @rule(which=st.integers(0, 1), size=st.integers(1, 64))
    def queue_pipe_read(self, which: int, size: int) -> None:
        op = self.ring.read(self.pipes[which][0], bytearray(size))
        self.kept.append(op)
        self.sizes[op.user_data] = size
        self.expected_open.add(op.user_data)

    @rule(which=st.integers(0, 1), n=st.integers(1, 128))
    def write_pipe(self, which: int, n: int) -> None:
        os.write(self.pipes[which][1], b"x" * n)

    @rule(seconds=st.sampled_from([0.0, 0.001, 30.0]))
    def queue_timeout(self, seconds: float) -> None:
        op = self.ring.timeout(seconds)
        self.kept.append(op)
        self.sizes[op.user_data] = ffi.sizeof("struct __kernel_timespec")  # the pinned timespec
        self.expected_open.add(op.user_data)

    @precondition(lambda self: self.kept)
    @rule(index=st.integers(0, 1000))
    def cancel(self, index: int) -> None:
        op = self.kept[index % len(self.kept)]
        if op.done() or op.cancel_requested:
            try:
                op.cancel()
            except OperationStateError:
                return
            raise AssertionError("cancel of a finished or already-cancelled op must be refused")
        op.cancel()
        assert op.cancel_requested

    @rule()
    def submit(self) -> None:
        assert self.ring.submit() >= 0

    @rule(timeout=st.sampled_from([0.0, 0.001]))
    def wait_some(self, timeout: float) -> None:
        self._record(self.ring.wait(0 if timeout == 0 else 1, timeout=timeout)
                     if self.expected_open or timeout == 0 else [])

    @precondition(lambda self: self.kept)
    @rule(index=st.integers(0, 1000))
    def drop_reference(self, index: int) -> None:
        self.kept.pop(index % len(self.kept))

    @rule()
    def collect_garbage(self) -> None:
        gc.collect()

    def _record(self, done: list[saferring.Operation[object]]) -> None:
        for op in done:
            assert op.user_data not in self.finished, "an op finished twice"
            assert op.user_data in self.expected_open
            self.finished.add(op.user_data)
            self.expected_open.discard(op.user_data)
            self.sizes.pop(op.user_data, None)
            assert op.state in TERMINAL and op.done()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def registry_matches_model(self) -> None:
        stats = self.ring.stats()
        # The ring may have reaped ops that wait() has not returned yet (kept in its ready list).
        ready = {op.user_data for op in self.ring._ready}
        assert stats.in_flight == len(self.expected_open - ready)
        assert stats.pinned_bytes == sum(size for ud, size in self.sizes.items() if ud not in ready)

    @invariant()
    def kept_ops_answer_consistently(self) -> None:
        for op in self.kept:
            if op.done():
                assert op.state in TERMINAL
                try:
                    op.result()
                except OperationStateError as exc:
                    raise AssertionError("finished op refused result()") from exc
                except OSError:
                    pass
            else:
                assert op.state in (OpState.QUEUED, OpState.SUBMITTED)

    def teardown(self) -> None:
        self.ring.close()
        for op in self.kept:
            assert op.done(), op
        assert self.ring.stats().in_flight == 0
        for r, w in self.pipes:
            os.close(r)
            os.close(w)


LifeCycle.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifeCycle = LifeCycle.TestCase
