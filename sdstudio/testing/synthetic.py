"""Random-weight checkpoints in the original single-file layout, for tests, benchmarks and the
placeholder demo model.

Modules are built with diffusers / transformers at either the real size or a tiny size of the same
family, then written out under the original (LDM / SGM) key names by :mod:`.convert`. Same seed,
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..models.convert import canonical_text_state, component_to_ldm

_VAE = {
    "full": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
    "tiny": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
}
_CLIP_L = {
    "full": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 256, "num_attention_heads": 1},
}
_OPENCLIP_H = {
    "full": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 256, "num_attention_heads": 1},
}
_OPENCLIP_BIGG = {
    "full": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "projection_dim": 1280,
    },
    # wider than the tiny CLIP-L, as in the real model (768 vs 1280): tools tell the encoders apart by width
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "projection_dim": 128,
    },
}


def unet_config(family: str, size: str, in_channels: int = 4) -> dict:
    tiny = size == "tiny"
    if family == "sd1":
        ch = [32, 64, 64, 64] if tiny else [320, 640, 1280, 1280]
        return {
            "in_channels": in_channels,
            "block_out_channels": ch,
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 64 if tiny else 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        }
    if family == "sd2":
        ch = [64, 64, 128, 128] if tiny else [320, 640, 1280, 1280]
        return {
            "in_channels": in_channels,
            "block_out_channels": ch,
            "layers_per_block": 2,
            "attention_head_dim": [c // 64 for c in ch],
            "cross_attention_dim": 64 if tiny else 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        }
    if family == "sdxl":
        ch = [64, 128, 128] if tiny else [320, 640, 1280]
        pooled = _OPENCLIP_BIGG[size]["projection_dim"]
        return {
            "in_channels": in_channels,
            "block_out_channels": ch,
            "layers_per_block": 2,
            "attention_head_dim": [c // 64 for c in ch],
            "cross_attention_dim": 192 if tiny else 2048,
            "use_linear_projection": True,
            "transformer_layers_per_block": [1, 2, 2] if tiny else [1, 2, 10],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 6 * 256 + pooled,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        }
    if family == "sdxl_refiner":  # 4 levels of 384 channels, OpenCLIP-G context, aesthetic score (5 ids)
        ch = [64, 128, 128, 128] if tiny else [384, 768, 1536, 1536]
        width = _OPENCLIP_BIGG[size]["hidden_size"]
        pooled = _OPENCLIP_BIGG[size]["projection_dim"]
        return {
            "in_channels": in_channels,
            "block_out_channels": ch,
            "layers_per_block": 2,
            "attention_head_dim": [c // 64 for c in ch],
            "cross_attention_dim": width,
            "use_linear_projection": True,
            "transformer_layers_per_block": [2, 2, 2, 2] if tiny else [4, 4, 4, 4],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 5 * 256 + pooled,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        }
    raise ValueError(family)


def _clip_config(base: dict, act: str, pad: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad,
        **{"projection_dim": base.get("projection_dim", 768), **base},
    )


def realistic_norms(module: torch.nn.Module) -> None:
    """Fresh norm layers have weight 1 and bias 0, which makes every normalised vector average exactly
    zero -- unlike trained models, and fatal to A1111's mean-restoring emphasis. Perturb them."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.05, 0.1)


def tiny_unet(family: str = "sd1", in_channels: int = 4, seed: int = 0) -> UNet2DConditionModel:
    """A random tiny UNet of ``family`` (:func:`unet_config`), in eval mode, its norms perturbed."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family, "tiny", in_channels)).eval()
    realistic_norms(unet)
    return unet


def make_checkpoint(
    family: str = "sd1",
    size: str = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    inpainting: bool = False,
    ema: bool = False,
    meta: bool = False,
) -> dict[str, torch.Tensor]:
    """A random-weight state dict in the original layout of ``family`` (sd1, sd2, sdxl, sdxl_refiner).
    ``meta=True`` gives shape-only tensors (no memory, instant), for layout and detection checks."""
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=True):
            return make_checkpoint(family, size, seed=seed, dtype=dtype, inpainting=inpainting, ema=ema)
    torch.manual_seed(seed)
    ucfg = unet_config(family, size, 9 if inpainting else 4)
    unet = UNet2DConditionModel(**ucfg)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        **_VAE[size],
    )
    if family == "sd1":
        encoders = [
            (
                CLIPTextModel(_clip_config(_CLIP_L[size], "quick_gelu", 49407)),
                "cond_stage_model.transformer.",
                "clip_hf",
            )
        ]
    elif family == "sd2":
        encoders = [
            (
                CLIPTextModelWithProjection(_clip_config(_OPENCLIP_H[size], "gelu", 0)),
                "cond_stage_model.model.",
                "openclip",
            )
        ]
    elif family == "sdxl":
        encoders = [
            (
                CLIPTextModel(_clip_config(_CLIP_L[size], "quick_gelu", 49407)),
                "conditioner.embedders.0.transformer.",
                "clip_hf",
            ),
            (
                CLIPTextModelWithProjection(_clip_config(_OPENCLIP_BIGG[size], "gelu", 0)),
                "conditioner.embedders.1.model.",
                "openclip",
            ),
        ]
    elif family == "sdxl_refiner":
        encoders = [
            (
                CLIPTextModelWithProjection(_clip_config(_OPENCLIP_BIGG[size], "gelu", 0)),
                "conditioner.embedders.0.model.",
                "openclip",
            ),
        ]
    else:
        raise ValueError(family)
    for module in [unet, vae] + [e[0] for e in encoders]:
        realistic_norms(module)
    sd = ldm_state_dict(unet, vae, encoders)
    if ema:  # full training checkpoints also carry EMA copies; loaders must ignore them
        for k in [k for k in sd if k.startswith("model.diffusion_model.")][:8]:
            sd["model_ema." + k[len("model.diffusion_model.") :].replace(".", "")] = sd[k].clone()
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def ldm_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL, encoders: list[tuple]) -> dict[str, torch.Tensor]:
    """diffusers modules -> one state dict in the original single-file layout (``encoders``: (module,
    key prefix, layout) as :func:`make_checkpoint` lists them). The demo model's trainer exports with it."""
    lpb = unet.config.layers_per_block
    up_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    sd = component_to_ldm(unet.state_dict(), "model.diffusion_model.", "unet", layers_per_block=lpb,
                          up_has_attention=up_attn)
    sd.update(component_to_ldm(vae.state_dict(), "first_stage_model.", "vae",
                               levels=len(vae.config.block_out_channels)))
    for encoder, prefix, layout in encoders:
        sd.update(component_to_ldm(canonical_text_state(encoder.state_dict()), prefix, layout))
    return sd


def write_checkpoint(path: str | Path, family: str = "sd1", size: str = "tiny", **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = make_checkpoint(family, size, **kwargs)
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata={"sdstudio.synthetic": f"{family}-{size}"})
    else:
        torch.save({"state_dict": sd, "global_step": 0}, str(path))
    return path


def write_upscaler(path: str | Path, arch: str = "esrgan", scale: int = 4, nf: int = 8, nb: int = 1,
                   seed: int = 0) -> Path:
    """A random-weight upscaler file: ``esrgan`` (RRDBNet, new key layout), ``esrgan-old`` (the original
    ESRGAN key names) or ``compact`` (Real-ESRGAN's SRVGGNet). Scales 1/2 of RRDBNet use pixel-unshuffle
    as Real-ESRGAN's x2/x1 models do."""
    from ..engine.upscalers import RRDBNet, SRVGGNetCompact

    torch.manual_seed(seed)
    if arch == "compact":
        model: torch.nn.Module = SRVGGNetCompact(3, 3, nf, 2, scale, prelu=True)
    else:
        n_up = {1: 2, 2: 2, 4: 2, 8: 3}[scale]
        unshuffle = {1: 4, 2: 2}.get(scale, 1)
        model = RRDBNet(3 * unshuffle ** 2, 3, nf, nb, 32, n_up, unshuffle)  # growth channels: ESRGAN's 32
    for p in model.parameters():  # small weights: the network stays near its residual path
        p.data.mul_(0.3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if arch != "compact":
        sd = {_basicsr_name(k): v for k, v in sd.items()}
        if arch == "esrgan-old":
            sd = _old_esrgan_names(sd, nb, len([k for k in sd if k.startswith("conv_up") and k.endswith("weight")]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _basicsr_name(key: str) -> str:
    """RRDBNet's ``ups.N`` -> BasicSR's ``conv_up{N+1}``."""
    if key.startswith("ups."):
        n, rest = key[4:].split(".", 1)
        return f"conv_up{int(n) + 1}.{rest}"
    return key


def _old_esrgan_names(sd: dict[str, torch.Tensor], nb: int, n_up: int) -> dict[str, torch.Tensor]:
    hr = 3 + 3 * n_up - 1  # model.0 conv, model.1 body, then [upsample, conv, lrelu] per step
    out = {}
    for k, v in sd.items():
        name, param = k.rsplit(".", 1)
        if name.startswith("body."):
            _, i, rdb, conv = name.split(".")
            out[f"model.1.sub.{i}.{rdb.upper()}.{conv}.0.{param}"] = v
        elif name == "conv_body":
            out[f"model.1.sub.{nb}.{param}"] = v
        elif name == "conv_first":
            out[f"model.0.{param}"] = v
        elif name.startswith("conv_up"):
            out[f"model.{3 * int(name[7:])}.{param}"] = v
        elif name == "conv_hr":
            out[f"model.{hr}.{param}"] = v
        elif name == "conv_last":
            out[f"model.{hr + 2}.{param}"] = v
    return out


_TAGGER_TAGS = ("circle", "square", "triangle", "star", "red", "green", "blue", "yellow", "simple_background",
                "no_humans")
_CAPTION_WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "on",
                  "background", "small", "large", "left", "right", "picture", "of", "with")


def write_interrogators(models_dir: str | Path, seed: int = 0) -> Path:
    """Tiny random-weight interrogation models in the folders :mod:`sdstudio.engine.interrogate` reads:
    ``BLIP`` (captioner with a small word-piece vocabulary), ``CLIP`` (using our CLIP tokenizer's
    vocabulary) and ``deepbooru`` (a ViT multi-label tagger over a few tags)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    models_dir = Path(models_dir)
    torch.manual_seed(seed)
    blip_dir = models_dir / "BLIP"
    blip_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[DEC]", "[SEP]", "[UNK]", "[CLS]", "[MASK]", *_CAPTION_WORDS]
    (blip_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    blip = BlipConfig(vision_config={**small, "image_size": 32, "patch_size": 16},
                      text_config={**small, "vocab_size": len(vocab), "bos_token_id": 1, "sep_token_id": 2,
                                   "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 64},
                      projection_dim=32)
    BlipForConditionalGeneration(blip).save_pretrained(str(blip_dir))
    tokenizer = BertTokenizer(str(blip_dir / "vocab.txt"), bos_token="[DEC]", unk_token="[UNK]", sep_token="[SEP]",
                              pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(str(blip_dir))
    clip_dir = models_dir / "CLIP"
    clip = CLIPConfig(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407},
                      vision_config={**small, "image_size": 32, "patch_size": 16}, projection_dim=32)
    CLIPModel(clip).save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    tagger_dir = models_dir / "deepbooru"
    tags = dict(enumerate(_TAGGER_TAGS))
    vit = ViTConfig(**small, image_size=32, patch_size=16, num_labels=len(tags), id2label=tags,
                    label2id={v: k for k, v in tags.items()}, problem_type="multi_label_classification")
    ViTForImageClassification(vit).save_pretrained(str(tagger_dir))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tagger_dir))
    return models_dir
