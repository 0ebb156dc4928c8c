"""Flux.1 and SD 3.x LoRAs on reduced published-layout models: every layout trainers ship (sd-scripts,
ComfyUI / BFL, diffusers / PEFT, XLabs) gives the same weights; those weights equal the original-layout
weights with ``W + mult * alpha / rank * up @ down`` merged in and loaded fresh through the loader (and, where
diffusers' converters handle a reduced width, diffusers' own ``load_lora_adapter`` + ``fuse_lora``)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.engine import lora as lora_ops
from sdstudio.models.dit import build_dit
from sdstudio.models.errors import ModelFileError
from sdstudio.models.loader import load_checkpoint
from sdstudio.testing import dit_files as DF
from sdstudio.testing import lora_files as LF

HIDDEN = 256  # two 128-wide heads
T5_WIDTH = DF.T5_SIZES["tiny"]["d_model"]
CLIP_L = DF.CLIP_SIZES["clip_l"]["tiny"][0]
MULT = 0.7


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-lora")
    shapes = DF.flux_shapes(2, 2, hidden=HIDDEN, context_dim=T5_WIDTH, pooled_dim=CLIP_L, guidance=True)
    state = DF.random_state(shapes, seed=3)
    DF.save(state, root / "flux.safetensors")
    DF.save(DF.encoder_state("clip_l", projection=False), root / "te" / "clip_l.safetensors")
    DF.save(DF.encoder_state("t5xxl"), root / "te" / "t5xxl.safetensors")
    DF.save(DF.dit_vae_state(seed=4), root / "vae" / "ae.safetensors")
    model = load_checkpoint(root / "flux.safetensors", text_encoder_dirs=(root / "te",), vae_dirs=(root / "vae",))
    return model, state, shapes, root


def write(root, name, sd):
    path = root / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def with_lora(model, path, te=MULT, unet=MULT, module=None):
    """The module's weights with the file applied, and the file (checking that everything in it fitted)."""
    lf = lora_ops.LoraFile(path, model)
    with lora_ops.applied(model, [(lf, te, unet)]):
        return weights(module if module is not None else model.unet), lf


def deltas(model, path, **kw):
    before = weights(kw.get("module", model.unet))
    after, lf = with_lora(model, path, **kw)
    assert lf.unmatched == []
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def forward(t):
    """The transformer on fixed inputs: a 4x4-patch latent, 8 text tokens, pooled vector, t, guidance."""
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    with torch.no_grad():
        return t(hidden_states=torch.randn(1, 16, 64, generator=g),
                 encoder_hidden_states=torch.randn(1, 8, T5_WIDTH, generator=g),
                 pooled_projections=torch.randn(1, CLIP_L, generator=g), timestep=torch.tensor([0.6]),
                 img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                 return_dict=False)[0]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_every_flux_layout_gives_the_same_weights(flux):
    model, _, shapes, root = flux
    f = LF.factors(shapes, seed=1)
    files = {"kohya": LF.kohya(f), "comfyui": LF.comfy(f), "bfl-bare": LF.comfy(f, prefix=""),
             "comfyui-kohya-names": {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
                                     for k, v in LF.comfy(f).items()},
             "diffusers": LF.flux_diffusers(f, HIDDEN),
             "peft-wrapped": LF.flux_diffusers(f, HIDDEN, prefix="base_model.model.")}
    results = {name: deltas(model, write(root, name, sd)) for name, sd in files.items()}
    linear = {n + ".weight" for n, m in model.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(results["kohya"]) == linear  # every Linear, the fused ones' parts included
    for name, got in results.items():
        assert max_diff(got, results["kohya"]) < 1e-6, name
    part = LF.xlabs_part(f, HIDDEN)  # XLabs files hold only attention (q, k, v of linear1, not its MLP rows)
    xl, ref = deltas(model, write(root, "xlabs", LF.xlabs(part, HIDDEN))), \
        deltas(model, write(root, "xlabs-as-kohya", LF.kohya(part)))
    assert max_diff(xl, ref) < 1e-6
    assert "single_transformer_blocks.0.proj_mlp.weight" not in xl and "transformer_blocks.1.attn.to_k.weight" in xl


def test_flux_lora_equals_merged_original_weights_loaded_fresh(flux):
    model, state, shapes, root = flux
    f = LF.factors(shapes, seed=2)
    ours, _ = with_lora(model, write(root, "kohya-merge", LF.kohya(f)))
    fresh = build_dit(model.spec.dit, LF.merged(state, f, MULT))  # the loader's own BFL -> diffusers conversion
    diff = max_diff(ours, fresh.state_dict())
    assert diff < 1e-5, diff
    lf = lora_ops.LoraFile(root / "kohya-merge.safetensors", model)
    with lora_ops.applied(model, [(lf, 1.0, MULT)]):
        out = forward(model.unet)
    plain, reference = forward(model.unet), forward(fresh)
    err = float((out - reference).abs().max())
    assert err < 1e-4 * float(reference.abs().max()), err
    assert float((plain - reference).abs().max()) > 100 * err  # the LoRA does change the output


def test_flux_lora_equals_diffusers_own_loader(flux):
    """diffusers' converters (kohya, XLabs) into its PEFT layers, fused: the same weights. Its kohya one
    hard-codes Flux's 3072 width for ``linear1``, so that module is left out here, and it copies the final
    layer's factors without alpha / rank (its "TODO: alphas"), so those two get alpha = rank."""
    from diffusers import FluxPipeline

    model, _, shapes, root = flux
    f = LF.factors(shapes, seed=4, keep=lambda n: not n.endswith("linear1"))
    f |= {n: (d, u, float(d.shape[0])) for n, (d, u, _) in f.items() if n.startswith("final_layer.")}
    cases = {"kohya": LF.kohya(f), "xlabs": LF.xlabs(LF.xlabs_part(f, HIDDEN), HIDDEN)}
    for name, sd in cases.items():
        path = write(root, f"for-diffusers-{name}", sd)
        theirs = copy.deepcopy(model.unet)
        converted = FluxPipeline.lora_state_dict(str(path))
        # diffusers 0.42's kohya converter names the embedders and the final layer without "transformer.",
        # so its own loader (prefix "transformer") leaves them out; put the prefix back to compare them too
        converted = {("" if k.startswith("transformer.") else "transformer.") + k: v for k, v in converted.items()}
        theirs.load_lora_adapter(converted, prefix="transformer")
        theirs.fuse_lora(lora_scale=MULT)
        fused = {k.replace("base_layer.", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
        ours, _ = with_lora(model, path)
        assert max_diff(ours, fused) < 1e-5, name


def test_text_encoder_parts_and_separate_multipliers(flux):
    model, _, _, root = flux
    enc = model.extras["encoders"]
    fl = {("" if n.startswith("text_model.") else "text_model.") + n: m.weight.shape  # the names files use
          for n, m in enc["clip_l"].named_modules() if isinstance(m, torch.nn.Linear)}
    ft = {n: m.weight.shape for n, m in enc["t5xxl"].named_modules() if isinstance(m, torch.nn.Linear)}
    f_clip = LF.factors({n + ".weight": s for n, s in fl.items()}, seed=5)
    f_t5 = LF.factors({n + ".weight": s for n, s in ft.items()}, seed=6)
    kohya = write(root, "te-kohya", LF.kohya(f_clip, "lora_te1_") | LF.kohya(f_t5, "lora_te3_"))
    comfy = write(root, "te-comfy", LF.comfy(f_clip, "text_encoders.clip_l.transformer.")
                  | LF.comfy(f_t5, "text_encoders.t5xxl.transformer."))
    old = write(root, "te-old-flux", LF.kohya(f_clip, "lora_te1_") | LF.kohya(f_t5, "lora_te2_"))  # T5 as te2
    for kind, f in (("clip_l", f_clip), ("t5xxl", f_t5)):
        own = {n.removeprefix("text_model.") for n, _ in enc[kind].named_modules()}
        expected = {(n if n in own else n.removeprefix("text_model.")) + ".weight": MULT * a / d.shape[0] * (u @ d)
                    for n, (d, u, a) in f.items()}
        for path in (kohya, comfy, old):
            got = deltas(model, path, module=enc[kind])
            assert max_diff(got, expected) < 1e-6, (kind, path.name)
    before = weights(enc["clip_l"]), weights(model.unet)
    assert max_diff(with_lora(model, kohya, te=0, unet=1)[0], before[1]) == 0  # te weight 0: encoders untouched
    assert max_diff(with_lora(model, kohya, te=0, module=enc["clip_l"])[0], before[0]) == 0


def test_weight_zero_is_no_lora_and_removal_is_bit_exact(flux):
    model, _, shapes, root = flux
    path = write(root, "zero", LF.kohya(LF.factors(shapes, seed=7)))
    before, out = weights(model.unet), forward(model.unet)
    lf = lora_ops.LoraFile(path, model)
    with lora_ops.applied(model, [(lf, 0.0, 0.0)]):
        assert torch.equal(forward(model.unet), out)
    for w in (1.0, -0.4, 2.5):
        with lora_ops.applied(model, [(lf, w, w)]):
            assert not torch.equal(forward(model.unet), out)
    after = weights(model.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(forward(model.unet), out)


def test_other_network_kinds_on_fused_weights(flux):
    """LoHa, LoKr and full-diff entries for fused weights (qkv, ``linear1``): the update is made at the fused size
    and split like the base weight (checked against the merged original-layout weights)."""
    model, state, shapes, root = flux
    g = torch.Generator().manual_seed(8)
    sd, merged = {}, dict(state)
    for name in ("double_blocks.1.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                 "final_layer.adaLN_modulation.1"):
        out_f, in_f = shapes[name + ".weight"]
        k = "lora_unet_" + name.replace(".", "_")
        if name.startswith("double_blocks.0"):  # LoKr under LyCORIS's own prefix, no alpha
            w1, w2 = torch.randn(2, 2, generator=g), torch.randn(out_f // 2, in_f // 2, generator=g) * 0.05
            sd |= {"lycoris_" + k[len("lora_unet_"):] + ".lokr_w1": w1,
                   "lycoris_" + k[len("lora_unet_"):] + ".lokr_w2": w2}
            delta = torch.kron(w1, w2)
        elif name.endswith("qkv"):  # LoHa, rank 2, alpha 1
            a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.5 for s in ((out_f, 2), (2, in_f), (out_f, 2), (2, in_f)))
            sd |= {k + ".hada_w1_a": a1, k + ".hada_w1_b": b1, k + ".hada_w2_a": a2, k + ".hada_w2_b": b2,
                   k + ".alpha": torch.tensor(1.0)}
            delta = (a1 @ b1) * (a2 @ b2) * 0.5
        else:
            delta = torch.randn(out_f, in_f, generator=g) * 0.05
            sd[k + ".diff"] = delta
        merged[name + ".weight"] = state[name + ".weight"] + MULT * delta
    ours, lf = with_lora(model, write(root, "lycoris", sd))
    assert lf.unmatched == [] and len(lf.targets) == 4
    assert max_diff(ours, build_dit(model.spec.dit, merged).state_dict()) < 1e-5


def test_sd_loras_on_flux_report_what_does_not_fit(flux):
    model, _, _, root = flux
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    with pytest.raises(ModelFileError, match="none of its 2 modules fit this model"):
        lora_ops.LoraFile(write(root, "sd1", sd1), model)
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sdxl = {k.replace("lora_te_", "lora_te1_"): v for k, v in sd1.items() if "unet" in k} | {
        te1 + ".lora_down.weight": torch.ones(4, CLIP_L), te1 + ".lora_up.weight": torch.ones(CLIP_L, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),  # real SDXL size
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)}
    lf = lora_ops.LoraFile(write(root, "sdxl", sdxl), model)
    assert [k for k, _, _ in lf.targets] == ["te"]  # CLIP-L is CLIP-L: that part fits and applies
    assert sorted(lf.unmatched) == ["lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    with lora_ops.applied(model, [(lf, 1.0, 1.0)]):  # applies without error
        pass


# ---- SD 3.x ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-lora")
    width = DF.CLIP_SIZES["clip_l"]["tiny"][0] + DF.CLIP_SIZES["clip_g"]["tiny"][0]
    shapes = DF.sd3_shapes(2, pos_embed_max=16, context_dim=T5_WIDTH, pooled_dim=width, prefix="")
    state = DF.random_state(shapes, seed=2)
    full = DF.with_prefix(state, DF.SD3_PREFIX) | DF.dit_vae_state(prefix="first_stage_model.", levels=4)
    for kind in ("clip_l", "clip_g"):
        full |= DF.with_prefix(DF.encoder_state(kind), f"text_encoders.{kind}.transformer.")
    DF.save(full, root / "sd3.safetensors")
    return load_checkpoint(root / "sd3.safetensors"), state, shapes, root


def test_sd3_kohya_and_diffusers_layouts_equal_merged_weights(sd3):
    model, state, shapes, root = sd3
    f = LF.factors({k: v for k, v in shapes.items() if k != "pos_embed"}, seed=3)
    ours, _ = with_lora(model, write(root, "sd3-kohya", LF.kohya(f)))
    fresh = build_dit(model.spec.dit, DF.with_prefix(LF.merged(state, f, MULT), DF.SD3_PREFIX))  # diffusers' converter
    assert max_diff(ours, fresh.state_dict()) < 1e-5
    assert not torch.equal(ours["transformer_blocks.1.norm1_context.linear.weight"],
                           model.unet.state_dict()["transformer_blocks.1.norm1_context.linear.weight"])
    comfy, _ = with_lora(model, write(root, "sd3-comfy", LF.comfy(f)))
    assert max_diff(comfy, ours) < 1e-6
    # diffusers / PEFT names: the module's own, straight from the fresh model's deltas as rank-full factors
    g = torch.Generator().manual_seed(9)
    peft, expected = {}, {}
    for name, m in model.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "add_k_proj", "to_add_out", "ff.net.2")):
            a, b = torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g) * 0.1
            peft |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}
            expected[name + ".weight"] = MULT * (b @ a)
    assert max_diff(deltas(model, write(root, "sd3-peft", peft)), expected) < 1e-6


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_full_size_names_reach_modules_of_the_right_size(family):
    """Every matrix of the full-size published layouts, by its sd-scripts name, on a meta-device transformer:
    found, and the fused update's rows are the original weight's."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from sdstudio.models.detect import detect
    from sdstudio.models.loader import LoadedModel

    shapes = {"flux-dev": lambda: DF.flux_shapes(), "flux-schnell": lambda: DF.flux_shapes(guidance=False),
              "sd3-medium": lambda: DF.sd3_shapes(24), "sd3.5-medium": DF.sd35_medium_shapes,
              "sd3.5-large": DF.sd35_large_shapes}[family]()
    spec = detect(shapes)
    with init_empty_weights(include_buffers=True):  # SD3.5's 384x384 position table would be 0.9 GB
        unet = (FluxTransformer2DModel if spec.dit.is_flux else SD3Transformer2DModel)(**spec.dit.transformer)
    index = lora_ops._module_index(LoadedModel(None, spec, unet, None, [], [], torch.float32))
    prefix = "" if spec.dit.is_flux else DF.SD3_PREFIX
    matrices = {k[len(prefix):-len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) > 1}
    for name, shape in matrices.items():
        kind, target = index["lora_unet_" + name.replace(".", "_")]
        rows = target.total if isinstance(target, lora_ops.Rows) else target.weight.shape[0]
        assert kind == "unet" and rows == shape[0], name
    fused = {id(m) for _, t in index.values() if isinstance(t, lora_ops.Rows) for m, _ in t.pieces}
    plain = {id(t) for _, t in index.values() if isinstance(t, torch.nn.Module)}
    linear = {id(m) for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert fused | plain == linear  # nothing of the transformer is out of reach
