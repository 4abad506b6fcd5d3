"""A readers–writer lock for the service's index: many searches at once, one write at a time."""

from __future__ import annotations

import threading


class RWLock:
    """Many concurrent searches, one writer at a time (writers wait for running searches).

    A waiting writer holds back new searches, so a steady stream of searches cannot starve an index write.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def read(self) -> _Held:
        return _Held(self, write=False)

    def write(self) -> _Held:
        return _Held(self, write=True)


class _Held:
    def __init__(self, lock: RWLock, write: bool) -> None:
        self.lock, self.write = lock, write

    def __enter__(self) -> None:
        with self.lock._cond:
            if self.write:
                self.lock._writers_waiting += 1
                self.lock._cond.wait_for(lambda: not self.lock._writing and self.lock._readers == 0)
                self.lock._writers_waiting -= 1
                self.lock._writing = True
            else:
                self.lock._cond.wait_for(lambda: not self.lock._writing and self.lock._writers_waiting == 0)
                self.lock._readers += 1

    def __exit__(self, *exc) -> None:
        with self.lock._cond:
            if self.write:
                self.lock._writing = False
            else:
                self.lock._readers -= 1
            self.lock._cond.notify_all()
