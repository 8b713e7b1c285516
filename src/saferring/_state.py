"""The operation life cycle: named states, the events that move between them, and which calls
each state allows.  Read this file as the specification; ``operation.py`` and ``ring.py`` follow it.

Theory of operation
-------------------
An operation is born when a ``Ring`` method places its SQE in the submission queue (QUEUED).  It
is SUBMITTED once the kernel has been handed that SQE.  It ends with exactly one *final* CQE
(a CQE without ``IORING_CQE_F_MORE``), which moves it to one of three terminal states:

* COMPLETED: the kernel reported success (``res >= 0``, or an errno the operation defines as its
  normal outcome, such as ``-ETIME`` for a timeout that expired);
* CANCELLED: the CQE carried ``-ECANCELED`` (or ``-EINTR`` after saferring asked to cancel it:
  a blocking read interrupted in an io-wq worker reports that);
* FAILED: any other negative ``res``.

Multishot requests (``accept(multishot=True)``, ``poll_add(multishot=True)``, multishot timeouts) and
zero-copy sends post CQEs with ``IORING_CQE_F_MORE`` before their final one.  Each such CQE leaves
the operation SUBMITTED and hands it a value (see ``MultishotOperation.take``); only the final CQE
ends it and releases its pins.  A zero-copy send's final CQE is the notification that the kernel no
longer reads the buffer, which comes after the CQE that reports the bytes sent.

Terminal states are sticky: nothing leaves them, and ``result()`` answers the same way every time.

Rules that follow from the kernel, not from taste:

* Everything the kernel may read or write stays pinned until the final CQE, whatever the state
  says about cancellation: a successful cancel request does *not* mean the kernel is done with the
  buffer, only that the target's own CQE is coming (liburing#733).
* The SUBMIT event is recorded by the ring as a watermark (the user_data of the newest SQE the kernel
  was handed), not by visiting every operation: that would cost more than the submit itself.  An
  operation applies the event the first time anyone looks at its state.  A final CQE always implies
  the SQE was submitted, so the completion path may apply SUBMIT and CQE in one step.
"""

from __future__ import annotations

import enum


class OpState(enum.Enum):
    """Where an :class:`~saferring.Operation` is in its life cycle."""

    QUEUED = "queued"
    """The SQE is in the submission queue; the kernel has not been handed it yet."""
    SUBMITTED = "submitted"
    """The kernel has the SQE; its final CQE has not been reaped."""
    COMPLETED = "completed"
    """The final CQE reported success; ``result()`` returns the value."""
    FAILED = "failed"
    """The final CQE reported an error; ``result()`` raises it as an ``OSError``."""
    CANCELLED = "cancelled"
    """The final CQE reported a cancellation; ``result()`` raises ``OperationCancelledError``."""


class Event(enum.Enum):
    """What can happen to an operation."""

    SUBMIT = "submit"  # the kernel was handed the SQE
    CQE_OK = "cqe ok"  # final CQE, success
    CQE_ERROR = "cqe error"  # final CQE, failure
    CQE_CANCELLED = "cqe cancelled"  # final CQE, -ECANCELED (or -EINTR once cancel was asked)
    CQE_MORE = "cqe more"  # a CQE with IORING_CQE_F_MORE: a result, and more CQEs to come


QUEUED, SUBMITTED = OpState.QUEUED, OpState.SUBMITTED
COMPLETED, FAILED, CANCELLED = OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED

#: The whole life cycle.  A (state, event) pair that is not here is a bug in saferring, not in
#: the caller: the kernel never produces it (e.g. a second final CQE for one user_data).
TRANSITIONS: dict[tuple[OpState, Event], OpState] = {
    (QUEUED, Event.SUBMIT): SUBMITTED,
    (SUBMITTED, Event.SUBMIT): SUBMITTED,  # a later submit() covers it again: no change
    # Multishot and zero-copy requests: each non-final CQE carries a result (a connection, a
    # poll event, the byte count of a zero-copy send) and the request stays in flight, pins and all.
    (SUBMITTED, Event.CQE_MORE): SUBMITTED,
    (SUBMITTED, Event.CQE_OK): COMPLETED,
    (SUBMITTED, Event.CQE_ERROR): FAILED,
    (SUBMITTED, Event.CQE_CANCELLED): CANCELLED,
}

TERMINAL: frozenset[OpState] = frozenset({COMPLETED, FAILED, CANCELLED})
IN_FLIGHT: frozenset[OpState] = frozenset({QUEUED, SUBMITTED})


class Action(enum.Enum):
    """What a caller can ask of an operation."""

    RESULT = "result()"
    CANCEL = "cancel()"


#: Which states allow which calls.  Anything else raises OperationStateError.
ALLOWED: dict[Action, frozenset[OpState]] = {
    Action.RESULT: TERMINAL,
    Action.CANCEL: IN_FLIGHT,
}


def next_state(state: OpState, event: Event) -> OpState:
    """Return the state ``event`` moves ``state`` to; ``KeyError`` if the table has no such move."""
    return TRANSITIONS[(state, event)]
