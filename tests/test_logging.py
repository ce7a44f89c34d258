"""`worldmodels.logging.RecentReturns`: the recent return covers recent env steps, not a count of episodes."""

from __future__ import annotations

from worldmodels.logging import RecentReturns, recent_window


def test_recent_returns_cover_the_last_window_of_env_steps():
    recent = RecentReturns(window=1000)
    assert recent.mean() is None and recent.returns() == []
    for step, ret in [(100, 20.0), (300, 22.0), (2500, 300.0), (3100, 100.0)]:
        recent.add(step, ret)
    # at 3100 the window is (2100, 3100]: the two long episodes, not the short early ones
    assert recent.returns() == [300.0, 100.0]
    assert recent.mean() == 200.0
    assert recent.returns(3600) == [100.0]
    # no episode ended in the window: the last one is reported alone
    assert recent.returns(9000) == [100.0]


def test_recent_returns_round_trip_and_read_old_checkpoints():
    recent = RecentReturns(window=1000)
    for step, ret in [(100, 1.0), (1500, 2.0), (1800, 3.0)]:
        recent.add(step, ret)
    restored = RecentReturns(window=1000)
    restored.load(recent.state(), env_step=1800)
    assert restored.returns() == recent.returns() == [2.0, 3.0]
    # older checkpoints kept bare returns (the last 100 episodes): they count as ending at the checkpoint
    old = RecentReturns(window=1000)
    old.load([5.0, 7.0], env_step=4000)
    assert old.returns() == [5.0, 7.0] and old.returns(5001) == [7.0]


def test_recent_window_is_a_tenth_of_the_run():
    assert recent_window(12_000) == 1200
    assert recent_window(1_000_000) == 100_000
    assert recent_window(512) == 1000
