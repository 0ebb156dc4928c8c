"""Our single-file loader against diffusers' own ``from_single_file`` (given local configs), weight by weight."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdstudio.models.diffusers_layout import load_folder, write_config_folder
from sdstudio.models.loader import ModelCache, load_checkpoint
from sdstudio.testing.synthetic import make_checkpoint, write_checkpoint


def _state(module):
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def assert_same_weights(ours, theirs, what, unused_by_them=()):
    """``unused_by_them``: key prefixes diffusers deliberately leaves unloaded (SD2's last OpenCLIP
    layer, which penultimate-layer conditioning never uses)."""
    a, b = _state(ours), _state(theirs)
    a = {k.removeprefix("text_model."): v for k, v in a.items()}
    b = {k.removeprefix("text_model."): v for k, v in b.items()}
    skipped = {k for k, v in b.items() if v.is_meta}
    assert all(k.startswith(unused_by_them) for k in skipped) if unused_by_them else not skipped, sorted(skipped)[:5]
    a = {k: v for k, v in a.items() if k not in skipped}
    b = {k: v for k, v in b.items() if k not in skipped}
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
    bad = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not bad, (what, bad[:5])


def compare_with_diffusers(path, tmp_path, dtype=torch.float32):
    ours = load_checkpoint(path, dtype)
    config = write_config_folder(ours.spec, tmp_path / "config")
    cls = StableDiffusionXLPipeline if ours.spec.is_sdxl else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype)
    assert_same_weights(ours.unet, pipe.unet, "unet")
    assert_same_weights(ours.vae, pipe.vae, "vae")
    last = ours.spec.text_encoders[0].config["num_hidden_layers"] - 1
    unused = (f"encoder.layers.{last}.",) if ours.spec.family == "sd2" else ()
    assert_same_weights(ours.text_encoders[0], pipe.text_encoder, "text_encoder", unused)
    if ours.spec.is_sdxl:
        assert_same_weights(ours.text_encoders[1], pipe.text_encoder_2, "text_encoder_2")
    return ours, pipe


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_matches_diffusers_from_single_file(family, tiny_dir, tmp_path):
    compare_with_diffusers(tiny_dir / f"tiny-{family}.safetensors", tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(dtype, tmp_path):
    path = write_checkpoint(tmp_path / "half.safetensors", "sd1", "tiny", dtype=dtype)
    model = load_checkpoint(path, torch.float32)
    assert next(model.unet.parameters()).dtype == torch.float32
    ref = load_checkpoint(write_checkpoint(tmp_path / "full.safetensors", "sd1", "tiny"), torch.float32)
    w, r = model.unet.conv_in.weight, ref.unet.conv_in.weight
    assert torch.allclose(w, r, atol=1e-2) and not torch.equal(w, r)  # same values, rounded through half


def test_ckpt_and_safetensors_load_the_same(tmp_path):
    a = load_checkpoint(write_checkpoint(tmp_path / "m.safetensors", "sd1", "tiny", seed=3, ema=True))
    b = load_checkpoint(write_checkpoint(tmp_path / "m.ckpt", "sd1", "tiny", seed=3, ema=True))
    assert_same_weights(a.unet, b.unet, "unet")
    assert_same_weights(a.text_encoders[0], b.text_encoders[0], "te")


def test_no_meta_tensors_left(tiny_dir):
    model = load_checkpoint(tiny_dir / "tiny-sdxl.safetensors")
    for module in (model.unet, model.vae, *model.text_encoders):
        assert not any(t.is_meta for t in module.state_dict().values())


def test_v_prediction_from_yaml_beside(tmp_path):
    path = write_checkpoint(tmp_path / "v2.safetensors", "sd2", "tiny")
    assert load_checkpoint(path).spec.prediction == "epsilon"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_checkpoint(path).spec.prediction == "v_prediction"


def test_cache_returns_same_model_and_reloads_changed_file(tmp_path):
    path = write_checkpoint(tmp_path / "c.safetensors", "sd1", "tiny")
    cache = ModelCache(1)
    first = cache.get(path, torch.float32)
    assert cache.get(path, torch.float32) is first
    write_checkpoint(tmp_path / "other.safetensors", "sd1", "tiny", seed=9)
    path.unlink()
    (tmp_path / "other.safetensors").rename(path)
    assert cache.get(path, torch.float32) is not first


def test_diffusers_folder_loads_and_matches(tiny_dir, tmp_path):
    ours, pipe = compare_with_diffusers(tiny_dir / "tiny-sd1.safetensors", tmp_path)
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    folder = load_folder(tmp_path / "folder", torch.float32)
    assert folder.spec.family == "sd1"
    assert_same_weights(folder.unet, ours.unet, "unet")
    assert_same_weights(folder.text_encoders[0], ours.text_encoders[0], "te")


@pytest.mark.full
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_matches_diffusers_from_single_file(family, tmp_path):
    """Full-size random-weight checkpoints in the real layout (fp16 on disk to keep memory in reach)."""
    path = write_checkpoint(tmp_path / f"full-{family}.safetensors", family, "full", dtype=torch.float16)
    compare_with_diffusers(path, tmp_path, dtype=torch.float16)


def _variant(tmp_path, family, name, edit):
    sd = make_checkpoint(family, "tiny", seed=5)
    ref = tmp_path / f"ref-{family}.safetensors"
    save_file(sd, str(ref))
    sd = dict(sd)
    edit(sd)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return load_checkpoint(ref), load_checkpoint(path)


def _drop(sd, pattern):
    for k in [k for k in sd if pattern in k]:
        del sd[k]


def test_sdxl_files_without_clip_l_final_norm_load_silently(tmp_path):
    """SDXL conditions on CLIP-L's penultimate layer, so real files leave its final norm out."""
    ref, model = _variant(tmp_path, "sdxl", "no-norm",
                          lambda sd: _drop(sd, "embedders.0.transformer.text_model.final_layer_norm"))
    assert model.warnings == []
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    a = model.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2]
    b = ref.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(a, b)


def test_sd1_file_without_final_norm_warns_naming_the_tensor(tmp_path):
    """SD 1.x reads the final norm: its absence is filled (ones / zeros) and said."""
    _, model = _variant(tmp_path, "sd1", "sd1-no-norm", lambda sd: _drop(sd, "final_layer_norm"))
    assert len(model.warnings) == 2 and all("final_layer_norm" in w and "sd1-no-norm" in w for w in model.warnings)
    norm = model.text_encoders[0].final_layer_norm  # transformers 5: CLIPTextModel has no text_model level
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


def _extras(sd):
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    sd["conditioner.embedders.0.transformer.text_model.logit_scale"] = torch.tensor(4.6052)
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000)


def test_logit_scale_position_ids_and_ema_bookkeeping_are_ignored(tmp_path):
    ref, model = _variant(tmp_path, "sdxl", "extras", _extras)
    assert model.warnings == []
    assert_same_weights(model.text_encoders[0], ref.text_encoders[0], "te")
    assert_same_weights(model.text_encoders[1], ref.text_encoders[1], "te2")


def test_openclip_projection_stored_either_way_round(tmp_path):
    """OpenCLIP stores ``text_projection`` as P in ``x @ P``; some converters store a Linear's weight (P^T)
    under ``text_projection.weight``. Both give the same pooled output."""
    def linear_layout(sd):
        sd["conditioner.embedders.1.model.text_projection.weight"] = \
            sd.pop("conditioner.embedders.1.model.text_projection").t().contiguous()

    ref, model = _variant(tmp_path, "sdxl", "linear-proj", linear_layout)
    src = make_checkpoint("sdxl", "tiny", seed=5)["conditioner.embedders.1.model.text_projection"]
    ids = torch.tensor([[49406, 320, 1929, 49407] + [0] * 73])
    out = ref.text_encoders[1](ids)
    pooled_in = ref.text_encoders[1].text_model(ids).pooler_output
    assert torch.allclose(out.text_embeds, pooled_in @ src, atol=1e-5)  # x @ P, as OpenCLIP computes it
    assert torch.allclose(model.text_encoders[1](ids).text_embeds, out.text_embeds, atol=1e-6)


def test_fp8_weights_upcast_on_load(tmp_path):
    def to_fp8(sd):
        for k in [k for k in sd if k.startswith("model.diffusion_model.") and sd[k].ndim >= 2]:
            sd[k] = sd[k].to(torch.float8_e4m3fn)

    ref, model = _variant(tmp_path, "sd1", "fp8", to_fp8)
    w = model.unet.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, ref.unet.conv_in.weight.to(torch.float8_e4m3fn).float())  # exactly the stored values
    assert not torch.equal(w, ref.unet.conv_in.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
                                   torch.float8_e4m3fn])
def test_mapped_views_read_the_same_tensors_as_safetensors(dtype, tmp_path):
    from safetensors import safe_open

    from sdstudio.models.safe_load import open_state_dict

    # odd sizes put later tensors at offsets that are not multiples of 8 bytes (the fallback path)
    tensors = {f"t{i}": torch.randn(n, 3).to(dtype) if dtype.is_floating_point else torch.arange(n * 3).reshape(n, 3).to(dtype)
               for i, n in enumerate((5, 1, 7, 0, 64))}
    tensors["odd"] = torch.zeros(3, dtype=torch.uint8)
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    views, plain = open_state_dict(path, mapped=True), safe_open(str(path), framework="pt")
    for key in tensors:
        got, want = views[key], plain.get_tensor(key)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key


def test_loaded_weights_are_not_views_of_the_file(tmp_path):
    # A model must not point into the file's map: a file rewritten in place would change its weights.
    path = write_checkpoint(tmp_path / "m.safetensors", "sd1", "tiny", seed=1)
    model = load_checkpoint(path, torch.float32)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    other = write_checkpoint(tmp_path / "other.safetensors", "sd1", "tiny", seed=2)
    with open(path, "r+b") as f:  # same size and layout, other values, written into the same inode
        f.write(other.read_bytes())
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(load_checkpoint(path, torch.float32).unet.conv_in.weight, before["conv_in.weight"])
