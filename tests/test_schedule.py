"""Schedules parse once, print back in the same form and fire at the right steps."""

import pytest

from lscape.errors import UsageError
from lscape.schedule import Schedule, parse_duration


@pytest.mark.parametrize("text", ["every:5", "every:3:2", "at:0,10,100", "log:1:1000:10", "epoch", "time:15m",
                                  "time:90s", "never"])
def test_schedule_round_trips(text):
    s = Schedule.parse(text)
    assert str(s) == text
    assert str(Schedule.parse(str(s))) == text


def test_every_fires_on_multiples_after_offset():
    s = Schedule.parse("every:3:2")
    assert [t for t in range(12) if s.due(t)] == [2, 5, 8, 11]


def test_at_and_log_fire_on_listed_steps():
    assert [t for t in range(200) if Schedule.parse("at:100,0,10").due(t)] == [0, 10, 100]
    steps = [t for t in range(2000) if Schedule.parse("log:1:1000:4").due(t)]
    assert steps == [1, 10, 100, 1000]


def test_epoch_fires_at_epoch_end_only():
    s = Schedule.parse("epoch")
    assert not s.due(5) and s.due(5, epoch_end=True)


def test_time_fires_first_then_after_interval():
    s = Schedule.parse("time:10s")
    assert s.due(0, now=0.0)
    assert not s.due(1, now=5.0)
    assert s.due(2, now=10.5)
    assert not s.due(3, now=12.0)


def test_durations():
    assert parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400 and parse_duration(90) == 90


@pytest.mark.parametrize("bad", ["every:0", "every:x", "at:", "at:-1", "log:10:1:3", "epoch:3", "time:0", "weekly", ""])
def test_bad_schedules_name_the_accepted_forms(bad):
    with pytest.raises(UsageError, match="every:N"):
        Schedule.parse(bad)
