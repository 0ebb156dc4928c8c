"""The launch flags every command shares (folders, device, plug-ins) and what they build: the paths, the
device options, the plug-ins and the studio that runs requests with their scripts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .core.paths import DeviceOptions, Paths, default_precision


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """A1111's directory and device flags, shared by every command and by the server."""
    g = parser.add_argument_group("folders (A1111 names)")
    g.add_argument("--data-dir", default=os.environ.get("SDSTUDIO_DATA_DIR", "."),
                   help="base folder holding models/, embeddings/, outputs/ (default: current folder)")
    g.add_argument("--ckpt-dir", action="append", default=[], help="extra folder with checkpoints")
    g.add_argument("--vae-dir", help="folder with VAE files (default: models/VAE)")
    g.add_argument("--vae-approx-dir", help="folder with live preview decoders: TAESD, Approx NN (default: "
                   "models/VAE-approx)")
    g.add_argument("--lora-dir", help="folder with LoRA files (default: models/Lora)")
    g.add_argument("--embeddings-dir", help="folder with textual inversion embeddings (default: embeddings)")
    g.add_argument("--hypernetwork-dir", help="folder with hypernetworks (default: models/hypernetworks)")
    g.add_argument("--esrgan-models-path", help="folder with ESRGAN upscalers (default: models/ESRGAN)")
    g.add_argument("--realesrgan-models-path", help="folder with Real-ESRGAN upscalers (default: models/RealESRGAN)")
    g.add_argument("--swinir-models-path", help="folder with SwinIR upscalers (default: models/SwinIR)")
    g.add_argument("--dat-models-path", help="folder with DAT upscalers (default: models/DAT)")
    g.add_argument("--gfpgan-models-path", help="folder with GFPGAN and the face detector (default: models/GFPGAN)")
    g.add_argument("--codeformer-models-path", help="folder with CodeFormer (default: models/Codeformer)")
    g.add_argument("--controlnet-dir", help="folder with ControlNet models (default: models/ControlNet)")
    g.add_argument("--annotators-dir", help="folder with the ControlNet preprocessors' networks, e.g. "
                                            "ControlNetHED.pth (default: models/ControlNet/annotators)")
    g.add_argument("--text-encoder-dir", help="folder with SD 3.x / Flux text encoders: CLIP-L, CLIP-G, T5-XXL "
                                              "(default: models/text_encoder; models/clip is read too)")
    g.add_argument("--styles-file", help="prompt styles CSV (default: styles.csv in the data dir)")
    d = parser.add_argument_group("device")
    d.add_argument("--precision", choices=["full", "autocast", "half"], default=default_precision(),
                   help="full: float32 everywhere; autocast/half: float16 on a GPU, bfloat16 on a CPU with "
                        "native bfloat16 (avx512_bf16, amx_bf16), float32 on other CPUs (default: autocast, "
                        "or SDSTUDIO_PRECISION)")
    d.add_argument("--no-half", action="store_true", help="run the model in float32 (GPU, or a bfloat16 CPU)")
    d.add_argument("--no-half-vae", action="store_true", help="run the VAE in float32 (on the GPU, and on a CPU with native bfloat16)")
    d.add_argument("--medvram", action="store_true", help="keep only the component in use on the GPU")
    d.add_argument("--lowvram", action="store_true", help="stream UNet blocks to the GPU one by one")
    d.add_argument("--xformers", action="store_true", help="use xformers attention when installed")
    d.add_argument("--compile", action="store_true",
                   help="compile the UNet with torch.compile on first use (minutes; a GPU speed-up: on a 2-core CPU "
                        "it measured 1.09x after a 6-minute compile; the CPU needs a C++ compiler)")
    d.add_argument("--fp8", action="store_true",
                   help="store the UNet's (or SD 3 / Flux transformer's) weights in float8 e4m3fn, each layer cast to "
                        "the compute precision when it runs (A1111's FP8 weight): about half its memory, slightly "
                        "different pictures, slower on a CPU")
    d.add_argument("--use-cpu", nargs="*", help="run on the CPU even when a GPU is present")
    e = parser.add_argument_group("plug-ins (A1111's extensions)")
    e.add_argument("--extensions-dir", help="folder of plug-in folders (default: extensions in the data dir)")
    e.add_argument("--disable-all-extensions", action="store_true", help="load no plug-in")
    e.add_argument("--disable-extra-extensions", action="store_true",
                   help="load no plug-in (sdstudio's own features are built in, so the same as the above)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def paths_from(args: argparse.Namespace) -> Paths:
    return Paths(Path(args.data_dir), ckpt_dirs=[Path(p) for p in args.ckpt_dir], vae_dir=args.vae_dir,
                 vae_approx_dir=getattr(args, "vae_approx_dir", None),
                 lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, hypernetwork_dir=args.hypernetwork_dir,
                 esrgan_dir=args.esrgan_models_path,
                 realesrgan_dir=args.realesrgan_models_path, swinir_dir=args.swinir_models_path,
                 dat_dir=args.dat_models_path, gfpgan_dir=args.gfpgan_models_path,
                 codeformer_dir=args.codeformer_models_path, controlnet_dir=args.controlnet_dir,
                 annotators_dir=args.annotators_dir, text_encoder_dir=args.text_encoder_dir,
                 styles_file=args.styles_file)


def device_options_from(args: argparse.Namespace) -> DeviceOptions:
    return DeviceOptions(precision=args.precision, no_half=args.no_half, no_half_vae=args.no_half_vae,
                         medvram=args.medvram, lowvram=args.lowvram, xformers=args.xformers,
                         use_cpu=args.use_cpu is not None, compile=args.compile, fp8=getattr(args, "fp8", False))


def plugins_from(args: argparse.Namespace, paths: Paths, disabled: list[str] | None = None):
    """The plug-ins the flags and ``config.json``'s ``disabled_extensions`` leave on, loaded."""
    from .plugins import load

    if disabled is None:
        try:
            disabled = json.loads((paths.data_dir / "config.json").read_text(encoding="utf-8")).get(
                "disabled_extensions", [])
        except (OSError, ValueError, AttributeError):
            disabled = []
    folder = Path(getattr(args, "extensions_dir", None) or paths.data_dir / "extensions")
    return load(folder, disabled=disabled or [], disable_all=getattr(args, "disable_all_extensions", False),
                disable_extra=getattr(args, "disable_extra_extensions", False))


def studio_from(args: argparse.Namespace, engine, disabled: list[str] | None = None):
    """The studio (scripts above the engine) with the enabled plug-ins' scripts; ``disabled``: the settings'
    ``disabled_extensions`` when the caller has them already (else read from config.json)."""
    from .scripts import Studio

    plugins = plugins_from(args, engine.paths, disabled)
    activate(plugins)
    engine.upscalers.extra.update(plugins.upscalers)  # this engine's: by name, after the built-in ones
    for preprocessor in plugins.preprocessors.values():
        engine.controlnets.add_preprocessor(preprocessor)
    return Studio(engine, plugins.catalog), plugins


def activate(plugins) -> None:
    """Make the plug-ins' samplers and schedule types known by name (the sampler tables are process-wide)."""
    from .core import names
    from .engine import samplers, schedules

    def owner_failed(label: str, exc: Exception) -> None:
        for p in plugins.infos:
            if label in p.samplers or label in p.schedules:
                p.status, p.error = "failed", f"{type(exc).__name__}: {exc}"

    for info, function in plugins.samplers:
        try:
            names.register_sampler(info)
        except ValueError as exc:  # a name another sampler has: that plug-in is reported, the rest go on
            owner_failed(info.label, exc)
            continue
        samplers.SAMPLER_FUNCTIONS[info.function] = function
    for info, function in plugins.schedulers:
        try:
            names.register_schedule(info)
        except ValueError as exc:
            owner_failed(info.label, exc)
            continue
        schedules.SCHEDULE_FUNCTIONS[info.name] = lambda n, model, sdxl=False, f=function: f(n, model, sdxl)


def add_worker_flags(g) -> None:
    """Where generation runs: this process (default) or Ray workers; where outputs are kept."""
    g.add_argument("--ray", action="store_true",
                   help="start a local Ray and run generation on Ray workers: one per GPU (or --ray-cpu-workers)")
    g.add_argument("--workers", metavar="ADDRESS",
                   help="run generation on the Ray cluster at ADDRESS (ray://HEAD:10001, HEAD:6379, or auto): "
                        "one worker per GPU of the cluster (or --ray-cpu-workers)")
    g.add_argument("--ray-cpu-workers", type=int, metavar="N",
                   help="with --ray / --workers: N CPU workers (one core each) instead of one per GPU")
    g.add_argument("--output-store", metavar="URL",
                   help="also keep every output file in this fsspec URL (s3://bucket/path, file:///srv/out...); "
                        "jobs record its URLs and the API serves files from there when they are not local")


def worker_pool_from(args: argparse.Namespace, engine, catalog):
    """The Ray worker pool ``--ray`` / ``--workers`` ask for (None: jobs run in this process). Each worker
    builds its engine from the same folders, device flags and plug-ins as this process."""
    if not getattr(args, "ray", False) and not getattr(args, "workers", None):
        if getattr(args, "ray_cpu_workers", None):
            raise ValueError("--ray-cpu-workers needs --ray or --workers")
        return None
    from .service.ray_workers import WorkerSpec, start_ray_pool

    address = None if args.ray else args.workers
    plugin_flags = {"extensions_dir": getattr(args, "extensions_dir", None),
                    "disable_all_extensions": getattr(args, "disable_all_extensions", False),
                    "disable_extra_extensions": getattr(args, "disable_extra_extensions", False)}
    spec = WorkerSpec(engine.paths, device_options_from(args), plugin_flags=plugin_flags,
                      store_url=getattr(args, "output_store", None))
    return start_ray_pool(spec, address=address, cpu_workers=args.ray_cpu_workers, catalog=catalog)
