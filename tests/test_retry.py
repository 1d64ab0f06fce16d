"""RetryPolicy: SPEC section 4."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import senderqueue as sq

T0 = datetime(2030, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def test_defaults_are_those_of_the_spec() -> None:
    policy = sq.RetryPolicy()
    assert policy.min_backoff == timedelta(minutes=5)
    assert policy.max_backoff == timedelta(hours=1)
    assert policy.max_attempts == 20
    assert policy.max_lifetime == timedelta(days=5)
    assert policy.jitter == 0.0


def test_policy_is_frozen_attrs() -> None:
    policy = sq.RetryPolicy()
    assert attrs.has(sq.RetryPolicy)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.max_attempts = 3  # type: ignore[misc]
    assert attrs.evolve(policy, max_attempts=3).max_attempts == 3
    assert sq.RetryPolicy() == sq.RetryPolicy()


@pytest.mark.parametrize("n", range(1, 31))
def test_default_backoff_doubles_up_to_the_cap(n: int) -> None:
    # 5, 10, 20, 40 minutes, then one hour from the 5th attempt on.
    expected = [5, 10, 20, 40][n - 1] if n <= 4 else 60
    assert sq.RetryPolicy().backoff(n) == timedelta(minutes=expected)


def test_backoff_doubles_exactly_before_the_cap() -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(microseconds=1), max_backoff=timedelta(days=365))
    for n in range(1, 36):
        assert policy.backoff(n) == timedelta(microseconds=2 ** (n - 1))


@pytest.mark.parametrize("n", [31, 64, 100, 1000, 1001, 10**6, 2**63, 10**100])
def test_backoff_of_huge_attempt_counts_is_the_cap(n: int) -> None:
    assert sq.RetryPolicy().backoff(n) == timedelta(hours=1)
    wide = sq.RetryPolicy(min_backoff=timedelta(days=1), max_backoff=timedelta(days=365))
    assert wide.backoff(n) == timedelta(days=365)


def test_backoff_with_the_largest_min_backoff_does_not_overflow() -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(days=365), max_backoff=timedelta(days=365))
    for n in (1, 2, 60, 10**9):
        assert policy.backoff(n) == timedelta(days=365)


@given(
    min_seconds=st.integers(1, 10**6),
    extra_seconds=st.integers(0, 10**7),
    n=st.integers(1, 10**9),
)
def test_backoff_formula(min_seconds: int, extra_seconds: int, n: int) -> None:
    low = timedelta(seconds=min_seconds)
    high = timedelta(seconds=min_seconds + extra_seconds)
    policy = sq.RetryPolicy(min_backoff=low, max_backoff=high)
    wait = policy.backoff(n)
    assert low <= wait <= high
    exact = min(high.total_seconds(), min_seconds * 2 ** min(n - 1, 200))
    assert wait == timedelta(seconds=exact)


@given(n=st.integers(1, 100))
def test_backoff_never_shrinks(n: int) -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(seconds=7), max_backoff=timedelta(days=3))
    assert policy.backoff(n) <= policy.backoff(n + 1)


def test_next_attempt_is_now_plus_backoff() -> None:
    policy = sq.RetryPolicy()
    now = T0 + timedelta(hours=3)
    assert policy.next_attempt(1, T0, now) == now + timedelta(minutes=5)
    assert policy.next_attempt(3, T0, now) == now + timedelta(minutes=20)


# -- exhaustion -------------------------------------------------------------------------------


def test_exhaustion_by_attempts() -> None:
    policy = sq.RetryPolicy(max_attempts=3)
    assert not policy.exhausted(1, T0, T0)
    assert not policy.exhausted(2, T0, T0)
    assert policy.exhausted(3, T0, T0)  # exactly max_attempts fails
    assert policy.exhausted(4, T0, T0)
    assert policy.next_attempt(2, T0, T0) is not None
    assert policy.next_attempt(3, T0, T0) is None


def test_a_single_attempt_policy_fails_at_the_first_soft_bounce() -> None:
    policy = sq.RetryPolicy(max_attempts=1)
    assert policy.exhausted(1, T0, T0)
    assert policy.next_attempt(1, T0, T0) is None


def test_exhaustion_by_lifetime() -> None:
    policy = sq.RetryPolicy(max_lifetime=timedelta(hours=2))
    assert not policy.exhausted(1, T0, T0)
    assert not policy.exhausted(1, T0, T0 + timedelta(hours=2) - US)
    assert policy.exhausted(1, T0, T0 + timedelta(hours=2))  # exactly max_lifetime fails
    assert policy.exhausted(1, T0, T0 + timedelta(hours=2) + US)
    assert policy.next_attempt(1, T0, T0 + timedelta(hours=2) - US) is not None
    assert policy.next_attempt(1, T0, T0 + timedelta(hours=2)) is None


def test_default_lifetime_is_five_days() -> None:
    policy = sq.RetryPolicy()
    assert not policy.exhausted(1, T0, T0 + timedelta(days=5) - US)
    assert policy.exhausted(1, T0, T0 + timedelta(days=5))


@given(
    max_attempts=st.integers(1, 50),
    attempts=st.integers(1, 60),
    age=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10)),
)
def test_exhausted_is_attempts_or_lifetime(max_attempts: int, attempts: int, age: timedelta) -> None:
    policy = sq.RetryPolicy(max_attempts=max_attempts, max_lifetime=timedelta(days=5))
    expected = attempts >= max_attempts or age >= timedelta(days=5)
    assert policy.exhausted(attempts, T0, T0 + age) is expected
    assert (policy.next_attempt(attempts, T0, T0 + age) is None) is expected


# -- jitter ------------------------------------------------------------------------------------


@given(
    jitter=st.floats(min_value=0.001, max_value=0.999),
    seed=st.integers(-(2**63), 2**63),
    key=st.text(max_size=20),
    n=st.integers(1, 40),
)
def test_jitter_stays_in_range(jitter: float, seed: int, key: str, n: int) -> None:
    plain = sq.RetryPolicy(min_backoff=timedelta(seconds=30), max_backoff=timedelta(hours=6))
    policy = attrs.evolve(plain, jitter=jitter, seed=seed)
    base = plain.backoff(n, key)
    wait = policy.backoff(n, key)
    # A microsecond of rounding either side: timedelta * float rounds to microseconds.
    assert base * (1 - jitter) - US <= wait <= base * (1 + jitter) + US


@given(seed=st.integers(), key=st.text(max_size=30), n=st.integers(1, 100))
def test_jitter_is_deterministic(seed: int, key: str, n: int) -> None:
    a = sq.RetryPolicy(jitter=0.5, seed=seed)
    b = sq.RetryPolicy(jitter=0.5, seed=seed)
    assert a.backoff(n, key) == b.backoff(n, key) == a.backoff(n, key)


def test_jitter_differs_across_keys_attempts_and_seeds() -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(minutes=10), max_backoff=timedelta(minutes=10), jitter=0.5)
    by_key = {policy.backoff(1, f"message-{i}") for i in range(50)}
    assert len(by_key) >= 45
    by_attempt = {policy.backoff(n, "message-1") for n in range(1, 51)}
    assert len(by_attempt) >= 45  # the base is capped (10 minutes), so only the draw varies
    by_seed = {attrs.evolve(policy, seed=seed).backoff(1, "message-1") for seed in range(50)}
    assert len(by_seed) >= 45


def test_jitter_spreads_over_the_whole_range() -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(minutes=10), max_backoff=timedelta(minutes=10), jitter=0.5)
    factors = [policy.backoff(1, str(i)) / timedelta(minutes=10) for i in range(2000)]
    assert min(factors) < 0.55
    assert max(factors) > 1.45
    assert 0.9 < sum(factors) / len(factors) < 1.1


def test_jitter_is_applied_in_next_attempt() -> None:
    policy = sq.RetryPolicy(jitter=0.5, seed=7)
    assert policy.next_attempt(1, T0, T0, "k") == T0 + policy.backoff(1, "k")
    assert policy.backoff(1, "k") != timedelta(minutes=5)


def test_no_jitter_ignores_key_and_seed() -> None:
    assert sq.RetryPolicy(seed=1).backoff(3, "a") == sq.RetryPolicy(seed=2).backoff(3, "b")


# -- invalid policies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_backoff": timedelta(0)},
        {"min_backoff": timedelta(seconds=-1)},
        {"max_backoff": timedelta(0)},
        {"max_backoff": -timedelta(hours=1)},
        {"max_lifetime": timedelta(0)},
        {"max_lifetime": timedelta(days=-5)},
        {"min_backoff": timedelta(hours=2), "max_backoff": timedelta(hours=1)},
        {"min_backoff": timedelta(minutes=5), "max_backoff": timedelta(minutes=5) - US},
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"jitter": -0.01},
        {"jitter": 1.0},
        {"jitter": 1.5},
        {"jitter": math.nan},
        {"jitter": math.inf},
    ],
    ids=repr,
)
def test_invalid_policies_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the type is the contract
        sq.RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_edge_policies_are_valid() -> None:
    policy = sq.RetryPolicy(
        min_backoff=timedelta(hours=1), max_backoff=timedelta(hours=1), max_attempts=1, jitter=0.0
    )
    assert policy.backoff(1) == policy.backoff(99) == timedelta(hours=1)
    assert sq.RetryPolicy(jitter=0.999).jitter == 0.999
    assert sq.RetryPolicy(min_backoff=US, max_backoff=US).backoff(5) == US


def test_a_backoff_that_could_leave_the_calendar_is_refused() -> None:
    # T0 + 3,000,000 days is past the year 9999: such a policy would fail mid-batch, so it is refused.
    far = timedelta(days=3_000_000)
    with pytest.raises(ValueError, match="at most 365 days"):
        sq.RetryPolicy(min_backoff=far, max_backoff=far)
    with pytest.raises(ValueError, match="at most 365 days"):
        sq.RetryPolicy(max_backoff=timedelta(days=366))
    assert sq.RetryPolicy(max_backoff=timedelta(days=365)).backoff(1000) == timedelta(days=365)
