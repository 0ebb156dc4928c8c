"""Flow-matching models (SD 3.x, Flux.1) through the k-diffusion samplers (:mod:`sdstudio.engine.flow`).

Tiny random SD3 / Flux transformers, CLIP and T5 encoders: our change of variables with our Euler sampler
against diffusers' FlowMatchEulerDiscreteScheduler and its SD3 / Flux pipelines, the shift formulas
against diffusers' and the training tables, the T5 tokenizer against published ids.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sdstudio.engine.flow import (
    MAX_FLOW_SIGMA,
    FlowConditioner,
    FlowSchedule,
    FlowTextEncoders,
    FluxCall,
    SD3Call,
    flow_c_in,
    flow_denoised,
    flow_timestep,
    flux_mu,
    flux_shift,
    image_ids,
    pack_latents,
    t5_tokenizer,
    to_ve,
    unpack_latents,
)
from sdstudio.engine.samplers import SAMPLER_FUNCTIONS
from sdstudio.models.loader import clip_tokenizer

torch.set_num_threads(1)
LAT = 8  # latent side: 64 image tokens for SD3 (patch 2: 16), 16 packed tokens for Flux


# ---- tiny components ------------------------------------------------------------------------------------
def _clip(hidden: int, projection: int | None, seed: int):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init: encodings that differ visibly per prompt
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _t5(d_model: int = 48, seed: int = 3) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def _vae() -> AutoencoderKL:
    torch.manual_seed(4)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                         norm_num_groups=1, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",)).eval()


def make_sd3_parts():
    clip_l = _clip(16, 16, 1)
    with torch.no_grad():  # SD3 files' CLIP-L projection is the identity (its pooled vector is unprojected)
        clip_l.text_projection.weight.copy_(torch.eye(16))
    clip_g, t5 = _clip(24, 16, 2), _t5(48)
    torch.manual_seed(5)
    transformer = SD3Transformer2DModel(sample_size=LAT, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    return clip_l, clip_g, t5, transformer


def make_flux_parts():
    clip_l, t5 = _clip(16, None, 6), _t5(48, 7)
    torch.manual_seed(8)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    return clip_l, t5, transformer


@pytest.fixture(scope="module")
def sd3_parts():
    return make_sd3_parts()


@pytest.fixture(scope="module")
def flux_parts():
    return make_flux_parts()


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, LAT, LAT, generator=torch.Generator().manual_seed(seed))


def _flow_cfg_denoiser(call, cond, uncond, cfg: float):
    """The denoiser for prediction "flow" as CFGDenoiser computes it (cond and uncond in one batch, guidance
    on the denoised estimates), for models that take (x_f, σ)."""
    def denoise(x, sigma):
        s = sigma.reshape(-1)
        x_in = x * flow_c_in(s)[:, None, None, None]
        t = flow_timestep(s)
        out = call(torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond.crossattn, uncond.crossattn]),
                   added_cond_kwargs={"text_embeds": torch.cat([cond.pooled, uncond.pooled])}).sample
        d_c, d_u = (flow_denoised(x, o[None], s[:, None, None, None]) for o in out)
        return d_u + cfg * (d_c - d_u)
    return denoise


def _euler(denoiser, noise, sigmas):
    return SAMPLER_FUNCTIONS["euler"](denoiser, noise * sigmas[0], sigmas)


# ---- the T5 tokenizer -------------------------------------------------------------------------------------
# ids published with the T5 vocabulary (transformers' T5 tokenizer integration tests; google/t5-v1_1-xxl)
PUBLISHED_T5 = {
    "a photo of a cat": [3, 9, 1202, 13, 3, 9, 1712, 1],
    "The quick brown fox jumps over the lazy dog.": [37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5, 1],
    "A long paragraph for summarization.": [71, 307, 8986, 21, 4505, 1635, 1707, 5, 1],
    "Summary of the text.": [20698, 13, 8, 1499, 5, 1],
    "Hey how are you doing": [9459, 149, 33, 25, 692, 1],
    "BERT is designed to pre-train deep bidirectional representations from unlabeled text by jointly conditioning "
    "on both left and right context in all layers.": [272, 24203, 19, 876, 12, 554, 18, 9719, 1659, 2647, 26352, 6497,
                                                         7, 45, 73, 9339, 400, 26, 1499, 57, 22801, 10760, 30, 321, 646,
                                                         11, 269, 2625, 16, 66, 7500, 5, 1],
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides general-purpose "
    "architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural Language Understanding (NLU) and "
    "Natural Language Generation (NLG) with over 32+ pretrained models in 100+ languages and deep interoperability "
    "between Jax, PyTorch and TensorFlow.": [
        31220, 7, 41, 14034, 801, 38, 3, 102, 63, 17, 127, 524, 18, 7031, 2032, 277, 11, 3, 102, 63, 17, 127, 524, 18,
        2026, 17, 10761, 18, 7041, 61, 795, 879, 18, 19681, 4648, 7, 41, 12920, 382, 6, 350, 6383, 4949, 6, 2158, 12920,
        382, 9, 6, 3, 4, 11160, 6, 2043, 17153, 279, 49, 17, 6, 3, 4, 434, 9688, 11439, 21, 6869, 10509, 17725, 41, 567,
        9138, 61, 11, 6869, 10509, 11946, 41, 18207, 517, 61, 28, 147, 3538, 1220, 7140, 10761, 2250, 16, 910, 1220,
        8024, 11, 1659, 1413, 32, 883, 2020, 344, 2215, 226, 6, 12901, 382, 127, 524, 11, 4738, 7, 127, 15390, 5, 1],
}


def test_t5_tokenizer_gives_the_published_ids():
    tok = t5_tokenizer()
    for text, ids in PUBLISHED_T5.items():
        assert tok(text).input_ids == ids, text
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 32100  # 32000 pieces + 100 sentinels (the model's embedding has 32128 rows)
    # padding and truncation as diffusers asks for them: </s> kept at the end, <pad> = 0 after it
    assert tok("a photo", padding="max_length", max_length=6, truncation=True).input_ids == [3, 9, 1202, 1, 0, 0]
    assert tok("a b c d e f g", max_length=4, truncation=True).input_ids == [3, 9, 3, 1]


# ---- shifts and schedules --------------------------------------------------------------------------------
def test_flow_table_is_the_training_table():
    """Our 1000 flow σ are diffusers' (and A1111's ModelSamplingDiscreteFlow's) SD3 training sigmas."""
    ours = FlowSchedule(3.0).flow.sigmas
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)  # descending there, ascending here
    assert torch.allclose(ours, ref.float(), atol=1e-6, rtol=0)
    assert float(ours[0]) == pytest.approx(3 * 0.001 / (1 + 2 * 0.001)) and float(ours[-1]) == 1.0


@pytest.mark.parametrize("size", [(256, 256), (512, 512), (768, 1024), (1024, 1024), (1536, 1536)])
def test_flux_shift_matches_diffusers(size):
    w, h = size
    seq = (h // 16) * (w // 16)
    assert flux_mu(w, h) == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15), abs=1e-12)
    assert flux_shift(w, h, schnell=True) == 1.0
    # FluxPipeline's default sigmas (linspace(1, 1/n) time-shifted by mu) = our "simple" schedule, n | 1000
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    n = 20
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=flux_mu(w, h))
    ours = flow_timestep(FlowSchedule.flux(w, h).sigmas_for("simple", n).double())
    assert float(ours[0]) == pytest.approx(MAX_FLOW_SIGMA, abs=1e-9)  # σ = 1, clamped
    assert torch.allclose(ours[1:], sched.sigmas[1:].double(), atol=2e-6, rtol=0)


def test_sd3_uniform_is_diffusers_spacing_and_flow_space_karras():
    sched = FlowSchedule(3.0)
    ours = flow_timestep(sched.sigmas_for("uniform", 10).double())
    t = torch.linspace(1.0, 0.001, 10, dtype=torch.float64)
    ref = 3 * t / (1 + 2 * t)
    assert torch.allclose(ours[1:-1], ref[1:], atol=1e-5, rtol=0) and ours[-1] == 0
    # Karras runs between the flow σ_min and 1 as in A1111 / Forge (not between s_min and s = 9999)
    karras = flow_timestep(sched.sigmas_for("karras", 10).double())
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    lo, hi = float(sched.flow.sigma_min) ** (1 / 7), 1.0
    ref = (hi + ramp * (lo - hi)) ** 7
    assert torch.allclose(karras[1:-1], ref[1:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="align_your_steps"):
        sched.sigmas_for("align_your_steps", 10)


def test_ve_conversion_round_trips():
    sigma = torch.tensor([0.0, 0.003, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    s = to_ve(sigma)
    assert s[0] == 0 and float(s[2]) == pytest.approx(1.0) and float(s[-1]) == pytest.approx(9999.0)
    assert torch.allclose(flow_timestep(s[:-1]), sigma[:-1], atol=1e-15, rtol=0)
    sched = FlowSchedule(3.0)
    t = torch.tensor([0.0, 10.5, 249.0, 998.0])
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    assert float(sched.t_to_sigma(torch.tensor(249.0))) == pytest.approx(1.0, rel=1e-5)  # shift 3: t = .25 -> σ = .5


# ---- the change of variables: Euler in s is FlowMatchEuler in σ --------------------------------------------
def _diffusers_euler(model_v, noise, flow_sigmas):
    """FlowMatchEulerDiscreteScheduler's loop; in float64 its step ``x + (σ_next - σ)·v`` written out, since the
    scheduler computes in float32."""
    if noise.dtype == torch.float64:
        x = noise
        for sigma, sigma_next in itertools.pairwise(flow_sigmas):
            x = x + (sigma_next - sigma) * model_v(x, sigma)
        return x
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)  # shift 1: the sigmas given are used as they are
    sched.set_timesteps(sigmas=flow_sigmas[:-1].tolist())
    x = noise
    for t in sched.timesteps:
        x = sched.step(model_v(x, t / 1000), t, x).prev_sample
    return x


def _euler_case(call, cond_kwargs, dtype, steps: int = 6):
    sched = FlowSchedule(3.0)
    sigmas = sched.sigmas_for("simple", steps).to(dtype)
    noise = _noise().to(dtype)
    kwargs = {"encoder_hidden_states": cond_kwargs["encoder_hidden_states"].to(dtype),
              "added_cond_kwargs": {"text_embeds": cond_kwargs["added_cond_kwargs"]["text_embeds"].to(dtype)}}
    ours = _euler(lambda x, s: flow_denoised(x, call(x * flow_c_in(s), flow_timestep(s).reshape(1), **kwargs).sample, s),
                  noise, sigmas)
    flow_sigmas = flow_timestep(sigmas.double())
    ref = _diffusers_euler(lambda x, t: call(x, t.reshape(1), **kwargs).sample, noise * flow_sigmas[0].to(dtype), flow_sigmas)
    return ours, ref


# float64: the change of variables is exact; float32: the first step from s0 = 9999 loses ~1e-4 (x ≈ s·ε cancels)
EULER_TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.no_grad()
def test_euler_equals_flow_match_euler_sd3(sd3_parts, dtype):
    transformer = copy.deepcopy(sd3_parts[-1]).to(dtype)
    torch.manual_seed(9)
    kwargs = {"encoder_hidden_states": torch.randn(1, 5, 48), "added_cond_kwargs": {"text_embeds": torch.randn(1, 32)}}
    ours, ref = _euler_case(SD3Call(transformer), kwargs, dtype)
    assert ours.dtype == ref.dtype == dtype
    assert (ours - ref).abs().max() < EULER_TOLERANCE[dtype], float((ours - ref).abs().max())
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.no_grad()
def test_euler_equals_flow_match_euler_flux(flux_parts, dtype):
    transformer = copy.deepcopy(flux_parts[-1]).to(dtype)
    torch.manual_seed(10)
    kwargs = {"encoder_hidden_states": torch.randn(1, 5, 48), "added_cond_kwargs": {"text_embeds": torch.randn(1, 16)}}
    ours, ref = _euler_case(FluxCall(transformer, guidance=3.5), kwargs, dtype)
    assert (ours - ref).abs().max() < EULER_TOLERANCE[dtype], float((ours - ref).abs().max())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' DPM scheduler internals
@torch.no_grad()
def test_dpmpp_2m_equals_diffusers_flow_dpm_solver(sd3_parts):
    """Beyond Euler: k-diffusion's DPM++ 2M in s is diffusers' DPM-Solver++ (2M) for flow models (α = 1 - σ):
    the change of variables gives the multistep samplers their flow forms too."""
    transformer = copy.deepcopy(sd3_parts[-1]).double()
    torch.manual_seed(9)
    kwargs = {"encoder_hidden_states": torch.randn(1, 5, 48).double(),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 32).double()}}
    call = SD3Call(transformer)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    sched.set_timesteps(8)
    flow_sigmas = sched.sigmas.double()  # its own spacing, 0.9997 .. 0
    noise = _noise().double()
    x = noise * flow_sigmas[0]
    for i, t in enumerate(sched.timesteps):
        x = sched.step(call(x, flow_sigmas[i].reshape(1), **kwargs).sample, t, x).prev_sample
    sigmas = to_ve(flow_sigmas)
    ours = SAMPLER_FUNCTIONS["dpmpp_2m"](
        lambda x, s: flow_denoised(x, call(x * flow_c_in(s), flow_timestep(s).reshape(1), **kwargs).sample, s),
        noise * sigmas[0], sigmas)
    assert (ours - x).abs().max() < 1e-5, float((ours - x).abs().max())  # the scheduler computes in float32


# ---- whole pipelines: our conditioning + schedule + denoiser + Euler = diffusers' pipeline ------------------
def _sd3_pipeline(parts):
    clip_l, clip_g, t5, transformer = parts
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=_vae(), text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g,
                                    tokenizer_2=clip_tokenizer("!"), text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_sd3_pipeline_gives_our_latents(sd3_parts):
    clip_l, clip_g, t5, transformer = sd3_parts
    conditioner = FlowConditioner(FlowTextEncoders("sd3", clip_l, clip_g, t5), torch.device("cpu"))
    prompt, cfg, steps = "a photo of a cat, oil painting", 4.5, 8
    cond, uncond = conditioner.encode(prompt), conditioner.encode("")
    sigmas = FlowSchedule(3.0).sigmas_for("uniform", steps)
    noise = _noise(1)
    ours = _euler(_flow_cfg_denoiser(SD3Call(transformer), cond, uncond, cfg), noise, sigmas)
    flow_sigmas = flow_timestep(sigmas.double()).float()
    pipe = _sd3_pipeline(sd3_parts)
    # diffusers treats the given latent as x_f at the first σ: give it ours, x·s0 / (1 + s0)
    ref = pipe(prompt, negative_prompt="", num_inference_steps=steps, sigmas=flow_sigmas[:-1].tolist(),
               guidance_scale=cfg, latents=noise * flow_sigmas[0], output_type="latent", height=LAT, width=LAT,
               max_sequence_length=77).images
    assert (ours - ref).abs().max() < 5e-4, float((ours - ref).abs().max())
    # σ0 = 1 exactly and the pure noise as diffusers starts by default: the clamp's whole effect
    default = pipe(prompt, negative_prompt="", num_inference_steps=steps, sigmas=[1.0] + flow_sigmas[1:-1].tolist(),
                   guidance_scale=cfg, latents=noise, output_type="latent", height=LAT, width=LAT,
                   max_sequence_length=77).images
    assert (ours - default).abs().max() < 2e-3, float((ours - default).abs().max())


@torch.no_grad()
def test_flux_pipeline_gives_our_latents(flux_parts):
    clip_l, t5, transformer = flux_parts
    conditioner = FlowConditioner(FlowTextEncoders("flux", clip_l, t5=t5, t5_tokens=512), torch.device("cpu"))
    prompt, steps, guidance = "a photo of a cat, oil painting", 8, 3.5
    cond = conditioner.encode(prompt)
    sched = FlowSchedule.flux(LAT * 8, LAT * 8)
    sigmas = sched.sigmas_for("simple", steps)
    noise = _noise(2)
    call = FluxCall(transformer, guidance=guidance)
    ours = _euler(_flow_cfg_denoiser(call, cond, cond, 1.0), noise, sigmas)  # CFG 1: distilled guidance only
    flow_sigmas = flow_timestep(sigmas.double()).float()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(),
                        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(prompt, num_inference_steps=steps, sigmas=flow_sigmas[:-1].tolist(), guidance_scale=guidance,
                  latents=pack_latents(noise * flow_sigmas[0]), output_type="latent", height=LAT, width=LAT,
                  max_sequence_length=512).images
    ref = unpack_latents(packed, LAT, LAT)
    assert (ours - ref).abs().max() < 5e-4, float((ours - ref).abs().max())


# ---- conditioning ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_sd3_conditioning_matches_diffusers_encode_prompt(sd3_parts):
    clip_l, clip_g, t5, _ = sd3_parts
    conditioner = FlowConditioner(FlowTextEncoders("sd3", clip_l, clip_g, t5), torch.device("cpu"))
    pipe = _sd3_pipeline(sd3_parts)
    for prompt in ["a photo of a cat", "", "masterpiece, a red fox in the snow at dawn"]:
        cond = conditioner.encode(prompt)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=77)
        assert cond.crossattn.shape == (1, 154, 48)
        assert torch.allclose(cond.crossattn, embeds, atol=1e-6, rtol=0)
        assert torch.allclose(cond.pooled, pooled, atol=1e-6, rtol=0)


@torch.no_grad()
def test_flux_conditioning_matches_diffusers_encode_prompt(flux_parts):
    clip_l, t5, transformer = flux_parts
    conditioner = FlowConditioner(FlowTextEncoders("flux", clip_l, t5=t5, t5_tokens=256), torch.device("cpu"))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    for prompt in ["a photo of a cat", "masterpiece, a red fox in the snow at dawn"]:
        cond = conditioner.encode(prompt)
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, max_sequence_length=256)
        assert cond.crossattn.shape == (1, 256, 48)
        assert torch.allclose(cond.crossattn, embeds, atol=1e-6, rtol=0)
        assert torch.allclose(cond.pooled, pooled, atol=1e-6, rtol=0)


@torch.no_grad()
def test_sd3_emphasis_chunks_and_missing_t5(sd3_parts):
    clip_l, clip_g, t5, _ = sd3_parts
    conditioner = FlowConditioner(FlowTextEncoders("sd3", clip_l, clip_g, t5), torch.device("cpu"))
    plain = conditioner.encode("cat")
    weighted = conditioner.encode("(cat:1.5)", emphasis="No norm")
    w = torch.ones(154)
    w[1] = 1.5  # CLIP part: BOS, cat...
    w[77] = 1.5  # T5 part: cat, </s>, <pad>...
    assert torch.allclose(weighted.crossattn, plain.crossattn * w[None, :, None], atol=1e-6, rtol=0)
    assert torch.equal(weighted.pooled, plain.pooled)  # weights do not touch the pooled vector
    original = conditioner.encode("(cat:1.5)")  # "Original": the mean of each part restored
    assert float(original.crossattn[:, :77].mean()) == pytest.approx(float(plain.crossattn[:, :77].mean()), rel=1e-5)
    # a second chunk (BREAK) doubles the CLIP part and the T5 part follows it: 2 x 77 + 2 x 77
    assert conditioner.encode("a cat BREAK a dog").crossattn.shape[1] == 308
    # without T5-XXL its part is zeros (A1111, SD3 reference) and the CLIP part is 4096 wide
    no_t5 = FlowConditioner(FlowTextEncoders("sd3", clip_l, clip_g), torch.device("cpu")).encode("cat")
    assert no_t5.crossattn.shape == (1, 154, 4096)
    assert torch.equal(no_t5.crossattn[:, 77:], torch.zeros(1, 77, 4096))
    assert torch.allclose(no_t5.crossattn[:, :77, :48], plain.crossattn[:, :77], atol=1e-6, rtol=0)


# ---- the Flux seam -----------------------------------------------------------------------------------------
def test_flux_packing_and_ids_are_diffusers():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_latents(torch.zeros(1, 16, 5, 6))


@torch.no_grad()
def test_flux_guidance_reaches_the_model_and_unet_extras_are_refused(flux_parts, sd3_parts):
    *_, transformer = flux_parts
    torch.manual_seed(11)
    x, t = torch.randn(1, 4, LAT, LAT), torch.tensor([0.5])
    kwargs = {"encoder_hidden_states": torch.randn(1, 5, 48), "added_cond_kwargs": {"text_embeds": torch.randn(1, 16)}}
    a = FluxCall(transformer, guidance=3.5)(x, t, **kwargs).sample
    b = FluxCall(transformer, guidance=1.0)(x, t, **kwargs).sample
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(TypeError, match="down_block_additional_residuals"):
        FluxCall(transformer)(x, t, down_block_additional_residuals=[x], **kwargs)
    with pytest.raises(TypeError, match="mid_block_additional_residual"):
        SD3Call(sd3_parts[-1])(x, t, mid_block_additional_residual=x, **kwargs)


@torch.no_grad()
def test_clip_l_pooled_is_unprojected_and_t5_truncation_keeps_eos(sd3_parts, flux_parts):
    clip_l, clip_g, t5, _ = sd3_parts
    projected_l = copy.deepcopy(clip_l)
    torch.manual_seed(12)
    projected_l.text_projection.weight.normal_()  # a file whose CLIP-L projection is not the identity
    cond = FlowConditioner(FlowTextEncoders("sd3", projected_l, clip_g, t5), torch.device("cpu")).encode("a cat")
    tokens = clip_tokenizer()("a cat", add_special_tokens=False).input_ids
    ids = torch.tensor([[49406, *tokens] + [49407] * (77 - 1 - len(tokens))])
    assert torch.allclose(cond.pooled[:, :16], projected_l.text_model(input_ids=ids).pooler_output, atol=1e-6, rtol=0)
    # a prompt longer than the T5 sequence: cut to length - 1 tokens and </s>, as diffusers' tokenizer call does
    clip_l, t5, transformer = flux_parts
    short = FlowConditioner(FlowTextEncoders("flux", clip_l, t5=t5, t5_tokens=8), torch.device("cpu"))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    prompt = "a red fox sitting in deep snow under a pale winter sky"
    embeds, _, _ = pipe.encode_prompt(prompt, prompt, max_sequence_length=8)
    assert torch.allclose(short.encode(prompt).crossattn, embeds, atol=1e-6, rtol=0)
