"""A1111's speed options on the tiny model: Negative Guidance minimum sigma (NGMS), padding prompt and
negative prompt to one length, token merging (ToMe); their settings, infotext keys and paste."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from sdstudio.core.params import (
    Img2ImgRequest,
    Txt2ImgRequest,
    from_infotext,
    option_fields,
    token_merging_ratio,
)
from sdstudio.core.settings import Settings
from sdstudio.engine.conditioning import Conditioning, TextConditioner
from sdstudio.engine.denoiser import (
    CFGDenoiser,
    ComposedConditioning,
    ScheduledConditioning,
    SpeedOptions,
    pad_cond_uncond,
    pad_cond_uncond_v0,
)
from sdstudio.engine.hooks import SamplingPlan, StepHook
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.engine.tome import (
    TokenMerging,
    bipartite_soft_matching_2d,
    destination_choice,
    transformer_blocks,
)
from sdstudio.testing.synthetic import tiny_unet

CPU = torch.device("cpu")
BASE = {"prompt": "a red circle", "negative_prompt": "blue", "width": 64, "height": 64, "steps": 8, "seed": 3,
        "sampler_name": "Euler", "cfg_scale": 5.0}
LONG_NEGATIVE = "blue, " * 45  # 90 tokens: two chunks (154 vectors) against the prompt's one (77)


def px(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def params(result) -> dict[str, str]:
    from sdstudio.core import infotext

    return infotext.parse(result.images[0].infotext)


class UNetCalls(StepHook):
    """Records every UNet call: the sampler's sigma, which rows are the negative prompt's, the text's shape."""

    def __init__(self):
        self.calls: list[tuple[float, list[bool], tuple]] = []

    def unet_inputs(self, call):
        self.calls.append((float(call.step.sigma[0]), list(call.uncond), tuple(call.encoder_hidden_states.shape)))
        self.hidden = call.encoder_hidden_states


# ---- Negative Guidance minimum sigma ----------------------------------------------------------------------
def _expected_uncond(sigmas: list[float], s_min: float, all_steps: bool) -> list[bool]:
    """A1111's rule, call by call: the negative pass is skipped at odd calls (or all) below s_min."""
    return [not ((k % 2 == 1 or all_steps) and s < s_min) for k, s in enumerate(sigmas)]


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
@pytest.mark.parametrize("all_steps", [False, True])
def test_ngms_skips_the_negative_pass_at_the_calls_a1111_skips_it(session_engine, sampler, all_steps):
    plain = UNetCalls()
    session_engine.generate(Txt2ImgRequest(**{**BASE, "sampler_name": sampler}), hooks=[plain])
    sigmas = [s for s, _, _ in plain.calls]
    assert all(rows == [False, True] for _, rows, _ in plain.calls)  # one UNet call per denoiser call
    s_min = (sorted(sigmas)[len(sigmas) // 2] + sorted(sigmas)[len(sigmas) // 2 + 1]) / 2  # half the calls below
    seen = UNetCalls()
    result = session_engine.generate(Txt2ImgRequest(**{**BASE, "sampler_name": sampler, "s_min_uncond": s_min,
                                                       "s_min_uncond_all": all_steps}), hooks=[seen])
    assert [s for s, _, _ in seen.calls] == sigmas
    has_uncond = [True in rows for _, rows, _ in seen.calls]
    assert has_uncond == _expected_uncond(sigmas, s_min, all_steps)
    assert 0 < has_uncond.count(False) < len(sigmas)
    text = params(result)
    assert float(text["NGMS"]) == pytest.approx(s_min)
    assert text.get("NGMS all steps") == ("True" if all_steps else None)
    pasted = from_infotext(result.images[0].infotext)
    assert pasted.s_min_uncond == pytest.approx(s_min) and pasted.s_min_uncond_all is all_steps


def test_ngms_above_every_sigma_changes_nothing_and_writes_only_ngms(session_engine):
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    low = session_engine.generate(Txt2ImgRequest(**{**BASE, "s_min_uncond": 0.001, "s_min_uncond_all": True}))
    assert np.array_equal(px(plain), px(low))
    assert params(low)["NGMS"] == "0.001" and "NGMS all steps" not in params(low)  # A1111: no skip, no key
    assert "NGMS" not in params(plain)


def _plan(unet, cond, uncond, cfg=5.0):
    return SamplingPlan(unet, DiscreteSchedule(), "epsilon", [cond], [uncond], cfg, torch.float32, CPU, steps=10)


def _x(seed=11):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * 3.0


def _direct(unet, x, sigma, crossattn):
    """The epsilon model's denoised prediction from a plain UNet call."""
    t = DiscreteSchedule().sigma_to_t(torch.tensor([sigma]))
    with torch.no_grad():
        eps = unet(x / (sigma ** 2 + 1) ** 0.5, t, encoder_hidden_states=crossattn).sample
    return x - eps * sigma


def test_a_skipped_call_is_the_first_parts_prediction_guided_at_scale_one():
    unet = tiny_unet("sd1", seed=2)
    g = torch.Generator().manual_seed(4)
    c1, c2, u = (Conditioning(torch.randn(1, 77, 64, generator=g)) for _ in range(3))
    cond = ComposedConditioning([(ScheduledConditioning([(99, c1)]), 1.0), (ScheduledConditioning([(99, c2)]), 0.5)])
    uncond = ScheduledConditioning([(99, u)])
    x, sigma = _x(), 3.0
    d1, d2, du = (_direct(unet, x, sigma, c.crossattn) for c in (c1, c2, u))
    ngms = CFGDenoiser(_plan(unet, cond, uncond), SpeedOptions(s_min_uncond=100.0))
    with torch.no_grad():
        first = ngms(x, torch.tensor([sigma]))  # call 0: even, not skipped
        second = ngms(x, torch.tensor([sigma]))  # call 1: odd, skipped
    cfg = du + (d1 - du) * 5.0 + (d2 - du) * 0.5 * 5.0
    assert torch.allclose(first, cfg, atol=1e-4)
    stand_in = d1 + (d2 - d1) * 0.5  # uncond := part 1, scale 1: d1 + 1·(d1 - d1) + 0.5·(d2 - d1)
    assert torch.allclose(second, stand_in, atol=1e-4)
    assert torch.allclose(ngms.uncond_denoised, d1, atol=1e-4)  # what CFG++ samplers read as the negative


# ---- pad prompt / negative prompt ----------------------------------------------------------------------
def _empty(engine, model_name="tiny-sd1"):
    _, model = engine.load(model_name)
    return TextConditioner(model, CPU).encode("")


def test_without_padding_different_lengths_run_as_two_unet_calls(session_engine):
    seen = UNetCalls()
    result = session_engine.generate(Txt2ImgRequest(**{**BASE, "negative_prompt": LONG_NEGATIVE}), hooks=[seen])
    assert [(rows, shape[1]) for _, rows, shape in seen.calls[:2]] == [([False], 77), ([True], 154)]
    assert len(seen.calls) == 2 * BASE["steps"]
    assert "Pad conds" not in params(result)


def test_pad_conds_pads_the_shorter_side_with_empty_prompt_chunks(session_engine):
    seen = UNetCalls()
    req = Txt2ImgRequest(**{**BASE, "negative_prompt": LONG_NEGATIVE, "pad_cond_uncond": True})
    result = session_engine.generate(req, hooks=[seen])
    assert len(seen.calls) == BASE["steps"]  # one batch per step
    assert all(rows == [False, True] and shape[:2] == (2, 154) for _, rows, shape in seen.calls)
    _, model = session_engine.load("tiny-sd1")
    conditioner = TextConditioner(model, CPU)
    prompt, empty = conditioner.encode(BASE["prompt"]), conditioner.encode("")
    assert torch.equal(seen.hidden[0, :77], prompt.crossattn[0]) and torch.equal(seen.hidden[0, 77:], empty.crossattn[0])
    assert torch.equal(seen.hidden[1], conditioner.encode(LONG_NEGATIVE).crossattn[0])
    assert params(result)["Pad conds"] == "True"
    assert from_infotext(result.images[0].infotext).pad_cond_uncond is True


def test_pad_conds_v0_repeats_or_cuts_the_negative_prompt(session_engine):
    _, model = session_engine.load("tiny-sd1")
    conditioner = TextConditioner(model, CPU)
    long_neg = conditioner.encode(LONG_NEGATIVE).crossattn[0]
    seen = UNetCalls()
    cut = session_engine.generate(Txt2ImgRequest(**{**BASE, "negative_prompt": LONG_NEGATIVE,
                                                    "pad_cond_uncond_v0": True, "pad_cond_uncond": True}), hooks=[seen])
    assert all(shape[:2] == (2, 77) for _, _, shape in seen.calls)
    assert torch.equal(seen.hidden[1], long_neg[:77])  # cut to the prompt's length
    assert params(cut)["Pad conds v0"] == "True" and "Pad conds" not in params(cut)  # v0 wins, as in A1111
    seen = UNetCalls()
    session_engine.generate(Txt2ImgRequest(**{**BASE, "prompt": LONG_NEGATIVE, "pad_cond_uncond_v0": True}),
                            hooks=[seen])
    neg = conditioner.encode(BASE["negative_prompt"]).crossattn[0]
    assert all(shape[:2] == (2, 154) for _, _, shape in seen.calls)
    assert torch.equal(seen.hidden[1, :77], neg) and torch.equal(seen.hidden[1, 77:], neg[-1:].expand(77, -1))


def test_padding_changes_nothing_when_the_lengths_match(session_engine):
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    for option in ("pad_cond_uncond", "pad_cond_uncond_v0"):
        padded = session_engine.generate(Txt2ImgRequest(**{**BASE, option: True}))
        assert np.array_equal(px(plain), px(padded))
        assert "Pad conds" not in params(padded) and "Pad conds v0" not in params(padded)


def test_padded_guidance_equals_cfg_over_the_padded_unet_calls():
    unet = tiny_unet("sd1", seed=2)
    g = torch.Generator().manual_seed(5)
    c, u, empty = Conditioning(torch.randn(1, 77, 64, generator=g)), Conditioning(torch.randn(1, 154, 64, generator=g)), \
        Conditioning(torch.randn(1, 77, 64, generator=g))
    plan = _plan(unet, ComposedConditioning([(ScheduledConditioning([(99, c)]), 1.0)]), ScheduledConditioning([(99, u)]))
    x, sigma = _x(), 2.0
    with torch.no_grad():
        out = CFGDenoiser(plan, SpeedOptions(pad_cond_uncond=True, empty=empty))(x, torch.tensor([sigma]))
    dc = _direct(unet, x, sigma, torch.cat([c.crossattn, empty.crossattn], dim=1))
    du = _direct(unet, x, sigma, u.crossattn)
    assert torch.allclose(out, du + (dc - du) * 5.0, atol=1e-4)


def test_padding_the_empty_negative_prompt_with_itself_changes_nothing():
    """The common case: a long prompt and an empty negative prompt. The negative side gets a second copy of
    the empty prompt's chunk; attending over keys that are all there twice gives the same result, so the one
    padded batch matches the two separate calls (to float rounding)."""
    unet = tiny_unet("sd1", seed=2)
    g = torch.Generator().manual_seed(14)
    c, empty = Conditioning(torch.randn(1, 154, 64, generator=g)), Conditioning(torch.randn(1, 77, 64, generator=g))

    def denoised(options):
        plan = _plan(unet, ComposedConditioning([(ScheduledConditioning([(99, c)]), 1.0)]),
                     ScheduledConditioning([(99, empty)]))
        calls = UNetCalls()
        plan = SamplingPlan(plan.unet, plan.schedule, "epsilon", plan.cond, plan.uncond, 5.0, torch.float32, CPU,
                            steps=10, hooks=[calls])
        with torch.no_grad():
            return CFGDenoiser(plan, options)(_x(), torch.tensor([2.0])), len(calls.calls)

    (unpadded, two), (padded, one) = denoised(None), denoised(SpeedOptions(pad_cond_uncond=True, empty=empty))
    assert (two, one) == (2, 1)
    other = Conditioning(torch.randn(1, 77, 64, generator=g))  # a filler that is not the negative prompt itself
    changed, _ = denoised(SpeedOptions(pad_cond_uncond=True, empty=other))
    assert float((padded - unpadded).abs().max()) < 1e-4  # measured 2e-5 (float rounding, times CFG 5)
    assert float((changed - unpadded).abs().max()) > 1e-2  # measured 0.3


def test_pad_functions_follow_a1111():
    g = torch.Generator().manual_seed(6)
    a, b, e = (Conditioning(torch.randn(1, n, 8, generator=g)) for n in (77, 231, 77))
    conds, unconds, did = pad_cond_uncond([a], [b], e)
    assert did and conds[0].crossattn.shape[1] == 231 and unconds[0] is b
    assert torch.equal(conds[0].crossattn[:, 77:154], e.crossattn) and torch.equal(conds[0].crossattn[:, 154:], e.crossattn)
    conds, unconds, did = pad_cond_uncond([b], [a], e)
    assert did and conds[0] is b and unconds[0].crossattn.shape[1] == 231
    _, unconds, did = pad_cond_uncond_v0([a], [b])
    assert did and torch.equal(unconds[0].crossattn, b.crossattn[:, :77])
    assert pad_cond_uncond([a], [a], e)[2] is False and pad_cond_uncond_v0([a], [a])[2] is False


# ---- token merging ----------------------------------------------------------------------------------------
def test_merge_then_unmerge_of_identical_tokens_gives_them_back():
    """Each 2×2 cell holds one token four times (dyadic values: the means are exact): every source merges
    into its own cell's destination and unmerging restores the grid exactly."""
    g = torch.Generator().manual_seed(7)
    h = w = 8
    cells = torch.randint(-8, 8, (2, h // 2, w // 2, 16), generator=g).float() / 4
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, h * w, 16)
    r = h * w * 3 // 4
    merge, unmerge = bipartite_soft_matching_2d(x, w, h, 2, 2, r)
    merged = merge(x)
    assert merged.shape == (2, h * w - r, 16)
    assert torch.equal(unmerge(merged), x)
    merge, unmerge = bipartite_soft_matching_2d(x, w, h, 2, 2, 0)  # r = 0: nothing merged
    assert torch.equal(merge(x), x) and torch.equal(unmerge(x), x)


def test_unmerge_keeps_unmerged_tokens_and_spreads_the_means():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 36, 4, generator=g)
    merge, unmerge = bipartite_soft_matching_2d(x, 6, 6, 2, 2, 10)
    back = unmerge(merge(x))
    changed = (back != x).any(dim=-1)[0]
    # 10 of the 27 sources merged into some of the 9 destinations: those change, nothing else
    assert 11 <= int(changed.sum()) <= 19
    assert torch.equal(back[0, ~changed], x[0, ~changed])


class Recording:
    """An attention processor that records how many tokens it attends over, then attends (SDPA)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        self.tokens.append(hidden_states.shape[1])
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def _unet_call(unet, rows=2, size=16, seed=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, size, size, generator=g)
    hidden = torch.randn(rows, 77, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.full((rows,), 500.0), encoder_hidden_states=hidden).sample


@pytest.mark.parametrize(("ratio", "attended"), [(0.3, 256 - 76), (0.5, 128), (0.9, 64)])
def test_ratio_reduces_the_self_attention_tokens_of_full_resolution_blocks(ratio, attended):
    unet = tiny_unet("sd1", seed=1)
    blocks = transformer_blocks(unet)
    selfs, crosses = {b: Recording() for b in blocks}, {b: Recording() for b in blocks}
    for b in blocks:
        b.attn1.set_processor(selfs[b])
        b.attn2.set_processor(crosses[b])
    hook = TokenMerging(ratio)
    with hook.applied(unet):
        _unet_call(unet)
    full = [b for b in blocks if crosses[b].tokens == [256]]  # the cross-attention sees the block's own grid
    assert len(full) >= 2  # the first down level's and the last up level's blocks
    # int(256 · ratio) merged, at most the 192 sources of a 16×16 grid in 2×2 cells
    assert all(selfs[b].tokens == [attended] for b in full)
    assert all(selfs[b].tokens == crosses[b].tokens for b in blocks if b not in full)  # lower levels: untouched
    assert hook.merged_tokens == [(256, attended)] * len(full)
    assert all(b.attn1.processor is selfs[b] for b in blocks)  # put back after the pass


def test_a_pass_that_merges_nothing_is_bit_identical():
    unet = tiny_unet("sd1", seed=1)
    plain = _unet_call(unet)
    for hook in (TokenMerging(0.0), TokenMerging(0.5, max_downsample=0)):  # installed, merging no block
        with hook.applied(unet):
            assert torch.equal(_unet_call(unet), plain)
    with TokenMerging(0.5).applied(unet):
        assert not torch.allclose(_unet_call(unet), plain, atol=1e-4)
    assert torch.equal(_unet_call(unet), plain)


def test_sdxl_has_no_full_resolution_attention_so_nothing_merges():
    unet = tiny_unet("sdxl", seed=1)
    g = torch.Generator().manual_seed(3)
    x, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 192, generator=g)
    added = {"text_embeds": torch.randn(2, 128, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    with torch.no_grad():
        plain = unet(x, torch.full((2,), 500.0), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        hook = TokenMerging(0.5)
        with hook.applied(unet):
            merged = unet(x, torch.full((2,), 500.0), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert hook.merged_tokens == [] and torch.equal(plain, merged)


def test_random_destinations_come_from_each_images_seed():
    unet = tiny_unet("sd1", seed=1)
    g = torch.Generator().manual_seed(12)
    x, hidden = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 64, generator=g)
    t = torch.full((4,), 500.0)

    def run(rows, seeds, use_rand=True):
        from sdstudio.engine.hooks import Step, UNetCall

        hook = TokenMerging(0.5, use_rand=use_rand, seeds=seeds)
        images = [i // 2 for i in range(len(rows))]  # rows: (prompt, negative) of image 0, then of image 1
        with hook.applied(unet), torch.no_grad():
            hook.unet_inputs(UNetCall(x[rows], t[rows], hidden[rows], images, [i % 2 == 1 for i in range(len(rows))],
                                      Step(0, 1, torch.ones(1))))
            return unet(x[rows], t[rows], encoder_hidden_states=hidden[rows]).sample

    batch = run([0, 1, 2, 3], [21, 22])
    assert torch.equal(batch, run([0, 1, 2, 3], [21, 22]))  # the same seeds: the same choices
    alone = run([2, 3], [22])  # image 1 on its own, with its seed
    assert torch.allclose(batch[2:], alone, atol=1e-5)
    assert not torch.allclose(run([2, 3], [23]), alone, atol=1e-4)  # another seed, other destinations
    assert not torch.allclose(run([2, 3], [22], use_rand=False), alone, atol=1e-4)
    # tomesd's rule: an image with an odd number of rows in the call (its negative prompt skipped) draws nothing
    assert torch.equal(run([2], [22]), run([2], [22], use_rand=False))
    choice = destination_choice(2, 16, 16, 2, 2, [torch.Generator().manual_seed(1), None])
    assert choice.shape == (2, 8, 8) and choice[1].eq(0).all() and choice[0].max() <= 3


def test_token_merging_in_a_job(session_engine):
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    zero = session_engine.generate(Txt2ImgRequest(**{**BASE, "token_merging_ratio": 0.0}))
    assert np.array_equal(px(plain), px(zero)) and "Token merging ratio" not in params(zero)
    req = Txt2ImgRequest(**{**BASE, "token_merging_ratio": 0.5})
    one, two = session_engine.generate(req), session_engine.generate(req)
    assert np.array_equal(px(one), px(two))
    assert not np.array_equal(px(one), px(plain))
    assert params(one)["Token merging ratio"] == "0.5" and "Token merging ratio hr" not in params(one)
    pasted = from_infotext(one.images[0].infotext)
    assert np.array_equal(px(session_engine.generate(pasted)), px(one))


def test_token_merging_ratios_follow_a1111():
    req = Txt2ImgRequest(token_merging_ratio=0.3)
    assert token_merging_ratio(req) == 0.3 and token_merging_ratio(req, hires=True) == 0.3
    assert token_merging_ratio(req.replace(token_merging_ratio_hr=0.6), hires=True) == 0.6
    img = Img2ImgRequest(token_merging_ratio=0.3, token_merging_ratio_img2img=0.5)
    assert token_merging_ratio(img) == 0.5 and token_merging_ratio(img.replace(token_merging_ratio_img2img=0.0)) == 0.3
    from sdstudio.core.params import to_infotext_params

    hires = Txt2ImgRequest(token_merging_ratio=0.3, enable_hr=True)
    text = to_infotext_params(hires)
    assert text["Token merging ratio"] == "0.3" and text["Token merging ratio hr"] == "0.3"  # A1111: the hr ratio in use
    assert to_infotext_params(img)["Token merging ratio"] == "0.5"
    back = from_infotext({"Prompt": "x", "Steps": "20", "Token merging ratio": "0.5", "Token merging ratio hr": "0.7",
                          "Sampler": "Euler"}, Img2ImgRequest(token_merging_ratio_img2img=0.2))
    assert token_merging_ratio(back) == 0.5 and token_merging_ratio(back, hires=True) == 0.7


def test_options_come_from_settings_and_override_settings():
    settings = Settings()
    assert all(settings[k] in (0.0, False) for k in ("s_min_uncond", "s_min_uncond_all", "pad_cond_uncond",
                                                      "pad_cond_uncond_v0", "token_merging_ratio",
                                                      "token_merging_ratio_hr", "token_merging_ratio_img2img"))
    fields = option_fields({**settings.values, "s_min_uncond": "1.5", "token_merging_ratio": 0.5,
                            "pad_cond_uncond": "true"})
    req = Txt2ImgRequest(**fields)
    assert (req.s_min_uncond, req.token_merging_ratio, req.pad_cond_uncond) == (1.5, 0.5, True)
    from sdstudio.api.a1111 import Txt2ImgBody, to_request

    body = Txt2ImgBody(prompt="x", override_settings={"s_min_uncond_all": True, "token_merging_ratio_hr": 0.4})
    api = to_request(body, settings.values)
    assert api.s_min_uncond_all is True and api.token_merging_ratio_hr == 0.4


@pytest.mark.parametrize(("field", "value"), [("token_merging_ratio", 1.0), ("token_merging_ratio_hr", -0.1),
                                              ("s_min_uncond", -1.0)])
def test_bad_values_are_refused_by_name(field, value):
    from sdstudio.core.errors import RequestError

    with pytest.raises(RequestError, match=field):
        Txt2ImgRequest(**{field: value}).validate()


# ---- DeepCache (ours) -------------------------------------------------------------------------------------
def _count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    seen: list[int] = []
    return seen, module.register_forward_hook(lambda *_: seen.append(1))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_shallow_call_on_its_own_kept_features_is_the_full_call(family):
    from sdstudio.engine.deepcache import DeepCache

    unet = tiny_unet(family, seed=1)
    g = torch.Generator().manual_seed(13)
    width = 64 if family == "sd1" else 192
    x, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, width, generator=g)
    t = torch.full((2,), 400.0)
    extra = {} if family == "sd1" else {"added_cond_kwargs": {
        "text_embeds": torch.randn(2, 128, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}}
    cache = DeepCache(2)
    mid, handle = _count_calls(unet.mid_block)
    with torch.no_grad():
        full = cache(unet, 0, 1, x, t, hidden, **extra).sample
        shallow = cache(unet, 1, 1, x, t, hidden, **extra).sample  # odd call: the outer level on the kept features
        other_slot = cache(unet, 1, 2, x, t, hidden, **extra).sample  # nothing kept for that place: full
    handle.remove()
    assert torch.equal(shallow, full) and torch.equal(other_slot, full)
    assert (cache.full_calls, cache.shallow_calls, len(mid)) == (2, 1, 2)  # the shallow call skipped the middle


def test_deepcache_in_a_job(session_engine):
    _, model = session_engine.load("tiny-sd1")
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    req = Txt2ImgRequest(**{**BASE, "deepcache_interval": 3})
    mid, handle = _count_calls(model.unet.mid_block)
    calls = UNetCalls()
    try:
        first = session_engine.generate(req, hooks=[calls])
    finally:
        handle.remove()
    assert len(calls.calls) == BASE["steps"] and len(mid) == 3  # the whole UNet at calls 0, 3 and 6 of 8
    again = session_engine.generate(req)
    assert np.array_equal(px(first), px(again)) and not np.array_equal(px(first), px(plain))
    assert params(first)["DeepCache interval"] == "3" and "DeepCache interval" not in params(plain)
    assert np.array_equal(px(session_engine.generate(from_infotext(first.images[0].infotext))), px(first))


def test_each_pass_gets_its_own_ratio_and_options(session_engine):
    from sdstudio.engine.speed import SpeedJob

    _, model = session_engine.load("tiny-sd1")
    req = Txt2ImgRequest(token_merging_ratio=0.3, token_merging_ratio_hr=0.6, s_min_uncond=2.0, deepcache_interval=2,
                         enable_hr=True)
    job = SpeedJob.prepare(req, [model], CPU, session_engine.placement)
    (first,), options = job.for_pass("first", model, seeds=[5])
    (hires,), _ = job.for_pass("hires", model, seeds=[5])
    assert (first.ratio, hires.ratio) == (0.3, 0.6)
    assert (options.s_min_uncond, options.deepcache_interval, options.empty) == (2.0, 2, None)
    assert job.for_pass("first", model)[0][0].generators == []  # no seeds given: no generators to draw from
    padded = SpeedJob.prepare(req.replace(pad_cond_uncond=True), [model], CPU, session_engine.placement)
    assert torch.equal(padded.for_pass("first", model)[1].empty.crossattn, _empty(session_engine).crossattn)


def test_a1111s_top_level_s_min_uncond_beats_the_setting():
    from sdstudio.api.a1111 import Txt2ImgBody, to_request

    assert to_request(Txt2ImgBody(prompt="x", s_min_uncond=0.7), {}).s_min_uncond == 0.7
    assert to_request(Txt2ImgBody(prompt="x", s_min_uncond=0.7), {"s_min_uncond": 0.2}).s_min_uncond == 0.7
    assert to_request(Txt2ImgBody(prompt="x"), {"s_min_uncond": 0.2}).s_min_uncond == 0.2
    assert to_request(Txt2ImgBody(prompt="x"), {}).s_min_uncond == 0
