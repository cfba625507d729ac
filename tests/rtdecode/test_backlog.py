"""The backlog policies: what waits between the volume loop and the decoders, and what is dropped."""

import logging
import threading

import pytest

from rtdecode.backlog import Backlog
from rtdecode.errors import ConfigError
from tests.helpers import wait_until

WAIT_S = 15.0


def drain(backlog: Backlog) -> list:
    items = []
    while (item := backlog.get(timeout_s=0)) is not None:
        items.append(item)
    return items


def test_keep_all_keeps_everything_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="rtdecode.backlog")
    backlog = Backlog("keep_all", max_items=10)
    assert [backlog.put(i) for i in range(100)] == [[]] * 100
    assert (len(backlog), backlog.n_dropped, backlog.peak) == (100, 0, 100)
    warnings = [r for r in caplog.records if "warning level" in r.getMessage()]
    assert len(warnings) == 1 and "max_items=10" in warnings[0].getMessage()
    assert drain(backlog) == list(range(100))


def test_drop_oldest_returns_what_it_drops_in_order():
    backlog = Backlog("drop_oldest", max_items=3)
    assert [backlog.put(i) for i in range(6)] == [[], [], [], [0], [1], [2]]
    backlog.put_front("given-back")  # over capacity now, but put_front never drops
    assert len(backlog) == 4
    assert backlog.put(6) == ["given-back", 3]
    assert (backlog.n_dropped, backlog.peak) == (5, 4)
    assert drain(backlog) == [4, 5, 6]


def test_latest_only_keeps_the_newest():
    backlog = Backlog("latest_only", max_items=50)
    assert backlog.put("a") == []
    assert backlog.put("b") == ["a"]
    assert backlog.put("c") == ["b"]
    assert (len(backlog), backlog.n_dropped) == (1, 2)
    assert drain(backlog) == ["c"]


def test_put_front_goes_first():
    backlog = Backlog("keep_all", max_items=10)
    backlog.put("t1")
    backlog.put("t2")
    backlog.put_front("t0-again")
    assert drain(backlog) == ["t0-again", "t1", "t2"]


def test_get_times_out_empty():
    backlog = Backlog("keep_all", max_items=10)
    assert backlog.get(timeout_s=0.05) is None
    assert backlog.get(timeout_s=0) is None


def blocked_consumer(backlog: Backlog) -> tuple[threading.Thread, list]:
    """A thread blocked in ``backlog.get()``, and the list it appends what it got to."""
    got = []
    consumer = threading.Thread(target=lambda: got.append(backlog.get(timeout_s=None)), daemon=True)
    consumer.start()
    wait_until(lambda: backlog.n_waiting == 1, "the consumer to wait")
    return consumer, got


def test_a_put_wakes_a_waiting_get():
    backlog = Backlog("drop_oldest", max_items=2)
    consumer, got = blocked_consumer(backlog)
    backlog.put("trial-1")
    consumer.join(WAIT_S)
    assert not consumer.is_alive() and got == ["trial-1"]


def test_close_wakes_a_blocked_get_and_leaves_items_takeable():
    backlog = Backlog("keep_all", max_items=10)
    consumer, got = blocked_consumer(backlog)
    backlog.close()
    consumer.join(WAIT_S)
    assert not consumer.is_alive() and got == [None]
    assert backlog.closed
    backlog.put_front("given back during shutdown")
    assert backlog.get(timeout_s=None) == "given back during shutdown"
    assert backlog.get(timeout_s=None) is None  # closed and empty: never waits


def test_listeners_hear_every_put_and_never_break_the_producer():
    backlog = Backlog("keep_all", max_items=10)
    heard = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    backlog.add_listener(broken)
    backlog.add_listener(lambda: heard.append(len(backlog)))
    backlog.put("a")
    backlog.put_front("b")
    backlog.remove_listener(broken)
    backlog.put("c")
    assert heard == [1, 2, 3]


@pytest.mark.parametrize(("policy", "max_items"), [("drop_newest", 3), ("keep_all", 0), ("drop_oldest", 2.5)])
def test_bad_settings_are_refused(policy, max_items):
    with pytest.raises(ConfigError, match="backlog"):
        Backlog(policy, max_items)
