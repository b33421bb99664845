"""The hybrid logical clock, NTP samples and the offset estimator, in virtual time."""

from __future__ import annotations

import random
import statistics

from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshpost.clock import (
    HLC_COUNTER_LIMIT_BEYOND_BOUND,
    HLC_LOGICAL_MASK,
    HLC_MAX_FORWARD_DRIFT_MS,
    FakeClock,
    HybridLogicalClock,
    OffsetEstimator,
    hlc_pack,
    hlc_unpack,
    ntp_sample,
)

MS = 1_000_000
SECOND = 1_000_000_000

FAST = settings(max_examples=200, deadline=None)

# One step of a clock's life: move the wall clock (possibly backwards), stamp a local event,
# or observe a remote timestamp placed relative to the current wall clock.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("jump"), st.integers(-100 * SECOND, 10 * SECOND)),
        st.tuples(st.just("now"), st.just(0)),
        st.tuples(
            st.just("observe"),
            st.integers(-5 * SECOND, (HLC_MAX_FORWARD_DRIFT_MS - 1) * MS),
        ),
        st.tuples(st.just("observe_exact"), st.integers(0, HLC_LOGICAL_MASK)),
    ),
    min_size=1,
    max_size=60,
)


def physical_ms(clock: FakeClock) -> int:
    return clock.wall_ns() // MS


# -- hybrid logical clock --------------------------------------------------------------------


def test_pack_and_unpack_are_inverse() -> None:
    assert hlc_unpack(hlc_pack(1_700_000_000_000, 7)) == (1_700_000_000_000, 7)
    assert hlc_pack(5, HLC_LOGICAL_MASK) < hlc_pack(6, 0)


@FAST
@given(steps)
def test_hlc_strictly_increases_whatever_the_wall_clock_does(
    ops: list[tuple[str, int]],
) -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    previous = hlc.now()
    for kind, value in ops:
        if kind == "jump":
            clock.wall += value
            continue
        if kind == "now":
            stamp = hlc.now()
        elif kind == "observe":
            remote = hlc_pack(physical_ms(clock) + value // MS, 3)
            stamp = hlc.observe(remote)
            assert stamp > remote
        else:
            # A remote stamp in exactly the millisecond we are in, any counter value.
            l_ms, _ = hlc_unpack(hlc.last)
            remote = hlc_pack(l_ms, value)
            rejected = hlc.rejected
            stamp = hlc.observe(remote)
            beyond = l_ms > physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS
            if beyond and max(value, hlc_unpack(previous)[1]) >= HLC_COUNTER_LIMIT_BEYOND_BOUND:
                # Issue 16: past wall + bound a remote may not push the counter towards
                # rolling our millisecond over; it is refused and counted instead.
                assert hlc.rejected == rejected + 1
            else:
                assert stamp > remote
        assert stamp > previous
        assert hlc.last == stamp
        previous = stamp


@FAST
@given(
    st.integers(0, HLC_LOGICAL_MASK),
    st.integers(-SECOND, SECOND),
    st.integers(-(HLC_MAX_FORWARD_DRIFT_MS - 1), HLC_MAX_FORWARD_DRIFT_MS),
)
def test_observe_orders_after_the_remote_and_the_previous_local_stamp(
    remote_counter: int, local_jump_ns: int, remote_ahead_ms: int
) -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    before = hlc.now()
    clock.wall += local_jump_ns
    remote = hlc_pack(physical_ms(clock) + remote_ahead_ms, remote_counter)
    after = hlc.observe(remote)
    assert after > remote
    assert after > before


def test_hlc_follows_the_wall_clock_when_it_moves_forward() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    first = hlc.now()
    clock.advance(0.005)
    second = hlc.now()
    assert hlc_unpack(second) == (physical_ms(clock), 0)
    assert second > first


def test_hlc_counts_logically_when_the_wall_clock_goes_backwards() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    ms, _ = hlc_unpack(hlc.now())
    clock.wall -= 3 * SECOND
    assert hlc_unpack(hlc.now()) == (ms, 1)
    assert hlc_unpack(hlc.now()) == (ms, 2)


def test_counter_overflow_borrows_the_next_millisecond() -> None:
    clock = FakeClock()
    ms = physical_ms(clock)
    hlc = HybridLogicalClock(clock, last=hlc_pack(ms, HLC_LOGICAL_MASK - 1))
    assert hlc.now() == hlc_pack(ms, HLC_LOGICAL_MASK)
    assert hlc.now() == hlc_pack(ms + 1, 0)
    assert hlc.now() == hlc_pack(ms + 1, 1)


def test_counter_overflow_on_observe_borrows_the_next_millisecond() -> None:
    clock = FakeClock()
    ms = physical_ms(clock)
    hlc = HybridLogicalClock(clock)
    remote = hlc_pack(ms + 10, HLC_LOGICAL_MASK)
    assert hlc.observe(remote) == hlc_pack(ms + 11, 0)


def test_a_whole_millisecond_of_stamps_stays_unique_and_ordered() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    stamps = [hlc.now() for _ in range(HLC_LOGICAL_MASK + 10)]
    assert stamps == sorted(set(stamps))
    assert hlc_unpack(stamps[-1])[0] == physical_ms(clock) + 1


def test_a_remote_within_the_drift_limit_drags_the_clock_forward() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    remote = hlc_pack(physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS, 9)
    assert hlc.observe(remote) == remote + 1


@FAST
@given(st.integers(1, 10**9), st.integers(0, HLC_LOGICAL_MASK))
def test_an_absurd_far_future_remote_is_not_adopted_physically(
    beyond_ms: int, counter: int
) -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    before = hlc.now()
    remote = hlc_pack(physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS + beyond_ms, counter)
    after = hlc.observe(remote)
    assert after > before
    assert hlc_unpack(after)[0] == physical_ms(clock)
    assert after < remote


def test_a_restored_last_stamp_is_never_undercut() -> None:
    clock = FakeClock()
    future = hlc_pack(physical_ms(clock) + 5_000, 42)
    hlc = HybridLogicalClock(clock, last=future)
    assert hlc.now() == future + 1
    assert hlc.last == future + 1


# -- NTP samples and the offset estimator --------------------------------------------------


@FAST
@given(
    st.integers(0, 2**62),
    st.integers(-(10**12), 10**12),
    st.integers(0, 10**10),
    st.integers(0, 10**10),
    st.integers(0, 10**9),
)
def test_ntp_sample_follows_the_ntp_formula(
    t1: int, offset: int, forward: int, backward: int, processing: int
) -> None:
    t2 = t1 + forward + offset
    t3 = t2 + processing
    t4 = t3 - offset + backward
    sample = ntp_sample(t1, t2, t3, t4)
    assert sample.offset_ns == ((t2 - t1) + (t3 - t4)) // 2
    assert sample.delay_ns == forward + backward
    # Asymmetry is the only source of error, and it is at most half the delay.
    assert abs(sample.offset_ns - offset) <= (forward + backward) // 2 + 1


def test_ntp_sample_of_a_symmetric_exchange_is_exact() -> None:
    sample = ntp_sample(1_000, 1_000 + 10 + 250, 1_000 + 10 + 250 + 3, 1_000 + 10 + 3 + 10)
    assert sample.offset_ns == 250
    assert sample.delay_ns == 20


def test_an_empty_estimator_knows_nothing() -> None:
    estimator = OffsetEstimator()
    assert estimator.best() is None
    assert estimator.offset_ns is None
    assert estimator.rtt_ns is None


def test_samples_with_negative_delay_are_ignored() -> None:
    estimator = OffsetEstimator()
    # The reply "arrived" before the request was even answered: a clock jumped mid-exchange.
    estimator.add(1_000, 5_000, 6_000, 1_500)
    assert estimator.best() is None
    estimator.add(1_000, 1_100, 1_200, 1_300)
    estimator.add(1_000, 50_000, 50_100, 1_050)
    assert estimator.best() is not None
    assert estimator.rtt_ns == 200


def test_the_estimator_forgets_samples_older_than_its_window() -> None:
    estimator = OffsetEstimator(window=4)
    estimator.add(0, 5, 5, 10)  # delay 10: the best ever
    for _ in range(4):
        estimator.add(0, 500, 500, 1_000)  # delay 1000
    assert estimator.rtt_ns == 1_000


class TwoClocks:
    """Our FakeClock and a peer's, which runs `skew_ns` ahead; real time advances both."""

    def __init__(self, skew_ns: int) -> None:
        self.local = FakeClock()
        self.peer = FakeClock(skew_ns=skew_ns)

    def advance_ns(self, ns: int) -> None:
        self.local.advance(ns / 1e9)
        self.peer.advance(ns / 1e9)
        # Keep both exact: `advance` goes through floats.
        self.peer.wall = self.local.wall

    def exchange(self, estimator: OffsetEstimator, forward_ns: int, backward_ns: int) -> None:
        t1 = self.local.wall_ns()
        self.advance_ns(forward_ns)
        t2 = self.peer.wall_ns()
        self.advance_ns(200_000)  # the peer takes 0.2 ms to answer
        t3 = self.peer.wall_ns()
        self.advance_ns(backward_ns)
        t4 = self.local.wall_ns()
        estimator.add(t1, t2, t3, t4)
        self.advance_ns(100 * MS)


def queueing_delays(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Base one-way latency 1 ms plus asymmetric exponential queueing (fwd 30 ms, back 3 ms)."""
    return [
        (MS + int(rng.expovariate(1 / (30 * MS))), MS + int(rng.expovariate(1 / (3 * MS))))
        for _ in range(n)
    ]


def test_offset_estimate_recovers_a_known_skew_despite_asymmetric_queueing() -> None:
    skew = 250 * MS
    clocks = TwoClocks(skew)
    estimator = OffsetEstimator()
    rng = random.Random(20240601)
    delays = queueing_delays(rng, 40)
    naive: list[int] = []
    for forward, backward in delays:
        clocks.exchange(estimator, forward, backward)
        naive.append(((forward - backward) // 2) + skew)
    assert estimator.offset_ns is not None
    assert estimator.rtt_ns is not None
    assert abs(estimator.offset_ns - skew) < 3 * MS
    # Averaging every sample would be badly biased by the asymmetric queueing.
    assert abs(statistics.mean(naive) - skew) > 5 * MS
    # The chosen sample is the fastest of the last window.
    last_window = delays[-OffsetEstimator.DEFAULT_WINDOW :]
    assert estimator.rtt_ns == min(f + b for f, b in last_window)


@FAST
@given(st.integers(0, 2**32), st.integers(-(10 * SECOND), 10 * SECOND))
def test_offset_error_is_bounded_by_half_the_best_round_trip(seed: int, skew: int) -> None:
    clocks = TwoClocks(skew)
    estimator = OffsetEstimator()
    for forward, backward in queueing_delays(random.Random(seed), 12):
        clocks.exchange(estimator, forward, backward)
    assert estimator.offset_ns is not None
    assert estimator.rtt_ns is not None
    assert abs(estimator.offset_ns - skew) <= estimator.rtt_ns // 2 + 1


def test_a_remote_no_later_than_our_own_stamp_is_merged_even_after_a_big_backward_jump() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    hlc.now()
    clock.wall -= 10 * HLC_MAX_FORWARD_DRIFT_MS * MS  # our wall clock falls ten minutes back
    ours = hlc.now()
    l_ms, l_c = hlc_unpack(ours)
    # The peer has seen our stamps: its clock equals our time line, not the future.
    remote = hlc_pack(l_ms, l_c + 100)
    assert hlc.observe(remote) > remote


# -- the forward bound cannot be ratcheted (issue 16, item 4) ------------------------------------


def test_a_remote_echoing_an_ahead_clock_cannot_ratchet_it_past_the_bound() -> None:
    """A peer that sends back our own stamp with the counter at 0xFFFF, again and again, used
    to roll our clock one millisecond further each time (B ended 209 s ahead)."""
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    bound_ms = physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS
    hlc.observe(hlc_pack(bound_ms, 0))  # as far ahead as a remote may take us
    for _ in range(1000):
        l_ms, _c = hlc_unpack(hlc.last)
        hlc.observe(hlc_pack(l_ms, HLC_LOGICAL_MASK))
        clock.advance(0.0001)  # virtual time: 0.1 s in all
    assert hlc_unpack(hlc.last)[0] <= physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS + 1
    assert hlc.rejected > 0


def test_a_remote_just_past_the_bound_is_rejected_even_behind_our_own_stamp() -> None:
    clock = FakeClock()
    ahead = hlc_pack(physical_ms(clock) + 2 * HLC_MAX_FORWARD_DRIFT_MS, 0)
    hlc = HybridLogicalClock(clock, last=ahead)
    hlc.observe(ahead - (1 << 16))  # a millisecond behind ours: orders, moves nothing
    assert hlc.rejected == 0
    hlc.observe(hlc_pack(hlc_unpack(ahead)[0], HLC_LOGICAL_MASK))
    assert hlc.rejected == 1
    assert hlc_unpack(hlc.last)[0] == hlc_unpack(ahead)[0]


def test_a_restored_stamp_beyond_the_bound_is_refused_and_reported() -> None:
    clock = FakeClock()
    bound_ms = physical_ms(clock) + HLC_MAX_FORWARD_DRIFT_MS
    hlc, refused = HybridLogicalClock.restored(clock, hlc_pack(bound_ms + 149_000, 3))
    assert refused == hlc_pack(bound_ms + 149_000, 3)
    assert hlc_unpack(hlc.now())[0] == physical_ms(clock)
    hlc, refused = HybridLogicalClock.restored(clock, hlc_pack(bound_ms, 3))
    assert refused is None
    assert hlc.now() == hlc_pack(bound_ms, 4)


def test_advance_moves_past_an_own_stamp_whatever_the_bound() -> None:
    clock = FakeClock()
    hlc = HybridLogicalClock(clock)
    far = hlc_pack(physical_ms(clock) + 10 * HLC_MAX_FORWARD_DRIFT_MS, 5)
    hlc.advance(far)
    assert hlc.now() == far + 1
    assert hlc.rejected == 0


def test_a_restored_stamp_within_the_bound_of_its_send_time_survives_a_clock_going_back() -> None:
    # The node's own wall clock ran an hour ahead when it issued the stamp, and was corrected
    # while it was down: its time line stays monotonic (only a stamp beyond the bound of its
    # own send time, i.e. ratcheted by remotes, is refused).
    clock = FakeClock()
    hour_ms = 3_600_000
    issued_at = clock.wall_ns() + hour_ms * MS
    stamp = hlc_pack(issued_at // MS + 5, 2)
    hlc, refused = HybridLogicalClock.restored(clock, stamp, issued_at)
    assert refused is None and hlc.now() == stamp + 1
    ratcheted = hlc_pack(issued_at // MS + HLC_MAX_FORWARD_DRIFT_MS + 150_000, 0)
    hlc, refused = HybridLogicalClock.restored(clock, ratcheted, issued_at)
    assert refused == ratcheted and hlc_unpack(hlc.now())[0] == physical_ms(clock)


def test_the_estimator_picks_the_first_fastest_sample_as_ntp_sample_computes_it() -> None:
    estimator = OffsetEstimator()
    estimator.add(0, 700, 710, 30)  # delay 20, offset 690
    estimator.add(0, 12, 22, 30)  # delay 20 as well, came later: not chosen
    estimator.add(0, 500, 500, 1_000)  # delay 1000
    assert estimator.best() == ntp_sample(0, 700, 710, 30)
    assert (estimator.offset_ns, estimator.rtt_ns) == (690, 20)


class _ReferenceHLC:
    """`HybridLogicalClock.now` and `observe` as they were written before their steps went
    inline (2026-12-06): the same clock, call by call."""

    def __init__(self, clock: FakeClock, last: int) -> None:
        self._clock, self._last, self.rejected = clock, last, 0

    @staticmethod
    def _bump(ms: int, counter: int) -> int:
        return hlc_pack(ms + 1, 0) if counter >= HLC_LOGICAL_MASK else hlc_pack(ms, counter + 1)

    def now(self) -> int:
        pt = self._clock.wall_ns() // 1_000_000
        l_ms, l_c = hlc_unpack(self._last)
        self._last = hlc_pack(pt, 0) if pt > l_ms else self._bump(l_ms, l_c)
        return self._last

    def observe(self, remote: int) -> int:
        pt = self._clock.wall_ns() // 1_000_000
        r_ms, r_c = hlc_unpack(remote)
        l_ms, l_c = hlc_unpack(self._last)
        if r_ms > pt + HLC_MAX_FORWARD_DRIFT_MS and not (
            r_ms <= l_ms and (r_ms < l_ms or max(l_c, r_c) < HLC_COUNTER_LIMIT_BEYOND_BOUND)
        ):
            self.rejected += 1
            return self.now()
        top = max(pt, l_ms, r_ms)
        if top == l_ms == r_ms:
            self._last = self._bump(top, max(l_c, r_c))
        elif top == l_ms:
            self._last = self._bump(top, l_c)
        elif top == r_ms:
            self._last = self._bump(top, r_c)
        else:
            self._last = hlc_pack(top, 0)
        return self._last


_COUNTERS = st.one_of(st.sampled_from([0, HLC_LOGICAL_MASK - 1, HLC_LOGICAL_MASK]),
                      st.integers(0, HLC_LOGICAL_MASK))


@FAST
@example(0, HLC_LOGICAL_MASK, [("now", 0), ("now", 0)], 0)  # an exhausted counter
@given(
    st.integers(-5, 5), _COUNTERS,
    st.lists(st.one_of(
        st.tuples(st.just("jump"), st.integers(-100 * SECOND, 10 * SECOND)),
        st.tuples(st.just("now"), st.just(0)),
        # A remote this many ms from the wall clock (beyond the bound too), any counter.
        st.tuples(st.just("observe"), st.integers(-5_000, HLC_MAX_FORWARD_DRIFT_MS + 5_000)),
        # A remote in our own millisecond, or one either side, with any counter.
        st.tuples(st.just("observe_own"), st.integers(-HLC_LOGICAL_MASK - 1,
                                                      2 * HLC_LOGICAL_MASK + 1)),
    ), min_size=1, max_size=60),
    _COUNTERS,
)
def test_now_and_observe_stamp_as_their_reference_does(
    start_ms: int, start_counter: int, ops: list[tuple[str, int]], counter: int,
) -> None:
    """`now` and `observe` inline their steps (both run on every single send): they stamp,
    reject and count exactly as the code they replaced, from any start and after any steps."""
    clock = FakeClock()
    last = hlc_pack(physical_ms(clock) + start_ms, start_counter)
    hlc, reference = HybridLogicalClock(clock, last), _ReferenceHLC(clock, last)
    for kind, value in ops:
        if kind == "jump":
            clock.wall += value
            continue
        if kind == "now":
            stamps = hlc.now(), reference.now()
        else:
            if kind == "observe":
                remote = hlc_pack(physical_ms(clock) + value, counter)
            else:
                remote = hlc.last + value  # counter and millisecond around our own
            stamps = hlc.observe(remote), reference.observe(remote)
        assert stamps[0] == stamps[1]
        assert (hlc.last, hlc.rejected) == (reference._last, reference.rejected)
