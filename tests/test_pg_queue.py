"""The PostgreSQL queue of record against a real server this module starts (Debian's ``postgresql`` package:
initdb and pg_ctl in a temporary folder, as the ``postgres`` user when the tests run as root); skipped, with
the reason, when no server can start. The SQLite queue's behaviour tests run on it unchanged; beyond them:
several API servers claiming at once (each job once), recovery touching only the restarted server's jobs,
and a server using it end to end on the tiny model."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import test_queue

from sdstudio.service.pgqueue import PostgresJobQueue, QueueDatabaseError, open_queue
from sdstudio.service.queue import DONE, FAILED, INTERRUPTED_BY_RESTART, QUEUED, RUNNING, SQLiteJobQueue

pytestmark = pytest.mark.xdist_group("postgres")  # one server for the module


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def pg_url(free_port):
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql): no initdb / pg_ctl")
    # the server's folder must be reachable by its user: not under pytest's root-only temp folder
    root = Path(tempfile.mkdtemp(prefix="sdstudio-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as the postgres user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, sock, port = root / "data", root, free_port()
    log = root / "server.log"
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "sdstudio", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        if log.exists():
            detail += log.read_text(errors="replace")[-500:]
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {exc} {detail.strip()}")
    try:
        yield f"postgresql://sdstudio@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False,
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _clear(url: str) -> None:
    q = PostgresJobQueue(url)
    with q._tx() as db:
        db.execute("TRUNCATE sdstudio_jobs, sdstudio_clients RESTART IDENTITY")
    q.close()


@pytest.fixture
def queue(pg_url):
    """An empty PostgreSQL queue (the SQLite tests below use this fixture)."""
    _clear(pg_url)
    q = PostgresJobQueue(pg_url)
    yield q
    q.close()


@pytest.fixture
def reopen(pg_url):
    """Opens the queue again, as a restarted server does."""
    return lambda: PostgresJobQueue(pg_url)


# the SQLite queue's behaviour, on PostgreSQL
test_fifo_for_one_client = test_queue.test_fifo_for_one_client
test_round_robin_between_clients = test_queue.test_round_robin_between_clients
test_position_predicts_the_claim_order = test_queue.test_position_predicts_the_claim_order
test_a_client_that_just_ran_waits_for_the_others = test_queue.test_a_client_that_just_ran_waits_for_the_others
test_park_keeps_progress_and_serves_the_next_client = test_queue.test_park_keeps_progress_and_serves_the_next_client
test_cancel = test_queue.test_cancel
test_list_pages_and_filters = test_queue.test_list_pages_and_filters
test_many_threads_submit_at_once = test_queue.test_many_threads_submit_at_once
test_a_lost_workers_job_is_queued_again_once_and_a_restart_remembers = \
    test_queue.test_a_lost_workers_job_is_queued_again_once_and_a_restart_remembers


def test_several_servers_claim_each_job_exactly_once(queue, pg_url):
    for n in range(60):
        queue.submit("abc"[n % 3], "txt2img", {"name": str(n)})
    servers = [PostgresJobQueue(pg_url, owner=f"server-{i}") for i in range(2)]
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def claimer(q):
        while (job := q.claim()) is not None:
            with lock:
                claimed.append((job.id, q.owner))
            q.finish(job.id, DONE, {})

    threads = [threading.Thread(target=claimer, args=(q,)) for q in servers for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for i, _ in claimed]
    assert len(ids) == 60 and len(set(ids)) == 60  # every job once
    assert {owner for _, owner in claimed} == {"server-0", "server-1"}
    assert all(j.status == DONE for j in queue.list(limit=100))
    for q in servers:
        q.close()


def test_recover_touches_only_the_restarted_servers_jobs(queue, pg_url):
    a, b = PostgresJobQueue(pg_url, owner="a"), PostgresJobQueue(pg_url, owner="b")
    mine = a.submit("x", "txt2img", {"name": "a's"})
    a.claim()
    a.save_progress(mine.id, 1, {"images": ["kept"]})
    theirs = b.submit("x", "txt2img", {"name": "b's"})
    b.claim()
    waiting = a.submit("x", "txt2img", {"name": "waiting"})
    a.close()  # server a "dies"
    again = PostgresJobQueue(pg_url, owner="a")
    assert again.recover() == [mine.id]
    assert again.get(mine.id).status == FAILED and again.get(mine.id).error == INTERRUPTED_BY_RESTART
    assert again.get(theirs.id).status == RUNNING  # b is alive and still running it
    assert again.get(waiting.id).status == QUEUED
    b.finish(theirs.id, DONE, {})
    resumed = again.submit("x", "txt2img", {"name": "resume me"})
    again.claim()  # "waiting" (older) first
    assert again.claim().id == resumed.id
    again.close()
    third = PostgresJobQueue(pg_url, owner="a")
    assert sorted(third.recover(resume=True)) == sorted([waiting.id, resumed.id])
    assert third.get(resumed.id).status == QUEUED and third.get(waiting.id).status == QUEUED
    for q in (b, third):
        q.close()


def test_a_table_of_the_first_schema_gets_the_new_columns(queue, pg_url):
    with queue._tx() as db:
        db.execute("ALTER TABLE sdstudio_jobs DROP COLUMN requeues, DROP COLUMN lost_worker")
    again = PostgresJobQueue(pg_url)  # as a server of this version opens a queue an older one made
    job = again.submit("a", "txt2img", {"name": "x"})
    assert (again.get(job.id).requeues, again.get(job.id).lost_worker) == (0, None)
    again.close()


def test_open_queue_picks_the_backend_and_names_a_bad_server(pg_url, tmp_path):
    q = open_queue(pg_url, tmp_path / "unused.sqlite3")
    assert isinstance(q, PostgresJobQueue)
    q.close()
    assert isinstance(open_queue(None, tmp_path / "jobs.sqlite3"), SQLiteJobQueue)
    with pytest.raises(QueueDatabaseError, match="cannot open the queue database"):
        open_queue("postgresql://nobody@/nodb?host=/nonexistent-socket-dir&port=1", tmp_path / "x")


def test_a_server_runs_its_jobs_from_a_postgres_queue(pg_url, data_dir):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    _clear(pg_url)
    args = build_parser().parse_args(["serve", "--data-dir", str(data_dir), "--api", "--nowebui", "--queue-db", pg_url])
    with TestClient(create_app(args)) as http:
        body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 5, "batch_size": 2}
        answer = http.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200 and len(answer.json()["images"]) == 2
        jobs = http.get("/sdstudio/v1/jobs").json()["jobs"]
        assert [j["status"] for j in jobs] == [DONE] and jobs[0]["result"]["all_seeds"] == [5, 6]
        http.app.state.service.stop()


def test_a_dead_servers_running_job_is_taken_over_once_when_its_lease_runs_out(queue, pg_url):
    import time

    a, b, c = (PostgresJobQueue(pg_url, owner=name) for name in ("a", "b", "c"))
    job = a.submit("x", "txt2img", {"name": "long"})
    assert a.claim().id == job.id
    a.save_progress(job.id, 2, {"images": ["0.png", "1.png"]})
    alive = a.submit("x", "txt2img", {"name": "a's other"})
    assert b.take_over(60) == []  # fresh: a is alive
    time.sleep(0.3)
    a.renew_leases()
    assert b.take_over(0.25) == []  # renewed just now
    time.sleep(0.3)
    assert a.take_over(0.25) == []  # a server never takes over its own jobs
    assert b.take_over(0.25) == [(job.id, QUEUED)]  # a stopped renewing: queued again, progress kept
    again = b.get(job.id)
    assert (again.status, again.batches_done, again.requeues, again.lost_worker) == (QUEUED, 2, 1, "server a")
    assert a.recover() == []  # a's restart: the job is not a's any more
    assert b.claim().id == job.id and b.get(alive.id).status == QUEUED
    time.sleep(0.3)  # now b dies too
    assert c.take_over(0.25) == [(job.id, FAILED)]
    failed = c.get(job.id)
    assert failed.status == FAILED and "server a, then server b" in failed.error and "not queued again" in failed.error
    assert failed.result == {"images": ["0.png", "1.png"]}  # what was made is kept
    for q in (a, b, c):
        q.close()


def test_the_service_renews_its_leases_and_takes_over_a_dead_servers_jobs(queue, pg_url, data_dir):
    import time

    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.service.jobs import JobService

    dead = PostgresJobQueue(pg_url, owner="dead")
    orphan = dead.submit("x", "load", {"model": "nothing"})
    dead.claim()
    dead.close()
    mine = PostgresJobQueue(pg_url, owner="mine")
    service = JobService(Engine(Paths(data_dir)), mine, lease=0.4)  # (its start-up recovery: nothing of its own)
    running = mine.submit("y", "load", {"model": "nothing"})
    assert mine.claim().id == running.id  # this server's own (as if its worker ran it)
    with mine._tx() as db:
        db.execute("UPDATE sdstudio_jobs SET heartbeat = 0")  # both leases long expired
    thread = threading.Thread(target=service._keep_leases, daemon=True)
    thread.start()  # the lease keeper alone (no dispatcher to run what it queues again)
    try:
        deadline = time.monotonic() + 10
        while mine.get(orphan.id).status != QUEUED:
            assert time.monotonic() < deadline, "the dead server's job was not taken over"
            time.sleep(0.05)
        assert mine.get(orphan.id).lost_worker == "server dead"
        assert mine.get(running.id).status == RUNNING  # its own: renewed, not taken over
        with mine._tx() as db:
            beat = db.execute("SELECT heartbeat FROM sdstudio_jobs WHERE id = %s", (running.id,)).fetchone()
        assert beat["heartbeat"] > time.time() - 5
    finally:
        service._stop.set()
        thread.join(5)
        mine.close()
