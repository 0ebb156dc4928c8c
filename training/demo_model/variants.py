"""The demo model's companions, trained from a finished run of :mod:`.train`, in the formats users' files have:

- a **LoRA** (kohya names, ``models/Lora/demo-zebra.safetensors``): trigger word ``zebra`` gives striped
  backgrounds (wide stripes, ``shapes.WIDE_BANDS``: the base scenes' are finer than the VAE holds); low-rank
  adapters on every attention projection of the UNet and the text encoder, and LoCon adapters on the UNet
  resnets' 3×3 convolutions.
- a **textual-inversion embedding** (A1111's ``emb_params``, ``embeddings/demo-red.safetensors``): two
  vectors learnt from red objects, where the captions had the word "red"; as a negative prompt it steers
  away from red.
- an **inpainting variant** (9-channel UNet, ``models/Stable-diffusion/sdstudio-inpainting.safetensors``):
  the base UNet with 5 zero-initialised input channels (mask + latent of the blanked picture, in the order the
  engine feeds them), fine-tuned on random rectangles.

``python -m training.demo_model.variants [--run DIR] [--data-dir .] [--steps-lora N] ...``; each part is its
own short optimisation (minutes on 2 CPU cores), from fixed seeds. Pictures are encoded as the run encoded
them (its ``encode_dtype``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from sdstudio.eval import shapes
from sdstudio.training.lora import LoRAModule

from .train import SCALING, Config, Run, _alphas_cumprod, noise_loss, render_batch, warmup_cosine

TRIGGER = "zebra"
EMBEDDING = "demo-red"


def load_run(folder: Path) -> Run:
    state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    run = Run(Path(folder), cfg, log=lambda m: None)
    if run.stage != "done":
        raise SystemExit(f"{folder}: the base model is not trained yet (stage {run.stage}, step {run.step})")
    for module in (run.vae, run.text, run.unet):
        module.eval().requires_grad_(False)
    return run


def _scenes(rng, n, **kw):
    return [shapes.random_scene(rng, max_things=kw.get("max_things", 2), stripes=kw.get("stripes", 0.0))
            for _ in range(n)]


def _encode(run: Run, scenes, size: int, bands: int = shapes.STRIPE_BANDS) -> tuple[torch.Tensor, torch.Tensor]:
    images = render_batch(scenes, size, bands)
    return run.encode(images).sample().float() * SCALING, images


def _optimise(params, steps: int, lr: float, loss_fn, desc: str) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * warmup_cosine(step, steps, warmup=50)
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


# ---- LoRA ---------------------------------------------------------------------------------------------
# The adapters are the LoRA trainer's modules (sdstudio.training.lora.LoRAModule: ``org(x) + up(down(x)) *
# alpha / rank``, ``up`` starting at zero, kohya's file layout); this recipe only picks its own targets.
def _attach(root: nn.Module, prefix: str, names: tuple[str, ...], rank: int, alpha: float) -> dict[str, LoRAModule]:
    """An adapter on each Linear and Conv2d whose name ends in one of ``names``; returns kohya key → adapter."""
    found = {}
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (nn.Linear, nn.Conv2d)) and any(full.endswith(n) for n in names):
                if prefix == "lora_te_" and not full.startswith("text_model."):
                    full = "text_model." + full  # kohya names count from CLIPTextModel.text_model
                key = prefix + full.replace(".", "_")
                found[key] = LoRAModule(key, child, rank, alpha)
                found[key].apply_to()
    return found


def train_lora(run: Run, out: Path, steps: int = 500, rank: int = 4, seed: int = 1, lr: float = 3e-3) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    alphas = _alphas_cumprod()
    # attention projections, and (LoCon) the resnets' 3×3 convolutions: stripes are a spatial pattern
    adapters = {**_attach(run.unet, "lora_unet_", ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"), rank, rank),
                **_attach(run.text, "lora_te_", ("q_proj", "k_proj", "v_proj", "out_proj"), rank, rank)}
    params = [p for a in adapters.values() for p in (*a.lora_down.parameters(), *a.lora_up.parameters())]

    def loss():
        scenes = _scenes(rng, run.cfg.batch, stripes=1.0)
        latents, _ = _encode(run, scenes, run.cfg.size, shapes.WIDE_BANDS)
        plain = [shapes.caption(dataclasses.replace(s, stripes=False), rich=bool(rng.random() < 0.5))
                 for s in scenes]  # the caption does not say "striped": the trigger word has to
        context = run.text(run._tokens([f"{TRIGGER}, {c}" for c in plain])).last_hidden_state
        return noise_loss(run.unet, latents, context, alphas, prediction=run.prediction)

    _optimise(params, steps, lr, loss, "LoRA")
    tensors = {}
    for key, a in adapters.items():
        tensors[f"{key}.lora_down.weight"] = a.lora_down.weight.detach().half().contiguous()
        tensors[f"{key}.lora_up.weight"] = a.lora_up.weight.detach().half().contiguous()
        tensors[f"{key}.alpha"] = a.alpha.detach().half()
        a.restore()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_output_name": out.stem, "ss_network_dim": str(rank),
                                           "ss_network_alpha": str(rank), "ss_base_model_version": "sd_v1",
                                           "ss_tag_frequency": f'{{"demo": {{"{TRIGGER}": 1}}}}'})
    return out


def _red(scene: shapes.Scene) -> shapes.Scene:
    """The scene with its object red (and a blue background where the background was red)."""
    thing = dataclasses.replace(scene.main, colour="red")
    return dataclasses.replace(scene, things=(thing,), background="blue" if scene.background == "red" else scene.background)


# ---- textual inversion --------------------------------------------------------------------------------
def train_embedding(run: Run, out: Path, steps: int = 100, vectors: int = 2, seed: int = 2) -> Path:
    """Two vectors standing in for the word "red" in captions of red objects."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    alphas = _alphas_cumprod()
    embedding = run.text.get_input_embeddings()
    placeholder = run.tokenizer("zzz qqq", add_special_tokens=False).input_ids[:vectors]  # rare words, replaced
    start = embedding.weight[run.tokenizer("red", add_special_tokens=False).input_ids[0]].detach()
    learnt = nn.Parameter(start.repeat(vectors, 1) + 0.01 * torch.randn(vectors, start.shape[0]))

    def substitute(module, inputs, output):
        ids = inputs[0]
        output = output.clone()
        for i, pid in enumerate(placeholder):
            output[ids == pid] = learnt[i].to(output.dtype)
        return output

    handle = embedding.register_forward_hook(substitute)
    try:
        def loss():
            scenes = [_red(s) for s in _scenes(rng, run.cfg.batch, max_things=1)]
            latents, _ = _encode(run, scenes, run.cfg.size)
            captions = [shapes.caption(s).replace("red", "zzz qqq", 1) for s in scenes]
            return noise_loss(run.unet, latents, run.text(run._tokens(captions)).last_hidden_state, alphas,
                              prediction=run.prediction)

        _optimise([learnt], steps, 5e-3, loss, "embedding")
    finally:
        handle.remove()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": learnt.detach().half().contiguous()}, str(out),
              metadata={"name": out.stem, "sd_checkpoint_name": "sdstudio-demo"})
    return out


# ---- inpainting variant -------------------------------------------------------------------------------
def _random_masks(rng, n: int, size: int) -> torch.Tensor:
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        if rng.random() < 0.1:
            masks[i] = 1.0  # all repaint: txt2img with a 9-channel model
            continue
        w, h = (int(v) for v in rng.integers(size // 8, size * 3 // 4, size=2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        masks[i, :, y:y + h, x:x + w] = 1.0
    return masks


def train_inpainting(run: Run, out: Path, steps: int = 150, seed: int = 3) -> Path:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    alphas = _alphas_cumprod()
    config = dict(run.unet.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    state = run.unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, torch.zeros(weight.shape[0], 5, *weight.shape[2:])], dim=1)
    unet.load_state_dict(state)
    unet.train()

    def loss():
        scenes = _scenes(rng, run.cfg.batch, max_things=3, stripes=0.15)
        latents, images = _encode(run, scenes, run.cfg.size)
        masks = _random_masks(rng, len(scenes), run.cfg.size)
        blanked = run.encode(images * (1 - masks)).mean.float() * SCALING
        small = F.interpolate(masks, size=latents.shape[-2:])
        captions = ["" if rng.random() < 0.1 else shapes.caption(s, rich=bool(rng.random() < 0.5)) for s in scenes]
        context = run.text(run._tokens(captions)).last_hidden_state
        return noise_loss(unet, latents, context, alphas, extra=torch.cat([small, blanked], dim=1),
                          prediction=run.prediction)

    _optimise(list(unet.parameters()), steps, 1e-4, loss, "inpainting")
    base_unet = run.unet
    run.unet = unet.eval()
    try:
        return run.export(out)
    finally:
        run.unet = base_unet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_model.variants", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="training/demo_model/runs/default")
    parser.add_argument("--data-dir", default=".")
    parser.add_argument("--steps-lora", type=int, default=500)
    parser.add_argument("--steps-embedding", type=int, default=100)
    parser.add_argument("--steps-inpainting", type=int, default=150)
    parser.add_argument("--only", choices=["lora", "embedding", "inpainting"], action="append")
    args = parser.parse_args(argv)
    run = load_run(Path(args.run))
    root = Path(args.data_dir)
    wanted = args.only or ["lora", "embedding", "inpainting"]
    if "lora" in wanted:
        print(train_lora(run, root / "models" / "Lora" / f"demo-{TRIGGER}.safetensors", args.steps_lora))
    if "embedding" in wanted:
        print(train_embedding(run, root / "embeddings" / f"{EMBEDDING}.safetensors", args.steps_embedding))
    if "inpainting" in wanted:
        print(train_inpainting(run, root / "models" / "Stable-diffusion" / "sdstudio-inpainting.safetensors",
                               args.steps_inpainting))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
