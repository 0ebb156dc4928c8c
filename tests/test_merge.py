"""The checkpoint merger: A1111's maths and key rules checked on small hand-made tensors (every expected value
written out by hand), its inpainting / instruct-pix2pix conv rule, discard, bake-in VAE, fp16 and metadata as
A1111 writes them; supermerger's block of every key of the full-size SD 1.x and SDXL layouts (shapes only,
against an independent derivation from diffusers' block structure); a LoRA merged in equals the engine applying
it at run time; the queue job behind ``POST /sdstudio/v1/merge`` with the result in ``/sdapi/v1/sd-models``;
the CLI and the tab."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdstudio.cli import main
from sdstudio.models import merge as merger
from sdstudio.models.convert import unet_ldm_to_hf
from sdstudio.models.files import legacy_model_hash, sha256_file
from sdstudio.testing.synthetic import make_checkpoint, write_checkpoint

U = "model.diffusion_model."


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.fixture
def abc(tmp_path):
    """Three small "checkpoints" whose merges can be worked out by hand."""
    a = {U + "w": torch.tensor([1.0, 2.0, 4.0]), U + "only_a": torch.tensor([7.0]),
         U + "not_in_c": torch.tensor([1.0]), "first_stage_model.decoder.w": torch.tensor([1.0, 1.0]),
         "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.tensor([0, 1, 2]),
         "alphas_cumprod": torch.tensor([3.0]), U + "steps": torch.tensor([10], dtype=torch.int64)}
    b = {U + "w": torch.tensor([3.0, 6.0, 0.0]), U + "only_b": torch.tensor([5.0]), U + "not_in_c": torch.tensor([3.0]),
         "first_stage_model.decoder.w": torch.tensor([3.0, 5.0]),
         "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.tensor([5, 6, 7]),
         "alphas_cumprod": torch.tensor([9.0]), U + "steps": torch.tensor([20], dtype=torch.int64)}
    c = {U + "w": torch.tensor([1.0, 2.0, 2.0]), "first_stage_model.decoder.w": torch.tensor([1.0, 1.0]),
         U + "steps": torch.tensor([10], dtype=torch.int64)}
    return tuple(_write(tmp_path / f"{n}.safetensors", t) for n, t in zip("abc", (a, b, c)))


def test_weighted_sum_is_one_minus_m_a_plus_m_b_on_keys_both_have(abc, tmp_path):
    a, b, _ = abc
    out = load_file(merger.merge(a, b, method="Weighted sum", multiplier=0.25, out_path=tmp_path / "r.safetensors"))
    assert out[U + "w"].tolist() == [1.5, 3.0, 3.0]  # 0.75*[1,2,4] + 0.25*[3,6,0]
    assert out[U + "not_in_c"].tolist() == [1.5]
    assert out["first_stage_model.decoder.w"].tolist() == [1.5, 2.0]
    assert out[U + "only_a"].tolist() == [7.0]  # only in A: kept as A
    assert U + "only_b" not in out  # only in B: left out
    assert out["alphas_cumprod"].tolist() == [3.0]  # no "model" in the name: A's
    assert out["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [0, 1, 2]  # skipped
    # integers merge too (A1111 does not exclude them) and become floats, as torch promotes them: 0.75*10 + 0.25*20
    assert out[U + "steps"].tolist() == [12.5] and out[U + "steps"].dtype == torch.float32


def test_add_difference_is_a_plus_m_times_b_minus_c(abc, tmp_path):
    a, b, c = abc
    out = load_file(merger.merge(a, b, c, method="Add difference", multiplier=0.5, out_path=tmp_path / "r.safetensors"))
    assert out[U + "w"].tolist() == [2.0, 4.0, 3.0]  # [1,2,4] + 0.5*([3,6,0] - [1,2,2])
    assert out["first_stage_model.decoder.w"].tolist() == [2.0, 3.0]  # [1,1] + 0.5*([3,5]-[1,1])
    assert out[U + "not_in_c"].tolist() == [1.0]  # B's key that C lacks: a zero difference
    assert out[U + "only_a"].tolist() == [7.0] and U + "only_b" not in out
    with pytest.raises(merger.MergeError, match="requires a tertiary model"):
        merger.merge(a, b, method="Add difference", multiplier=0.5, out_path=tmp_path / "x.safetensors")


def test_no_interpolation_is_a_and_fp16_halves_only_what_a1111_halves(abc, tmp_path):
    a, b, _ = abc
    same = load_file(merger.merge(a, b, method="No interpolation", multiplier=0.9, out_path=tmp_path / "n.safetensors"))
    assert same.keys() == load_file(a).keys() and all(torch.equal(same[k], v) for k, v in load_file(a).items())
    half = load_file(merger.merge(a, method="No interpolation", multiplier=0, fp16=True, out_path=tmp_path / "h.safetensors"))
    assert {half[k].dtype for k in half if half[k].is_floating_point()} == {torch.float16}  # every float of A
    assert half[U + "steps"].dtype == torch.int64  # to_half touches float32 only
    ws = load_file(merger.merge(a, b, method="Weighted sum", multiplier=0.25, fp16=True, out_path=tmp_path / "w.safetensors"))
    assert ws[U + "w"].dtype == torch.float16 and ws[U + "w"].tolist() == [1.5, 3.0, 3.0]  # merged keys: halved
    assert ws[U + "only_a"].dtype == torch.float32  # A1111 leaves unmerged keys as they were
    assert ws["alphas_cumprod"].dtype == torch.float32


def test_discard_drops_matching_keys_and_the_name_follows_a1111(abc, tmp_path):
    a, b, c = abc
    path = merger.merge(a, b, method="Weighted sum", multiplier=0.3, out_path=tmp_path, discard=r"decoder\.|only_")
    assert path.name == "0.7(a) + 0.3(b).safetensors"
    out = load_file(path)
    assert not [k for k in out if re.search(r"decoder\.|only_", k)] and U + "w" in out
    assert merger.merge(a, b, c, method="Add difference", multiplier=0.3, out_path=tmp_path).name == \
        "a + 0.3(b - c).safetensors"
    assert merger.merge(a, method="No interpolation", multiplier=0.3, out_path=tmp_path, fmt="ckpt").name == "a.ckpt"
    assert merger.merge(a, b, multiplier=0.3, out_path=tmp_path, custom_name="mine").name == "mine.safetensors"
    with pytest.raises(merger.MergeError, match="regular expression"):
        merger.merge(a, b, multiplier=0.3, out_path=tmp_path, discard="(")


def test_the_inpainting_and_instruct_pix2pix_first_conv_rule(tmp_path):
    key = U + "input_blocks.0.0.weight"
    a9 = torch.arange(2 * 9 * 1 * 1, dtype=torch.float32).reshape(2, 9, 1, 1)
    b4 = torch.full((2, 4, 1, 1), 100.0)
    a = _write(tmp_path / "inp.safetensors", {key: a9})
    b = _write(tmp_path / "plain.safetensors", {key: b4})
    path = merger.merge(a, b, method="Weighted sum", multiplier=0.25, out_path=tmp_path)
    assert path.name == "0.75(inp) + 0.25(plain).inpainting.safetensors"
    out = load_file(path)[key]
    assert torch.equal(out[:, :4], 0.75 * a9[:, :4] + 25.0) and torch.equal(out[:, 4:], a9[:, 4:])
    assert json.loads(_meta(path)["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(merger.MergeError, match="A must be the inpainting model"):
        merger.merge(b, a, method="Weighted sum", multiplier=0.5, out_path=tmp_path / "x.safetensors")
    ip2p = _write(tmp_path / "ip2p.safetensors", {key: a9[:, :8].contiguous()})
    path = merger.merge(ip2p, b, method="Weighted sum", multiplier=0.5, out_path=tmp_path)
    assert path.name.endswith(".instruct-pix2pix.safetensors")
    assert json.loads(_meta(path)["sd_merge_recipe"])["is_instruct_pix2pix"] is True
    with pytest.raises(merger.MergeError, match="A must be the instruct-pix2pix model"):
        merger.merge(b, ip2p, method="Weighted sum", multiplier=0.5, out_path=tmp_path / "x.safetensors")


def test_bake_in_vae_replaces_the_first_stage_model_keys(abc, tmp_path):
    a, b, _ = abc
    vae = _write(tmp_path / "my.vae.safetensors", {"decoder.w": torch.tensor([8.0, 9.0]), "loss.x": torch.tensor([1.0]),
                                                   "encoder.not_in_a": torch.tensor([1.0])})
    out = load_file(merger.merge(a, b, method="Weighted sum", multiplier=0.5, bake_vae=vae, fp16=True,
                                 out_path=tmp_path / "r.safetensors"))
    assert out["first_stage_model.decoder.w"].tolist() == [8.0, 9.0]
    assert out["first_stage_model.decoder.w"].dtype == torch.float16
    assert "first_stage_model.encoder.not_in_a" not in out and "first_stage_model.loss.x" not in out
    assert out[U + "w"].tolist() == [2.0, 4.0, 2.0]


def test_metadata_is_a1111s_recipe_and_models(abc, tmp_path):
    a, b, c = abc
    first = merger.merge(a, b, method="Weighted sum", multiplier=0.25, out_path=tmp_path / "first.safetensors",
                         custom_name="first", discard="only_b", config_source=2)
    recipe = json.loads(_meta(first)["sd_merge_recipe"])
    assert recipe == {"type": "webui", "primary_model_hash": sha256_file(a), "secondary_model_hash": sha256_file(b),
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
                      "save_as_half": False, "custom_name": "first", "config_source": 2, "bake_in_vae": "None",
                      "discard_weights": "only_b", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(_meta(first)["sd_merge_models"])
    assert models == {sha256_file(a): {"name": "a.safetensors", "legacy_hash": legacy_model_hash(a), "sd_merge_recipe": None},
                      sha256_file(b): {"name": "b.safetensors", "legacy_hash": legacy_model_hash(b), "sd_merge_recipe": None}}
    assert _meta(first)["format"] == "pt"
    tagged = _write(tmp_path / "tagged.safetensors", load_file(c), {"ss_output_name": "c-lora", "format": "pt"})
    second = merger.merge(first, c, tagged, method="Add difference", multiplier=1.0, out_path=tmp_path / "s.safetensors")
    meta = _meta(second)
    assert meta["ss_output_name"] == "c-lora"  # the inputs' own fields are copied
    models = json.loads(meta["sd_merge_models"])  # the earlier merge's recipe and its inputs come along
    assert models[sha256_file(first)]["sd_merge_recipe"] == recipe and sha256_file(a) in models
    assert json.loads(meta["sd_merge_recipe"])["tertiary_model_hash"] == sha256_file(tagged)
    bare = merger.merge(a, b, multiplier=0.5, save_metadata=False, out_path=tmp_path / "bare.safetensors")
    assert _meta(bare) == {}
    ckpt = merger.merge(a, b, multiplier=0.5, fmt="ckpt", out_path=tmp_path / "r.ckpt")
    plain = torch.load(ckpt, weights_only=True)  # a plain state dict, as A1111's torch.save(theta_0)
    assert plain[U + "w"].tolist() == [2.0, 4.0, 2.0]


def test_config_is_copied_from_a_b_or_c(abc, tmp_path):
    a, b, _ = abc
    b.with_suffix(".yaml").write_text("model: b\n")
    out = merger.merge(a, b, multiplier=0.5, out_path=tmp_path / "r.safetensors")
    assert out.with_suffix(".yaml").read_text() == "model: b\n"
    out = merger.merge(a, b, multiplier=0.5, out_path=tmp_path / "n.safetensors", config_source="Don't")
    assert not out.with_suffix(".yaml").exists()


# ---- block weights ----------------------------------------------------------------------------------

def _expected_block(key: str, sdxl: bool) -> str:
    """The block from diffusers' structure (levels of layers_per_block=2 resnets/attentions + a resampler),
    not from the LDM indices the merger reads."""
    if not key.startswith(U):
        return "BASE"
    hf = unet_ldm_to_hf(key[len(U):], 2)
    last = 8 if sdxl else 11
    if hf.startswith(("time_embedding.", "add_embedding.", "conv_in.")):
        return "IN00"
    if hf.startswith(("conv_norm_out.", "conv_out.")):
        return f"OUT{last:02d}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", hf):
        return f"IN{1 + 3 * int(m[1]) + int(m[3]):02d}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", hf):
        return f"IN{3 + 3 * int(m[1]):02d}"
    if hf.startswith("mid_block."):
        return "M00"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", hf):
        return f"OUT{3 * int(m[1]) + int(m[3]):02d}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", hf):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    raise AssertionError(f"{key} -> {hf}: no block")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_key_of_the_full_size_layout_is_in_its_block(family):
    if family == "sd1":
        keys = list(make_checkpoint("sd1", "full", meta=True))
    else:
        from sdstudio.testing.sgm_layout import sgm_shapes

        keys = list(sgm_shapes("base"))
    sdxl = family == "sdxl"
    names = merger.block_names(sdxl)
    assert len(names) == (20 if sdxl else 26)
    got = {k: merger.block_of(k, sdxl) for k in keys}
    wrong = [(k, got[k], _expected_block(k, sdxl)) for k in keys if got[k] != _expected_block(k, sdxl)]
    assert not wrong, wrong[:5]
    assert set(got.values()) == set(names)  # every block has keys
    assert all(got[k] == "BASE" for k in keys if k.startswith(("first_stage_model.", "cond_stage_model.",
                                                                "conditioner.")))
    with pytest.raises(merger.MergeError, match=f"takes {len(names)}"):
        merger.parse_block_weights([0.5] * (26 if sdxl else 20), sdxl)


def test_block_weights_set_each_blocks_multiplier(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", "tiny", seed=1)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", "tiny", seed=2)
    weights = [round(0.03 * i, 2) for i in range(26)]
    out = load_file(merger.merge(a, b, method="Weighted sum", multiplier=0.5, block_weights=weights,
                                 out_path=tmp_path / "bw.safetensors"))
    ta, tb = load_file(a), load_file(b)
    for key in ta:
        w = weights[merger.BLOCKS_SD.index(merger.block_of(key, False))]
        assert torch.equal(out[key], (1 - w) * ta[key] + w * tb[key]), key
    uniform = load_file(merger.merge(a, b, multiplier=0.4, block_weights=",".join(["0.4"] * 26),
                                     out_path=tmp_path / "u.safetensors"))
    plain = load_file(merger.merge(a, b, multiplier=0.4, out_path=tmp_path / "p.safetensors"))
    assert all(torch.equal(uniform[k], plain[k]) for k in plain)


# ---- LoRAs merged in --------------------------------------------------------------------------------

def _kohya_lora(checkpoint: Path, family: str) -> dict[str, torch.Tensor]:
    """A kohya LoRA over the UNet's attention, proj_in and resnet convs (LDM names) and the text encoders'
    attention, one MLP and SDXL's text_projection (OpenCLIP's fused q/k/v and transposed projection included)."""
    from sdstudio.models.safe_load import open_state_dict

    shapes = open_state_dict(checkpoint).shapes
    g = torch.Generator().manual_seed(0)
    lora = {}

    def add(name, out, inp, kernel=()):
        lora[name + ".lora_down.weight"] = torch.randn(2, inp, *kernel, generator=g) * 0.1
        lora[name + ".lora_up.weight"] = torch.randn(out, 2, *((1, 1) if kernel else ()), generator=g) * 0.1
        lora[name + ".alpha"] = torch.tensor(1.0)

    for k, s in shapes.items():
        if k.startswith(U) and k.endswith(".weight") and (".to_" in k or "proj_in" in k or "in_layers.2" in k):
            add("lora_unet_" + k[len(U):-len(".weight")].replace(".", "_"), s[0], s[1], tuple(s[2:]))
    if family == "sd1":
        pre = "cond_stage_model.transformer."
        for k, s in shapes.items():
            if k.startswith(pre) and "layers.0." in k and k.endswith("_proj.weight"):
                add("lora_te_" + k[len(pre):-len(".weight")].replace(".", "_"), s[0], s[1])
    else:
        pre = "conditioner.embedders.1.model."
        width = shapes[pre + "transformer.resblocks.0.attn.in_proj_weight"][1]
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"lora_te2_text_model_encoder_layers_0_self_attn_{n}", width, width)
        add("lora_te2_text_model_encoder_layers_1_mlp_fc1", shapes[pre + "transformer.resblocks.1.mlp.c_fc.weight"][0],
            width)
        p = shapes[pre + "text_projection"]
        add("lora_te2_text_projection", p[1], p[0])
        add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 64, 64)
    return lora


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_lora_merged_in_equals_applying_it_at_run_time(tmp_path, family):
    from sdstudio.engine.lora import LoraFile, applied
    from sdstudio.models.loader import load_checkpoint

    ckpt = write_checkpoint(tmp_path / "base.safetensors", family, "tiny")
    lora = _write(tmp_path / "style.safetensors", _kohya_lora(ckpt, family))
    out = merger.merge(ckpt, method="No interpolation", multiplier=0, loras=[(lora, 0.7)],
                       out_path=tmp_path / "merged.safetensors")
    merged, runtime = load_checkpoint(out), load_checkpoint(ckpt)
    file = LoraFile(lora, runtime)
    assert not file.unmatched
    with applied(runtime, [(file, 0.7, 0.7)]):
        pairs = [(runtime.unet, merged.unet), *zip(runtime.text_encoders, merged.text_encoders)]
        changed = 0
        for live, baked in pairs:
            live_sd, baked_sd = live.state_dict(), baked.state_dict()
            for k, v in live_sd.items():
                torch.testing.assert_close(baked_sd[k], v, rtol=0, atol=1e-6, msg=k)
        base = load_checkpoint(ckpt)
        for orig, baked in [(base.unet, merged.unet), *zip(base.text_encoders, merged.text_encoders)]:
            changed += sum(not torch.equal(orig.state_dict()[k], baked.state_dict()[k]) for k in orig.state_dict())
    assert changed >= len(file.targets) - 1  # the LoRA changed the weights it targets
    assert json.loads(_meta(out)["sd_merge_recipe"])["sdstudio_loras"] == [["style.safetensors", 0.7]]


# ---- the job, the API, the CLI, the tab -------------------------------------------------------------

@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    write_checkpoint(folder / "alpha.safetensors", "sd1", "tiny", seed=1)
    write_checkpoint(folder / "beta.safetensors", "sd1", "tiny", seed=2)
    (root / "models" / "VAE").mkdir(parents=True)
    vae = {k[len("first_stage_model."):]: v for k, v in make_checkpoint("sd1", "tiny", seed=3).items()
           if k.startswith("first_stage_model.")}
    _write(root / "models" / "VAE" / "clear.vae.safetensors", vae)
    return root


def test_the_api_queues_a_merge_job_and_the_model_list_shows_the_result(data_root):
    from fastapi.testclient import TestClient

    from sdstudio.cli import build_parser
    from sdstudio.server import create_app

    app = create_app(build_parser().parse_args(["serve", "--data-dir", str(data_root), "--nowebui"]))
    service = app.state.service
    try:
        http = TestClient(app)
        before = {m["model_name"] for m in http.get("/sdapi/v1/sd-models").json()}
        r = http.post("/sdstudio/v1/merge", json={"primary_model_name": "alpha", "secondary_model_name": "beta",
                                                  "interp_method": "Weighted sum", "multiplier": 0.25,
                                                  "save_as_half": True, "custom_name": "blend",
                                                  "bake_in_vae": "clear.vae.safetensors"})
        assert r.status_code == 202, r.text
        job = service.wait(r.json()["id"], timeout=60)
        assert job.status == "done", job.error
        shown = http.get(f"/sdstudio/v1/jobs/{job.id}").json()
        assert shown["kind"] == "merge" and shown["status"] == "done"
        models = {m["model_name"]: m for m in http.get("/sdapi/v1/sd-models").json()}
        assert set(models) - before == {"blend"} and models["blend"]["title"] == job.result["model_title"]
        path = Path(job.result["path"])
        assert path.parent == data_root / "models" / "Stable-diffusion"
        recipe = json.loads(_meta(path)["sd_merge_recipe"])
        assert recipe["bake_in_vae"] == "clear.vae.safetensors" and recipe["save_as_half"] is True
        assert json.loads(_meta(path)["sd_merge_models"])[sha256_file(path.parent / "alpha.safetensors")]["name"] == \
            "alpha.safetensors"
        for body, word in (({"primary_model_name": "nope", "secondary_model_name": "beta"}, "nope"),
                           ({"primary_model_name": "alpha", "secondary_model_name": "beta", "custom_name": "../x"},
                            "custom_name"),
                           ({"primary_model_name": "alpha", "interp_method": "Add difference",
                             "secondary_model_name": "beta"}, "tertiary_model_name"),
                           ({"primary_model_name": "alpha", "secondary_model_name": "beta", "block_weights": [1, 2]},
                            "takes 26")):
            r = http.post("/sdstudio/v1/merge", json=body)
            assert r.status_code == 422 and word in r.text, r.text
    finally:
        service.stop()


def test_the_cli_merges_into_the_checkpoint_folder(data_root, capsys):
    common = ["--data-dir", str(data_root)]
    assert main(["merge", "alpha", "beta", "alpha", "--method", "Add difference", "--multiplier", "0.5", "--fp16",
                 "--discard", "first_stage", "--name", "cli-out", *common]) == 0
    out = data_root / "models" / "Stable-diffusion" / "cli-out.safetensors"
    assert "Checkpoint saved to" in capsys.readouterr().out and out.is_file()
    merged = load_file(out)
    alpha = load_file(data_root / "models" / "Stable-diffusion" / "alpha.safetensors")
    assert not [k for k in merged if "first_stage" in k]
    key = U + "input_blocks.1.0.in_layers.2.weight"  # alpha + 0.5 (beta - alpha)... with C = alpha
    beta = load_file(data_root / "models" / "Stable-diffusion" / "beta.safetensors")
    assert torch.equal(merged[key], (alpha[key] + 0.5 * (beta[key] - alpha[key])).half())
    assert main(["merge", "alpha", "beta", "--block-weights", "1,2", *common]) == 2
    assert "takes 26" in capsys.readouterr().err
    assert main(["merge", "alpha", "beta", "--format", "ckpt", "--bake-vae", "clear", *common]) == 0
    assert (data_root / "models" / "Stable-diffusion" / "0.7(alpha) + 0.3(beta).ckpt").is_file()


def test_the_tab_has_a1111s_ids_and_merge_shows_the_result(data_root):
    from sdstudio.core.paths import Paths
    from sdstudio.core.settings import Settings
    from sdstudio.engine.generate import Engine
    from sdstudio.service.jobs import JobService
    from sdstudio.service.queue import SQLiteJobQueue
    from sdstudio.ui.app import StudioUI

    service = JobService(Engine(Paths(data_root)), SQLiteJobQueue(data_root / "jobs.sqlite3")).start()
    try:
        ui = StudioUI(service, Settings(data_root / "config.json", {}))
        page = ui.build()
        ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
        assert {"tab_modelmerger", "modelmerger_primary_model_name", "modelmerger_secondary_model_name",
                "modelmerger_tertiary_model_name", "modelmerger_custom_name", "modelmerger_interp_amount",
                "modelmerger_interp_method", "modelmerger_checkpoint_format", "modelmerger_save_as_half",
                "modelmerger_config_method", "modelmerger_bake_in_vae", "modelmerger_discard_weights",
                "modelmerger_save_metadata", "modelmerger_merge", "modelmerger_result"} <= ids
        tab = ui.merger
        assert (tab.amount.value, tab.method.value, tab.format.value, tab.half.value, tab.save_metadata.value) == \
            (0.3, "Weighted sum", "safetensors", False, True)
        titles = ui.checkpoint_titles()
        values = [titles[0], titles[1], None, "Weighted sum", 0.5, False, "from-tab", "safetensors", 0, "None", "",
                  True, True, True, "{}", "", ""]
        updates = list(tab.run("ui:merge-test", *values))
        assert len(updates) == 2 and 'class="sd-live" data-job=' in updates[0][0]  # the bar the page's script polls
        bar, result, *lists = updates[-1]
        assert bar == "" and "from-tab.safetensors" in result
        assert any("from-tab.safetensors" in str(c) for c in lists[0].choices)  # the lists know the new model
    finally:
        service.stop()
