"""FairQueue on its own: per-user FIFOs served round-robin, jobs given back first, removal, positions."""

from __future__ import annotations

from bot.queue import FairQueue, _Entry
from mgie_engine.protocol import EditJob


def entry(user: int, name: str) -> _Entry:
    job = EditJob(job_id=name, image=b"", instruction=name, seed=0, text_cfg=7.5, image_cfg=1.5, steps=1)
    return _Entry(job=job, user_id=user, enqueued_at=0.0)


def filled(*jobs: tuple[int, str]) -> FairQueue:
    queue = FairQueue()
    for user, name in jobs:
        queue.push(entry(user, name))
    return queue


def served(queue: FairQueue) -> list[str]:
    out = []
    while (e := queue.pop()) is not None:
        out.append(e.job.job_id)
    return out


def names(entries: list[_Entry]) -> list[str]:
    return [e.job.job_id for e in entries]


def test_an_empty_queue_serves_nothing():
    queue = FairQueue()
    assert queue.pop() is None and len(queue) == 0 and queue.order() == [] and queue.pending_for(1) == 0


def test_one_user_is_served_in_the_order_they_asked():
    assert served(filled((1, "a1"), (1, "a2"), (1, "a3"))) == ["a1", "a2", "a3"]


def test_users_take_turns_so_many_jobs_wait_behind_one_job_of_each_other_user():
    queue = filled((1, "a1"), (1, "a2"), (1, "a3"), (2, "b1"), (3, "c1"), (2, "b2"))
    assert names(queue.order()) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert served(queue) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_order_is_what_pop_would_do_and_changes_nothing():
    queue = filled((1, "a1"), (2, "b1"), (1, "a2"))
    before = names(queue.order())
    assert names(queue.order()) == before and len(queue) == 3
    assert served(queue) == before


def test_a_newcomer_joins_the_end_of_the_round_not_the_end_of_every_queue():
    queue = filled((1, "a1"), (1, "a2"), (1, "a3"))
    assert queue.pop().job.job_id == "a1"
    queue.push(entry(2, "b1"))
    assert served(queue) == ["a2", "b1", "a3"]


def test_a_user_who_ran_dry_rejoins_at_the_back():
    queue = filled((1, "a1"), (2, "b1"), (2, "b2"))
    assert queue.pop().job.job_id == "a1"  # user 1 has nothing left and leaves the round
    queue.push(entry(1, "a2"))
    assert served(queue) == ["b1", "a2", "b2"]


def test_a_job_given_back_goes_first_and_its_user_keeps_their_turn():
    queue = filled((1, "a1"), (2, "b1"), (2, "b2"))
    first = queue.pop()
    queue.push(first, front=True)  # its worker failed before painting
    assert served(queue) == ["a1", "b1", "b2"]


def test_a_job_given_back_goes_before_its_own_users_other_jobs():
    queue = filled((1, "a1"), (1, "a2"), (2, "b1"))
    first = queue.pop()
    queue.push(first, front=True)
    assert queue.pending_for(1) == 2 and names(queue.order()).index("a1") < names(queue.order()).index("a2")
    assert served(queue).index("a1") < 2


def test_a_job_given_back_does_not_jump_other_users_turns():
    queue = filled((1, "a1"), (2, "b1"), (1, "a2"), (3, "c1"))
    first = queue.pop()  # user 1 still has a2 waiting, so their next turn is after bob's and carol's
    queue.push(first, front=True)
    assert names(queue.order()) == ["b1", "c1", "a1", "a2"]
    assert served(queue) == ["b1", "c1", "a1", "a2"]


def test_remove_takes_a_job_out_and_a_user_with_none_left_out_of_the_round():
    queue = filled((1, "a1"), (2, "b1"), (2, "b2"), (3, "c1"))
    assert queue.remove("a1").user_id == 1
    assert queue.pending_for(1) == 0 and len(queue) == 3
    assert queue.remove("b2").job.job_id == "b2"
    assert queue.remove("nope") is None
    assert served(queue) == ["b1", "c1"]


def test_pending_for_counts_each_users_waiting_jobs():
    queue = filled((1, "a1"), (1, "a2"), (2, "b1"))
    assert (queue.pending_for(1), queue.pending_for(2), queue.pending_for(3)) == (2, 1, 0)
    queue.pop()
    assert queue.pending_for(1) == 1 and len(queue) == 2
