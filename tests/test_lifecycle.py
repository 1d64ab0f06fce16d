"""The lifecycle table against SPEC section 3, written out again here by hand."""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import attrs
import pytest
import transitions

import senderqueue as sq
from senderqueue import _lifecycle
from senderqueue.testing import ManualClock

S = sq.State
T = sq.Trigger

# SPEC section 3, "Transitions (normative)": (trigger, source) -> the states it may lead to.
# ``None`` is "not stored yet" (the source of enqueue). Every pair not listed is forbidden.
SPEC_TABLE: dict[tuple[sq.Trigger, sq.State | None], frozenset[sq.State]] = {
    (T.ENQUEUE, None): frozenset({S.NEW, S.FROZEN}),
    (T.CLAIM, S.NEW): frozenset({S.SENDING}),
    (T.CLAIM, S.RETRIES): frozenset({S.SENDING}),
    (T.DELIVER, S.SENDING): frozenset({S.DELIVERED}),
    (T.SOFT_BOUNCE, S.SENDING): frozenset({S.RETRIES, S.FROZEN, S.FAILED, S.DELETED}),
    (T.HARD_BOUNCE, S.SENDING): frozenset({S.FAILED}),
    # Back to the state it was claimed from (NEW or RETRIES); FROZEN / DELETED as for soft_bounce.
    (T.RELEASE, S.SENDING): frozenset({S.NEW, S.RETRIES, S.FROZEN, S.DELETED}),
    # Lease expiry: as soft_bounce.
    (T.EXPIRE, S.SENDING): frozenset({S.RETRIES, S.FROZEN, S.FAILED, S.DELETED}),
    (T.FREEZE, S.NEW): frozenset({S.FROZEN}),
    (T.FREEZE, S.RETRIES): frozenset({S.FROZEN}),
    (T.UNFREEZE, S.FROZEN): frozenset({S.NEW, S.RETRIES}),
    (T.CLEAR, S.NEW): frozenset({S.DELETED}),
    (T.CLEAR, S.FROZEN): frozenset({S.DELETED}),
    (T.CLEAR, S.RETRIES): frozenset({S.DELETED}),
}

SOURCES: list[sq.State | None] = [None, *S]
PAIRS = list(itertools.product(T, SOURCES))


def test_states_and_triggers_are_those_of_the_spec() -> None:
    assert {s.name for s in S} == {"NEW", "SENDING", "RETRIES", "FROZEN", "DELIVERED", "FAILED", "DELETED"}
    assert {str(t) for t in T} == {
        "enqueue",
        "claim",
        "deliver",
        "soft_bounce",
        "hard_bounce",
        "release",
        "expire",
        "freeze",
        "unfreeze",
        "clear",
    }
    assert {S.NEW, S.SENDING, S.RETRIES, S.FROZEN} == sq.QUEUED
    assert {S.DELIVERED, S.FAILED, S.DELETED} == sq.TERMINAL
    assert sq.QUEUED.isdisjoint(sq.TERMINAL)
    assert set(S) == sq.QUEUED | sq.TERMINAL


def test_lifecycle_covers_every_trigger_and_only_the_spec_sources() -> None:
    assert set(sq.LIFECYCLE) == set(T)
    for trigger in T:
        expected_sources = {source for (t, source) in SPEC_TABLE if t is trigger}
        assert set(sq.LIFECYCLE[trigger]) == expected_sources, trigger


@pytest.mark.parametrize(("trigger", "source"), PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
def test_every_trigger_source_pair(trigger: sq.Trigger, source: sq.State | None) -> None:
    expected = SPEC_TABLE.get((trigger, source), frozenset())
    assert _lifecycle.allowed(trigger, source) == expected
    if expected:
        assert sq.LIFECYCLE[trigger][source] == expected
    else:
        assert source not in sq.LIFECYCLE[trigger]
    for dest in S:
        if dest in expected:
            _lifecycle.check(trigger, source, dest)
        else:
            with pytest.raises(sq.InvalidTransition):
                _lifecycle.check(trigger, source, dest)


def test_terminal_states_are_never_left() -> None:
    for trigger, state in itertools.product(T, sq.TERMINAL):
        assert _lifecycle.allowed(trigger, state) == frozenset()


def test_lifecycle_is_immutable() -> None:
    with pytest.raises(TypeError):
        sq.LIFECYCLE[T.CLAIM] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        sq.LIFECYCLE[T.CLAIM][S.FROZEN] = frozenset({S.SENDING})  # type: ignore[index]
    assert isinstance(sq.LIFECYCLE[T.CLAIM][S.NEW], frozenset)


def test_check_raises_invalid_transition_for_disallowed_moves() -> None:
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.check(T.DELIVER, S.NEW, S.DELIVERED)
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.check(T.CLAIM, S.FROZEN, S.SENDING)
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.check(T.CLEAR, S.SENDING, S.DELETED)  # clear spares SENDING
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.check(T.ENQUEUE, S.NEW, S.NEW)
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.check(T.HARD_BOUNCE, S.SENDING, S.DELETED)  # a verdict wins over a clear
    assert issubclass(sq.InvalidTransition, sq.SenderQueueError)


# -- leave_sending: SPEC section 3, rule 3 ---------------------------------------------------

LEAVING = (T.DELIVER, T.SOFT_BOUNCE, T.HARD_BOUNCE, T.RELEASE, T.EXPIRE)


def _rule_3(
    trigger: sq.Trigger, *, claimed_from: sq.State, cleared: bool, exhausted: bool, frozen: bool
) -> tuple[sq.State, sq.State | None]:
    """Rule 3 as an ordered list of (applies, outcome); the first that applies wins."""
    retried = trigger in (T.SOFT_BOUNCE, T.EXPIRE)
    back = S.RETRIES if retried else claimed_from
    rules: list[tuple[bool, tuple[sq.State, sq.State | None]]] = [
        (trigger is T.DELIVER, (S.DELIVERED, None)),
        (trigger is T.HARD_BOUNCE, (S.FAILED, None)),
        (cleared, (S.DELETED, None)),
        (retried and exhausted, (S.FAILED, None)),
        (frozen, (S.FROZEN, back)),
        (True, (back, None)),
    ]
    return next(outcome for applies, outcome in rules if applies)


def _combinations() -> Iterator[tuple[sq.Trigger, bool, bool, bool, sq.State]]:
    return itertools.product(LEAVING, (False, True), (False, True), (False, True), (S.NEW, S.RETRIES))


COMBINATIONS = list(_combinations())


@pytest.mark.parametrize(
    ("trigger", "cleared", "exhausted", "frozen", "claimed_from"),
    COMBINATIONS,
    ids=[
        "-".join([t, "cleared" if c else "kept", "exhausted" if e else "fresh", "frozen" if f else "open", s])
        for t, c, e, f, s in COMBINATIONS
    ],
)
def test_leave_sending_precedence(
    trigger: sq.Trigger, cleared: bool, exhausted: bool, frozen: bool, claimed_from: sq.State
) -> None:
    got = _lifecycle.leave_sending(
        trigger, claimed_from=claimed_from, cleared=cleared, exhausted=exhausted, frozen=frozen
    )
    expected = _rule_3(
        trigger, claimed_from=claimed_from, cleared=cleared, exhausted=exhausted, frozen=frozen
    )
    assert got == expected
    state, frozen_from = got
    # Whatever the combination, the result is a move the table allows, and FROZEN remembers NEW or RETRIES.
    assert state in SPEC_TABLE[(trigger, S.SENDING)]
    assert (frozen_from is not None) == (state is S.FROZEN)
    assert frozen_from in (None, S.NEW, S.RETRIES)


def test_leave_sending_spot_checks() -> None:
    leave = _lifecycle.leave_sending
    # A verdict beats a clear; a clear beats exhaustion; exhaustion beats a freeze.
    assert leave(T.DELIVER, claimed_from=S.NEW, cleared=True, exhausted=True, frozen=True) == (
        S.DELIVERED,
        None,
    )
    assert leave(T.HARD_BOUNCE, claimed_from=S.RETRIES, cleared=True, exhausted=False, frozen=True) == (
        S.FAILED,
        None,
    )
    assert leave(T.SOFT_BOUNCE, claimed_from=S.NEW, cleared=True, exhausted=True, frozen=True) == (
        S.DELETED,
        None,
    )
    assert leave(T.EXPIRE, claimed_from=S.NEW, cleared=False, exhausted=True, frozen=True) == (S.FAILED, None)
    # A soft bounce of a NEW message goes to RETRIES (frozen: remembered as RETRIES).
    assert leave(T.SOFT_BOUNCE, claimed_from=S.NEW, cleared=False, exhausted=False, frozen=True) == (
        S.FROZEN,
        S.RETRIES,
    )
    # A release is never exhausted and returns where it came from.
    assert leave(T.RELEASE, claimed_from=S.NEW, cleared=False, exhausted=True, frozen=False) == (S.NEW, None)
    assert leave(T.RELEASE, claimed_from=S.NEW, cleared=False, exhausted=True, frozen=True) == (
        S.FROZEN,
        S.NEW,
    )
    assert leave(T.RELEASE, claimed_from=S.RETRIES, cleared=False, exhausted=False, frozen=False) == (
        S.RETRIES,
        None,
    )


@pytest.mark.parametrize("trigger", [t for t in T if t not in LEAVING])
@pytest.mark.parametrize(("cleared", "frozen"), list(itertools.product((False, True), repeat=2)))
def test_leave_sending_refuses_triggers_that_do_not_leave_sending(
    trigger: sq.Trigger, cleared: bool, frozen: bool
) -> None:
    with pytest.raises(sq.InvalidTransition):
        _lifecycle.leave_sending(trigger, claimed_from=S.NEW, cleared=cleared, exhausted=False, frozen=frozen)


def test_leave_sending_refuses_a_claimed_from_that_claim_cannot_come_from() -> None:
    accepted = []
    for claimed_from, frozen in itertools.product(
        [S.FROZEN, S.DELETED, S.SENDING, S.DELIVERED, S.FAILED], (False, True)
    ):
        try:
            got = _lifecycle.leave_sending(
                T.RELEASE, claimed_from=claimed_from, cleared=False, exhausted=False, frozen=frozen
            )
        except sq.InvalidTransition:
            continue
        accepted.append((claimed_from, frozen, got))
    assert accepted == []


# -- no transitions model per message -------------------------------------------------------


def test_state_is_a_plain_enum() -> None:
    assert issubclass(S, enum.Enum)
    assert {cls.__module__ for cls in S.__mro__[1:]} <= {"enum", "builtins"}
    assert S("new") is S.NEW
    stored_as: object = "new"  # a StrEnum: backends store and compare the plain string
    assert stored_as == S.NEW


def _message(queue: sq.SenderQueue) -> sq.Message:
    msg_id = queue.enqueue(
        mailing="m", sender="s", recipient="a@example.com", content=b"x", mail_from="f@example.com"
    )
    return queue.get(msg_id)


def test_message_carries_nothing_from_transitions() -> None:
    queue = sq.SenderQueue(clock=ManualClock(datetime(2030, 1, 1, tzinfo=UTC)))
    message = _message(queue)
    assert attrs.has(sq.Message)
    assert not hasattr(message, "__dict__")  # slotted: nothing can be attached to it at runtime
    trigger_like = {str(t) for t in T} | {f"to_{s.name}" for s in S} | {f"may_{t}" for t in T}
    assert not trigger_like & set(dir(message))
    assert not {"machine", "trigger", "get_graph"} & set(dir(message))
    for field in attrs.fields(sq.Message):
        value = getattr(message, field.name)
        assert not type(value).__module__.startswith("transitions"), field.name
    with pytest.raises(AttributeError):
        message.claim = lambda: None  # type: ignore[attr-defined]


def test_no_machine_is_made_for_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    original = transitions.Machine.__init__

    def counting_init(self: transitions.Machine, *args: object, **kwargs: object) -> None:
        made.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transitions.Machine, "__init__", counting_init)
    clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    queue = sq.SenderQueue(clock=clock)
    for _ in range(3):
        _message(queue)
    claims = queue.claim("s", limit=3)
    queue.deliver(claims[0])
    queue.soft_bounce(claims[1], "451 4.7.1 later")
    queue.release(claims[2])
    queue.freeze("m")
    queue.unfreeze("m")
    clock.advance(timedelta(hours=2))
    queue.clear("m")
    queue.metrics("m")
    assert made == []


# -- diagram ------------------------------------------------------------------------------

_EDGE = re.compile(r"^\s*(\w+) --> (\w+)\s*:\s*(.+?)\s*$")


def test_diagram_is_a_mermaid_state_diagram_of_the_table() -> None:
    text = _lifecycle.diagram()
    assert "stateDiagram" in text
    for state in S:
        assert state.name in text
    for trigger in T:
        assert str(trigger) in text
    edges = set()
    for line in text.splitlines():
        match = _EDGE.match(line)
        if match:
            source, dest, labels = match.groups()
            for label in labels.split("|"):
                edges.add((label.strip(), source, dest))
    expected = {
        (str(trigger), "ABSENT" if source is None else source.name, dest.name)
        for (trigger, source), dests in SPEC_TABLE.items()
        for dest in dests
    }
    assert edges == expected
