"""The ``sdstudio`` command line: txt2img, img2img, deforum, pnginfo, models, styles, merge, serve.

Errors print one line naming the problem and exit with status 2 (bad input) or 1 (internal error);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from .core.imageops import MASKED_CONTENT, RESIZE_MODES
from .core.names import UnknownNameError, sampler_labels, schedule_labels
from .core.params import Img2ImgRequest, RequestError, Txt2ImgRequest, from_infotext, with_png_info
from .core.paths import Paths
from .flags import add_common_flags, device_options_from, paths_from, studio_from

USER_ERRORS: tuple[type[BaseException], ...] = (RequestError, UnknownNameError, FileNotFoundError)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768, got {text!r}") from None


# Flags of ``txt2img`` -> request fields. Defaults are None so that, with --from-png / --infotext,
# only the flags actually given override the pasted parameters.
_TXT2IMG_FLAGS = {
    "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name", "scheduler": "scheduler",
    "cfg": "cfg_scale", "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "batch_count": "n_iter", "batch_size": "batch_size", "clip_skip": "clip_skip", "model": "model", "vae": "vae",
    "rng": "rng", "eta": "eta", "ensd": "eta_noise_seed_delta", "styles": "styles", "emphasis": "emphasis",
    "novelai_braces": "novelai_braces", "tiled_vae": "tiled_vae",
    "refiner": "refiner_checkpoint", "refiner_switch_at": "refiner_switch_at",
    "distilled_cfg": "distilled_cfg_scale",
    "hires": "enable_hr", "hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler", "hr_steps": "hr_second_pass_steps",
    "denoising_strength": "denoising_strength", "hr_sampler": "hr_sampler_name", "hr_scheduler": "hr_scheduler",
    "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt", "hr_cfg": "hr_cfg",
}


def add_generation_flags(t: argparse.ArgumentParser) -> None:
    """The flags txt2img and img2img share (request fields, re-creating, output)."""
    t.add_argument("-n", "--negative-prompt", dest="negative_prompt")
    t.add_argument("--steps", type=int)
    t.add_argument("--sampler", help=f"one of: {', '.join(sampler_labels())}")
    t.add_argument("--scheduler", "--schedule-type", dest="scheduler", help=f"one of: {', '.join(schedule_labels())}")
    t.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float)
    t.add_argument("--seed", type=int, help="-1 for random")
    t.add_argument("--subseed", "--variation-seed", dest="subseed", type=int)
    t.add_argument("--subseed-strength", "--variation-strength", dest="subseed_strength", type=float)
    t.add_argument("--seed-resize-from", type=_size, metavar="WxH")
    t.add_argument("--size", type=_size, metavar="WxH")
    t.add_argument("--width", "-W", type=int)
    t.add_argument("--height", "-H", type=int)
    t.add_argument("--batch-count", "--n-iter", dest="batch_count", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--clip-skip", type=int)
    t.add_argument("--model", help="checkpoint name (file stem), title or hash")
    t.add_argument("--vae", help="Automatic, None or a VAE name from models/VAE")
    t.add_argument("--distilled-cfg", dest="distilled_cfg", type=float,
                   help="Flux.1 dev's distilled guidance (Forge's Distilled CFG Scale, default 3.5)")
    t.add_argument("--refiner", help="a checkpoint that takes over part-way (A1111's Refiner; SDXL's refiner)")
    t.add_argument("--refiner-switch-at", dest="refiner_switch_at", type=float,
                   help="fraction of sampling done when the refiner takes over (default 0.8)")
    t.add_argument("--rng", choices=["GPU", "CPU", "NV"])
    t.add_argument("--eta", type=float)
    t.add_argument("--ensd", type=int, help="eta noise seed delta")
    t.add_argument("--tiling", action="store_true", default=None)
    t.add_argument("--restore-faces", action="store_true", default=None,
                   help="restore faces (CodeFormer in models/Codeformer or GFPGAN in models/GFPGAN)")
    t.add_argument("--face-restorer", choices=["CodeFormer", "GFPGAN"], help="which (default: CodeFormer if there)")
    t.add_argument("--codeformer-weight", type=float, help="CodeFormer weight 0..1 (default 0.5; 0 = most effect)")
    t.add_argument("--emphasis", choices=["Original", "No norm", "None"])
    t.add_argument("--novelai-braces", action="store_true", default=None, help="{x} weighs x by 1.05")
    t.add_argument("--style", dest="styles", action="append", help="apply a style from styles.csv (repeatable)")
    t.add_argument("--tiled-vae", action="store_true", default=None, help="decode in tiles (big images, little memory)")
    t.add_argument("--denoising-strength", type=float, help="img2img: how far from the init (default 0.75); "
                   "txt2img: the Hires. fix pass's (default 0.7)")
    t.add_argument("--from-png", metavar="IMAGE", help="re-create an image from its embedded parameters")
    t.add_argument("--infotext", help="re-create from pasted A1111 parameters text")
    t.add_argument("--outdir", help="write images here instead of outputs/<kind>-images/DATE")
    t.add_argument("--format", choices=["png", "jpg", "webp"], default="png")
    t.add_argument("--no-grid", action="store_true", help="do not save a grid for batches")
    sc = t.add_argument_group("scripts")
    sc.add_argument("--script", help="xyz, prompt-matrix, prompt-sr, prompts-from-file; img2img also: "
                    "\"SD upscale\", Loopback, \"Poor man's outpainting\", \"Outpainting mk2\"")
    sc.add_argument("--script-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a script argument (repeatable), e.g. upscaler=4x-UltraSharp scale=2 overlap=64")
    sc.add_argument("--alwayson", nargs="+", action="append", default=[], metavar="NAME",
                    help="switch an always-on script on, with its arguments (repeatable), e.g. "
                         "--alwayson dynthres mimic_scale=7 threshold_percentile=99")
    sc.add_argument("--controlnet", nargs="+", action="append", default=[], metavar="FIELD=VALUE",
                    help="a ControlNet unit (repeatable, one per unit) with the extension's fields, e.g. "
                         "--controlnet image=edges.png module=canny model=control_v11p_sd15_canny weight=0.8; "
                         "image and mask are files; without an image img2img uses its init image")
    for axis in ("x", "y", "z"):
        sc.add_argument(f"--{axis}-type", help=f"X/Y/Z plot: the {axis.upper()} axis (e.g. \"CFG Scale\", Steps, Sampler)")
        sc.add_argument(f"--{axis}-values", help=f"X/Y/Z plot: the {axis.upper()} values (e.g. \"3,7\", \"1-5 (+2)\")")
    sc.add_argument("--no-legend", action="store_true", help="X/Y/Z plot: no axis labels")
    sc.add_argument("--include-sub-images", action="store_true", help="X/Y/Z plot: also save every cell's image")
    sc.add_argument("--include-sub-grids", action="store_true", help="X/Y/Z plot: also save each Z value's grid")
    sc.add_argument("--keep-random-seeds", action="store_true", help="X/Y/Z plot: keep -1 seeds random per cell")
    sc.add_argument("--margin", type=int, help="X/Y/Z plot / prompt matrix: pixels between cells")
    sc.add_argument("--file", help="prompts-from-file: the file (one prompt or --option line per line)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdstudio", description="Stable Diffusion studio (A1111-compatible)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("txt2img", help="generate images from a prompt")
    t.add_argument("prompt", nargs="?", default=None)
    add_generation_flags(t)
    h = t.add_argument_group("Hires. fix")
    h.add_argument("--hires", "--enable-hr", dest="hires", action="store_true", default=None,
                   help="upscale the first pass and refine it with an img2img pass (--denoising-strength: its strength)")
    h.add_argument("--hr-scale", type=float, help="upscale by (default 2)")
    h.add_argument("--hr-resize", type=_size, metavar="WxH", help="resize to, instead of --hr-scale (0 = keep ratio)")
    h.add_argument("--hr-upscaler", help="Latent, Latent (nearest-exact)..., Lanczos, Nearest or a models/ESRGAN name")
    h.add_argument("--hr-steps", type=int, help="hires steps (0 = same as --steps)")
    h.add_argument("--hr-sampler", help="hires sampler (default: the same)")
    h.add_argument("--hr-scheduler", help="hires schedule type (default: the same)")
    h.add_argument("--hr-prompt", help="hires prompt (default: the same)")
    h.add_argument("--hr-negative-prompt", help="hires negative prompt (default: the same)")
    h.add_argument("--hr-cfg", type=float, help="hires CFG scale (default: the same)")
    t.add_argument("--server", metavar="URL", help="queue the job on a running sdstudio server (e.g. "
                   "http://127.0.0.1:7860) instead of running it here; the server saves the images")
    t.add_argument("--server-auth", metavar="USER:PASS", help="--api-auth credentials of that server")
    add_common_flags(t)

    i = sub.add_parser("img2img", help="generate from an image: img2img, inpaint, inpaint sketch, scripts, batch")
    i.add_argument("init", nargs="?", default=None, help="the init image (or --input-dir for a batch)")
    i.add_argument("prompt", nargs="?", default=None)
    i.add_argument("-p", "--prompt", dest="prompt_flag", help="the prompt (handy with --input-dir)")
    add_generation_flags(i)
    g = i.add_argument_group("img2img and inpaint")
    g.add_argument("--resize-mode", choices=list(RESIZE_MODES), help="how the init image is brought to the size")
    g.add_argument("--mask", help="inpaint mask (white = repaint)")
    g.add_argument("--sketch", help="inpaint sketch: this image is the init with colour strokes drawn on it; "
                   "the strokes become the content and the mask")
    g.add_argument("--mask-alpha", type=float, default=0.0, help="inpaint sketch mask transparency, 0-100")
    g.add_argument("--mask-blur", type=int)
    g.add_argument("--invert-mask", action="store_true", default=None, help="inpaint not masked")
    g.add_argument("--masked-content", choices=list(MASKED_CONTENT))
    g.add_argument("--only-masked", action="store_true", default=None, help="inpaint area: only masked")
    g.add_argument("--padding", type=int, help="only masked padding, pixels")
    g.add_argument("--soft-inpainting", action="store_true", default=None,
                   help="soft inpainting (A1111's defaults; use a large --mask-blur)")
    g.add_argument("--fix-steps", action="store_true", default=None,
                   help="do exactly the amount of steps the slider specifies")
    b = i.add_argument_group("batch (A1111's Batch tab)")
    b.add_argument("--input-dir", help="run over every image in this folder")
    b.add_argument("--output-dir", help="where the batch's results go (default: outputs/img2img-images/DATE)")
    b.add_argument("--mask-dir", help="masks with the same file names as the inputs")
    b.add_argument("--use-png-info", action="store_true",
                   help="take prompt, negative prompt, seed, sampler, CFG and steps from each input's PNG info")
    add_common_flags(i)

    d = sub.add_parser("deforum", help="make a Deforum animation from the extension's saved settings file")
    d.add_argument("settings", help="the settings file (the extension's .txt / JSON; missing keys take its defaults)")
    d.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting (repeatable); VALUE is JSON when it reads as JSON, e.g. --set max_frames=24 "
                        "--set 'zoom=0:(1.02)' --set 'prompts={\"0\": \"a forest\"}'")
    d.add_argument("--model", help="checkpoint name (file stem), title or hash (default: the first one)")
    d.add_argument("--outdir", help="write the run here instead of outputs/img2img-images/<batch name>")
    d.add_argument("--resume", metavar="TIMESTRING", help="continue the interrupted run of that timestring")
    d.add_argument("--ffmpeg-crf", type=int, default=17, help="the mp4's CRF (default 17, as the extension)")
    d.add_argument("--ffmpeg-preset", default="slow", help="the mp4's x264 preset (default slow, as the extension)")
    d.add_argument("--server", metavar="URL", help="queue the run on a running sdstudio server (its /deforum_api) "
                   "instead of running it here; the server writes the frames")
    d.add_argument("--server-auth", metavar="USER:PASS", help="--api-auth credentials of that server")
    add_common_flags(d)

    q = sub.add_parser("interrogate", help="describe an image as a prompt (CLIP: BLIP caption + CLIP terms; "
                       "deepdanbooru: tags)")
    q.add_argument("image")
    q.add_argument("--model", choices=["clip", "deepdanbooru"], default="clip")
    add_common_flags(q)

    e = sub.add_parser("extras", help="upscale images (A1111's Extras tab): one image or a folder")
    e.add_argument("image", nargs="?", help="the image (or --input-dir)")
    e.add_argument("--input-dir", help="every image in this folder (A1111's 'Batch from directory')")
    e.add_argument("--output-dir", help="where results go (default: outputs/extras-images/DATE)")
    e.add_argument("--scale", type=float, default=2.0, help="scale by (default 2)")
    e.add_argument("--resize", type=_size, metavar="WxH", help="scale to, instead of --scale")
    e.add_argument("--no-crop", action="store_true", help="with --resize: stretch instead of crop to fit")
    e.add_argument("--upscaler", default="Lanczos", help="None, Lanczos, Nearest or a models/ESRGAN name")
    e.add_argument("--upscaler-2", default="None")
    e.add_argument("--upscaler-2-visibility", type=float, default=0.0)
    e.add_argument("--gfpgan-visibility", type=float, default=0.0, help="restore faces with GFPGAN, 0..1")
    e.add_argument("--codeformer-visibility", type=float, default=0.0, help="restore faces with CodeFormer, 0..1")
    e.add_argument("--codeformer-weight", type=float, default=0.0, help="CodeFormer weight: 0 = most effect")
    add_common_flags(e)

    p = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the parsed fields as JSON")
    p.add_argument("--debug", action="store_true")

    mg = sub.add_parser("merge", help="merge checkpoints (A1111's Checkpoint Merger) into the checkpoint folder")
    mg.add_argument("models", nargs="+", metavar="MODEL", help="A, B and C (names, titles or hashes of checkpoints)")
    mg.add_argument("--method", default="Weighted sum", choices=["Weighted sum", "Add difference", "No interpolation"])
    mg.add_argument("--multiplier", "-M", type=float, default=0.3, help="M: (1-M)A + MB, or A + M(B-C)")
    mg.add_argument("--fp16", action="store_true", help="save as float16")
    mg.add_argument("--bake-vae", metavar="NAME", help="a VAE from models/VAE to bake in")
    mg.add_argument("--discard", metavar="REGEX", help="drop the weights whose names match")
    mg.add_argument("--block-weights", metavar="W1,...", help="supermerger's block weights: 26 values (BASE, "
                    "IN00-IN11, M00, OUT00-OUT11) for SD 1.x/2.x, 20 (BASE, IN00-IN08, M00, OUT00-OUT08) for SDXL")
    mg.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                    help="a LoRA from models/Lora to merge into the result (repeatable)")
    mg.add_argument("--format", choices=["safetensors", "ckpt"], default="safetensors")
    mg.add_argument("--config-source", choices=["A, B or C", "B", "C", "Don't"], default="A, B or C",
                    help="copy the .yaml config from")
    mg.add_argument("--no-metadata", action="store_true", help="save no metadata (A1111's Save metadata off)")
    mg.add_argument("--name", default="", help="the result's name (default: A1111's, e.g. '0.7(a) + 0.3(b)')")
    add_common_flags(mg)

    tr = sub.add_parser("train", help="train a network on a folder of images (kohya's dataset layout)")
    tr.add_argument("kind", choices=["lora", "embedding", "hypernetwork", "dreambooth"],
                    help="what to train: a LoRA into models/Lora, a textual-inversion embedding into embeddings/, a "
                    "hypernetwork into models/hypernetworks (both as A1111's Train tab; made first, as its Create "
                    "tabs make them, when there is none of that name), or a Dreambooth checkpoint into the "
                    "checkpoint folder")
    tr.add_argument("dataset", help="a folder of N_name repeat folders (or images) with .caption/.txt captions "
                    "(embedding, hypernetwork: A1111's folder of images, [filewords] from a .txt or the file name)")
    tr.add_argument("--model", required=True, help="the base checkpoint (name, title or hash)")
    tr.add_argument("--name", default="", help="the output's name (default: the dataset folder's)")
    tr.add_argument("--steps", type=int, help="training steps (default: kohya's 1600, or --epochs; embedding and "
                    "hypernetwork: A1111's Max steps, 100000, the step to train up to)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--dim", type=int, default=4, help="network dim (rank)")
    tr.add_argument("--alpha", type=float, default=1.0, help="network alpha (scale = alpha / dim)")
    tr.add_argument("--locon", action="store_true", help="LoCon: conv layers too (conv dim = --dim)")
    tr.add_argument("--lr", type=float, help="learning rate (default: LoRA 1e-4, Dreambooth 2e-6)")
    tr.add_argument("--unet-only", action="store_true", help="train the UNet only, not the text encoder")
    tr.add_argument("--scheduler", default="constant", help="constant, cosine, linear, cosine_with_restarts...")
    tr.add_argument("--batch-size", type=int, default=1)
    tr.add_argument("--resolution", type=int, default=512)
    tr.add_argument("--caption-extension", default=".caption")
    tr.add_argument("--flip", action="store_true", help="flip augmentation")
    tr.add_argument("--shuffle-caption", action="store_true")
    tr.add_argument("--keep-tokens", type=int, default=0)
    tr.add_argument("--min-snr-gamma", type=float)
    tr.add_argument("--noise-offset", type=float)
    tr.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--cache-latents", action="store_true",
                    help="encode every picture (and its mirror with --flip) through the VAE once, before training")
    tr.add_argument("--save-every", type=int, help="also save every N steps")
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run of the same name")
    tr.add_argument("--caption-missing", choices=["blip", "deepbooru", "both"],
                    help="lora, dreambooth: first caption every picture that has no caption file (BLIP's caption, "
                         "DeepBooru's tags, or both), written beside it with --caption-extension; needs the "
                         "interrogators' weights in models/BLIP, models/deepbooru")
    db = tr.add_argument_group("dreambooth")
    db.add_argument("--class-dir", help="prior preservation: the class images (N_class folders or images)")
    db.add_argument("--num-class-images", type=int, default=0,
                    help="generate class images from --class-prompt until the folder holds this many")
    db.add_argument("--class-prompt", help="the prompt of the generated class images (e.g. 'a photo of a dog')")
    db.add_argument("--class-negative", default="", help="their negative prompt")
    db.add_argument("--class-steps", type=int, default=20, help="their sampling steps")
    db.add_argument("--prior-loss-weight", type=float, default=1.0, help="the class loss's weight")
    db.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text encoder(s) too")
    db.add_argument("--fp16", action="store_true", help="save the checkpoint as float16")
    tr.add_argument("--sample-every", type=int, help="lora, dreambooth: sample pictures every N steps "
                    "(models/Lora/sample/NAME, models/dreambooth/NAME/samples)")
    tr.add_argument("--sample-prompt", action="append", default=[], help="a sample prompt (repeatable)")
    ti = tr.add_argument_group("embedding and hypernetwork (A1111's Train tab; --batch-size, --steps, --seed, "
                               "--save-every and --resume too)")
    ti.add_argument("--template", help="the prompt template file (A1111's names: style_filewords.txt, "
                    "subject_filewords.txt, hypernetwork.txt...; also textual_inversion_templates/ in the data dir); "
                    "default: style_filewords.txt, hypernetwork.txt")
    ti.add_argument("--learn-rate", help="A1111's learning rate: 0.005, or a schedule like '0.005:100, 1e-3:1000, "
                    "1e-5' (default: embedding 0.005, hypernetwork 0.00001)")
    ti.add_argument("--width", type=int, help="training width (default: --resolution)")
    ti.add_argument("--height", type=int, help="training height (default: --resolution)")
    ti.add_argument("--gradient-step", type=int, default=1, help="gradient accumulation steps")
    ti.add_argument("--vectors", type=int, default=1, help="new embedding: vectors per token (1-75)")
    ti.add_argument("--init-text", default="*", help="new embedding: the text its vectors start from")
    ti.add_argument("--sizes", default="768,320,640,1280",
                    help="new hypernetwork: the attention widths it acts on (A1111's Create tab: 768,320,640,1280)")
    ti.add_argument("--layer-structure", default="1, 2, 1", help="new hypernetwork: its layer structure")
    ti.add_argument("--activation", default="linear", help="new hypernetwork: its activation function")
    ti.add_argument("--overwrite", action="store_true",
                    help="make the embedding / hypernetwork anew when one of that name exists (its training is lost)")
    add_common_flags(tr)

    m = sub.add_parser("models", help="list checkpoints and VAEs with their hashes")
    add_common_flags(m)

    st = sub.add_parser("styles", help="list, save or delete prompt styles (styles.csv)")
    st.add_argument("action", choices=["list", "save", "delete"], nargs="?", default="list")
    st.add_argument("name", nargs="?")
    st.add_argument("--prompt", default="", help="style prompt; {prompt} marks where the user's prompt goes")
    st.add_argument("--negative", default="", help="style negative prompt")
    add_common_flags(st)

    s = sub.add_parser("serve", help="start the web UI and/or the A1111-compatible API")
    from .server import add_server_flags

    add_server_flags(s)
    add_common_flags(s)
    return parser


def request_from_args(args: argparse.Namespace, base: Txt2ImgRequest | None = None) -> Txt2ImgRequest:
    """The request the flags describe (pasted parameters first, flags over them); checked, except for an
    img2img base, which the caller completes with its init image first."""
    from .core.outputs import read_infotext

    base = base or Txt2ImgRequest()
    if args.from_png:
        text = read_infotext(Path(args.from_png))
        if not text:
            raise RequestError(f"{args.from_png}: the image holds no generation parameters")
        req = from_infotext(text, base)
    elif args.infotext:
        req = from_infotext(args.infotext, base)
    else:
        req = base
    changes = {field: getattr(args, flag) for flag, field in _TXT2IMG_FLAGS.items()
               if getattr(args, flag, None) is not None}  # img2img has no Hires. fix flags
    if args.prompt is not None:
        changes["prompt"] = args.prompt
    if args.size:
        changes["width"], changes["height"] = args.size
    if args.width is not None:
        changes["width"] = args.width
    if args.height is not None:
        changes["height"] = args.height
    if args.seed_resize_from:
        changes["seed_resize_from_w"], changes["seed_resize_from_h"] = args.seed_resize_from
    if args.tiling:
        changes["tiling"] = True
    if args.restore_faces:
        changes["restore_faces"] = True
    if args.face_restorer:
        changes["face_restoration_model"] = args.face_restorer
    if args.codeformer_weight is not None:
        changes["code_former_weight"] = args.codeformer_weight
    if getattr(args, "hr_resize", None):
        changes["hr_resize_x"], changes["hr_resize_y"] = args.hr_resize
    if args.script:
        changes["script_name"], changes["script_args"] = script_from_args(args)
    if args.alwayson:  # names are matched (aliases too) by the studio, which knows the plug-ins' scripts
        changes["alwayson_scripts"] = {**req.alwayson_scripts,
                                       **{entry[0]: _script_args(entry[1:]) for entry in args.alwayson}}
    if getattr(args, "controlnet", None):
        changes.setdefault("alwayson_scripts", dict(req.alwayson_scripts))["ControlNet"] = {
            "units": [_controlnet_unit(entry) for entry in args.controlnet]}
    req = req.replace(**changes)
    return req if isinstance(req, Img2ImgRequest) else req.validate(check_scripts=False)  # scripts: by the studio


def _controlnet_unit(pairs: list[str]) -> dict:
    """``--controlnet image=FILE module=canny ...`` -> a unit dict (switched on; files read as base64)."""
    import base64

    unit: dict = {"enabled": True}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RequestError(f"--controlnet {pair!r}: expected FIELD=VALUE (e.g. module=canny)")
        key = key.strip()
        if key in ("image", "mask", "input_image", "mask_image"):
            path = Path(value).expanduser()
            if not path.is_file():
                raise RequestError(f"--controlnet {key}={value}: no such file")
            unit[key] = base64.b64encode(path.read_bytes()).decode()
        else:
            unit[key] = value
    return unit


def cmd_txt2img(args: argparse.Namespace) -> int:
    from .engine.generate import Engine

    req = request_from_args(args)
    if args.server:
        return submit_to_server(args, req)
    paths = paths_from(args)
    return generate_and_save(Engine(paths, device_options_from(args)), req, args, paths, "txt2img")


def generate_and_save(engine, req: Txt2ImgRequest, args: argparse.Namespace, paths: Paths, kind: str,
                      outdir: Path | None = None) -> int:
    """Run ``req`` with a progress bar, save each image as it is finished, print where they went."""
    from tqdm import tqdm

    from .core import outputs

    outdir = outdir or (Path(args.outdir) if args.outdir else outputs.dated_dir(paths.outputs_dir, f"{kind}-images"))
    grid_dir = Path(args.outdir) if args.outdir else outputs.dated_dir(paths.outputs_dir, f"{kind}-grids")
    bars: list = []  # created at the first step, so errors before sampling print alone
    written: list[Path] = []

    def on_progress(p) -> None:
        if not bars:
            bars.append(tqdm(total=p.job_count * p.steps, desc="sampling", unit="step", file=sys.stderr, leave=False))
        bars[0].n = p.job_no * p.steps + p.step
        bars[0].refresh()

    def on_image(image) -> None:  # saved as soon as it exists: an interrupt loses nothing finished
        if image.extra:  # ControlNet's detected map: beside the images, in detected_maps/
            written.append(outputs.save_image(image.image, outdir / "detected_maps", infotext=None,
                                              suffix="detected-map", fmt="png"))
            return
        if image.grid:  # a script's own grid
            written.append(outputs.save_image(image.image, grid_dir, infotext=image.infotext, basename="grid",
                                              fmt=args.format))
            return
        written.append(outputs.save_image(image.image, outdir, infotext=image.infotext, suffix=str(image.seed),
                                          fmt=args.format))

    studio, _ = studio_from(args, engine)
    try:
        result = studio.generate(req, on_progress=on_progress, on_image=on_image)
    finally:
        for bar in bars:
            bar.close()
    for path in written:
        print(path)
    own = [g for g in result.images if not g.extra]
    if len(own) > 1 and not args.no_grid and not req.script_name:
        grid = outputs.image_grid([g.image for g in own], req.batch_size)
        print(outputs.save_image(grid, grid_dir, infotext=own[0].infotext, basename="grid", fmt=args.format))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.interrupted:
        print("interrupted: kept the images finished so far", file=sys.stderr)
    return 0


def script_from_args(args: argparse.Namespace) -> tuple[str, dict]:
    """``--script`` (a script's name or its short alias, e.g. xyz) and its flags -> (script name, arguments)."""
    from .core.scripts import builtin

    script = builtin().find("xyz" if args.script.lower() == "prompt-sr" else args.script)
    name = script.name if script is not None else args.script  # an unknown one is refused by its checks
    values = _script_args(args.script_arg)
    if name == "X/Y/Z plot":
        if args.script.lower() == "prompt-sr":
            values.setdefault("x_type", "Prompt S/R")
        for axis in ("x", "y", "z"):
            if getattr(args, f"{axis}_type"):
                values[f"{axis}_type"] = getattr(args, f"{axis}_type")
            if getattr(args, f"{axis}_values") is not None:
                values[f"{axis}_values"] = getattr(args, f"{axis}_values")
        for flag, key, value in (("no_legend", "draw_legend", False), ("include_sub_images", "include_lone_images", True),
                                 ("include_sub_grids", "include_sub_grids", True),
                                 ("keep_random_seeds", "no_fixed_seeds", True)):
            if getattr(args, flag):
                values[key] = value
    if args.margin is not None and name in ("X/Y/Z plot", "Prompt matrix"):
        values["margin_size"] = args.margin
    if args.file:
        try:
            values["prompt_txt"] = Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise RequestError(f"--file: {exc}") from None
    return name, values


_IMG2IMG_FLAGS = {"mask_blur": "mask_blur", "padding": "inpaint_full_res_padding", "fix_steps": "fix_steps",
                  "soft_inpainting": "soft_inpainting"}


def _script_args(pairs: list[str]) -> dict:
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RequestError(f"--script-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.split(",") if key.strip() == "direction" else value
    return out


def img2img_request(args: argparse.Namespace, init, mask=None) -> Img2ImgRequest:
    """The img2img request the flags describe for one init image (a path or a PIL image)."""
    req = request_from_args(args, Img2ImgRequest())
    changes = {field: getattr(args, flag) for flag, field in _IMG2IMG_FLAGS.items() if getattr(args, flag) is not None}
    if args.resize_mode:
        changes["resize_mode"] = RESIZE_MODES.index(args.resize_mode)
    if args.masked_content:
        changes["inpainting_fill"] = MASKED_CONTENT.index(args.masked_content)
    if args.invert_mask:
        changes["inpainting_mask_invert"] = 1
    if args.only_masked:
        changes["inpaint_full_res"] = True
    return req.replace(init_images=[init], mask=mask, **changes).validate()


def cmd_img2img(args: argparse.Namespace) -> int:
    from .core import imageops, outputs
    from .engine.generate import Engine
    from .engine.img2img import open_image

    if bool(args.init) == bool(args.input_dir):
        raise RequestError("give an init image, or --input-dir for a batch (not both; -p gives the prompt)")
    if args.prompt_flag is not None:
        args.prompt = args.prompt_flag
    paths = paths_from(args)
    engine = Engine(paths, device_options_from(args))
    if args.init:
        mask = args.mask
        init = args.init
        if args.sketch:  # inpaint sketch: the strokes are the content and, where they differ, the mask
            original = open_image(args.init, "init image").convert("RGB")
            init, mask = imageops.inpaint_sketch(original, open_image(args.sketch, "sketch").convert("RGB"),
                                                 args.mask_blur if args.mask_blur is not None else 4, args.mask_alpha)
        return generate_and_save(engine, img2img_request(args, init, mask), args, paths, "img2img")
    inputs = outputs.images_in(Path(args.input_dir))
    outdir = Path(args.output_dir) if args.output_dir else outputs.dated_dir(paths.outputs_dir, "img2img-images")
    for path in inputs:
        req = img2img_request(args, str(path), outputs.mask_for(path, args.mask_dir))
        if args.use_png_info:  # the input's own parameters, for what it describes
            req = with_png_info(req, outputs.read_infotext(path))
        generate_and_save(engine, req.validate(), args, paths, "img2img", outdir=outdir)
    return 0


def cmd_extras(args: argparse.Namespace) -> int:
    from .core import outputs
    from .engine import extras
    from .engine.devices import plan_devices
    from .engine.faces import FaceRestorers
    from .engine.img2img import open_image
    from .engine.upscalers import Upscalers

    if bool(args.image) == bool(args.input_dir):
        raise RequestError("give an image, or --input-dir for a folder (not both)")
    paths = paths_from(args)
    plan = plan_devices(device_options_from(args))
    upscalers = Upscalers(paths.upscaler_dirs, plan.device, plan.dtype)
    faces = FaceRestorers(paths.face_restorer_dirs, plan.device, plan.dtype)
    req = extras.ExtrasRequest(scale=args.scale, resize_to=args.resize, crop=not args.no_crop,
                               upscaler_1=args.upscaler, upscaler_2=args.upscaler_2,
                               upscaler_2_visibility=args.upscaler_2_visibility,
                               gfpgan_visibility=args.gfpgan_visibility,
                               codeformer_visibility=args.codeformer_visibility, codeformer_weight=args.codeformer_weight)
    extras.check(req, upscalers, faces)
    inputs = [Path(args.image)] if args.image else outputs.images_in(Path(args.input_dir))
    outdir = Path(args.output_dir) if args.output_dir else outputs.dated_dir(paths.outputs_dir, "extras-images")
    for path in inputs:
        result = extras.run(open_image(str(path), str(path)), req, upscalers, faces)
        print(outputs.save_image(result, outdir, infotext=outputs.read_infotext(path), suffix=path.stem))
    return 0


def cmd_interrogate(args: argparse.Namespace) -> int:
    from .engine.devices import plan_devices
    from .engine.img2img import open_image
    from .engine.interrogate import Interrogators

    plan = plan_devices(device_options_from(args))
    image = open_image(args.image, "image")
    print(Interrogators(paths_from(args).models_dir, plan.device, plan.dtype).interrogate(image, args.model))
    return 0


def job_body(req: Txt2ImgRequest) -> dict:
    """What ``--server`` posts to ``/sdstudio/v1/jobs``: the request as it serializes itself (every field,
    scripts and always-on scripts included, so none can be dropped on the way) and where the images go."""
    return {"request": {"save_images": True}, "sdstudio_request": req.to_dict()}


def submit_to_server(args: argparse.Namespace, req: Txt2ImgRequest) -> int:
    """``txt2img --server URL``: the job goes into that server's queue; progress is followed over its
    event stream and the paths the server wrote are printed."""
    import base64
    import json
    import urllib.error
    import urllib.request

    base = args.server.rstrip("/")
    headers = {"Content-Type": "application/json", "X-Sdstudio-Client": f"cli:{os.getpid()}"}
    if args.server_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(args.server_auth.encode()).decode()

    def call(path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=3600)

    try:
        job = json.loads(call("/sdstudio/v1/jobs", job_body(req)).read())
        print(f"queued job {job['id']} ({job['queue_position']} ahead)", file=sys.stderr)
        with call(f"/sdstudio/v1/jobs/{job['id']}/events") as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    state = json.loads(line[5:])
                    if state.get("state"):
                        s = state["state"]
                        print(f"\rstep {s['sampling_step']}/{s['sampling_steps']} of batch {s['job_no'] + 1}"
                              f"/{s['job_count']}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        job = json.loads(call(f"/sdstudio/v1/jobs/{job['id']}").read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RequestError(f"the server refused the job ({exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise RequestError(f"cannot reach {base}: {exc.reason}") from None
    for image in job["result"].get("images", []):
        print(image["path"])
    if job["result"].get("grid"):
        print(job["result"]["grid"])
    if job["status"] != "done":
        print(f"error: the job {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1
    return 0


def deforum_settings_from_args(args: argparse.Namespace):
    """The settings file with the ``--set`` changes, each checked as the file's keys are."""
    import json

    from .core import deforum as spec

    path = Path(args.settings).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such settings file")
    settings = spec.load_settings(path)
    changes = {}
    for pair in args.sets:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RequestError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            changes[key.strip()] = json.loads(value)
        except ValueError:
            changes[key.strip()] = value
    if args.resume:
        changes.update({"resume_from_timestring": True, "resume_timestring": args.resume})
    if not changes:
        return settings
    changed = settings.updated(changes)
    changed.notes[:0] = [n for n in settings.notes if n not in changed.notes]  # the file's own notes first
    return changed


@contextlib.contextmanager
def stop_on_ctrl_c(unit: str):
    """While inside: the first Ctrl+C asks to stop after the ``unit`` under way (``stop["asked"]``, for a
    ``should_stop``), the second quits at once."""
    stop = {"asked": False}

    def on_sigint(*_) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print(f"\nstopping after this {unit} (Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_deforum(args: argparse.Namespace) -> int:

    from .core import deforum as spec
    from .engine.generate import Engine
    from .scripts.deforum import DeforumRun

    settings = deforum_settings_from_args(args)
    if args.ffmpeg_preset not in spec.FFMPEG_PRESETS:
        raise RequestError(f"--ffmpeg-preset: {args.ffmpeg_preset!r} is not one of {', '.join(spec.FFMPEG_PRESETS)}")
    if args.server:
        return deforum_to_server(args, settings)
    for note in settings.notes:
        print(f"note: {note}", file=sys.stderr)
    paths = paths_from(args)
    engine = Engine(paths, device_options_from(args))
    studio, _ = studio_from(args, engine)
    model = engine.registry.checkpoint(args.model).title if args.model else None

    def on_frame(p) -> None:
        print(f"\rframe {p.frame}/{p.frames}", end="", file=sys.stderr, flush=True)

    try:
        with stop_on_ctrl_c("frame") as stop:  # frames and state are kept: --resume carries on
            run = DeforumRun(studio, settings, paths.outputs_dir, outdir=Path(args.outdir) if args.outdir else None,
                             options={"ffmpeg_crf": args.ffmpeg_crf, "ffmpeg_preset": args.ffmpeg_preset},
                             model=model, on_frame=on_frame, should_stop=lambda: stop["asked"])
            result = run.run()
    finally:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.outdir)
    for path in (result.video, result.gif):
        if path is not None:
            print(path)
    print(f"{len(result.frames)} frame(s), settings in {result.settings_file}", file=sys.stderr)
    if result.interrupted:
        print(f"interrupted: kept the frames made so far; continue with --resume {result.timestring}",
              file=sys.stderr)
        return 130
    return 0


def deforum_to_server(args: argparse.Namespace, settings) -> int:
    """``deforum --server URL``: the run goes into that server's queue through the extension's API; its
    progress is polled and the paths the server wrote are printed."""
    import base64
    import json
    import time
    import urllib.error
    import urllib.request

    base = args.server.rstrip("/")
    headers = {"Content-Type": "application/json", "X-Sdstudio-Client": f"cli:{os.getpid()}"}
    if args.server_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(args.server_auth.encode()).decode()

    def call(path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=60) as f:
            return json.loads(f.read())

    overrides = {"deforum_ffmpeg_crf": args.ffmpeg_crf, "deforum_ffmpeg_preset": args.ffmpeg_preset}
    if args.model:
        overrides["sd_model_checkpoint"] = args.model
    try:
        job_id = call("/deforum_api/batches", {"deforum_settings": settings.to_dict(),
                                               "options_overrides": overrides})["job_ids"][0]
        print(f"queued job {job_id}", file=sys.stderr)
        while True:
            status = call(f"/deforum_api/jobs/{job_id}")
            print(f"\r{status['phase'].lower()}: frame {status['frames_done']}/{status['max_frames']}", end="",
                  file=sys.stderr, flush=True)
            if status["status"] != "ACCEPTED":
                break
            time.sleep(1.0)
        print(file=sys.stderr)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RequestError(f"the server refused the run ({exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise RequestError(f"cannot reach {base}: {exc.reason}") from None
    for warning in status.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if status.get("outdir"):
        print(status["outdir"])
    for key in ("video", "gif"):
        if status.get(key):
            print(status[key])
    if status["status"] != "SUCCEEDED":
        print(f"error: the run {status['status'].lower()}: {status.get('message')}", file=sys.stderr)
        return 1
    return 0


def cmd_pnginfo(args: argparse.Namespace) -> int:
    import json

    from .core import infotext
    from .core.outputs import read_infotext

    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = read_infotext(path)
    if not text:
        print(f"{path.name}: no generation parameters in this image", file=sys.stderr)
        return 1
    print(json.dumps(infotext.parse(text), indent=1, ensure_ascii=False) if args.json else text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .models.registry import ModelRegistry
    from .service.jobs import JobError, prepare_merge, run_merge

    if len(args.models) > 3:
        raise RequestError(f"merge takes at most 3 models (A B C), got {len(args.models)}")
    a, b, c = (list(args.models) + [None, None])[:3]
    paths = paths_from(args)
    registry = ModelRegistry(paths)
    try:
        spec = prepare_merge(registry, paths.ckpt_dirs[0], primary_model_name=a, secondary_model_name=b,
                             tertiary_model_name=c, interp_method=args.method, multiplier=args.multiplier,
                             save_as_half=args.fp16, custom_name=args.name, checkpoint_format=args.format,
                             config_source=args.config_source, bake_in_vae=args.bake_vae or "None",
                             discard_weights=args.discard or "", save_metadata=not args.no_metadata,
                             block_weights=args.block_weights, loras=args.lora)
    except JobError as exc:
        raise RequestError(str(exc)) from None
    shown = {"n": -1}

    def progress(done: int, total: int) -> None:
        percent = 100 * done // max(1, total)
        if percent // 10 != shown["n"] and sys.stderr.isatty():
            shown["n"] = percent // 10
            print(f"\rmerging: {percent}%", end="", file=sys.stderr, flush=True)

    result = run_merge(spec, registry, progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{result['message']} ({result['model_title']})")
    return 0


def _dataset_options(args: argparse.Namespace) -> dict:
    """``sdstudio train``'s dataset flags as :meth:`TrainingDataset.from_folder` arguments."""
    return {"resolution": args.resolution, "min_bucket_reso": min(256, args.resolution),
            "max_bucket_reso": max(1024, args.resolution), "caption_extension": args.caption_extension,
            "flip_aug": args.flip, "shuffle_caption": args.shuffle_caption, "keep_tokens": args.keep_tokens,
            "seed": args.seed}


def _train_progress(p) -> None:
    eta = f"  eta {p.eta:.0f} s" if p.eta is not None else ""
    print(f"\rstep {p.step}/{p.total}  loss {p.loss:.4f}{eta}", end="", file=sys.stderr, flush=True)


def _sizes(text: str, widths: set[int]) -> list[int]:
    """``--sizes 768,320`` -> [768, 320], refused when none of them is one of the model's attention ``widths``."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RequestError(f"--sizes: {text!r} is not a list of widths like 768,320,640,1280") from None
    if not set(sizes) & widths:
        raise RequestError(f"--sizes {text}: none is an attention width of this model; its widths are "
                           f"{','.join(map(str, sorted(widths)))}")
    return sizes


def cmd_train(args: argparse.Namespace) -> int:
    """``sdstudio train lora DATASET --model NAME``: a kohya-format LoRA into models/Lora (the job the API
    queues, run here). Ctrl+C stops after the current step and saves the state; ``--resume`` carries on with
    the same weights."""
    if args.kind == "dreambooth":
        return cmd_train_dreambooth(args)
    if args.kind in ("embedding", "hypernetwork"):
        return cmd_train_textual(args)
    from .engine.generate import Engine
    from .training import DatasetError, TrainingError
    from .training.lora import run_job
    from .training.preprocess import check_caption_missing

    engine = Engine(paths_from(args), device_options_from(args))
    config = {"network_dim": args.dim, "network_alpha": args.alpha, "conv_dim": args.dim if args.locon else None,
              "conv_alpha": args.alpha if args.locon else None,
              "learning_rate": args.lr if args.lr is not None else 1e-4, "train_text_encoder": not args.unet_only,
              "lr_scheduler": args.scheduler, "max_train_steps": args.steps, "max_train_epochs": args.epochs,
              "batch_size": args.batch_size, "min_snr_gamma": args.min_snr_gamma, "noise_offset": args.noise_offset,
              "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
              "cache_latents": args.cache_latents, "save_every_n_steps": args.save_every, "seed": args.seed,
              "sample_every_n_steps": args.sample_every}
    try:
        job = {"model": engine.registry.checkpoint(args.model).title,
               "dataset": {"root": str(Path(args.dataset).resolve()), **_dataset_options(args)},
               "output_name": args.name or Path(args.dataset).resolve().name, "resume": args.resume,
               "config": config, "caption_missing": check_caption_missing(args.caption_missing),
               "sample_prompts": args.sample_prompt}
        with stop_on_ctrl_c("step") as stop:  # the state is saved: --resume carries on
            result = run_job(engine, job, on_progress=_train_progress, should_stop=lambda: stop["asked"],
                             on_text=lambda text: print(f"\r{text}", end="", file=sys.stderr, flush=True))
    except (TrainingError, DatasetError) as exc:
        raise RequestError(str(exc)) from None
    return _train_done(result)


def _train_done(result: dict) -> int:
    """What a LoRA / Dreambooth run tells at its end: the pictures captioned and skipped, the file or the step
    it stopped at."""
    print(file=sys.stderr)
    if result.get("captioned"):
        print(f"captioned {len(result['captioned'])} pictures: {', '.join(result['captioned'])}", file=sys.stderr)
    for name, why in result["skipped_images"]:
        print(f"warning: {name} skipped: {why}", file=sys.stderr)
    if result["interrupted"]:
        print(f"stopped at step {result['steps']}/{result['total']}; --resume carries on", file=sys.stderr)
        return 0
    print(f"{result['path']}  ({result['steps']} steps, loss log {result['log_path']})")
    return 0


def cmd_train_dreambooth(args: argparse.Namespace) -> int:
    """``sdstudio train dreambooth DATASET --model NAME [--class-dir DIR --num-class-images N --class-prompt P]``:
    a fine-tuned checkpoint into the checkpoint folder (the same job the API queues, run here). Ctrl+C stops
    after the step (or the class picture) and saves the state; ``--resume`` carries on."""
    from .engine.generate import Engine
    from .training import DatasetError, TrainingError
    from .training.dreambooth import prepare_job, run_job

    paths = paths_from(args)
    engine = Engine(paths, device_options_from(args))  # loads a model only to generate class images / samples
    config = {"learning_rate": args.lr, "lr_scheduler": args.scheduler, "max_train_steps": args.steps,
              "max_train_epochs": args.epochs, "batch_size": args.batch_size, "min_snr_gamma": args.min_snr_gamma,
              "noise_offset": args.noise_offset, "mixed_precision": args.mixed_precision,
              "gradient_checkpointing": args.gradient_checkpointing, "cache_latents": args.cache_latents,
              "save_every_n_steps": args.save_every,
              "seed": args.seed, "train_text_encoder": args.train_text_encoder,
              "prior_loss_weight": args.prior_loss_weight, "save_precision": "fp16" if args.fp16 else "float",
              "sample_every_n_steps": args.sample_every}
    class_options = {"num_class_images": args.num_class_images, "class_prompt": args.class_prompt,
                     "class_negative_prompt": args.class_negative, "class_infer_steps": args.class_steps,
                     "class_seed": max(0, args.seed)}
    try:
        job = prepare_job(engine.registry, dataset=str(Path(args.dataset).resolve()), model=args.model,
                          output_name=args.name or None, resume=args.resume, dataset_options=_dataset_options(args),
                          class_dir=str(Path(args.class_dir).resolve()) if args.class_dir else None,
                          class_options=class_options, config=config, sample_prompts=args.sample_prompt,
                          caption_missing=args.caption_missing)
        with stop_on_ctrl_c("step") as stop:  # the state is saved: --resume carries on
            result = run_job(engine, job, on_progress=_train_progress, should_stop=lambda: stop["asked"],
                             on_text=lambda text: print(f"\r{text}", end="", file=sys.stderr, flush=True))
    except (TrainingError, DatasetError) as exc:
        raise RequestError(str(exc)) from None
    return _train_done(result)


def cmd_train_textual(args: argparse.Namespace) -> int:
    """``sdstudio train embedding|hypernetwork DATASET --model NAME [--name N]``: A1111's Train Embedding / Train
    Hypernetwork on the file ``--name`` (default: the dataset folder's), with its fields checked as its routes
    check them (:func:`sdstudio.api.train.train_kwargs`) and the queue job's function run here. When there is no
    file of that name it is made first, as A1111's Create embedding / Create hypernetwork tabs make one (their
    defaults); an existing one is trained on only with ``--resume`` (from the step it records up to
    ``--steps``) or made anew with ``--overwrite``. Ctrl+C stops after the step with the file saved."""
    from fastapi import HTTPException

    from .api.train import FieldError, train_kwargs
    from .engine.generate import Engine
    from .training import TrainingError
    from .training import embedding as ti
    from .training import hypernetwork as hn

    kind = args.kind
    paths = paths_from(args)
    engine = Engine(paths, device_options_from(args))
    title = engine.registry.checkpoint(args.model).title
    name = ti.clean_name(args.name or Path(args.dataset).resolve().name)
    folder = paths.hypernetwork_dir if kind == "hypernetwork" else paths.embeddings_dir
    existing = folder / f"{name}.pt" if kind == "hypernetwork" else ti.find_embedding(folder, name)
    existing = existing if existing is not None and existing.is_file() else None
    if existing is not None and not (args.resume or args.overwrite):
        raise RequestError(f"{kind} {name!r} already exists ({existing}): --resume trains on from the step it "
                           f"records, --overwrite makes it anew, or choose another --name")
    fields = {"batch_size": args.batch_size, "gradient_step": args.gradient_step,
              "data_root": str(Path(args.dataset).expanduser().resolve()),
              "training_width": args.width or args.resolution, "training_height": args.height or args.resolution,
              "steps": args.steps or 100000, "shuffle_tags": args.shuffle_caption, "seed": args.seed,
              "save_hypernetwork_every" if kind == "hypernetwork" else "save_embedding_every": args.save_every or 0}
    if args.learn_rate or args.lr:
        fields["learn_rate"] = args.learn_rate or str(args.lr)
    if args.template:
        template = Path(args.template).expanduser()
        fields["template_filename"] = str(template.resolve()) if template.is_file() else args.template
    try:
        kwargs = train_kwargs(fields, paths.data_dir, hypernetwork=kind == "hypernetwork")
    except FieldError as exc:
        raise RequestError(str(exc)) from None
    except HTTPException as exc:
        raise RequestError(str(exc.detail)) from None
    try:
        ti.template_lines(kwargs["template_file"], Path(kwargs["templates_dir"]))  # refused before a file is made
        if existing is None or args.overwrite:
            if kind == "hypernetwork":
                sizes = _sizes(args.sizes, hn.attention_widths(engine.load(title)[1].unet))
                made = hn.create_hypernetwork(name, sizes, args.layer_structure, args.activation, "Normal",
                                              overwrite_old=args.overwrite, folder=folder,
                                              seed=args.seed if args.seed >= 0 else None)
                engine.registry.refresh()
            else:
                made = ti.run_job(engine, {"what": "create_embedding", "model": title, "kwargs": {
                    "name": name, "num_vectors_per_token": args.vectors, "init_text": args.init_text,
                    "overwrite_old": args.overwrite}})["path"]
            print(f"created {made}", file=sys.stderr)
        with stop_on_ctrl_c("step") as stop:  # the file is saved at the step reached: --resume carries on
            result = ti.run_job(engine, {"what": kind, "model": title, "kwargs": {f"{kind}_name": name, **kwargs}},
                                on_progress=_train_progress, should_stop=lambda: stop["asked"])
    except TrainingError as exc:
        raise RequestError(str(exc)) from None
    print(file=sys.stderr)
    for name, why in result["skipped_images"]:
        print(f"warning: {name} skipped: {why}", file=sys.stderr)
    if result["note"]:
        print(result["note"], file=sys.stderr)
    if result["interrupted"]:
        print(f"stopped at step {result['steps']}; --resume carries on", file=sys.stderr)
    print(f"{result['path']}  (step {result['steps']})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.registry import ModelRegistry

    registry = ModelRegistry(paths_from(args))
    print("checkpoints:")
    for m in registry.checkpoints:
        print(f"  {m.title}  name={m.name}  old-hash={m.legacy_hash}")
    print("VAEs:")
    for v in registry.vaes:
        print(f"  {v.title}  name={v.name}")
    return 0


def cmd_styles(args: argparse.Namespace) -> int:
    from .core import styles

    path = paths_from(args).styles_file
    if args.action in ("save", "delete") and not args.name:
        raise RequestError(f"styles {args.action} needs a style name")
    if args.action == "save":
        styles.upsert(path, styles.Style(args.name, args.prompt, args.negative))
        print(f"saved style {args.name!r} to {path}")
    elif args.action == "delete":
        styles.delete(path, args.name)
        print(f"deleted style {args.name!r} from {path}")
    else:
        for s in styles.load(path).values():
            print(f"{s.name}\tprompt: {s.prompt}\tnegative: {s.negative_prompt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .core.outputs import NotAnImageError
    from .models.errors import ModelFileError, ModelNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    commands = {"txt2img": cmd_txt2img, "img2img": cmd_img2img, "deforum": cmd_deforum, "extras": cmd_extras, "interrogate": cmd_interrogate,
                "pnginfo": cmd_pnginfo, "models": cmd_models, "styles": cmd_styles, "merge": cmd_merge,
                "train": cmd_train}
    try:
        if args.command == "serve":
            from .server import serve

            return serve(args)
        return commands[args.command](args)
    except (*USER_ERRORS, ModelFileError, ModelNotFoundError, NotAnImageError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: internal error ({type(exc).__name__}: {exc}); run with --debug for details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
