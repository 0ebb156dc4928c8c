"""Faults a server meets: killed (kill -9) while loading a model or writing an output image or a training checkpoint,
a disk with no room for a file, a job that runs out of memory. After each: nothing on disk is corrupt, every job is
accounted for (failed with its finished images kept, or re-run once with --resume-queue), the server answers and
the next job runs. (A kill in the middle of sampling: tests/test_crash_recovery.py.)

Each server is a real ``sdstudio serve`` process on the tiny SD1 checkpoint. The kill lands inside a write or a load
through tests/fault_hold.py; the full disk is a file-size limit (RLIMIT_FSIZE, its signal ignored, so a write
past it fails with EFBIG as one on a full disk fails with ENOSPC); the memory is an address-space limit
(RLIMIT_AS) set on the running server a little above what it uses, so a large request's allocation really fails.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from step_hold import wait_for_file

from sdstudio.service.jobs import out_of_memory

FAULT_HOLD = Path(__file__).with_name("fault_hold.py")
FINISHED = ("done", "failed", "cancelled")


def call(port: int, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", "X-Sdstudio-Client": "faults"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# ``sdstudio serve`` under a file-size limit, its signal ignored (kept across exec: a write past it fails, EFBIG)
LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "sys.argv[0] = 'sdstudio'; runpy.run_module('sdstudio', run_name='__main__')")


def start(data_dir: Path, port: int, *flags: str, hold: list[str] | None = None,
          file_limit: int | None = None) -> subprocess.Popen:
    if hold is not None:
        command = [sys.executable, str(FAULT_HOLD), *hold, "--"]
    elif file_limit is not None:
        command = [sys.executable, "-c", LIMITED, str(file_limit), "serve"]
    else:
        command = [sys.executable, "-m", "sdstudio", "serve"]
    proc = subprocess.Popen([*command, "--api", "--nowebui", "--port", str(port), "--data-dir", str(data_dir), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 180
    while True:
        try:
            call(port, "/sdstudio/v1/queue", timeout=10)
            return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def wait_done(port: int, ids: list[str], timeout: float = 600) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        jobs = [call(port, f"/sdstudio/v1/jobs/{i}")[1] for i in ids]
        if all(j["status"] in FINISHED for j in jobs):
            return jobs
        assert time.time() < deadline, [j["status"] for j in jobs]
        time.sleep(0.2)


def check_pictures(folder: Path) -> list[Path]:
    """Every picture under ``folder`` decodes to its last byte; a left temporary file is a hidden ``.*.tmp``
    (never under a picture's name). Returns the pictures."""
    pictures = sorted(folder.rglob("*.png"))
    for path in pictures:
        with Image.open(path) as im:
            im.load()
    for path in folder.rglob("*"):
        assert path.is_dir() or path.suffix == ".png" or (path.name.startswith(".") and path.suffix == ".tmp") \
            or path.suffix in (".txt", ".json"), path
    return pictures


# ---- kill -9 while an output image is written ------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["default", "resume-queue"])
def test_killed_while_writing_an_image(data_dir, free_port, tmp_path, resume):
    """The server dies half-way through writing a job's second picture. Default: the job is failed with its first
    picture kept; --resume-queue: the job is run again from its second picture, once. Either way the other job
    runs, no picture is half-written, every picture on disk is listed by exactly one job."""
    port = free_port()
    proc = start(data_dir, port, hold=["--hold-dir", str(tmp_path), "--hold-write", ".png:2"])
    bodies = [{"request": {"prompt": "first", "steps": 2, "width": 64, "height": 64, "seed": 10, "n_iter": 2,
                           "save_images": True}},
              {"request": {"prompt": "second", "steps": 2, "width": 64, "height": 64, "seed": 20, "save_images": True}}]
    ids = [call(port, "/sdstudio/v1/jobs", body)[1]["id"] for body in bodies]
    held, temporary = map(Path, wait_for_file(tmp_path / "held", proc).splitlines())
    kill(proc)
    assert not held.exists() and temporary.is_file() and temporary.name.startswith(".")  # the cut write is only a temporary

    proc = start(data_dir, port := free_port(), *(["--resume-queue"] if resume else []))
    try:
        jobs = wait_done(port, ids)
    finally:
        log = stop(proc)
    first, second = jobs
    if resume:
        assert first["status"] == "done" and [im["seed"] for im in first["result"]["images"]] == [10, 11]
    else:
        assert first["status"] == "failed" and "interrupted" in first["error"]
        assert [im["seed"] for im in first["result"]["images"]] == [10]
        assert "1 job(s) were running when the server stopped" in log
    assert second["status"] == "done"
    listed = sorted(Path(im["path"]) for j in jobs for im in j["result"]["images"])
    check_pictures(data_dir / "outputs")  # the grid too, when the job ended
    assert check_pictures(data_dir / "outputs" / "txt2img-images") == listed


# ---- kill -9 while a model loads ------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["default", "resume-queue"])
def test_killed_while_loading_a_model(data_dir, free_port, tmp_path, resume):
    """The server dies with the checkpoint half read into the first job's model (its file open and mapped). The file
    is untouched (same bytes, same time); restarted, the job is failed (default) or run once (--resume-queue), the
    next job runs, and the model loads and generates."""
    import hashlib

    models = data_dir / "models" / "Stable-diffusion"
    ckpt = models / "tiny-sd1.safetensors"

    def identity() -> tuple:
        st = ckpt.stat()
        return hashlib.sha256(ckpt.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns, sorted(os.listdir(models))

    before = identity()
    port = free_port()
    proc = start(data_dir, port, hold=["--hold-dir", str(tmp_path), "--hold-load", "40"])
    bodies = [{"request": {"prompt": "first", "steps": 2, "width": 64, "height": 64, "seed": 10, "save_images": True}},
              {"request": {"prompt": "second", "steps": 2, "width": 64, "height": 64, "seed": 20, "save_images": True}}]
    ids = [call(port, "/sdstudio/v1/jobs", body)[1]["id"] for body in bodies]
    mapped = wait_for_file(tmp_path / "held", proc).splitlines()
    assert str(ckpt.resolve()) in mapped or str(ckpt) in mapped, mapped  # held mid-load, the file mapped
    assert call(port, f"/sdstudio/v1/jobs/{ids[0]}")[1]["status"] == "running"
    kill(proc)
    assert identity() == before

    proc = start(data_dir, port := free_port(), *(["--resume-queue"] if resume else []))
    try:
        first, second = wait_done(port, ids)
        status, again = call(port, "/sdapi/v1/txt2img", {"prompt": "after", "steps": 1, "width": 64, "height": 64})
    finally:
        log = stop(proc)
    if resume:
        assert first["status"] == "done" and [im["seed"] for im in first["result"]["images"]] == [10], first
    else:
        assert first["status"] == "failed" and "interrupted" in first["error"], first
        assert "1 job(s) were running when the server stopped" in log
    assert second["status"] == "done" and status == 200 and len(again["images"]) == 1
    assert identity() == before
    check_pictures(data_dir / "outputs")


# ---- kill -9 while a training checkpoint is saved -------------------------------------------------------


def _pictures(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        a = np.full((64, 64, 3), 30, np.uint8)
        a[8:40, 8 + 8 * i:40 + 8 * i] = (200, 40 * i, 40)
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"sks square {i}")


LORA = {"train_data_dir": "lora-set", "output_name": "sks", "network_dim": 2, "network_alpha": 1,
        "learning_rate": 1e-3, "train_batch_size": 2, "resolution": 64, "caption_extension": ".caption",
        "lr_scheduler": "constant", "seed": 3, "max_train_steps": 4, "save_every_n_steps": 1}


def test_killed_while_saving_a_training_checkpoint(data_dir, free_port, tmp_path):
    """A LoRA run saves a LoRA and its state after every step; the server dies half-way through the second state.
    What is on disk loads (the step LoRAs, the first state); restarted with --resume-queue, the run carries on from
    the state it has and ends once, with its final LoRA."""
    _pictures(data_dir / "lora-set")
    port = free_port()
    proc = start(data_dir, port, hold=["--hold-dir", str(tmp_path), "--hold-write=-state.pt:2"])
    status, job = call(port, "/sdstudio/v1/train/lora", LORA)
    assert status == 202, job
    held = Path(wait_for_file(tmp_path / "held", proc, timeout=600).splitlines()[0])
    kill(proc)
    lora_dir = data_dir / "models" / "Lora"
    assert held == lora_dir / "sks-state.pt"
    state = torch.load(held, map_location="cpu", weights_only=False)  # the first step's, whole
    assert state["step"] == 1
    for step in (1, 2):
        with safe_open(str(lora_dir / f"sks-step{step:08d}.safetensors"), "pt") as f:
            assert f.metadata()["ss_steps"] == str(step) and list(f.keys())
    assert not (lora_dir / "sks.safetensors").exists()

    proc = start(data_dir, port := free_port(), "--resume-queue")
    try:
        (done,) = wait_done(port, [job["id"]])
        loras = call(port, "/sdapi/v1/loras")[1]
    finally:
        stop(proc)
    assert done["status"] == "done" and done["result"]["steps"] == 4 == done["result"]["total"], done
    with safe_open(str(lora_dir / "sks.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    assert "sks" in [m["name"] for m in loras]
    with open(lora_dir / "sks-log.csv", newline="") as f:  # every step once: the cut one was not counted twice
        assert [row[0] for row in csv.reader(f)][1:] == ["1", "2", "3", "4"]
    assert torch.load(lora_dir / "sks-state.pt", map_location="cpu", weights_only=False)["step"] >= 3


# ---- a disk with no room --------------------------------------------------------------------------------

FILE_LIMIT = 20_000  # bytes: a 64x64 picture of the tiny model (~10 kB) fits, a 128x128 one (~37 kB) does not


def test_disk_full_while_saving(data_dir, free_port):
    """A picture and the styles file that find no room: each request fails with a message saying so, the files
    written before are intact, no half-written file is left under a real name, and the next job runs."""
    port = free_port()
    proc = start(data_dir, port, "--queue-db", ":memory:", file_limit=FILE_LIMIT)  # the queue keeps no file
    small = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 1, "save_images": True}
    try:
        assert call(port, "/sdstudio/v1/styles", {"name": "keep", "prompt": "{prompt}, kept"})[0] == 200
        styles_before = (data_dir / "styles.csv").read_bytes()
        assert call(port, "/sdapi/v1/txt2img", small)[0] == 200
        kept = check_pictures(data_dir / "outputs")
        assert len(kept) == 1

        status, body = call(port, "/sdapi/v1/txt2img", {**small, "width": 128, "height": 128})
        assert status == 500 and "could not write" in body["detail"] and "the disk is full" in body["detail"], body
        status, body = call(port, "/sdstudio/v1/styles", {"name": "big", "prompt": "x" * 30_000})
        assert status == 500 and "could not save the styles" in body["detail"] and "unchanged" in body["detail"]
        assert (data_dir / "styles.csv").read_bytes() == styles_before and not (data_dir / "styles.tmp").exists()

        assert call(port, "/sdapi/v1/txt2img", {**small, "seed": 2})[0] == 200  # the server goes on
        assert call(port, "/sdapi/v1/prompt-styles")[1][0]["name"] == "keep"
    finally:
        stop(proc)
    pictures = check_pictures(data_dir / "outputs")
    assert kept[0] in pictures and len(pictures) == 2


# ---- out of memory --------------------------------------------------------------------------------------


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_out_of_memory_fails_the_job_with_advice(data_dir, free_port):
    """An img2img at 4096² needs a 2 GiB activation in the VAE encoder; with the server's address space limited to
    1 GiB above what it uses after a small job, that allocation really fails. The job fails with a 413 that says
    what to do (smaller size, Tiled VAE, --medvram), the server stays up and the next job runs."""
    port = free_port()
    proc = start(data_dir, port, "--use-cpu", "all")  # the limit is on host memory (a GPU's own is not limited)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 100, 200)).save(buf, "PNG")
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "denoising_strength": 0.5,
            "init_images": [base64.b64encode(buf.getvalue()).decode()]}
    try:
        assert call(port, "/sdapi/v1/img2img", body)[0] == 200
        limit = _vm_size(proc.pid) + (1 << 30)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
        status, answer = call(port, "/sdapi/v1/img2img", {**body, "width": 4096, "height": 4096})
        assert status == 413, answer
        detail = answer["detail"]
        assert detail.startswith("out of memory") and "Tiled VAE" in detail and "--medvram" in detail, detail
        assert call(port, "/sdapi/v1/img2img", body)[0] == 200  # and the next job runs
        assert call(port, "/sdapi/v1/samplers")[0] == 200
    finally:
        log = stop(proc)
    assert "ran out of memory" in log and "Traceback" not in log


def test_what_counts_as_out_of_memory_or_a_full_disk(tmp_path):
    """Real failed allocations (Python's, numpy's, torch's CPU allocator) are out of memory; real writes past a
    file-size limit are a full disk; other errors are neither."""
    errors = []
    for allocate in (lambda: bytearray(1 << 62), lambda: np.empty(1 << 62, np.uint8),
                     lambda: torch.empty(1 << 62, dtype=torch.uint8)):
        try:
            allocate()
        except Exception as exc:  # noqa: BLE001 - whatever each library raises
            errors.append(exc)
    assert len(errors) == 3 and all(out_of_memory(e) for e in errors), errors
    assert not out_of_memory(ValueError("bad width")) and not out_of_memory(RuntimeError("shape mismatch"))
    script = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
              "from sdstudio.service.jobs import disk_full\n"
              f"try:\n    with open({str(tmp_path / 'big')!r}, 'wb') as f:\n        f.write(b'x' * 5000)\n"
              "except OSError as exc:\n    print(disk_full(exc), disk_full(OSError(2, 'No such file')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.split() == ["True", "False"], out.stderr
