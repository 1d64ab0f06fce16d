"""The message lifecycle: states, triggers, and the one table of allowed moves.

The table is declared once with ``transitions`` and compiled at import into an
immutable lookup. No ``transitions`` model is ever made per message: backends
check their moves against :data:`LIFECYCLE` (memory in Python; SQL and Redis
derive their allowed source states from it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from transitions import Machine

from ._errors import InvalidTransition

__all__ = [
    "LIFECYCLE",
    "QUEUED",
    "TERMINAL",
    "State",
    "Trigger",
    "allowed",
    "check",
    "diagram",
    "leave_sending",
]


class State(enum.StrEnum):
    """Where a message is in its life."""

    NEW = "new"
    """Not yet attempted."""
    SENDING = "sending"
    """Claimed by a sender worker, being delivered now."""
    RETRIES = "retries"
    """Attempted, soft-bounced, waiting for its next attempt time."""
    FROZEN = "frozen"
    """Paused with its sender queue; ``frozen_from`` says whether it was NEW or RETRIES."""
    DELIVERED = "delivered"
    """Terminal: accepted by the recipient's server."""
    FAILED = "failed"
    """Terminal: hard bounce, attempts exhausted, or lifetime expired."""
    DELETED = "deleted"
    """Terminal: removed by clear."""


class Trigger(enum.StrEnum):
    """What moves a message."""

    ENQUEUE = "enqueue"
    CLAIM = "claim"
    DELIVER = "deliver"
    SOFT_BOUNCE = "soft_bounce"
    HARD_BOUNCE = "hard_bounce"
    RELEASE = "release"
    EXPIRE = "expire"
    """A lease ran out and was settled; treated as a soft bounce ("lease expired")."""
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    CLEAR = "clear"


QUEUED: Final = frozenset({State.NEW, State.SENDING, State.RETRIES, State.FROZEN})
"""The states counted in a mailing's Total."""
TERMINAL: Final = frozenset({State.DELIVERED, State.FAILED, State.DELETED})
"""The states a message never leaves (until purged)."""

# The source of ``enqueue``: the message does not exist yet.
_ABSENT = "ABSENT"

_S = State
_T = Trigger
# SPEC section 3, one row per (trigger, sources, possible destinations).
_DECLARATION: Final[tuple[tuple[Trigger, tuple[str, ...], tuple[State, ...]], ...]] = (
    (_T.ENQUEUE, (_ABSENT,), (_S.NEW, _S.FROZEN)),
    (_T.CLAIM, (_S.NEW, _S.RETRIES), (_S.SENDING,)),
    (_T.DELIVER, (_S.SENDING,), (_S.DELIVERED,)),
    (_T.SOFT_BOUNCE, (_S.SENDING,), (_S.RETRIES, _S.FROZEN, _S.FAILED, _S.DELETED)),
    (_T.HARD_BOUNCE, (_S.SENDING,), (_S.FAILED,)),
    (_T.RELEASE, (_S.SENDING,), (_S.NEW, _S.RETRIES, _S.FROZEN, _S.DELETED)),
    (_T.EXPIRE, (_S.SENDING,), (_S.RETRIES, _S.FROZEN, _S.FAILED, _S.DELETED)),
    (_T.FREEZE, (_S.NEW, _S.RETRIES), (_S.FROZEN,)),
    (_T.UNFREEZE, (_S.FROZEN,), (_S.NEW, _S.RETRIES)),
    (_T.CLEAR, (_S.NEW, _S.FROZEN, _S.RETRIES), (_S.DELETED,)),
)


def _machine_spec() -> dict[str, object]:
    return {
        "states": [_ABSENT, *(s.name for s in State)],
        "transitions": [
            {"trigger": str(trigger), "source": [str(s).upper() for s in sources], "dest": dest.name}
            for trigger, sources, dests in _DECLARATION
            for dest in dests
        ],
        "initial": _ABSENT,
        "auto_transitions": False,
    }


def _compile() -> Mapping[Trigger, Mapping[State | None, frozenset[State]]]:
    # The machine is built once, without a model, only to read its validated table back.
    machine = Machine(model=None, **_machine_spec())  # type: ignore[arg-type]
    table: dict[Trigger, dict[State | None, frozenset[State]]] = {}
    for name, event in machine.events.items():
        by_source: dict[State | None, frozenset[State]] = {}
        for source, moves in event.transitions.items():
            key = None if source == _ABSENT else State[str(source)]
            by_source[key] = frozenset(State[str(move.dest)] for move in moves)
        table[Trigger(name)] = MappingProxyType(by_source)  # type: ignore[assignment]
    return MappingProxyType(table)


LIFECYCLE: Final = _compile()
"""``LIFECYCLE[trigger][source]`` is the set of states ``trigger`` may move a ``source``
message to; ``None`` stands for "not stored yet" (the source of ``enqueue``).
A (trigger, source) pair that is absent is not allowed."""


def allowed(trigger: Trigger, source: State | None) -> frozenset[State]:
    """The states ``trigger`` may move a message in ``source`` to (empty if none)."""
    return LIFECYCLE[trigger].get(source, frozenset())


def check(trigger: Trigger, source: State | None, dest: State) -> None:
    """Raise :class:`InvalidTransition` unless the lifecycle allows this move."""
    if dest not in LIFECYCLE[trigger].get(source, ()):
        raise InvalidTransition(f"{trigger} cannot move a message from {source} to {dest}")


def leave_sending(
    trigger: Trigger,
    *,
    claimed_from: State,
    cleared: bool,
    exhausted: bool,
    frozen: bool,
) -> tuple[State, State | None]:
    """Where a message leaving SENDING goes, as ``(state, frozen_from)``.

    The precedence of SPEC section 3, rule 3: a verdict (deliver, hard bounce) wins;
    otherwise DELETED if the queue was cleared since the claim; else FAILED if a
    soft bounce or an expired lease exhausted the retry policy; else FROZEN if the
    queue is frozen; else RETRIES (a release returns to ``claimed_from``).
    """
    if State.SENDING not in allowed(Trigger.CLAIM, claimed_from):
        raise InvalidTransition(f"no message is claimed from {claimed_from}")
    if trigger is Trigger.DELIVER:
        dest, frozen_from = State.DELIVERED, None
    elif trigger is Trigger.HARD_BOUNCE:
        dest, frozen_from = State.FAILED, None
    elif cleared:
        dest, frozen_from = State.DELETED, None
    else:
        retried = trigger in (Trigger.SOFT_BOUNCE, Trigger.EXPIRE)
        back = State.RETRIES if retried else claimed_from
        if retried and exhausted:
            dest, frozen_from = State.FAILED, None
        elif frozen:
            dest, frozen_from = State.FROZEN, back
        else:
            dest, frozen_from = back, None
    check(trigger, State.SENDING, dest)
    return dest, frozen_from


def diagram() -> str:
    """The lifecycle as a Mermaid state diagram, drawn by ``transitions`` from the declaration."""
    from transitions.extensions import GraphMachine

    class _Drawing:
        """A throwaway model: GraphMachine attaches its triggers and get_graph() to it."""

    drawing = _Drawing()
    GraphMachine(model=drawing, graph_engine="mermaid", title="Message lifecycle", **_machine_spec())  # type: ignore[arg-type]
    source: str = drawing.get_graph().draw(None)  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in source.splitlines()) + "\n"
