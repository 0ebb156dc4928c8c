"""The SQLite job queue: order (FIFO per client, round-robin between clients), parking, cancel, recovery."""

from __future__ import annotations

import threading

import pytest

from sdstudio.service.queue import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED_BY_RESTART,
    QUEUED,
    RUNNING,
    SQLiteJobQueue,
)


@pytest.fixture
def queue(tmp_path):
    q = SQLiteJobQueue(tmp_path / "jobs.sqlite3")
    yield q
    q.close()


@pytest.fixture
def reopen(tmp_path):
    """Opens the ``queue`` fixture's database again, as a restarted server does."""
    return lambda: SQLiteJobQueue(tmp_path / "jobs.sqlite3")


def drain(q) -> list[str]:
    order = []
    while (job := q.claim()) is not None:
        order.append(job.request["name"])
        q.finish(job.id, DONE, {})
    return order


def test_fifo_for_one_client(queue):
    for n in range(4):
        queue.submit("a", "txt2img", {"name": f"a{n}"})
    assert drain(queue) == ["a0", "a1", "a2", "a3"]


def test_round_robin_between_clients(queue):
    for n in range(3):
        queue.submit("a", "txt2img", {"name": f"a{n}"})
    queue.submit("b", "txt2img", {"name": "b0"})
    queue.submit("c", "txt2img", {"name": "c0"})
    queue.submit("b", "txt2img", {"name": "b1"})
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_position_predicts_the_claim_order(queue):
    jobs = [queue.submit(c, "txt2img", {"name": f"{c}{i}"}) for i, c in enumerate("aaabcb")]
    running = queue.claim()  # a0 runs; the others wait
    positions = {queue.get(j.id).request["name"]: queue.position(j.id) for j in jobs if j.id != running.id}
    queue.finish(running.id, DONE, {})
    expected = drain(queue)
    assert sorted(positions, key=positions.get) == expected
    assert queue.position(running.id) == -1


def test_a_client_that_just_ran_waits_for_the_others(queue):
    queue.submit("a", "txt2img", {"name": "a0"})
    first = queue.claim()
    queue.finish(first.id, DONE, {})
    queue.submit("a", "txt2img", {"name": "a1"})
    queue.submit("b", "txt2img", {"name": "b0"})
    assert drain(queue) == ["b0", "a1"]


def test_park_keeps_progress_and_serves_the_next_client(queue):
    long = queue.submit("a", "txt2img", {"name": "long"})
    job = queue.claim()
    queue.submit("b", "txt2img", {"name": "short"})
    assert queue.others_waiting("a") and not queue.others_waiting("b")
    queue.save_progress(job.id, 2, {"images": ["x", "y"]})
    queue.park(job.id)
    parked = queue.get(long.id)
    assert parked.status == QUEUED and parked.batches_done == 2 and parked.result == {"images": ["x", "y"]}
    assert drain(queue) == ["short", "long"]


def test_cancel(queue):
    queued = queue.submit("a", "txt2img", {"name": "q"})
    assert queue.cancel(queued.id, "b") is None  # someone else's job
    assert queue.get(queued.id).status == QUEUED
    assert queue.cancel(queued.id, "a").status == CANCELLED
    running = queue.submit("a", "txt2img", {"name": "r"})
    queue.claim()
    flagged = queue.cancel(running.id, "a")
    assert flagged.status == RUNNING and flagged.cancel_requested  # the worker stops it
    assert queue.claim() is None  # the cancelled job is never run
    assert queue.cancel("no-such-id", None) is None


def test_recover_marks_running_jobs_failed(tmp_path):
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    done = q.submit("a", "txt2img", {"name": "done"})
    q.finish(q.claim().id, DONE, {"images": []})
    running = q.submit("a", "txt2img", {"name": "running"})
    q.claim()
    waiting = q.submit("a", "txt2img", {"name": "waiting"})
    q.close()  # the process "dies": nothing else is written

    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    assert q.recover() == [running.id]
    assert q.get(running.id).status == FAILED and q.get(running.id).error == INTERRUPTED_BY_RESTART
    assert q.get(done.id).status == DONE and q.get(waiting.id).status == QUEUED
    assert len(q.list()) == 3


def test_recover_with_resume_queues_again(tmp_path):
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    running = q.submit("a", "txt2img", {"name": "running"})
    job = q.claim()
    q.save_progress(job.id, 1, {"images": ["kept"]})
    q.close()
    q = SQLiteJobQueue(tmp_path / "q.sqlite3")
    assert q.recover(resume=True) == [running.id]
    again = q.get(running.id)
    assert again.status == QUEUED and again.batches_done == 1 and again.result == {"images": ["kept"]}


def test_list_pages_and_filters(queue):
    ids = [queue.submit("a" if n % 2 else "b", "txt2img", {"name": str(n)}).id for n in range(7)]
    mine = queue.list("a")
    assert [j.id for j in mine] == [ids[5], ids[3], ids[1]]  # newest first
    assert [j.id for j in queue.list("a", offset=1, limit=1)] == [ids[3]]
    assert queue.list("a", offset=10**30, limit=10**30) == []  # past SQLite's integers: empty, not OverflowError
    queue.finish(queue.claim().id, FAILED, error="x")
    assert [j.status for j in queue.list(statuses=(FAILED,))] == [FAILED]


def test_many_threads_submit_at_once(queue):
    def submit(client):
        for n in range(25):
            queue.submit(client, "txt2img", {"name": f"{client}{n}"})

    threads = [threading.Thread(target=submit, args=(c,)) for c in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = drain(queue)
    assert len(order) == 100 and len(set(order)) == 100
    for client in "abcd":  # FIFO within each client
        assert [x for x in order if x[0] == client] == [f"{client}{n}" for n in range(25)]
    # round robin: in any window of 4 consecutive jobs, all 4 clients appear
    assert all(len({x[0] for x in order[i:i + 4]}) == 4 for i in range(0, 100, 4))


def test_a_lost_workers_job_is_queued_again_once_and_a_restart_remembers(queue, reopen):
    job = queue.submit("a", "txt2img", {"name": "x"})
    queue.claim()
    queue.save_progress(job.id, 1, {"images": ["kept"]})
    assert queue.worker_lost(job.id, "w1") is None  # the first loss: queued again, its progress kept
    again = queue.get(job.id)
    assert (again.status, again.batches_done, again.result) == (QUEUED, 1, {"images": ["kept"]})
    assert (again.requeues, again.lost_worker) == (1, "w1") and again.public()["requeues"] == 1
    queue.close()
    restarted = reopen()  # the API server restarts: the count is the queue's, not the old process's
    assert restarted.recover() == []
    assert restarted.claim().id == job.id
    assert restarted.worker_lost(job.id, "w2") == "w1"  # the second loss: not queued again
    assert restarted.get(job.id).status == RUNNING and restarted.get(job.id).requeues == 1
    other = restarted.submit("a", "txt2img", {"name": "y"})
    restarted.claim()
    assert restarted.worker_lost(other.id, "w2", requeue=False) is None  # a split job's shard runs elsewhere
    assert restarted.get(other.id).status == RUNNING and restarted.get(other.id).lost_worker == "w2"
    assert restarted.worker_lost("no-such-id", "w2") is None
    restarted.close()


def test_a_queue_file_of_the_first_schema_opens_with_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, client TEXT NOT NULL,
            kind TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL, result TEXT NOT NULL DEFAULT '{}',
            error TEXT, created REAL NOT NULL, started REAL, finished REAL,
            batches_done INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE clients (client TEXT PRIMARY KEY, last_served INTEGER NOT NULL);
        INSERT INTO jobs (id, client, kind, status, request, created) VALUES ('old', 'a', 'txt2img', 'queued',
            '{"name": "old"}', 1.0);
    """)
    db.close()
    q = SQLiteJobQueue(path)
    job = q.get("old")
    assert (job.status, job.requeues, job.lost_worker) == (QUEUED, 0, None)
    assert q.claim().id == "old" and q.worker_lost("old", "w") is None and q.get("old").lost_worker == "w"
    q.close()
