"""sdstudio against its peers, in one run: the same checkpoint, size, steps, sampler and prompt everywhere.

Each row runs in a fresh process of its own interpreter (peers live in their own venvs, see setup.sh):

- sdstudio, default precision (``Engine(Paths(...))``: what a plain launch gets on this machine)
- sdstudio, ``--precision full`` (``DeviceOptions(precision="full")``: float32)
- bare diffusers ``StableDiffusionPipeline.from_single_file`` + ``EulerDiscreteScheduler`` (float32 on a
  CPU, float16 on CUDA: the usual choice)
- stable-diffusion.cpp through ``stable-diffusion-cpp-python`` (its default weight type: the file's)
- ComfyUI's engine (``comfy`` package + its nodes, no server), default precision
- InvokeAI, where it installs (it does not here: the reason is printed)

The checkpoint is benchmarks/common.py's full-size SD 1.5-layout random-weight fp16 ``.safetensors``.
Sampler Euler, CFG on, batch 1, one prompt / negative / seed for all. Measured per row:

- load: seconds from after the imports until the model is ready to sample (each peer's own loader)
- first: seconds of a first 1-step image (any deferred loading or casting shows up here)
- s/step: (T(hi steps) - T(lo steps)) / (hi - lo), which cancels prompt encoding and VAE decoding
- peak RSS: the process's maximum resident memory (its VmHWM, read the same way for every peer)
- on CUDA also it/s (1 / s/step) and peak VRAM (torch's max reserved; sd.cpp's CPU build: n/a)

Printed as ratios to the "sdstudio (default)" row. A peer that is not set up is skipped with the reason.

Usage (from the repository root; the full quiet run takes ~15-25 min at 512 on 2 cores):
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peers/bench_peers.py --size 512 --lo 2 --hi 4
  smoke test: ... --size 256 --lo 1 --hi 2 --threads 1
Peers are found by flag, else environment variable, else under $SDSTUDIO_PEERS (default /work/peers):
  --sdcpp-python  / SDSTUDIO_PEER_SDCPP_PYTHON   (default $SDSTUDIO_PEERS/sdcpp/bin/python)
  --comfy-python  / SDSTUDIO_PEER_COMFY_PYTHON   (default $SDSTUDIO_PEERS/comfy/bin/python)
  --comfy-dir     / SDSTUDIO_PEER_COMFY_DIR      (default $SDSTUDIO_PEERS/comfy/ComfyUI)
  --invoke-python / SDSTUDIO_PEER_INVOKE_PYTHON  (default $SDSTUDIO_PEERS/invokeai/bin/python)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

from common import config_folder, full_sd15, in_fresh_process

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("SDSTUDIO_PEERS", "/work/peers"))
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
CFG = 7.0
SEED = 1

# Every driver gets the same settings as a JSON dict ``S`` and prints one JSON object as its last line:
# load_s, first_s, t_lo, t_hi, dtype, device and (on CUDA) peak_vram_mb.
PRELUDE = """
import json, sys, time
S = json.loads(sys.argv[1])
def vram():
    import torch
    return torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None
"""

SDSTUDIO = PRELUDE + """
import torch
from sdstudio.core.paths import DeviceOptions, Paths
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.generate import Engine
t = time.perf_counter()
engine = Engine(Paths(S["data"]), DeviceOptions(precision=S["precision"]) if S["precision"] else None)
_, model = engine.load(None)
load = time.perf_counter() - t
req = Txt2ImgRequest(prompt=S["prompt"], negative_prompt=S["negative"], sampler_name="Euler", scheduler="Uniform",
                     width=S["size"], height=S["size"], seed=S["seed"], cfg_scale=S["cfg"])
def run(n):
    t = time.perf_counter(); engine.generate(req.replace(steps=n)); return time.perf_counter() - t
first = run(1)
t_lo, t_hi = run(S["lo"]), run(S["hi"])
dtype = next(model.unet.parameters()).dtype
print(json.dumps({"load_s": load, "first_s": first, "t_lo": t_lo, "t_hi": t_hi, "device": str(engine.plan.device),
                  "dtype": str(dtype).replace("torch.", "") + " UNet", "peak_vram_mb": vram()}))
"""

DIFFUSERS = PRELUDE + """
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
t = time.perf_counter()
pipe = StableDiffusionPipeline.from_single_file(S["ckpt"], config=S["config"], local_files_only=True, torch_dtype=dtype,
                                                safety_checker=None, requires_safety_checker=False).to(device)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
load = time.perf_counter() - t
pipe.set_progress_bar_config(disable=True)
def run(n):
    t = time.perf_counter()
    pipe(prompt=S["prompt"], negative_prompt=S["negative"], width=S["size"], height=S["size"], guidance_scale=S["cfg"],
         num_inference_steps=n, generator=torch.Generator("cpu").manual_seed(S["seed"]))
    return time.perf_counter() - t
first = run(1)
t_lo, t_hi = run(S["lo"]), run(S["hi"])
print(json.dumps({"load_s": load, "first_s": first, "t_lo": t_lo, "t_hi": t_hi, "device": device,
                  "dtype": str(dtype).replace("torch.", ""), "peak_vram_mb": vram()}))
"""

SDCPP = PRELUDE + """
from stable_diffusion_cpp import StableDiffusion
t = time.perf_counter()
sd = StableDiffusion(model_path=S["ckpt"], n_threads=S["threads"], wtype=S["sdcpp_wtype"], verbose=False)
load = time.perf_counter() - t
def run(n):
    t = time.perf_counter()
    sd.generate_image(prompt=S["prompt"], negative_prompt=S["negative"], width=S["size"], height=S["size"],
                      cfg_scale=S["cfg"], sample_method="euler", sample_steps=n, seed=S["seed"])
    return time.perf_counter() - t
first = run(1)
t_lo, t_hi = run(S["lo"]), run(S["hi"])
print(json.dumps({"load_s": load, "first_s": first, "t_lo": t_lo, "t_hi": t_hi, "device": "cpu (CPU build)",
                  "dtype": "weights " + ("as in file" if S["sdcpp_wtype"] == "default" else S["sdcpp_wtype"]),
                  "peak_vram_mb": None}))
"""

COMFY = PRELUDE + """
sys.path.insert(0, S["comfy_dir"])
import torch
# PyPI's torchvision is a CUDA build whose C++ ops cannot load against a CPU torch; ComfyUI only imports
# torchvision (SD 1.5 never calls its ops), but torchvision's import registers fake kernels for nms/qnms,
# which needs the op names to exist. Declaring the two names lets the import through; nothing calls them.
if not torch.cuda.is_available():
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
sys.argv = ["main.py"] + ([] if torch.cuda.is_available() else ["--cpu"])
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, comfy.model_management, nodes
t = time.perf_counter()
model, clip, vae = comfy.sd.load_checkpoint_guess_config(S["ckpt"], output_vae=True, output_clip=True)[:3]
load = time.perf_counter() - t
def run(n):
    t = time.perf_counter()
    pos = nodes.CLIPTextEncode().encode(clip, S["prompt"])[0]
    neg = nodes.CLIPTextEncode().encode(clip, S["negative"])[0]
    latent = nodes.EmptyLatentImage().generate(S["size"], S["size"], 1)[0]
    out = nodes.common_ksampler(model, S["seed"], n, S["cfg"], "euler", "normal", pos, neg, latent)[0]
    nodes.VAEDecode().decode(vae, out)[0].cpu()
    return time.perf_counter() - t
first = run(1)
t_lo, t_hi = run(S["lo"]), run(S["hi"])
print(json.dumps({"load_s": load, "first_s": first, "t_lo": t_lo, "t_hi": t_hi,
                  "device": str(comfy.model_management.get_torch_device()),
                  "dtype": str(model.model.get_dtype()).replace("torch.", "") + " UNet", "peak_vram_mb": vram()}))
"""

INVOKEAI = PRELUDE + """
import socket, tempfile, threading, urllib.parse, urllib.request
import torch
if not torch.cuda.is_available():  # the same torchvision import problem as ComfyUI's (transformers imports it)
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
root = tempfile.mkdtemp(prefix="invokeai-root-")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
sys.argv = ["invokeai-web", "--root", root]
from invokeai.frontend.cli.arg_parser import InvokeAIArgs
InvokeAIArgs.parse_args()
from invokeai.app.services.config.config_default import get_config
config = get_config(); config.host, config.port = "127.0.0.1", port
import uvicorn
from invokeai.app.util.startup_utils import apply_monkeypatches, register_mime_types
apply_monkeypatches(); register_mime_types()
from invokeai.app.api_app import app, loop
from invokeai.backend.util.devices import TorchDevice
server = uvicorn.Server(uvicorn.Config(app=app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning"))
threading.Thread(target=lambda: loop.run_until_complete(server.serve()), daemon=True).start()
def call(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")
for _ in range(600):
    try:
        call("GET", "/v1/app/version"); break
    except OSError:
        time.sleep(0.1)
# the model, registered in place (InvokeAI probes and hashes it here; the weights load with the first image)
t = time.perf_counter()
job = call("POST", "/v2/models/install?inplace=true&source=" + urllib.parse.quote(S["invoke_model"]), {})
while job["status"] not in ("completed", "error", "cancelled"):
    time.sleep(0.05); job = call("GET", f"/v2/models/install/{job['id']}")
if job["status"] != "completed":
    raise SystemExit(f"InvokeAI could not install the model: {job.get('error')}: {job.get('error_reason')}")
install = time.perf_counter() - t
m = next(m for m in call("GET", "/v2/models/")["models"] if m["type"] == "main")
ident = {k: m[k] for k in ("key", "hash", "name", "base", "type")}
def graph(n):
    nodes = [{"id": "model", "type": "main_model_loader", "model": ident},
             {"id": "pos", "type": "compel", "prompt": S["prompt"]},
             {"id": "neg", "type": "compel", "prompt": S["negative"]},
             {"id": "noise", "type": "noise", "seed": S["seed"], "width": S["size"], "height": S["size"], "use_cpu": True},
             {"id": "denoise", "type": "denoise_latents", "steps": n, "cfg_scale": S["cfg"], "scheduler": "euler",
              "denoising_start": 0.0, "denoising_end": 1.0},
             {"id": "l2i", "type": "l2i"}]
    for node in nodes:
        node["use_cache"] = False  # every image does all its work, as in the other rows
    links = [("model", "clip", "pos", "clip"), ("model", "clip", "neg", "clip"), ("model", "unet", "denoise", "unet"),
             ("pos", "conditioning", "denoise", "positive_conditioning"),
             ("neg", "conditioning", "denoise", "negative_conditioning"), ("noise", "noise", "denoise", "noise"),
             ("denoise", "latents", "l2i", "latents"), ("model", "vae", "l2i", "vae")]
    edges = [{"source": {"node_id": a, "field": b}, "destination": {"node_id": c, "field": d}} for a, b, c, d in links]
    return {"id": f"steps-{n}", "nodes": {node["id"]: node for node in nodes}, "edges": edges}
def run(n):
    t = time.perf_counter()
    item_id = call("POST", "/v1/queue/default/enqueue_batch", {"batch": {"graph": graph(n), "runs": 1},
                                                               "prepend": False})["item_ids"][0]
    while (item := call("GET", f"/v1/queue/default/i/{item_id}"))["status"] not in ("completed", "failed", "canceled"):
        time.sleep(0.02)
    if item["status"] != "completed":
        raise SystemExit(f"InvokeAI failed: {item.get('error_type')}: {item.get('error_message')}")
    return time.perf_counter() - t
first = run(1)
t_lo, t_hi = run(S["lo"]), run(S["hi"])
warm_one = t_lo - (S["lo"] - 1) * (t_hi - t_lo) / (S["hi"] - S["lo"])  # a 1-step image once loaded
print(json.dumps({"load_s": install + first - warm_one, "first_s": first, "t_lo": t_lo, "t_hi": t_hi,
                  "device": str(TorchDevice.choose_torch_device()),
                  "dtype": str(TorchDevice.choose_torch_dtype()).replace("torch.", ""), "peak_vram_mb": vram(),
                  "note": f"diffusers folder of the same weights (InvokeAI loads single files through the hub); "
                          f"load = install {install:.2f} s + the first 1-step image's extra time"}))
server.should_exit = True
import shutil; shutil.rmtree(root, ignore_errors=True)
"""


@dataclass
class Row:
    name: str
    python: str
    code: str
    extra: dict = field(default_factory=dict)
    skip: str | None = None  # why the row cannot run ("not installed: ...")
    result: dict | None = None
    error: str | None = None


def probe(python: str | None, check: str, what: str, env: dict) -> str | None:
    """None when ``python`` exists and runs ``check``; otherwise the reason to print."""
    if not python or not Path(python).exists():
        return f"not installed: no interpreter at {python} (see benchmarks/peers/setup.sh)"
    out = subprocess.run([python, "-c", check], check=False, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"not installed: {what} does not import in {python}: {last}"
    return None


def _high_water_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (``VmHWM`` in /proc; None where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def run_fresh(python: str, code: str, settings: dict, env: dict, timeout: float) -> tuple[dict, float]:
    """Run a driver in a new process; its JSON result and the process's peak RSS in MB: the largest ``VmHWM``
    read while it runs (every 0.2 s; the memory map's own high-water mark, so nothing between reads is
    missed but the last 0.2 s). wait4's ``ru_maxrss`` is the fallback only: Linux carries it across exec, so
    it starts at this (large) process's size and hides any peer that stays below it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([python, "-c", code, json.dumps(settings)], stdout=out, stderr=err, env=env,
                                cwd=tempfile.gettempdir())
        deadline = time.monotonic() + timeout
        peak = None
        while True:
            seen = _high_water_mb(proc.pid)
            if seen is not None:
                peak = max(peak or 0.0, seen)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                raise RuntimeError(f"timed out after {timeout:.0f} s")
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if proc.returncode or not lines:
            tail = err.read().strip().splitlines()[-3:]
            raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
        return json.loads(lines[-1]), peak if peak is not None else usage.ru_maxrss / 1024


def diffusers_folder(ckpt: Path, config: Path) -> Path:
    """The checkpoint's weights as a diffusers folder (written once): InvokeAI loads a single file through
    ``from_single_file`` without a local config, which needs the hub; a folder loads offline."""
    folder = ckpt.with_suffix(".diffusers")
    if not (folder / "model_index.json").exists():
        in_fresh_process(f"""
import json, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_single_file({str(ckpt)!r}, config={str(config)!r}, local_files_only=True,
                                                torch_dtype=torch.float16, safety_checker=None,
                                                requires_safety_checker=False)
pipe.save_pretrained({str(folder)!r})
print(json.dumps({{}}))
""")
    return folder


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        cpu += ", " + " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}; {os.cpu_count()} cores; {mem:.0f} GiB"


def gpu_name(env: dict) -> str | None:
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    return out.stdout.strip() or None


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--lo", type=int, default=2)
    parser.add_argument("--hi", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per row (median)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="CPU threads for every peer (OMP/MKL and sd.cpp's n_threads)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument("--only", default="", help="comma-separated row names to run (substring match)")
    parser.add_argument("--sdcpp-python", default=os.environ.get("SDSTUDIO_PEER_SDCPP_PYTHON",
                                                                 str(PEERS / "sdcpp" / "bin" / "python")))
    parser.add_argument("--sdcpp-wtype", default="default", help="sd.cpp weight type (default: the file's, f16)")
    parser.add_argument("--comfy-python", default=os.environ.get("SDSTUDIO_PEER_COMFY_PYTHON",
                                                                 str(PEERS / "comfy" / "bin" / "python")))
    parser.add_argument("--comfy-dir", default=os.environ.get("SDSTUDIO_PEER_COMFY_DIR",
                                                              str(PEERS / "comfy" / "ComfyUI")))
    parser.add_argument("--invoke-python", default=os.environ.get("SDSTUDIO_PEER_INVOKE_PYTHON",
                                                                  str(PEERS / "invokeai" / "bin" / "python")))
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not 1 <= args.lo < args.hi:
        parser.error("need 1 <= --lo < --hi")

    ckpt = full_sd15()
    config = config_folder(ckpt)
    data = Path(tempfile.mkdtemp(prefix="sdstudio-peers-"))
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / ckpt.name).symlink_to(ckpt)
    threads = str(args.threads)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(REPO), **{k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}}
    settings = {"ckpt": str(ckpt), "config": str(config), "data": str(data), "size": args.size, "lo": args.lo,
                "hi": args.hi, "prompt": PROMPT, "negative": NEGATIVE, "cfg": CFG, "seed": SEED,
                "threads": args.threads, "sdcpp_wtype": args.sdcpp_wtype, "comfy_dir": args.comfy_dir}

    rows = [Row("sdstudio (default)", sys.executable, SDSTUDIO, {"precision": None}),
            Row("sdstudio --precision full", sys.executable, SDSTUDIO, {"precision": "full"}),
            Row("diffusers", sys.executable, DIFFUSERS),
            Row("stable-diffusion.cpp", args.sdcpp_python, SDCPP),
            Row("ComfyUI engine", args.comfy_python, COMFY),
            Row("InvokeAI", args.invoke_python, INVOKEAI)]
    rows[3].skip = probe(args.sdcpp_python, "import stable_diffusion_cpp", "stable_diffusion_cpp", env)
    if not (Path(args.comfy_dir) / "comfy" / "sd.py").exists():
        rows[4].skip = f"not installed: no ComfyUI source at {args.comfy_dir} (see benchmarks/peers/setup.sh)"
    else:
        rows[4].skip = probe(args.comfy_python, "import einops, torch, safetensors, av", "ComfyUI's dependencies", env)
    rows[5].skip = probe(args.invoke_python, "import invokeai.version", "invokeai", env)
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        for row in rows:
            if row.skip is None and not any(w in row.name.lower() for w in wanted):
                row.skip = "not selected (--only)"

    if rows[5].skip is None:
        settings["invoke_model"] = str(diffusers_folder(ckpt, config))
    for row in rows:
        if row.skip:
            print(f"{row.name}: {row.skip}", flush=True)
            continue
        runs = []
        for _ in range(args.repeat):
            print(f"{row.name}: running ...", flush=True)
            try:
                result, rss = run_fresh(row.python, row.code, {**settings, **row.extra}, env, args.timeout)
            except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                row.error = f"failed: {exc}"
                print(f"{row.name}: {row.error}", flush=True)
                break
            result["per_step"] = (result["t_hi"] - result["t_lo"]) / (args.hi - args.lo)
            result["peak_rss_mb"] = rss
            runs.append(result)
        if runs and not row.error:
            row.result = {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                          for k in runs[0]}
    shutil.rmtree(data)  # the link only: the checkpoint stays in the cache

    cuda = gpu_name(env)
    base = rows[0].result
    print()
    print(f"{datetime.date.today()} | {machine()}" + (f" | GPU {cuda}" if cuda else "") +
          f" | torch threads {args.threads}")
    print(f"SD 1.5 layout, random weights, {ckpt.name} ({ckpt.stat().st_size / 1e9:.2f} GB); {args.size}x{args.size}, "
          f"Euler, CFG {CFG}, batch 1; s/step = (T({args.hi}) - T({args.lo})) / {args.hi - args.lo}; "
          f"ratios = row / sdstudio (default); one fresh process per row, median of {args.repeat}")
    head = f"{'peer':28} {'device, precision':30} {'s/step':>7} {'ratio':>6} {'load s':>7} {'ratio':>6} " \
           f"{'1st 1-step s':>12} {'peak RSS MB':>11} {'ratio':>6}"
    if cuda:
        head += f" {'it/s':>6} {'ratio':>6} {'VRAM MB':>8} {'ratio':>6}"
    print(head)

    def ratio(r, key):
        return r[key] / base[key] if base and r.get(key) and base.get(key) else None

    for row in rows:
        r = row.result
        if r is None:
            print(f"{row.name:28} {row.skip or row.error}")
            continue
        line = (f"{row.name:28} {(r['device'] + ', ' + r['dtype'])[:30]:30} {fmt(r['per_step'], 3):>7} "
                f"{fmt(ratio(r, 'per_step')):>6} {fmt(r['load_s']):>7} {fmt(ratio(r, 'load_s')):>6} "
                f"{fmt(r['first_s']):>12} {r['peak_rss_mb']:>11.0f} {fmt(ratio(r, 'peak_rss_mb')):>6}")
        if cuda:
            ips = 1 / r["per_step"] if r["per_step"] > 0 else None
            base_ips = 1 / base["per_step"] if base and base["per_step"] > 0 else None
            line += (f" {fmt(ips):>6} {fmt(ips / base_ips if ips and base_ips else None):>6} "
                     f"{fmt(r.get('peak_vram_mb'), 0):>8} {fmt(ratio(r, 'peak_vram_mb')):>6}")
        print(line)
    report = {"date": str(datetime.date.today()), "machine": machine(), "gpu": cuda, "size": args.size,
              "lo": args.lo, "hi": args.hi, "threads": args.threads, "checkpoint": ckpt.name,
              "rows": [{"name": row.name, **(row.result or {"skipped": row.skip or row.error})} for row in rows]}
    for row in rows:
        if row.result and row.result.get("note"):
            print(f"{row.name}: {row.result['note']}")
    print(json.dumps(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
