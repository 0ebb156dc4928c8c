"""OneFormer semantic segmentation, the extension's ``oneformer_ade20k`` (label ``seg_ofade20k``) and
``oneformer_coco`` (``seg_ofcoco``): the published detectron2 checkpoints ``250_16_swin_l_oneformer_ade20k_160k.pth``
and ``150_16_swin_l_oneformer_coco_100ep.pth`` (``{"model": state}``; a Swin-L backbone, the multi-scale deformable
attention pixel decoder, the task-conditioned masked-attention transformer decoder and the task MLP, trained on
ADE20K's 150 classes with 250 queries and on COCO panoptic's 133 classes with 150 queries).

The network is transformers' ``OneFormerModel`` (with its ``SwinBackbone``), its configuration read from the
file's shapes (Swin's width, depths, heads and window, the numbers of queries, classes and layers), the file's
names renamed to transformers' (:func:`convert`: Swin's and the decoder self-attention's fused q/k/v split in
thirds). Tensors the file has and inference does not use are dropped: the text encoder, its projector and prompt
context (``text_encoder.*``, ``text_projector.*``, ``prompt_ctx.*``: only the training loss's contrastive queries use
them), the training criterion (``criterion.*``), Swin's ``relative_position_index`` buffers (recomputed from the
window size) and the ``pixel_mean`` / ``pixel_std`` constants if present.

As the extension's ``DefaultPredictor`` and ``OneFormer.semantic_inference`` (the configs' test settings), on the
picture it is given (the extension's frame: short side at the unit's resolution, padded to multiples of 64; these
preprocessors have no resolution slider): the picture (RGB, as the configs' ``INPUT.FORMAT``) rescaled with PIL's
bilinear filter so its short side is 640 (long side at most 2560) for ADE20K, 800 (at most 1333, detectron2's
defaults, which the COCO config keeps) for COCO; normalized with ImageNet's mean and std in 0-255; zero-padded at
the right and bottom to multiples of 32; the task "the task is semantic" as CLIP BPE ids (start and end tokens,
zeros after, 77 long) given as numbers to the task MLP. The masks of the last decoder layer are upsampled
(bilinear) to the padded size, cropped to the rescaled picture and resized to the picture's size; each class's
score is the sum over the queries of the query's softmax probability for the class (without the last, "no
object", class) times the sigmoid of its mask; each pixel gets its best class's colour: ADE20K's 150 colours, or
COCO panoptic's 133 (detectron2's ``COCO_CATEGORIES``), the datasets' ``stuff_colors`` the extension's visualizer
paints with.

Difference: the extension draws each class's region as a matplotlib polygon (antialiased, with a white outline
about 1.4 pixels wide, on a white canvas, largest region first; regions with holes as an image, without outline);
this map is the flat class colours, without outlines or blended edges.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...models.errors import ModelFileError
from .common import AnnotatorFile, cached_network, compute_device, count_indexed, renamed_weights
from .uniformer import ADE20K_PALETTE  # the ADE20K panoptic metadata's colours are mmsegmentation's palette

FILE_ADE20K = AnnotatorFile("250_16_swin_l_oneformer_ade20k_160k.pth", "oneformer")
FILE_COCO = AnnotatorFile("150_16_swin_l_oneformer_coco_100ep.pth", "oneformer")
MEAN = (123.675, 116.280, 103.530)
STD = (58.395, 57.120, 57.375)
SIZE_DIVISIBILITY = 32
TASK = "the task is semantic"
DEFORMABLE_LEVELS, DEFORMABLE_POINTS = 3, 4  # the pixel decoder's attention: 3 feature levels, 4 points each
QUERY_CHUNK = 50  # queries brought to full size at once (bounds the memory of the full-size masks)

# COCO panoptic's 133 categories' colours (panopticapi's, detectron2's COCO_CATEGORIES), class 0 ("person") first
COCO_PALETTE = np.array([
    (220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230), (106, 0, 228), (0, 60, 100), (0, 80, 100), (0, 0, 70),
    (0, 0, 192), (250, 170, 30), (100, 170, 30), (220, 220, 0), (175, 116, 175), (250, 0, 30), (165, 42, 42),
    (255, 77, 255), (0, 226, 252), (182, 182, 255), (0, 82, 0), (120, 166, 157), (110, 76, 0), (174, 57, 255),
    (199, 100, 0), (72, 0, 118), (255, 179, 240), (0, 125, 92), (209, 0, 151), (188, 208, 182), (0, 220, 176),
    (255, 99, 164), (92, 0, 73), (133, 129, 255), (78, 180, 255), (0, 228, 0), (174, 255, 243), (45, 89, 255),
    (134, 134, 103), (145, 148, 174), (255, 208, 186), (197, 226, 255), (171, 134, 1), (109, 63, 54),
    (207, 138, 255), (151, 0, 95), (9, 80, 61), (84, 105, 51), (74, 65, 105), (166, 196, 102), (208, 195, 210),
    (255, 109, 65), (0, 143, 149), (179, 0, 194), (209, 99, 106), (5, 121, 0), (227, 255, 205), (147, 186, 208),
    (153, 69, 1), (3, 95, 161), (163, 255, 0), (119, 0, 170), (0, 182, 199), (0, 165, 120), (183, 130, 88),
    (95, 32, 0), (130, 114, 135), (110, 129, 133), (166, 74, 118), (219, 142, 185), (79, 210, 114), (178, 90, 62),
    (65, 70, 15), (127, 167, 115), (59, 105, 106), (142, 108, 45), (196, 172, 0), (95, 54, 80), (128, 76, 255),
    (201, 57, 1), (246, 0, 122), (191, 162, 208), (255, 255, 128), (147, 211, 203), (150, 100, 100),
    (168, 171, 172), (146, 112, 198), (210, 170, 100), (92, 136, 89), (218, 88, 184), (241, 129, 0),
    (217, 17, 255), (124, 74, 181), (70, 70, 70), (255, 228, 255), (154, 208, 0), (193, 0, 92), (76, 91, 113),
    (255, 180, 195), (106, 154, 176), (230, 150, 140), (60, 143, 255), (128, 64, 128), (92, 82, 55),
    (254, 212, 124), (73, 77, 174), (255, 160, 98), (255, 255, 255), (104, 84, 109), (169, 164, 131),
    (225, 199, 255), (137, 54, 74), (135, 158, 223), (7, 246, 231), (107, 255, 200), (58, 41, 149),
    (183, 121, 142), (255, 73, 97), (107, 142, 35), (190, 153, 153), (146, 139, 141), (70, 130, 180),
    (134, 199, 156), (209, 226, 140), (96, 36, 108), (96, 96, 96), (64, 170, 64), (152, 251, 152), (208, 229, 228),
    (206, 186, 171), (152, 161, 64), (116, 112, 0), (0, 114, 143), (102, 102, 156), (250, 141, 255),
], np.uint8)


@dataclass(frozen=True)
class Dataset:
    """What a dataset's preprocessor differs in: its file, the test-time rescaling and the colours."""

    file: AnnotatorFile
    short_side: int
    max_size: int
    palette: np.ndarray


DATASETS = {"ade20k": Dataset(FILE_ADE20K, 640, 2560, ADE20K_PALETTE),
            "coco": Dataset(FILE_COCO, 800, 1333, COCO_PALETTE)}


# ---- the file's names to transformers' ----------------------------------------------------------------------------

_ENC = "net.pixel_level_module.encoder."
_PIX = "net.pixel_level_module.decoder."
_DEC = "net.transformer_module.decoder."
_BLOCK, _OUR_BLOCK = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.", _ENC + r"swin.encoder.layers.\1.blocks.\2."
_DEFORM = r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."
_OUR_DEFORM = _PIX + r"encoder.layers.\1."
_PRED = r"sem_seg_head\.predictor\."
_DROPPED = re.compile(r"(text_encoder|text_projector|prompt_ctx|criterion)\.|pixel_(mean|std)$|"
                      + _BLOCK + r"attn\.relative_position_index$")
_RULES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"backbone\.patch_embed\.proj\.", _ENC + "swin.embeddings.patch_embeddings.projection."),
    (r"backbone\.patch_embed\.norm\.", _ENC + "swin.embeddings.norm."),
    (_BLOCK + r"norm1\.", _OUR_BLOCK + "layernorm_before."),
    (_BLOCK + r"norm2\.", _OUR_BLOCK + "layernorm_after."),
    (_BLOCK + r"attn\.proj\.", _OUR_BLOCK + "attention.o_proj."),
    (_BLOCK + r"attn\.relative_position_bias_table$",
     _OUR_BLOCK + "attention.relative_position_bias.relative_position_bias_table"),
    (_BLOCK + r"mlp\.", _OUR_BLOCK + "mlp."),
    (r"backbone\.layers\.(\d+)\.downsample\.", _ENC + r"swin.encoder.layers.\1.downsample."),
    (r"sem_seg_head\.pixel_decoder\.input_proj\.", _PIX + "input_projections."),
    (r"sem_seg_head\.pixel_decoder\.transformer\.level_embed$", _PIX + "level_embed"),
    (_DEFORM + r"self_attn\.", _OUR_DEFORM + "self_attn."),
    (_DEFORM + r"linear1\.", _OUR_DEFORM + "fc1."),
    (_DEFORM + r"linear2\.", _OUR_DEFORM + "fc2."),
    (_DEFORM + r"norm1\.", _OUR_DEFORM + "self_attn_layer_norm."),
    (_DEFORM + r"norm2\.", _OUR_DEFORM + "final_layer_norm."),
    (r"sem_seg_head\.pixel_decoder\.mask_features\.", _PIX + "mask_projection."),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.weight$", _PIX + r"\1_\2.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.norm\.", _PIX + r"\1_\2.1."),
    (_PRED + r"query_embed\.weight$", "net.transformer_module.queries_embedder.weight"),
    (_PRED + r"level_embed\.weight$", "net.transformer_module.level_embed.weight"),
    (_PRED + r"decoder_norm\.", _DEC + "decoder_norm."),
    (_PRED + r"class_input_proj\.", _DEC + "query_input_projection."),
    (_PRED + r"class_embed\.", _DEC + "class_embed."),
    (_PRED + r"mask_embed\.layers\.(\d+)\.", _DEC + r"mask_embed.layers.\1.0."),
    (_PRED + r"class_transformer\.decoder\.", _DEC + "query_transformer.decoder."),
    (_PRED + r"transformer_cross_attention_layers\.(\d+)\.", _DEC + r"layers.\1.cross_attn."),
    (_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.",
     _DEC + r"layers.\1.self_attn.self_attn.out_proj."),
    (_PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.", _DEC + r"layers.\1.self_attn.norm."),
    (_PRED + r"transformer_ffn_layers\.(\d+)\.", _DEC + r"layers.\1.ffn."),
    (r"task_mlp\.layers\.(\d+)\.", r"net.task_encoder.task_mlp.layers.\1.0."),
]]
_STAGE_NORM = re.compile(r"backbone\.norm(\d+)\.(weight|bias)$")  # Swin's norm0-3: the backbone's stage1-4
_FUSED = [(re.compile(pattern), names) for pattern, names in [  # names of the q, k, v thirds ({} the letter)
    (_BLOCK + r"attn\.qkv\.(weight|bias)$", _OUR_BLOCK + r"attention.{}_proj.\3"),
    (_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$",
     _DEC + r"layers.\1.self_attn.self_attn.{}_proj.\2"),
]]


def rename(key: str) -> str | list[str] | None:
    """Our name for a file's tensor, three names for a fused q/k/v projection, None for one inference does not
    use; a name neither rule knows is kept (the loader then reports it as unexpected)."""
    if _DROPPED.match(key):
        return None
    for pattern, names in _FUSED:
        if m := pattern.match(key):
            return [m.expand(names.replace("{}", part)) for part in "qkv"]
    if m := _STAGE_NORM.match(key):
        return f"{_ENC}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
    for pattern, replacement in _RULES:
        if m := pattern.match(key):
            return m.expand(replacement) + key[m.end():]
    return key


def convert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return renamed_weights(weights, rename)


# ---- the network ---------------------------------------------------------------------------------------------

def config_from_shapes(shapes: dict[str, tuple[int, ...]]):
    """transformers' ``OneFormerConfig`` of a file's network (``shapes`` under the file's names). The attention
    heads are the deformable attention's (one number for the pixel and the transformer decoder, in the original
    as in transformers); the rest is as the published configs have it (post-norm, task norm, GN, strides 4-32)."""
    from transformers import OneFormerConfig, SwinConfig

    b, p, q = "backbone.layers.", "sem_seg_head.pixel_decoder.transformer.encoder.layers.", "sem_seg_head.predictor."
    stages = count_indexed(shapes, r"backbone\.layers\.(\d+)\.")
    depths = [count_indexed(shapes, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)]
    if stages == 0 or 0 in depths:
        raise ModelFileError("not a OneFormer Swin checkpoint (no backbone.layers.N.blocks.M tensors)")
    embed, _, patch, _ = shapes["backbone.patch_embed.proj.weight"]
    table = shapes[b + "0.blocks.0.attn.relative_position_bias_table"]
    swin = SwinConfig(
        embed_dim=embed, depths=depths, patch_size=patch, window_size=(math.isqrt(table[0]) + 1) // 2,
        num_heads=[shapes[f"{b}{i}.blocks.0.attn.relative_position_bias_table"][1] for i in range(stages)],
        mlp_ratio=shapes[b + "0.blocks.0.mlp.fc1.weight"][0] / embed, drop_path_rate=0.0,
        out_features=[f"stage{i + 1}" for i in range(stages)])
    queries, hidden = shapes[q + "query_embed.weight"]
    mask_dim, conv_dim = shapes["sem_seg_head.pixel_decoder.mask_features.weight"][:2]
    return OneFormerConfig(
        backbone_config=swin, num_labels=shapes[q + "class_embed.weight"][0] - 1, num_queries=queries,
        hidden_dim=hidden, conv_dim=conv_dim, mask_dim=mask_dim,
        num_attention_heads=shapes[p + "0.self_attn.attention_weights.weight"][0] // (
            DEFORMABLE_LEVELS * DEFORMABLE_POINTS),
        encoder_layers=count_indexed(shapes, r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
        encoder_feedforward_dim=shapes[p + "0.linear1.weight"][0],
        decoder_layers=count_indexed(shapes, r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.") + 1,
        dim_feedforward=shapes[q + "transformer_ffn_layers.0.linear1.weight"][0],
        query_dec_layers=count_indexed(shapes, r"sem_seg_head\.predictor\.class_transformer\.decoder\.layers\.(\d+)\."),
        task_seq_len=shapes["task_mlp.layers.0.weight"][1], is_training=False, use_auxiliary_loss=False,
        output_auxiliary_logits=False)


class OneFormer(nn.Module):
    """transformers' ``OneFormerModel`` (``net``) and the dataset whose colours and rescaling go with it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dataset: str):
        super().__init__()
        from transformers.models.oneformer.modeling_oneformer import OneFormerModel

        self.config = config_from_shapes(shapes)
        self.dataset = dataset
        self.net = OneFormerModel(self.config)
        self.net.pixel_level_module.encoder.swin.layernorm = nn.Identity()  # SwinModel's last norm: not the backbone's

    def forward(self, pixel_values: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, Q, classes + 1) and mask logits (B, Q, H / 4, W / 4) of the last decoder layer."""
        out = self.net(pixel_values=pixel_values, task_inputs=task)
        return out.transformer_decoder_class_predictions, out.transformer_decoder_mask_predictions


def _build(weights: dict[str, torch.Tensor], dataset: str) -> OneFormer:
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    try:
        model = OneFormer(shapes, dataset)
    except (KeyError, IndexError) as exc:
        raise ModelFileError(f"not a OneFormer Swin checkpoint (no {exc} among its tensors)") from None
    except ValueError as exc:  # shapes transformers' configuration refuses
        raise ModelFileError(f"not a OneFormer Swin checkpoint ({exc})") from None
    classes, palette = model.config.num_labels, DATASETS[dataset].palette
    if classes != len(palette):
        raise ModelFileError(f"a {classes}-class OneFormer, {dataset} has {len(palette)} classes "
                             f"(the other dataset's file?)")
    return model


def load(path: Path, dataset: str) -> OneFormer:
    """The network of a published OneFormer file for ``dataset`` (``ade20k`` or ``coco``), kept once built."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown OneFormer dataset {dataset!r} (ade20k or coco)")
    return cached_network(Path(path), f"oneformer_{dataset}", lambda weights: _build(weights, dataset),
                          convert=convert)


# ---- the preprocessor -------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def task_tokens(text: str = TASK, length: int = 77) -> tuple[int, ...]:
    """OneFormer's task input: the CLIP BPE ids of ``text`` (lower-cased) between the start and end tokens,
    zeros after (cut to ``length`` with the end token last, as its tokenizer does)."""
    from ...models.loader import clip_tokenizer

    ids = list(clip_tokenizer()(text.lower(), add_special_tokens=True)["input_ids"])
    if len(ids) > length:
        ids = ids[:length - 1] + ids[-1:]
    return tuple(ids + [0] * (length - len(ids)))


def rescaled_size(h: int, w: int, short_side: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge``: the short side at ``short_side``, the long side at most
    ``max_size``, rounded half up."""
    scale = short_side / min(h, w)
    nh, nw = (short_side, scale * w) if h < w else (scale * h, short_side)
    if max(nh, nw) > max_size:
        nh, nw = nh * max_size / max(nh, nw), nw * max_size / max(nh, nw)
    return int(nh + 0.5), int(nw + 0.5)


def prepare(image: np.ndarray, short_side: int, max_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The network's input (1×3×H×W, normalized, zero-padded to multiples of 32) and the rescaled size."""
    h, w = rescaled_size(image.shape[0], image.shape[1], short_side, max_size)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    ph, pw = -h % SIZE_DIVISIBILITY, -w % SIZE_DIVISIBILITY
    return F.pad(x, (0, pw, 0, ph))[None], (h, w)


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(Q, classes + 1) and (Q, H, W) -> (classes, H, W): per class, the sum over the queries of the class's
    softmax probability (the "no object" class left out after the softmax) times the mask's sigmoid."""
    probs = F.softmax(class_logits, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_logits.sigmoid())


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                    rescaled: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The class scores (classes, H, W) at ``size`` of one picture's decoder output: masks upsampled to the
    padded input, cropped to the rescaled picture, resized to ``size`` (bilinear both), then
    :func:`semantic_inference` (summed over chunks of queries, which is the same sum)."""
    (h, w), scores = rescaled, None
    for start in range(0, class_logits.shape[0], QUERY_CHUNK):
        masks = mask_logits[None, start:start + QUERY_CHUNK]
        masks = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)[0]
        part = semantic_inference(class_logits[start:start + QUERY_CHUNK], masks)
        scores = part if scores is None else scores + part
    return scores


@torch.no_grad()
def segment(model: OneFormer, image: np.ndarray) -> np.ndarray:
    """The class of every pixel (H×W int64) of an RGB uint8 picture."""
    data = DATASETS[model.dataset]
    device = compute_device()
    model.to(device)
    x, rescaled = prepare(image, data.short_side, data.max_size)
    task = torch.tensor(task_tokens(TASK, model.config.task_seq_len), dtype=torch.float32, device=device)[None]
    class_logits, mask_logits = model(x.to(device), task)
    scores = semantic_scores(class_logits[0], mask_logits[0], tuple(x.shape[-2:]), rescaled, image.shape[:2])
    return scores.argmax(dim=0).cpu().numpy()


def colorize(classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[classes]


def detect(model: OneFormer, image: np.ndarray) -> np.ndarray:
    """The segmentation map (H×W×3 uint8, the dataset's class colours) of an RGB uint8 picture."""
    return colorize(segment(model, image), DATASETS[model.dataset].palette)
