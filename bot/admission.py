"""Admission to the queue: a request takes its place when it passes its checks, not when it is queued.

Between the check and the queue lie a deferred reply, a download, a decode and database writes, so a
user who sent several requests at once used to pass the per-user cap with every one of them. Now the
check reserves what the request will use: a place in the queue (counted by the per-user pending cap and
the global cap at once) and a start in the user's jobs-per-minute window. A :class:`Ticket` stands for
both until the job is queued (``consume``: its queue entry holds the place from then on and the start
stays counted) or the request fails on the way (``release``: both are given back, so a refused image or
a full disk costs the user nothing).

Fair share of the global cap (:func:`fair_share_allows`): a user's n-th pending job (counting their
waiting, running and reserved ones, plus the new one) is admitted only while fewer than
``max_total / n`` places are taken. A first job may take any free place, a second one only while the
queue is less than half full, a third while it is less than a third full, and so on. So once the queue
is half full only people with nothing pending get in: whatever order requests arrive in, the last half
of the places goes to different users, one each, and a full queue holds at least ``max_total / 2``
users. Admitted jobs are never evicted, so room for late-comers has to be kept back before it is needed;
the price is that someone alone with an idle bot gets at most about ``sqrt(max_total)`` waiting edits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .intake import JobRateLimiter
    from .queue import JobQueue


def fair_share_allows(taken: int, max_total: int, nth: int) -> bool:
    """Whether a user's ``nth`` pending job may have a place while ``taken`` of ``max_total`` are taken."""
    return taken * max(nth, 1) < max_total


class Ticket:
    """A request's reserved queue place and rate-limit start, from its check until it is queued or fails.

    Exactly one of :meth:`consume` and :meth:`release` takes effect; later calls do nothing, so callers
    can ``release`` in a ``finally`` after a successful submit.
    """

    def __init__(self, queue: JobQueue, limiter: JobRateLimiter, user_id: int) -> None:
        self.queue, self.limiter, self.user_id = queue, limiter, user_id
        queue.reserve(user_id)
        self._start = limiter.record(user_id)
        self._open = True

    @property
    def open(self) -> bool:
        """Whether the ticket still holds its place (neither consumed nor released)."""
        return self._open

    def consume(self) -> None:
        """The job is in the queue: its entry now holds the place; the start keeps counting."""
        if self._open:
            self._open = False
            self.queue.unreserve(self.user_id)

    def release(self) -> None:
        """The request failed before it was queued: give the place and the rate-limit start back."""
        if self._open:
            self._open = False
            self.queue.unreserve(self.user_id)
            self.limiter.forget(self.user_id, self._start)
