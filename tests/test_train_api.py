"""LoRA training as a queue job through ``POST /sdstudio/v1/train/lora`` (kohya's field names), on the tiny SD1
checkpoint: a 3-step job (latents cached) writes a kohya file that /sdapi/v1/loras lists at once; a folder outside the data dir
and unknown fields are refused; /progress and the job show step, loss and ETA; interrupt saves the state and
a re-submitted job with ``resume`` carries on to the end."""

from __future__ import annotations

import csv
import time

from safetensors import safe_open
from train_fixtures import api_client, squares, wait_job

from tests.test_server import AUTH

BODY = {"train_data_dir": "lora-set", "output_name": "sks", "network_dim": 2, "network_alpha": 1,
        "learning_rate": 1e-3, "train_batch_size": 2, "resolution": 64, "caption_extension": ".caption",
        "lr_scheduler": "constant", "seed": 3}


def test_lora_route_trains_lists_refuses_and_resumes(data_dir):
    client = api_client(data_dir)
    squares(data_dir / "lora-set", [(200, 0, 40), (200, 40, 40)], [f"sks square {i}" for i in range(2)], broken=True)
    assert client.get("/sdapi/v1/loras", headers=AUTH).json() == []

    r = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "max_train_steps": 3, "cache_latents": True})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], AUTH)
    assert job["status"] == "done", job
    result = job["result"]
    path = data_dir / "models" / "Lora" / "sks.safetensors"
    assert result["path"] == str(path) and result["steps"] == 3 == result["total"] and not result["interrupted"]
    assert [name for name, _ in result["skipped_images"]] == ["broken.png"]
    assert len(result["losses"]) == 3 and all(v > 0 for v in result["losses"])
    with open(result["log_path"], newline="") as f:
        assert [row[0] for row in csv.reader(f)][1:] == ["1", "2", "3"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["ss_network_dim"] == "2" and meta["ss_steps"] == "3" and meta["ss_cache_latents"] == "True"
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    listed = {m["name"]: m for m in client.get("/sdapi/v1/loras", headers=AUTH).json()}
    assert listed["sks"]["path"] == str(path)  # no restart, no refresh call

    # refused: a folder outside the data dir, unknown or out-of-range fields, a scheduler we lack, no images
    outside = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "train_data_dir": "/tmp"})
    assert outside.status_code == 403
    escape = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "train_data_dir": "../"})
    assert escape.status_code == 403
    assert client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "bogus": 1}).status_code == 422
    assert client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "network_dim": 0}).status_code == 422
    bad = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "lr_scheduler": "nope"})
    assert bad.status_code == 422 and "lr_scheduler" in bad.text
    (data_dir / "empty").mkdir()
    empty = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "train_data_dir": "empty"})
    assert empty.status_code == 422 and "no usable images" in empty.text
    model = client.post("/sdstudio/v1/train/lora", headers=AUTH, json={**BODY, "model": "no-such-model"})
    assert model.status_code == 422

    # a long run: progress in /progress and in the job; interrupt saves the state; resume carries on
    long = {**BODY, "output_name": "long", "max_train_steps": 100000}
    job_id = client.post("/sdstudio/v1/train/lora", headers=AUTH, json=long).json()["id"]
    deadline, progress = time.time() + 60, {}
    while time.time() < deadline:
        progress = client.get("/sdapi/v1/progress", headers=AUTH).json()
        if progress["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    assert progress["job_id"] == job_id and progress["state"]["sampling_steps"] == 100000
    assert progress["textinfo"].startswith("Step ") and " of 100000, loss " in progress["textinfo"]
    assert "ETA" in progress["textinfo"] and 0 < progress["progress"] < 1
    time.sleep(1.2)  # the job's own result is written once a second
    running = client.get(f"/sdstudio/v1/jobs/{job_id}", headers=AUTH).json()
    assert running["status"] == "running" and running["result"]["total"] == 100000
    assert running["result"]["step"] >= 1 and running["result"]["loss"] > 0 and "eta" in running["result"]
    assert client.post("/sdapi/v1/interrupt", headers=AUTH).json()["interrupted"]
    stopped = wait_job(client, job_id, AUTH)
    assert stopped["status"] == "done" and stopped["result"]["interrupted"] and stopped["result"]["path"] is None
    reached = stopped["result"]["steps"]
    assert 2 <= reached < 100000
    state = data_dir / "models" / "Lora" / "long-state.pt"
    assert stopped["result"]["state_path"] == str(state) and state.is_file()

    resubmitted_at = time.time()
    again = client.post("/sdstudio/v1/train/lora", headers=AUTH,
                        json={**long, "max_train_steps": reached + 2, "resume": True})
    assert again.status_code == 202
    done = wait_job(client, again.json()["id"], AUTH)
    assert done["status"] == "done" and done["result"]["steps"] == reached + 2 and not done["result"]["interrupted"]
    assert done["result"]["losses"][:reached] == stopped["result"]["losses"]  # the run carried on, not restarted
    with open(done["result"]["log_path"], newline="") as f:
        assert [int(row[0]) for row in csv.reader(f) if row[0].isdigit()] == list(range(1, reached + 3))
    with safe_open(done["result"]["path"], "pt") as f:  # the first run's start: carried on, not begun again
        assert float(f.metadata()["ss_training_started_at"]) < resubmitted_at
        assert f.metadata()["ss_cache_latents"] == "False"  # not asked: the pictures went through the VAE each step
    assert "long" in {m["name"] for m in client.get("/sdapi/v1/loras", headers=AUTH).json()}


def test_lora_route_captions_missing_pictures_and_samples_through_the_queue(data_dir):
    """The queue worker runs the route's whole job: ``caption_missing`` captions the picture that has none
    before training (its tags in ss_tag_frequency), and ``sample_prompts`` every ``sample_every_n_steps`` go
    into kohya's sample folder."""
    import json

    from sdstudio.testing.synthetic import write_interrogators

    write_interrogators(data_dir / "models")
    client = api_client(data_dir)
    squares(data_dir / "lora-set", [(200, 0, 40), (200, 40, 40)], "sks square")
    (data_dir / "lora-set" / "1.caption").unlink()  # this picture has no caption
    r = client.post("/sdstudio/v1/train/lora", headers=AUTH,
                    json={**BODY, "max_train_steps": 2, "caption_missing": "deepbooru", "sample_every_n_steps": 2,
                          "sample_prompts": ["a sks square"]})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], AUTH, timeout=180)
    assert job["status"] == "done", job
    written = data_dir / "lora-set" / "1.caption"
    assert written.is_file() and written.read_text().strip()
    with safe_open(job["result"]["path"], "pt") as f:
        tags = json.loads(f.metadata()["ss_tag_frequency"])
    assert any(tag in counts for counts in tags.values() for tag in written.read_text().split(", "))
    samples = sorted((data_dir / "models" / "Lora" / "sample" / "sks").glob("*.png"))
    assert len(samples) == 1 and samples[0].name.startswith("00000002")
