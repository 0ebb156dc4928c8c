"""The command line as a user runs it."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.cli import main
from sdstudio.core.outputs import read_infotext

SMALL = ["--steps", "2", "--size", "64x64", "--seed", "42"]


def run(args, data_dir, capsys):
    code = main([*args, "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_issue_example_writes_a1111_layout(data_dir, capsys):
    code, out, _ = run(["txt2img", "a red circle", "-n", "blurry", "--steps", "2", "--sampler", "DPM++ 2M",
                        "--scheduler", "karras", "--cfg", "7", "--seed", "42", "--size", "64x64", "--batch-count", "2",
                        "--batch-size", "2", "--clip-skip", "2", "--model", "tiny-sd1"], data_dir, capsys)
    assert code == 0
    day = datetime.date.today().isoformat()
    images = data_dir / "outputs" / "txt2img-images" / day
    assert sorted(p.name for p in images.iterdir()) == ["00000-42.png", "00001-43.png", "00002-44.png", "00003-45.png"]
    grid = data_dir / "outputs" / "txt2img-grids" / day / "grid-0000.png"
    assert grid.is_file() and Image.open(grid).size == (128, 128)
    assert str(images / "00000-42.png") in out and str(grid) in out
    code, out, _ = run(["txt2img", "again", *SMALL], data_dir, capsys)
    assert (images / "00004-42.png").is_file()  # numbering continues, nothing overwritten


def test_pnginfo_and_from_png_recreate_pixels(data_dir, capsys, tmp_path):
    run(["txt2img", "a blue square", *SMALL, "--batch-size", "2", "--sampler", "Euler a", "--outdir", str(tmp_path / "a")],
        data_dir, capsys)
    src = tmp_path / "a" / "00001-43.png"
    code = main(["pnginfo", str(src)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("a blue square\n") and "Seed: 43" in out and "Sampler: Euler a" in out
    run(["txt2img", "--from-png", str(src), "--outdir", str(tmp_path / "b")], data_dir, capsys)
    again = tmp_path / "b" / "00000-43.png"
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(again)))
    text = read_infotext(src)
    run(["txt2img", "--infotext", text, "--outdir", str(tmp_path / "c")], data_dir, capsys)
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(tmp_path / "c" / "00000-43.png")))
    # flags given with --from-png override the pasted values
    run(["txt2img", "--from-png", str(src), "--seed", "7", "--outdir", str(tmp_path / "d")], data_dir, capsys)
    assert (tmp_path / "d" / "00000-7.png").is_file()


def test_jpeg_output_keeps_infotext(data_dir, capsys, tmp_path):
    run(["txt2img", "x", *SMALL, "--format", "jpg", "--outdir", str(tmp_path)], data_dir, capsys)
    code = main(["pnginfo", str(tmp_path / "00000-42.jpg")])
    assert code == 0 and "Seed: 42" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["txt2img", "x", "--size", "500x512"], "width must be a multiple of 8"),
    (["txt2img", "x", "--steps", "0"], "steps must be an integer"),
    (["txt2img", "x", "--sampler", "Eulr"], "valid samplers: DPM++ 2M"),
    (["txt2img", "x", "--model", "v1-5-pruned-emaonly"], "no checkpoint named 'v1-5-pruned-emaonly'"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle, data_dir, capsys):
    code, _, err = run(args, data_dir, capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not (data_dir / "outputs").exists()


def test_pnginfo_of_non_image(tmp_path, capsys):
    bad = tmp_path / "readme.txt"
    bad.write_text("not an image")
    assert main(["pnginfo", str(bad)]) == 2
    assert "readme.txt: not an image" in capsys.readouterr().err
    assert main(["pnginfo", str(tmp_path / "missing.png")]) == 2


def test_models_lists_names_and_hashes(data_dir, capsys):
    code, out, _ = run(["models"], data_dir, capsys)
    assert code == 0 and "tiny-sd1.safetensors [" in out and "name=tiny-sd1" in out


def test_broken_checkpoint_via_console_script(tmp_path):
    """The installed ``sdstudio`` script: a corrupt model file is one line, no traceback."""
    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    (ckpt / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    exe = Path(sys.executable).with_name("sdstudio")
    proc = subprocess.run([str(exe), "txt2img", "x", "--data-dir", str(tmp_path), *SMALL],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "broken.safetensors" in proc.stderr


def test_hires_flags(data_dir, capsys, tmp_path):
    code, _out, err = run(["txt2img", "a red circle", *SMALL, "--hires", "--hr-resize", "96x0", "--hr-steps", "3",
                          "--denoising-strength", "0.6", "--hr-upscaler", "Latent (nearest-exact)", "--tiled-vae",
                          "--outdir", str(tmp_path)], data_dir, capsys)
    assert code == 0, err
    image = tmp_path / "00000-42.png"
    assert Image.open(image).size == (96, 96)
    text = read_infotext(image)
    for part in ("Denoising strength: 0.6", "Hires resize: 96x0", "Hires steps: 3",
                 "Hires upscaler: Latent (nearest-exact)", "Tiled VAE: True"):
        assert part in text
    code, _, err = run(["txt2img", *SMALL, "--hires", "--hr-scale", "50"], data_dir, capsys)
    assert code != 0 and "hr_scale" in err


def _init(path, size=(64, 64)):
    from PIL import ImageDraw

    im = Image.new("RGB", size, (30, 60, 200))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    im.save(path)
    return im


def test_img2img_inpaint_and_script_flags(data_dir, capsys, tmp_path):
    _init(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    code, _, err = run(["img2img", str(tmp_path / "init.png"), "a star", *SMALL, "--mask", str(tmp_path / "mask.png"),
                        "--mask-blur", "0", "--masked-content", "latent noise", "--denoising-strength", "0.6",
                        "--outdir", str(tmp_path / "out")], data_dir, capsys)
    assert code == 0, err
    out = tmp_path / "out" / "00000-42.png"
    text = read_infotext(out)
    assert "Denoising strength: 0.6" in text and "Masked content: latent noise" in text and "Mask blur: 0" in text
    result, original = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "init.png"))
    assert np.array_equal(result[:, 32:], original[:, 32:]) and not np.array_equal(result[:, :32], original[:, :32])
    code, _, err = run(["img2img", str(tmp_path / "init.png"), *SMALL, "--script", "SD upscale",
                        "--script-arg", "upscaler=Lanczos", "--script-arg", "scale=2", "--script-arg", "overlap=16",
                        "--outdir", str(tmp_path / "up")], data_dir, capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "up" / "00000-42.png").size == (128, 128)
    code, _, err = run(["img2img", str(tmp_path / "init.png"), *SMALL, "--script", "Loopback",
                        "--script-arg", "loops=0"], data_dir, capsys)
    assert code == 2 and "loops" in err


def test_img2img_inpaint_sketch(data_dir, capsys, tmp_path):
    from PIL import ImageDraw

    original = _init(tmp_path / "init.png")
    sketch = original.copy()
    ImageDraw.Draw(sketch).rectangle((40, 4, 60, 24), fill=(255, 255, 0))
    sketch.save(tmp_path / "sketch.png")
    code, _, err = run(["img2img", str(tmp_path / "init.png"), *SMALL, "--sketch", str(tmp_path / "sketch.png"),
                        "--mask-blur", "0", "--outdir", str(tmp_path / "out")], data_dir, capsys)
    assert code == 0, err
    result = np.asarray(Image.open(tmp_path / "out" / "00000-42.png"))
    assert np.array_equal(result[30:, :], np.asarray(original)[30:, :])  # far from the strokes: untouched
    assert not np.array_equal(result[4:25, 40:61], np.asarray(original)[4:25, 40:61])


def test_img2img_batch_folder_with_masks_and_png_info(data_dir, capsys, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    _init(tmp_path / "in" / "a.png")
    code, _, err = run(["txt2img", "a blue square", *SMALL, "--seed", "7", "--outdir", str(tmp_path / "made")],
                       data_dir, capsys)
    assert code == 0, err
    (tmp_path / "made" / "00000-7.png").rename(tmp_path / "in" / "b.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.png")
    code, _, err = run(["img2img", "--input-dir", str(tmp_path / "in"), "--mask-dir", str(tmp_path / "masks"),
                          "--output-dir", str(tmp_path / "res"), "--use-png-info", "a prompt", *SMALL],
                         data_dir, capsys)
    assert code == 2 and "not both" in err  # a positional prompt is taken as an init image: refused clearly
    code, _out, err = run(["img2img", "--input-dir", str(tmp_path / "in"), "--mask-dir", str(tmp_path / "masks"),
                          "--output-dir", str(tmp_path / "res"), "--use-png-info", "-p", "a red circle", *SMALL],
                         data_dir, capsys)
    assert code == 0, err
    written = sorted((tmp_path / "res").iterdir())
    assert len(written) == 2
    texts = [read_infotext(p) for p in written]
    assert any("a blue square" in t and "Seed: 7" in t for t in texts)  # b.png's own parameters
    assert any("a red circle" in t and "Mask blur" in t and "Seed: 42" in t for t in texts)  # a.png: flags, mask


def test_extras_single_and_folder(data_dir, capsys, tmp_path):
    from sdstudio.testing.synthetic import write_upscaler

    write_upscaler(data_dir / "models" / "ESRGAN" / "2x-tiny.safetensors", "esrgan", 2)
    (tmp_path / "in").mkdir()
    _init(tmp_path / "in" / "a.png", (40, 30))
    _init(tmp_path / "in" / "b.png", (20, 20))
    code, out, err = run(["extras", str(tmp_path / "in" / "a.png"), "--upscaler", "2x-tiny", "--scale", "3",
                          "--output-dir", str(tmp_path / "one")], data_dir, capsys)
    assert code == 0, err
    assert Image.open(out.strip()).size == (120, 90)
    code, out, err = run(["extras", "--input-dir", str(tmp_path / "in"), "--resize", "64x32", "--upscaler", "Lanczos",
                          "--upscaler-2", "2x-tiny", "--upscaler-2-visibility", "0.5",
                          "--output-dir", str(tmp_path / "many")], data_dir, capsys)
    assert code == 0, err
    written = out.split()
    assert len(written) == 2 and all(Image.open(p).size == (64, 32) for p in written)
    code, _, err = run(["extras", str(tmp_path / "in" / "a.png"), "--upscaler", "4x-nope"], data_dir, capsys)
    assert code == 2 and "4x-nope" in err


def test_xyz_prompt_matrix_and_prompts_file_from_the_cli(data_dir, capsys, tmp_path):
    code, _out, err = run(["txt2img", "a red circle", *SMALL, "--script", "xyz", "--x-type", "CFG Scale", "--x-values",
                          "3,7", "--y-type", "Steps", "--y-values", "1,2", "--include-sub-images",
                          "--outdir", str(tmp_path / "xyz")], data_dir, capsys)
    assert code == 0, err
    written = sorted((tmp_path / "xyz").iterdir())
    assert [p.name for p in written if p.name.startswith("grid")] == ["grid-0000.png"]
    assert len(written) == 5 and "X Type: CFG Scale" in read_infotext(tmp_path / "xyz" / "grid-0000.png")
    code, _, err = run(["txt2img", *SMALL, "--from-png", str(tmp_path / "xyz" / "grid-0000.png"), "--outdir",
                        str(tmp_path / "again")], data_dir, capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "grid-0000.png")),
                          np.asarray(Image.open(tmp_path / "xyz" / "grid-0000.png")))  # the plot re-made from PNG info
    code, _, err = run(["txt2img", "a red circle", *SMALL, "--script", "prompt-sr", "--x-values", "red, blue, green",
                        "--outdir", str(tmp_path / "sr")], data_dir, capsys)
    assert code == 0, err
    assert "X Type: Prompt S/R" in read_infotext(tmp_path / "sr" / "grid-0000.png")
    code, _, err = run(["txt2img", "a cat|in a hat|red", *SMALL, "--script", "prompt-matrix", "--outdir",
                        str(tmp_path / "pm")], data_dir, capsys)
    assert code == 0, err
    assert len(list((tmp_path / "pm").iterdir())) == 5  # the labelled grid and 4 images
    (tmp_path / "prompts.txt").write_text("a cat\n--prompt a dog --steps 1\n")
    code, _, err = run(["txt2img", *SMALL, "--script", "prompts-from-file", "--file", str(tmp_path / "prompts.txt"),
                        "--outdir", str(tmp_path / "pf")], data_dir, capsys)
    assert code == 0, err
    assert len(list((tmp_path / "pf").iterdir())) == 2
    code, _, err = run(["txt2img", *SMALL, "--script", "xyz", "--x-type", "Sampler", "--x-values", "Euler, Nope"],
                       data_dir, capsys)
    assert code == 2 and "'Nope'" in err


def test_controlnet_units_from_the_cli(data_dir, capsys, tmp_path):
    from sdstudio.testing.controlnet_files import write_controlnet

    write_controlnet(data_dir / "models" / "ControlNet" / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    edges = tmp_path / "edges.png"
    picture = Image.new("RGB", (64, 64), "black")
    picture.paste((255, 255, 255), (16, 16, 48, 48))
    picture.save(edges)
    code, _, err = run(["txt2img", "a square", *SMALL, "--outdir", str(tmp_path / "cn"), "--controlnet",
                          f"image={edges}", "module=canny", "model=tiny-canny", "weight=0.8"], data_dir, capsys)
    assert code == 0, err
    image = tmp_path / "cn" / "00000-42.png"
    info = read_infotext(image)
    assert 'ControlNet 0: "Module: canny, Model: tiny-canny [' in info and "Weight: 0.8" in info
    maps = list((tmp_path / "cn" / "detected_maps").iterdir())
    assert len(maps) == 1 and Image.open(maps[0]).size == (64, 64)
    assert not (tmp_path / "cn" / "grid-0000.png").exists()  # one image: no grid, the map is not counted
    run(["txt2img", "a square", *SMALL, "--outdir", str(tmp_path / "plain")], data_dir, capsys)
    assert not np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(tmp_path / "plain" / "00000-42.png")))
    code, _, err = run(["txt2img", "x", *SMALL, "--controlnet", "image=/no/such.png"], data_dir, capsys)
    assert code != 0 and "no such file" in err


def test_train_lora_then_use_it(data_dir, capsys, tmp_path):
    from train_fixtures import squares

    squares(tmp_path / "set" / "3_sks shape", [(220, 40, 40), (40, 40, 220)], ["sks shape, red", "sks shape, blue"],
            broken=True)
    code, out, err = run(["train", "lora", str(tmp_path / "set"), "--model", "tiny-sd1", "--steps", "3",
                          "--resolution", "64", "--name", "shape"], data_dir, capsys)
    assert code == 0, err
    lora = data_dir / "models" / "Lora" / "shape.safetensors"
    assert lora.is_file() and str(lora) in out and "broken.png skipped" in err
    code, out, _ = run(["txt2img", "sks shape <lora:shape:1>", *SMALL], data_dir, capsys)
    assert code == 0 and 'Lora hashes: "shape: ' in read_infotext(out.split()[0])
    code, _, err = run(["train", "lora", str(tmp_path / "set"), "--model", "no-such"], data_dir, capsys)
    assert code != 0 and "no-such" in err and "Traceback" not in err


def test_train_embedding_creates_trains_resumes_and_is_used(data_dir, capsys, tmp_path):
    """``train embedding``: made as A1111's Create embedding makes one (vectors, init text), trained a few steps,
    trained on with --resume only; the prompt that names it records its hash."""
    from train_fixtures import plain_colours

    from sdstudio.models.embeddings import load_embedding

    pics = plain_colours(tmp_path / "pics", ["a.png", "b.png"], "a plain colour")
    small = ["--width", "64", "--height", "64", "--model", "tiny-sd1"]
    code, out, err = run(["train", "embedding", str(pics), "--name", "cli-emb", "--vectors", "2", "--init-text", "cat",
                          "--steps", "2", "--learn-rate", "0.01", *small], data_dir, capsys)
    path = data_dir / "embeddings" / "cli-emb.pt"
    assert code == 0, err
    assert f"created {path}" in err and out.strip() == f"{path}  (step 2)"
    data = torch.load(path, weights_only=True)
    assert data["step"] == 2 and data["string_to_param"]["*"].shape[0] == 2 and data["sd_checkpoint"]
    assert load_embedding(path).vectors[0].shape[0] == 2  # the engine's loader reads it
    code, _, err = run(["train", "embedding", str(pics), "--name", "cli-emb", "--steps", "3", *small], data_dir, capsys)
    assert code == 2 and "already exists" in err and "--resume" in err
    code, out, err = run(["train", "embedding", str(pics), "--name", "cli-emb", "--steps", "3", "--resume", *small],
                         data_dir, capsys)
    assert code == 0 and out.strip() == f"{path}  (step 3)" and "created" not in err
    code, out, _ = run(["txt2img", "a cli-emb picture", *SMALL], data_dir, capsys)
    assert code == 0 and 'TI hashes: "cli-emb: ' in read_infotext(out.split()[0])
    code, _, err = run(["train", "embedding", str(pics), "--name", "x", "--template", "nope.txt", *small],
                       data_dir, capsys)
    assert code == 2 and "nope.txt not found; available: hypernetwork.txt" in err
    assert not (data_dir / "embeddings" / "x.pt").exists()  # refused before the file was made


def test_train_hypernetwork_creates_trains_and_is_used(data_dir, capsys, tmp_path):
    from train_fixtures import plain_colours

    from sdstudio.engine.hypernetwork import Hypernetwork

    pics = plain_colours(tmp_path / "pics", ["a.png", "b.png"], "a plain colour")
    small = ["--width", "64", "--height", "64", "--model", "tiny-sd1"]
    code, _, err = run(["train", "hypernetwork", str(pics), "--name", "cli-hn", "--steps", "2", *small],
                       data_dir, capsys)
    assert code == 2 and "--sizes 768,320,640,1280: none is an attention width" in err and "32,64" in err
    code, out, err = run(["train", "hypernetwork", str(pics), "--name", "cli-hn", "--sizes", "32,64", "--steps", "2",
                          "--template", "style.txt", *small], data_dir, capsys)
    path = data_dir / "models" / "hypernetworks" / "cli-hn.pt"
    assert code == 0, err
    assert out.strip() == f"{path}  (step 2)"
    data = torch.load(path, weights_only=True)
    assert data["step"] == 2 and data["layer_structure"] == [1.0, 2.0, 1.0] and {32, 64} <= set(data)
    assert set(Hypernetwork(path).layers) == {32, 64}
    run(["txt2img", "x", *SMALL, "--outdir", str(tmp_path / "plain")], data_dir, capsys)
    code, out, err = run(["txt2img", "x <hypernet:cli-hn:1>", *SMALL, "--outdir", str(tmp_path / "hn")], data_dir, capsys)
    assert code == 0 and "left out" not in err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "00000-42.png")),
                              np.asarray(Image.open(tmp_path / "hn" / "00000-42.png")))


def test_train_lora_captions_the_pictures_without_captions(data_dir, capsys, tmp_path):
    """``--caption-missing``: the tagger's caption beside the picture that had none, before the run; without the
    interrogators' weights a one-line error naming the folder."""
    from train_fixtures import squares

    from sdstudio.testing.synthetic import write_interrogators

    folder = squares(tmp_path / "set" / "2_sks", [(220, 40, 40), (40, 40, 220)])
    (folder / "1.caption").write_text("blue square")
    args = ["train", "lora", str(tmp_path / "set"), "--model", "tiny-sd1", "--steps", "1", "--resolution", "64",
            "--name", "tagged", "--caption-missing", "deepbooru"]
    code, _, err = run(args, data_dir, capsys)
    assert code == 2 and "caption_missing (deepbooru)" in err and str(data_dir / "models" / "deepbooru") in err
    assert err.count("\n") <= 2 and not (folder / "0.caption").exists()
    write_interrogators(data_dir / "models")
    code, out, err = run(args, data_dir, capsys)
    assert code == 0, err
    assert str(data_dir / "models" / "Lora" / "tagged.safetensors") in out
    assert "captioned 1 pictures: 2_sks/0.png" in err and (data_dir / "models" / "Lora" / "tagged.safetensors").is_file()
    assert (folder / "0.caption").read_text().strip() and (folder / "1.caption").read_text() == "blue square"
