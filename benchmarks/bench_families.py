"""Per-step time of each model family through sdstudio's txt2img vs diffusers' own pipeline, same weights.

Families: sd1, sdxl, sdxl+refiner, sd3, flux-dev. For each, random-weight files in the published single-file
layouts are written into a temporary data folder (``--size``: ``tiny`` test-size models; ``reduced`` real
channel widths with fewer transformer blocks and text-encoder layers, see :data:`REDUCED`; ``full`` the real
SD 1.x / SDXL / refiner architectures -- SD3 and Flux stay reduced there, as their full files do not fit a
benchmark). Our side is ``Engine.generate`` (Euler, the Automatic schedule, CFG on, batch 1, fixed seed,
``RNG: CPU``). The other side is diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (+
``StableDiffusionXLImg2ImgPipeline`` with ``denoising_end`` / ``denoising_start`` for the refiner) /
``StableDiffusion3Pipeline`` / ``FluxPipeline`` built from the very modules the engine loaded (UNet or
transformer, VAE, text encoders) with our bundled tokenizers, Euler schedulers given the engine's sigmas, and
our initial noise as ``latents=``, so both compute the same thing. Devices and dtypes are the engine's own
plan: CUDA + fp16 where present, else the CPU in fp32.

Per-step time = (T(hi steps) - T(lo steps)) / (hi - lo) of whole jobs (text encoding and VAE decoding
cancel), after one warm-up job per side, median over ``--repeats`` rounds that alternate which side runs
first. The final latents of one job per side are compared (max abs difference, and relative to the largest
value); random weights with CFG are chaotic, so a few per cent there is two correct implementations.
The table is printed and appended, with the machine, versions and date, to ``benchmarks/families/RESULTS.md``.

Usage: python benchmarks/bench_families.py [--size tiny|reduced|full] [--families sd1,sdxl,...]
       [--steps 2,6] [--repeats 3] [--px 64] [--cfg 5] [--json out.jsonl] [--results PATH | --no-append]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdstudio.testing import dit_files as DF
from sdstudio.testing.synthetic import ldm_state_dict, make_checkpoint, realistic_norms, unet_config

FAMILIES = ("sd1", "sdxl", "sdxl+refiner", "sd3", "flux-dev")
RESULTS = REPO / "benchmarks" / "families" / "RESULTS.md"
PROMPT, NEGATIVE, SEED = "a red circle on a blue background, oil painting", "blurry, low quality", 1234
SWITCH_AT = 0.8  # refiner switch (A1111's default), diffusers' denoising_end / denoising_start
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
# --size reduced: real widths, fewer blocks. UNet transformer depth per level (SD 1.x has one per block: kept),
# DiT blocks, text-encoder layers; the VAEs are the real ones.
REDUCED = {"sdxl_tlpb": [1, 2, 2], "refiner_tlpb": [1, 1, 1, 1], "sd3_blocks": 4, "flux_double": 2, "flux_single": 4,
           "encoder_layers": 2}
NATIVE_PX = {"sd1": 512, "sdxl": 1024, "sdxl+refiner": 1024, "sd3": 1024, "flux-dev": 1024}


# ---- model files ------------------------------------------------------------------------------------------

def _clip_config(kind: str, size: str):
    from transformers import CLIPTextConfig

    width, layers, mlp, heads = DF.CLIP_SIZES[kind]["tiny" if size == "tiny" else "full"]
    if size == "reduced":
        layers = REDUCED["encoder_layers"]
    big = kind == "clip_g"
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, num_hidden_layers=layers, intermediate_size=mlp,
                          num_attention_heads=heads, projection_dim=width, max_position_embeddings=77,
                          hidden_act="gelu" if big else "quick_gelu", bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=0 if big else 49407)


def _unet_family_state(family: str, size: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD 1.x / SDXL / refiner single file's tensors (LDM / SGM key names)."""
    if size in ("tiny", "full"):
        return make_checkpoint(family, size, seed=seed, dtype=dtype)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = unet_config(family, "full")
    if family == "sdxl":
        cfg["transformer_layers_per_block"] = REDUCED["sdxl_tlpb"]
    elif family == "sdxl_refiner":
        cfg["transformer_layers_per_block"] = REDUCED["refiner_tlpb"]
    unet = UNet2DConditionModel(**cfg)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
    clip_l = (CLIPTextModel(_clip_config("clip_l", size)), "clip_hf")
    clip_g = (CLIPTextModelWithProjection(_clip_config("clip_g", size)), "openclip")
    encoders = {"sd1": [(*clip_l, "cond_stage_model.transformer.")],
                "sdxl": [(*clip_l, "conditioner.embedders.0.transformer."), (*clip_g, "conditioner.embedders.1.model.")],
                "sdxl_refiner": [(*clip_g, "conditioner.embedders.0.model.")]}[family]
    encoders = [(module, prefix, layout) for module, layout, prefix in encoders]
    for module in [unet, vae] + [e[0] for e in encoders]:
        realistic_norms(module)
    sd = ldm_state_dict(unet, vae, encoders)
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


_ENCODERS: dict[tuple, dict[str, torch.Tensor]] = {}  # SD3 and Flux share CLIP-L and T5: made once


def _encoder_state(kind: str, size: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A stand-alone encoder file's tensors (transformers' names). CLIP-L carries an identity projection, as
    the published files do where they have one (SD3 and Flux pool it unprojected; diffusers' SD3 pipeline
    projects), so both sides see the same pooled vector."""
    key = (kind, size, dtype)
    if key in _ENCODERS:
        return _ENCODERS[key]
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdstudio.models.convert import canonical_text_state

    torch.manual_seed({"clip_l": 10, "clip_g": 11, "t5xxl": 12}[kind])
    if kind == "t5xxl":
        t5 = DF.T5_SIZES["tiny" if size == "tiny" else "full"]
        if size != "tiny":
            t5 = {**t5, "num_layers": REDUCED["encoder_layers"]}
        module = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         use_cache=False, relative_attention_num_buckets=32,
                                         relative_attention_max_distance=128, **t5)).eval()
        sd = dict(module.state_dict())
        sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()  # the files hold both copies
    else:
        module = CLIPTextModelWithProjection(_clip_config(kind, size)).eval()
        realistic_norms(module)
        sd = canonical_text_state(module.state_dict())
        sd.pop("text_model.embeddings.position_ids", None)
        if kind == "clip_l":
            sd["text_projection.weight"] = torch.eye(sd["text_projection.weight"].shape[0])
    _ENCODERS[key] = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    return _ENCODERS[key]


def _dit_vae(size: str, prefix: str = "") -> dict[str, torch.Tensor]:
    return DF.dit_vae_state("tiny" if size == "tiny" else "full", prefix=prefix, levels=4 if size == "tiny" else None)


def sd3_shapes(size: str) -> DF.Shapes:
    """SD3 Medium's MMDiT keys (hidden 1536, 24 heads) cut to a few joint blocks (the last one keeps its
    context-pre-only form); tiny: the test suite's 2-block, 128-wide one."""
    if size == "tiny":
        width = DF.CLIP_SIZES["clip_l"]["tiny"][0] + DF.CLIP_SIZES["clip_g"]["tiny"][0]
        return DF.sd3_shapes(2, pos_embed_max=16, context_dim=DF.T5_SIZES["tiny"]["d_model"], pooled_dim=width,
                             prefix="")
    depth, full = REDUCED["sd3_blocks"], DF.sd3_shapes(24, prefix="")
    out = {}
    for k, v in full.items():
        m = re.match(r"joint_blocks\.(\d+)\.(.*)", k)
        if m is None or int(m[1]) < depth - 1:
            out[k] = v
        elif int(m[1]) == 23:
            out[f"joint_blocks.{depth - 1}.{m[2]}"] = v
    return out


def flux_shapes(size: str) -> DF.Shapes:
    if size == "tiny":
        return DF.flux_shapes(1, 1, hidden=256, context_dim=DF.T5_SIZES["tiny"]["d_model"],
                              pooled_dim=DF.CLIP_SIZES["clip_l"]["tiny"][0], guidance=True)
    return DF.flux_shapes(REDUCED["flux_double"], REDUCED["flux_single"])  # hidden 3072, T5 4096, CLIP-L 768


def write_group(group: str, size: str, root: Path, dtype: torch.dtype, refiner: bool = True) -> dict[str, str]:
    """Write one data folder's model files; returns {family: checkpoint name}. Groups: sd1, sdxl (base and
    refiner), sd3 (SD3 Medium-style file with its encoders bundled), flux (Flux.1 dev transformer, encoders in
    models/text_encoder, VAE in models/VAE, as Forge keeps them)."""
    ckpt = root / "models" / "Stable-diffusion"
    if group in ("sd1", "sdxl"):
        names = {}
        for family in ("sd1",) if group == "sd1" else ("sdxl", "sdxl_refiner") if refiner else ("sdxl",):
            name = f"{family.replace('_', '-')}-{size}"
            DF.save(_unet_family_state(family, size, dtype), ckpt / f"{name}.safetensors")
            names[family] = name
        return names
    flow_size = "tiny" if size == "tiny" else "reduced"
    if group == "sd3":
        state = DF.with_prefix(DF.random_state(sd3_shapes(flow_size), seed=2, dtype=dtype), "model.diffusion_model.")
        state |= {k: v.to(dtype) for k, v in _dit_vae(flow_size, "first_stage_model.").items()}
        for kind in ("clip_l", "clip_g", "t5xxl"):
            state |= DF.with_prefix(_encoder_state(kind, flow_size, dtype), f"text_encoders.{kind}.transformer.")
        DF.save(state, ckpt / f"sd3-{flow_size}.safetensors")
        return {"sd3": f"sd3-{flow_size}"}
    DF.save(DF.random_state(flux_shapes(flow_size), seed=3, dtype=dtype), ckpt / f"flux-dev-{flow_size}.safetensors")
    DF.save(_encoder_state("clip_l", flow_size, dtype), root / "models" / "text_encoder" / "clip_l.safetensors")
    DF.save(_encoder_state("t5xxl", flow_size, dtype), root / "models" / "text_encoder" / "t5xxl_fp16.safetensors")
    DF.save({k: v.to(dtype) for k, v in _dit_vae(flow_size).items()}, root / "models" / "VAE" / "ae.safetensors")
    return {"flux-dev": f"flux-dev-{flow_size}"}


# ---- the two sides ----------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


class Case:
    """One family: our request and the diffusers pipeline(s) over the engine's loaded modules."""

    def __init__(self, engine, family: str, names: dict[str, str], px: int, cfg: float):
        from sdstudio.core.names import get_sampler, resolve_schedule
        from sdstudio.core.params import Txt2ImgRequest

        self.engine, self.family, self.px, self.cfg = engine, family, px, cfg
        base = "sdxl" if family == "sdxl+refiner" else family
        self.req = Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, cfg_scale=cfg, width=px,
                                  height=px, sampler_name="Euler", scheduler="Automatic", rng="CPU",
                                  model=names[base], steps=2,
                                  refiner_checkpoint=names["sdxl_refiner"] if family == "sdxl+refiner" else "",
                                  refiner_switch_at=SWITCH_AT)
        self.sampler = get_sampler("Euler")
        self.schedule = resolve_schedule(self.sampler, "Automatic")
        self.model_name, self.names = names[base], names
        self.pipes: dict | None = None

    def ours(self, steps: int, latents: bool = False):
        """One job; with ``latents`` the final latent (the last step's denoised estimate: the schedule ends at 0)."""
        last: list[torch.Tensor] = []
        on_progress = (lambda p: last.append(p.latent.detach().float().cpu())) if latents else None
        self.engine.generate(self.req.replace(steps=steps), on_progress=on_progress)
        return last[-1] if latents else None

    # diffusers
    def _sigmas(self, steps: int) -> torch.Tensor:
        model = self.engine.load(self.model_name)[1]
        return self.engine._sigmas(model, self.req.replace(steps=steps), self.sampler, self.schedule.name, False)

    def _noise(self, channels: int) -> torch.Tensor:
        from sdstudio.engine.rng import image_noise

        noise, _ = image_noise(SEED, (channels, self.px // 8, self.px // 8), source="CPU", device=torch.device("cpu"))
        return noise[None]

    def build_pipes(self) -> None:
        from diffusers import (
            EulerDiscreteScheduler,
            FlowMatchEulerDiscreteScheduler,
            FluxPipeline,
            StableDiffusion3Pipeline,
            StableDiffusionPipeline,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )

        from sdstudio.engine.flow import t5_tokenizer
        from sdstudio.models.loader import clip_tokenizer

        m = self.engine.load(self.model_name)[1]
        pipes: dict = {}
        if not m.spec.is_flow:
            def euler(spec):
                return EulerDiscreteScheduler(**BETAS, prediction_type=spec.prediction, timestep_spacing="linspace",
                                              final_sigmas_type="zero", steps_offset=1)
            if m.spec.is_sdxl:
                pipes["base"] = StableDiffusionXLPipeline(
                    vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1],
                    tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], unet=m.unet, scheduler=euler(m.spec),
                    force_zeros_for_empty_prompt=False, add_watermarker=False)
                if self.family == "sdxl+refiner":
                    r = self.engine.load(self.req.refiner_checkpoint)[1]
                    pipes["refiner"] = StableDiffusionXLImg2ImgPipeline(
                        vae=r.vae, text_encoder=None, text_encoder_2=r.text_encoders[0], tokenizer=None,
                        tokenizer_2=r.tokenizers[0], unet=r.unet, scheduler=euler(r.spec),
                        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
            else:
                pipes["base"] = StableDiffusionPipeline(
                    vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                    scheduler=euler(m.spec), safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
        else:
            enc = m.extras["encoders"]
            if m.spec.dit.is_flux:
                pipes["base"] = FluxPipeline(transformer=m.unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                             vae=m.vae, text_encoder=enc["clip_l"], tokenizer=clip_tokenizer(),
                                             text_encoder_2=enc["t5xxl"], tokenizer_2=t5_tokenizer())
            else:
                pipes["base"] = StableDiffusion3Pipeline(
                    transformer=m.unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=m.vae,
                    text_encoder=enc["clip_l"], tokenizer=clip_tokenizer(), text_encoder_2=enc["clip_g"],
                    tokenizer_2=clip_tokenizer("!"), text_encoder_3=enc["t5xxl"], tokenizer_3=t5_tokenizer())
        for p in pipes.values():
            p.set_progress_bar_config(disable=True)
        self.pipes = pipes
        self.flow = m.spec.is_flow
        self.flux = m.spec.is_flow and m.spec.dit.is_flux
        self.channels = m.spec.unet["out_channels"]
        self.dtype = m.unet.dtype

    def theirs(self, steps: int, latents: bool = False):
        """The same job through diffusers; with ``latents`` the final latent (unpacked for Flux)."""
        from sdstudio.engine.flow import flow_timestep, pack_latents, unpack_latents

        if self.pipes is None:
            self.build_pipes()
        sigmas, noise, out = self._sigmas(steps), self._noise(self.channels), "latent" if latents else "pil"
        common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": self.px, "width": self.px}
        base = self.pipes["base"]
        with torch.no_grad():
            if not self.flow:
                # diffusers' Euler takes the whole list (with its final 0) and starts at noise * max(sigmas)
                kw = dict(common, sigmas=sigmas.tolist(), latents=noise.to(self.dtype), guidance_scale=self.cfg)
                if "refiner" not in self.pipes:
                    return base(**kw, output_type=out).images
                mid = base(**kw, denoising_end=SWITCH_AT, output_type="latent").images
                kw.pop("latents")
                return self.pipes["refiner"](**kw, image=mid, denoising_start=SWITCH_AT, output_type=out,
                                             aesthetic_score=6.0, negative_aesthetic_score=2.5).images
            fs = flow_timestep(sigmas.double()).float()  # flow sigmas; the scheduler appends the final 0
            start = (noise * fs[0]).to(self.dtype)
            kw = dict(common, num_inference_steps=steps, sigmas=fs[:-1].tolist(), output_type=out)
            if self.flux:  # true CFG with the negative prompt (ours: cfg_scale > 1) + the distilled guidance
                images = base(**kw, latents=pack_latents(start), true_cfg_scale=self.cfg,
                              guidance_scale=self.req.distilled_cfg_scale, max_sequence_length=512).images
                return unpack_latents(images, self.px // 8, self.px // 8) if latents else images
            return base(**kw, latents=start, guidance_scale=self.cfg, max_sequence_length=77).images

    def split_note(self, steps: int) -> str:
        """Where the refiner takes over on each side (A1111: nearest table timestep <= 199; diffusers: t < 200)."""
        if self.family != "sdxl+refiner":
            return ""
        sched = self.engine.schedule
        sig = self._sigmas(steps)[:-1]
        ours = sum(1 for s in sig if (999 - int(torch.argmin((sched.sigmas - s).abs()))) / 1000 < SWITCH_AT)
        t = [float(sched.sigma_to_t(s.reshape(1))) for s in sig]
        theirs = sum(1 for x in t if x >= round(1000 - SWITCH_AT * 1000))
        note = f"base {ours}/{steps} steps" if ours == theirs else \
            f"base steps differ: {ours}/{steps} ours (A1111's rule), {theirs}/{steps} diffusers"
        return note


def run_case(case: Case, lo: int, hi: int, repeats: int) -> dict:
    cuda = torch.cuda.is_available()
    load_s = _timed(lambda: case.ours(lo))  # loads the model(s) and warms up our side
    build_s = _timed(lambda: case.theirs(lo))  # builds the pipelines and warms up theirs
    sides = {"ours": case.ours, "theirs": case.theirs}
    per_step: dict[str, list[float]] = {"ours": [], "theirs": []}
    job: dict[str, list[float]] = {"ours": [], "theirs": []}
    for i in range(repeats):
        for side in (("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")):
            run = sides[side]
            t_lo = _timed(lambda: run(lo))  # noqa: B023 - called at once
            t_hi = _timed(lambda: run(hi))  # noqa: B023
            per_step[side].append((t_hi - t_lo) / (hi - lo))
            job[side].append(t_hi)
    peak: dict[str, float | None] = {}
    lat: dict[str, torch.Tensor] = {}
    for side in ("ours", "theirs"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        lat[side] = sides[side](hi, latents=True).float().cpu()
        peak[side] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    default_cache_s = None
    if case.family == "sdxl+refiner":  # the server's and CLI's Engine keep one checkpoint loaded (cache_size=1)
        from sdstudio.engine.generate import Engine

        plain = Case(Engine(case.engine.paths), case.family, case.names, case.px, case.cfg)
        plain.ours(lo)
        default_cache_s = statistics.median(_timed(lambda: plain.ours(hi)) for _ in range(2))
        del plain
        gc.collect()
    diff = float((lat["ours"] - lat["theirs"]).abs().max())
    scale = float(lat["theirs"].abs().max())
    o, t = statistics.median(per_step["ours"]), statistics.median(per_step["theirs"])
    return {"family": case.family, "px": case.px, "steps": [lo, hi], "repeats": repeats, "cfg": case.cfg,
            "schedule": case.schedule.label, "ours_s_per_step": o, "diffusers_s_per_step": t, "ratio": o / t,
            "ours_job_s": statistics.median(job["ours"]), "diffusers_job_s": statistics.median(job["theirs"]),
            "per_step_runs": per_step, "first_job_s": load_s, "diffusers_build_s": build_s,
            "latent_max_abs_diff": diff, "latent_rel_diff": diff / scale if scale else None,
            "peak_mb": peak, "note": case.split_note(hi), "default_cache_job_s": default_cache_s}


# ---- report -----------------------------------------------------------------------------------------------

def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} thread(s)"


def table(rows: list[dict]) -> str:
    head = ("| family | px | steps lo/hi | ours s/step | diffusers s/step | ratio | ours job s | diffusers job s | "
            "final latent max abs diff (rel.) | first job s (load) | peak GPU MB ours/diffusers | note |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('px', '')} | | | | | | | | | | failed: {r['error']} |")
            continue
        peak = r["peak_mb"]
        peak_s = f"{peak['ours']:.0f} / {peak['theirs']:.0f}" if peak.get("ours") is not None else "-"
        rel = f" ({r['latent_rel_diff']:.1e})" if r["latent_rel_diff"] is not None else ""
        note = r["note"]
        if r.get("default_cache_job_s") is not None:  # both checkpoints read again for every job
            note += f"; job {r['default_cache_job_s']:.2f} s with Engine's default cache_size=1"
        lines.append(f"| {r['family']} | {r['px']} | {r['steps'][0]}/{r['steps'][1]} | {r['ours_s_per_step']:.4f} | "
                     f"{r['diffusers_s_per_step']:.4f} | **{r['ratio']:.3f}** | {r['ours_job_s']:.3f} | "
                     f"{r['diffusers_job_s']:.3f} | {r['latent_max_abs_diff']:.2e}{rel} | {r['first_job_s']:.1f} | "
                     f"{peak_s} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "reduced", "full"), default="tiny")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", default=None, help="lo,hi step counts (default 2,8 tiny; 4,12 otherwise)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--px", type=int, default=None, help="image side (default 64 tiny; each family's native)")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--file-dtype", choices=("auto", "fp16", "fp32"), default="auto",
                        help="dtype of the written files (auto: fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per family here")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--label", default="", help="a note for the results section (e.g. 'sanity figures')")
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    lo, hi = map(int, (args.steps or ("2,8" if args.size == "tiny" else "4,12")).split(","))

    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine

    cuda = torch.cuda.is_available()
    file_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(args.file_dtype,
                                                                   torch.float16 if cuda else torch.float32)
    groups = {"sd1": ["sd1"], "sdxl": ["sdxl", "sdxl+refiner"], "sd3": ["sd3"], "flux": ["flux-dev"]}
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-families-"))
    started = datetime.datetime.now()
    try:
        for group, members in groups.items():
            members = [f for f in members if f in families]
            if not members:
                continue
            root = work / group
            t = time.perf_counter()
            try:
                names = write_group(group, args.size, root, file_dtype, refiner="sdxl+refiner" in members)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on with the next family
                rows += [{"family": f, "error": f"writing files: {type(exc).__name__}: {exc}"} for f in members]
                continue
            write_s = time.perf_counter() - t
            engine = Engine(Paths(root), cache_size=2)  # base + refiner stay loaded between jobs
            for family in members:
                px = args.px or (64 if args.size == "tiny" else NATIVE_PX[family])
                print(f"[{family}] {args.size}, {px}x{px}, files written in {write_s:.1f} s", flush=True)
                try:
                    row = run_case(Case(engine, family, names, px, args.cfg), lo, hi, args.repeats)
                except Exception as exc:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    row = {"family": family, "px": px, "error": f"{type(exc).__name__}: {exc}"}
                row.update(size=args.size, files_s=write_s,
                           device=str(engine.plan.device), dtype=str(engine.plan.dtype).removeprefix("torch."))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            del engine
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            shutil.rmtree(root, ignore_errors=True)
            if group == "flux":
                _ENCODERS.clear()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import diffusers
    import transformers

    plan = rows[0].get("device", "?") + " " + rows[0].get("dtype", "") if rows else "?"
    header = (f"### {started:%Y-%m-%d %H:%M}, --size {args.size}{', ' + args.label if args.label else ''}\n\n"
              f"{machine()}; {plan}; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
              f"{transformers.__version__}; Euler ({rows[0].get('schedule', '?') if rows else '?'}), CFG {args.cfg}, "
              f"batch 1, median of {args.repeats}; `{' '.join(['python', 'benchmarks/bench_families.py'] + sys.argv[1:])}`")
    text = header + "\n\n" + table(rows) + "\n"
    print("\n" + text)
    if not args.no_append:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
