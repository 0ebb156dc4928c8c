"""oneformer_ade20k / oneformer_coco: a tiny OneFormer written in the published detectron2 layout (the names of the
original model's modules: ``backbone.*`` Swin, ``sem_seg_head.pixel_decoder.*`` MSDeformAttn pixel decoder,
``sem_seg_head.predictor.*`` transformer decoder, ``task_mlp.*``, and the training-only text encoder and
criterion), listed here from those modules, loads through our renaming into transformers' OneFormer; the task
tokens, the rescaling, the semantic inference and the palettes are checked against the extension's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.engine.annotators import oneformer
from sdstudio.models.errors import ModelFileError
from tests.test_annotators import fresh_annotator_cache, picture  # noqa: F401 (autouse)

torch.set_num_threads(1)

TINY = {"embed": 16, "depths": (2, 2, 1, 1), "heads": (1, 2, 2, 4), "window": 3, "conv": 32, "hidden": 32,
        "mask": 32, "heads_dec": 4, "enc_layers": 2, "enc_ffn": 48, "dec_layers": 3, "ffn": 40, "class_layers": 2,
        "queries": 5, "task_len": 77}
TRAINING_ONLY = {"text_encoder.positional_embedding": (77, 16), "text_encoder.token_embedding.weight": (50, 16),
                 "text_encoder.transformer.resblocks.0.attn.in_proj_weight": (48, 16),
                 "text_encoder.transformer.resblocks.0.mlp.c_fc.weight": (64, 16),
                 "text_encoder.ln_final.weight": (16,), "text_projector.layers.0.weight": (32, 16),
                 "text_projector.layers.1.bias": (32,), "prompt_ctx.weight": (16, 16),
                 "criterion.empty_weight": (151,), "criterion.logit_scale": ()}


def _linear(out: dict, name: str, cout: int, cin: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin), (cout,)


def _norm(out: dict, name: str, c: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)


def _mha(out: dict, name: str, c: int) -> None:  # torch's nn.MultiheadAttention
    out[f"{name}.in_proj_weight"], out[f"{name}.in_proj_bias"] = (3 * c, c), (3 * c,)
    _linear(out, f"{name}.out_proj", c, c)


def published_layout(classes: int, t: dict = TINY) -> dict[str, tuple[int, ...]]:
    """Names and shapes of OneFormer's state dict, from the original modules: D2SwinTransformer (``patch_embed``,
    ``layers.i.blocks.j`` with ``norm1``, ``attn.qkv`` / ``attn.proj`` / ``relative_position_bias_table`` and the
    ``relative_position_index`` buffer, ``norm2``, ``mlp.fc1`` / ``fc2``, ``downsample``, the outputs' ``norm0-3``),
    MSDeformAttnPixelDecoder (``input_proj``, ``transformer.level_embed``, ``transformer.encoder.layers``,
    ``mask_features``, ``adapter_1`` / ``layer_1`` detectron2 convolutions with their ``norm``),
    ContrastiveMultiScaleMaskedTransformerDecoder (``class_transformer``, the self / cross attention and FFN
    layers, ``decoder_norm``, ``query_embed``, ``level_embed``, ``class_input_proj``, ``class_embed``,
    ``mask_embed``) and OneFormer's ``task_mlp``."""
    out: dict[str, tuple[int, ...]] = {}
    e, w = t["embed"], t["window"]
    dims = [e * 2 ** i for i in range(len(t["depths"]))]
    out["backbone.patch_embed.proj.weight"], out["backbone.patch_embed.proj.bias"] = (e, 3, 4, 4), (e,)
    _norm(out, "backbone.patch_embed.norm", e)
    for i, (depth, heads, dim) in enumerate(zip(t["depths"], t["heads"], dims)):
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}."
            _norm(out, p + "norm1", dim)
            out[p + "attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, heads)
            out[p + "attn.relative_position_index"] = (w * w, w * w)
            _linear(out, p + "attn.qkv", 3 * dim, dim)
            _linear(out, p + "attn.proj", dim, dim)
            _norm(out, p + "norm2", dim)
            _linear(out, p + "mlp.fc1", 4 * dim, dim)
            _linear(out, p + "mlp.fc2", dim, 4 * dim)
        if i < len(dims) - 1:
            out[f"backbone.layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            _norm(out, f"backbone.layers.{i}.downsample.norm", 4 * dim)
        _norm(out, f"backbone.norm{i}", dim)
    c, pd = t["conv"], "sem_seg_head.pixel_decoder."
    for k, dim in enumerate(dims[:0:-1]):  # res5, res4, res3
        out[f"{pd}input_proj.{k}.0.weight"], out[f"{pd}input_proj.{k}.0.bias"] = (c, dim, 1, 1), (c,)
        _norm(out, f"{pd}input_proj.{k}.1", c)
    out[pd + "transformer.level_embed"] = (3, c)
    for k in range(t["enc_layers"]):
        p = f"{pd}transformer.encoder.layers.{k}."
        _linear(out, p + "self_attn.sampling_offsets", t["heads_dec"] * 3 * 4 * 2, c)
        _linear(out, p + "self_attn.attention_weights", t["heads_dec"] * 3 * 4, c)
        _linear(out, p + "self_attn.value_proj", c, c)
        _linear(out, p + "self_attn.output_proj", c, c)
        _norm(out, p + "norm1", c)
        _linear(out, p + "linear1", t["enc_ffn"], c)
        _linear(out, p + "linear2", c, t["enc_ffn"])
        _norm(out, p + "norm2", c)
    out[pd + "mask_features.weight"], out[pd + "mask_features.bias"] = (t["mask"], c, 1, 1), (t["mask"],)
    out[pd + "adapter_1.weight"] = (c, dims[0], 1, 1)
    _norm(out, pd + "adapter_1.norm", c)
    out[pd + "layer_1.weight"] = (c, c, 3, 3)
    _norm(out, pd + "layer_1.norm", c)
    h, pr = t["hidden"], "sem_seg_head.predictor."
    for k in range(t["class_layers"]):
        p = f"{pr}class_transformer.decoder.layers.{k}."
        _mha(out, p + "self_attn", h)
        _mha(out, p + "multihead_attn", h)
        _linear(out, p + "linear1", t["ffn"], h)
        _linear(out, p + "linear2", h, t["ffn"])
        for n in (1, 2, 3):
            _norm(out, f"{p}norm{n}", h)
    _norm(out, pr + "class_transformer.decoder.norm", h)
    for k in range(t["dec_layers"]):
        _mha(out, f"{pr}transformer_self_attention_layers.{k}.self_attn", h)
        _norm(out, f"{pr}transformer_self_attention_layers.{k}.norm", h)
        _mha(out, f"{pr}transformer_cross_attention_layers.{k}.multihead_attn", h)
        _norm(out, f"{pr}transformer_cross_attention_layers.{k}.norm", h)
        _linear(out, f"{pr}transformer_ffn_layers.{k}.linear1", t["ffn"], h)
        _linear(out, f"{pr}transformer_ffn_layers.{k}.linear2", h, t["ffn"])
        _norm(out, f"{pr}transformer_ffn_layers.{k}.norm", h)
    _norm(out, pr + "decoder_norm", h)
    out[pr + "query_embed.weight"], out[pr + "level_embed.weight"] = (t["queries"], h), (3, h)
    out[pr + "class_input_proj.weight"], out[pr + "class_input_proj.bias"] = (h, c, 1, 1), (h,)
    _linear(out, pr + "class_embed", classes + 1, h)
    for k, cout in enumerate((h, h, t["mask"])):
        _linear(out, f"{pr}mask_embed.layers.{k}", cout, h)
    _linear(out, "task_mlp.layers.0", h, t["task_len"])
    _linear(out, "task_mlp.layers.1", h, h)
    return out


def swin_relative_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def tiny_weights(classes: int, seed: int = 0, training_only: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in published_layout(classes).items():
        if name.endswith("relative_position_index"):
            out[name] = swin_relative_index(TINY["window"])
        elif name.endswith(".weight") and len(shape) == 1:  # norms: around 1
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.2 * torch.randn(shape, generator=g)
    if training_only:
        out |= {name: torch.randn(shape, generator=g) for name, shape in TRAINING_ONLY.items()}
    return out


def write(path, weights: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "__author__": "test", "iteration": 1}, str(path))


# ---- the file ---------------------------------------------------------------------------------------------------

def test_published_layout_loads_every_tensor_used_or_dropped(tmp_path):
    weights = tiny_weights(150)
    path = tmp_path / "oneformer" / oneformer.FILE_ADE20K.name
    write(path, weights)
    model = oneformer.load(path, "ade20k")
    assert oneformer.load(path, "ade20k") is model  # built once
    cfg = model.config
    assert (cfg.num_labels, cfg.num_queries, cfg.hidden_dim, cfg.conv_dim, cfg.encoder_layers, cfg.decoder_layers,
            cfg.query_dec_layers, cfg.num_attention_heads, cfg.task_seq_len) == (150, 5, 32, 32, 2, 4, 2, 4, 77)
    sw = cfg.backbone_config
    assert (sw.embed_dim, list(sw.depths), list(sw.num_heads), sw.window_size, sw.mlp_ratio) == (
        16, [2, 2, 1, 1], [1, 2, 2, 4], 3, 4.0)
    dropped = {k for k in weights if oneformer.rename(k) is None}
    assert dropped == set(TRAINING_ONLY) | {k for k in weights if k.endswith("relative_position_index")}
    ours = model.state_dict()
    used = sum(v.numel() for k, v in weights.items() if k not in dropped)
    assert used == sum(v.numel() for v in ours.values())  # every kept tensor of the file is in the network, once
    enc, dec = "net.pixel_level_module.encoder.", "net.transformer_module.decoder."
    qkv = weights["backbone.layers.1.blocks.1.attn.qkv.weight"]
    swin = enc + "swin.encoder.layers.1.blocks.1.attention."
    for i, part in enumerate("qkv"):
        assert torch.equal(ours[f"{swin}{part}_proj.weight"].cpu(), qkv[32 * i:32 * (i + 1)])
    in_proj = weights["sem_seg_head.predictor.transformer_self_attention_layers.2.self_attn.in_proj_bias"]
    assert torch.equal(ours[dec + "layers.2.self_attn.self_attn.v_proj.bias"].cpu(), in_proj[64:])
    pairs = {"backbone.norm2.weight": enc + "hidden_states_norms.stage3.weight",
             "backbone.layers.0.blocks.1.attn.relative_position_bias_table":
                 enc + "swin.encoder.layers.0.blocks.1.attention.relative_position_bias.relative_position_bias_table",
             "backbone.layers.2.downsample.reduction.weight": enc + "swin.encoder.layers.2.downsample.reduction.weight",
             "sem_seg_head.pixel_decoder.adapter_1.norm.bias": "net.pixel_level_module.decoder.adapter_1.1.bias",
             "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.norm2.weight":
                 "net.pixel_level_module.decoder.encoder.layers.1.final_layer_norm.weight",
             "sem_seg_head.predictor.class_transformer.decoder.layers.1.multihead_attn.in_proj_weight":
                 dec + "query_transformer.decoder.layers.1.multihead_attn.in_proj_weight",
             "sem_seg_head.predictor.mask_embed.layers.2.weight": dec + "mask_embed.layers.2.0.weight",
             "sem_seg_head.predictor.query_embed.weight": "net.transformer_module.queries_embedder.weight",
             "task_mlp.layers.1.bias": "net.task_encoder.task_mlp.layers.1.0.bias"}
    for theirs, mine in pairs.items():
        assert torch.equal(ours[mine].cpu(), weights[theirs]), theirs
    # the Swin relative position index transformers recomputes is the one the file holds
    index = model.net.pixel_level_module.encoder.swin.encoder.layers[0].blocks[0].attention.relative_position_bias
    assert torch.equal(index.relative_position_index.cpu().view(9, 9), weights[
        "backbone.layers.0.blocks.0.attn.relative_position_index"])


def test_bad_files_name_the_file_and_the_keys(tmp_path):
    weights = tiny_weights(150, training_only=False)
    missing = dict(weights)
    del missing["sem_seg_head.predictor.transformer_ffn_layers.1.norm.bias"]
    write(tmp_path / "missing.pth", missing)
    with pytest.raises(ModelFileError, match=r"missing\.pth: not the expected network \(missing: "
                                             r"net\.transformer_module\.decoder\.layers\.1\.ffn\.norm\.bias"):
        oneformer.load(tmp_path / "missing.pth", "ade20k")
    extra = weights | {"sem_seg_head.predictor.query_feat.weight": torch.zeros(5, 32)}
    write(tmp_path / "extra.pth", extra)
    with pytest.raises(ModelFileError, match=r"extra\.pth: .*unexpected: sem_seg_head\.predictor\.query_feat"):
        oneformer.load(tmp_path / "extra.pth", "ade20k")
    wrong = weights | {"task_mlp.layers.1.weight": torch.zeros(32, 31)}
    write(tmp_path / "wrong.pth", wrong)
    with pytest.raises(ModelFileError, match=r"wrong\.pth: .*wrong shape: .*task_mlp\.layers\.1\.0\.weight"):
        oneformer.load(tmp_path / "wrong.pth", "ade20k")
    write(tmp_path / "coco.pth", tiny_weights(133, training_only=False))
    with pytest.raises(ModelFileError, match=r"coco\.pth: a 133-class OneFormer, ade20k has 150"):
        oneformer.load(tmp_path / "coco.pth", "ade20k")
    write(tmp_path / "other.pth", {"conv.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match=r"other\.pth: not a OneFormer Swin checkpoint"):
        oneformer.load(tmp_path / "other.pth", "coco")
    data = (tmp_path / "coco.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match=r"cut\.pth"):
        oneformer.load(tmp_path / "cut.pth", "coco")


# ---- the steps around the network ---------------------------------------------------------------------------------

def test_task_tokens_as_oneformers_tokenizer():
    # OneFormer's SimpleTokenizer on "The task is semantic": start, 4 words in 5 BPE ids, end, zeros to 77
    ids = oneformer.task_tokens("The task is semantic", 77)
    assert ids[:7] == (49406, 518, 10549, 533, 29119, 1550, 49407) and ids[7:] == (0,) * 70
    assert oneformer.task_tokens(oneformer.TASK, 77) == ids
    short = oneformer.task_tokens("the task is semantic", 4)
    assert short == (49406, 518, 10549, 49407)  # cut, the end token kept last


def test_rescaling_and_padding_as_detectron2():
    assert oneformer.rescaled_size(512, 704, 640, 2560) == (640, 880)
    assert oneformer.rescaled_size(704, 512, 800, 1333) == (1100, 800)
    assert oneformer.rescaled_size(300, 1200, 800, 1333) == (333, 1333)  # long side capped, then rounded
    assert oneformer.rescaled_size(101, 99, 640, 2560) == (653, 640)  # 640 * 101 / 99 = 652.9 rounds up
    img = np.full((50, 70, 3), (123, 116, 104), np.uint8)
    x, size = oneformer.prepare(img, 64, 2560)
    assert size == (64, 90) and x.shape == (1, 3, 64, 96)
    assert torch.allclose(x[0, :, :, :90], ((torch.tensor([123.0, 116.0, 104.0]) - torch.tensor(oneformer.MEAN))
                                              / torch.tensor(oneformer.STD)).view(3, 1, 1), atol=1e-5)
    assert torch.count_nonzero(x[..., 90:]) == 0  # zero padding after normalization


def test_semantic_inference_formula():
    rng = np.random.default_rng(0)
    cls, masks = rng.normal(size=(7, 4)) * 3, rng.normal(size=(7, 5, 6)) * 4
    probs = np.exp(cls - cls.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True))[:, :-1]  # softmax over the classes and "no object", then cut
    expected = np.einsum("qc,qhw->chw", probs, 1 / (1 + np.exp(-masks)))
    got = oneformer.semantic_inference(torch.tensor(cls), torch.tensor(masks)).numpy()
    assert got.shape == (3, 5, 6) and np.allclose(got, expected, atol=1e-10)


def test_semantic_scores_upsample_crop_resize(monkeypatch):
    g = torch.Generator().manual_seed(1)
    cls, masks = torch.randn(7, 4, generator=g), torch.randn(7, 8, 12, generator=g) * 3
    full = oneformer.semantic_scores(cls, masks, (32, 48), (29, 45), (20, 31))
    up = F.interpolate(masks[None], size=(32, 48), mode="bilinear", align_corners=False)[:, :, :29, :45]
    up = F.interpolate(up, size=(20, 31), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(full, oneformer.semantic_inference(cls, up), atol=1e-6)
    monkeypatch.setattr(oneformer, "QUERY_CHUNK", 3)  # chunks of queries: the same sum
    assert torch.allclose(oneformer.semantic_scores(cls, masks, (32, 48), (29, 45), (20, 31)), full, atol=1e-6)


def test_palettes_are_the_datasets():
    ade, coco = oneformer.ADE20K_PALETTE, oneformer.COCO_PALETTE
    assert ade.shape == (150, 3) and coco.shape == (133, 3) and ade.dtype == coco.dtype == np.uint8
    # ADE20K: wall, building, sky, floor, tree, ceiling, road ... flag
    assert ade[:7].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
                                [120, 120, 80], [140, 140, 140]]
    assert ade[-1].tolist() == [92, 0, 255]
    # COCO panoptic: person, bicycle, car, motorcycle ... rug-merged
    assert coco[:4].tolist() == [[220, 20, 60], [119, 11, 32], [0, 0, 142], [0, 0, 230]]
    assert coco[80].tolist() == [255, 255, 128] and coco[-1].tolist() == [250, 141, 255]  # banner (first stuff)
    assert oneformer.DATASETS["ade20k"].palette is ade and oneformer.DATASETS["coco"].palette is coco
    assert (oneformer.DATASETS["ade20k"].short_side, oneformer.DATASETS["ade20k"].max_size) == (640, 2560)
    assert (oneformer.DATASETS["coco"].short_side, oneformer.DATASETS["coco"].max_size) == (800, 1333)


def test_detect_gives_palette_colours(tmp_path, monkeypatch):
    monkeypatch.setitem(oneformer.DATASETS, "coco", oneformer.Dataset(oneformer.FILE_COCO, 96, 1333,
                                                                       oneformer.COCO_PALETTE))
    path = tmp_path / "oneformer" / oneformer.FILE_COCO.name
    write(path, tiny_weights(133, seed=3))
    model = oneformer.load(path, "coco")
    img = picture(40, 56)
    classes = oneformer.segment(model, img)
    assert classes.shape == (40, 56) and classes.min() >= 0 and classes.max() < 133
    out = oneformer.detect(model, img)
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert np.array_equal(out, oneformer.COCO_PALETTE[classes])
    # the network's scores are the formula on its own outputs
    x, size = oneformer.prepare(img, 96, 1333)
    task = torch.tensor(oneformer.task_tokens(), dtype=torch.float32)[None]
    with torch.no_grad():
        cls, masks = model(x.to(next(model.parameters()).device), task.to(next(model.parameters()).device))
    assert cls.shape == (1, 5, 134) and masks.shape == (1, 5, 24, 40)  # the padded 96×160 at 1/4
    scores = oneformer.semantic_scores(cls[0], masks[0], (96, 160), size, (40, 56))
    assert np.array_equal(scores.argmax(0).cpu().numpy(), classes)


def test_the_registered_preprocessors_frame_at_the_hidden_sliders_default(tmp_path, monkeypatch):
    from sdstudio.core.controlnet import ControlNetError
    from sdstudio.engine import annotators, preprocessors

    monkeypatch.setitem(oneformer.DATASETS, "coco", oneformer.Dataset(oneformer.FILE_COCO, 64, 1333,
                                                                       oneformer.COCO_PALETTE))
    write(tmp_path / "oneformer" / oneformer.FILE_COCO.name, tiny_weights(133, seed=3))
    found = {p.name: p for p in annotators.preprocessors(tmp_path)}
    coco = found["oneformer_coco"]
    assert coco.aliases == ("seg_ofcoco",) and coco.resolution is None and coco.detail()["sliders"] == []
    out = preprocessors.detect(coco, picture(40, 56), -1, -1, -1)  # the unit's -1: framed at 512
    assert out.shape[:2] == (512, 717) and out.dtype == np.uint8
    assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in oneformer.COCO_PALETTE.tolist()}
    assert preprocessors.detect(coco, picture(40, 56), 128, -1, -1).shape[:2] == (128, 179)
    with pytest.raises(ControlNetError, match=r"seg_ofade20k needs 250_16_swin_l_oneformer_ade20k_160k\.pth: put"):
        preprocessors.detect(found["oneformer_ade20k"], picture(40, 56), -1, -1, -1)
