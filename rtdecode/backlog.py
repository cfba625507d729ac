"""The daemon's explicit backlog policy: what waits between the volume loop and the decoders.

The volume loop (the producer) must never block: a slow decoder may not delay the next TR. So the queue between
them never refuses an item; instead a policy says what happens when decoders fall behind:

- ``keep_all``: every trial is decoded eventually; ``max_items`` is only a warning level (logged once each time the
  queue grows past it).
- ``drop_oldest``: at most ``max_items`` wait; the oldest are dropped to make room (returned to the caller, who
  can report them).
- ``latest_only``: only the newest trial waits (the display shows "now", never a stale trial).

Items are opaque. A job given back (its decode worker died) goes to the front with :meth:`Backlog.put_front`.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from rtdecode.errors import ConfigError

log = logging.getLogger(__name__)

Policy = Literal["keep_all", "drop_oldest", "latest_only"]
POLICIES: tuple[str, ...] = ("keep_all", "drop_oldest", "latest_only")


class Backlog:
    """A thread-safe queue of pending jobs with an explicit overflow policy; :meth:`put` never blocks.

    Parameters
    ----------
    policy : {"keep_all", "drop_oldest", "latest_only"}
    max_items : int
        Capacity for ``drop_oldest``; warning level for ``keep_all``; ignored by ``latest_only`` (always 1).

    Attributes
    ----------
    n_dropped : int
        Items dropped by the policy so far.
    peak : int
        The largest length the queue has reached.
    """

    def __init__(self, policy: Policy, max_items: int) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"backlog policy must be one of {POLICIES}; got {policy!r}")
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ConfigError(f"backlog max_items must be an integer >= 1; got {max_items!r}")
        self.policy = policy
        self.max_items = 1 if policy == "latest_only" else max_items
        self.n_dropped = 0
        self.peak = 0
        self._items: deque[Any] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._n_waiting = 0
        self._over_warning_level = False
        self._listeners: list[Callable[[], None]] = []

    def put(self, item: Any) -> list[Any]:
        """Add ``item`` at the back; return the items the policy dropped to make room (oldest first)."""
        with self._ready:
            self._items.append(item)
            dropped = self._apply_policy()
            self._note_length()
            self._ready.notify()
        self._notify_listeners()
        return dropped

    def put_front(self, item: Any) -> None:
        """Give back ``item`` (e.g. a job whose worker died): it goes first and is not dropped by this call."""
        with self._ready:
            self._items.appendleft(item)
            self._note_length()
            self._ready.notify()
        self._notify_listeners()

    def get(self, timeout_s: float | None) -> Any | None:
        """The oldest item, waiting up to ``timeout_s`` (``None``: until an item or :meth:`close`).

        Returns ``None`` on timeout, or once the backlog is closed and empty.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._ready:
            while not self._items and not self._closed:
                remaining_s = None if deadline is None else deadline - time.monotonic()
                if remaining_s is not None and remaining_s <= 0:
                    return None
                self._n_waiting += 1
                try:
                    self._ready.wait(remaining_s)
                finally:
                    self._n_waiting -= 1
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Wake every waiting :meth:`get`; from now on ``get`` never waits. Items left can still be taken."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._notify_listeners()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def n_waiting(self) -> int:
        """How many consumers are blocked in :meth:`get` right now."""
        return self._n_waiting

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every put and on close, in the putting thread (so it must be quick and must
        not block: e.g. wake a poll loop). Its exceptions are logged, never passed to the producer."""
        with self._ready:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (no error if it was not registered)."""
        with self._ready:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _apply_policy(self) -> list[Any]:
        if self.policy == "keep_all":
            return []
        dropped = []
        while len(self._items) > self.max_items:
            dropped.append(self._items.popleft())
        self.n_dropped += len(dropped)
        return dropped

    def _note_length(self) -> None:
        length = len(self._items)
        self.peak = max(self.peak, length)
        if self.policy != "keep_all":
            return
        if length > self.max_items and not self._over_warning_level:
            log.warning(
                "backlog holds %d items, more than its warning level max_items=%d (policy keep_all: nothing is "
                "dropped; decoders are falling behind)",
                length,
                self.max_items,
            )
        self._over_warning_level = length > self.max_items

    def _notify_listeners(self) -> None:
        with self._ready:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("backlog listener %r failed (ignored)", callback)
