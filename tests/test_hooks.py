"""The per-step hooks of sampling (sdstudio.engine.hooks) on the tiny model: where each is called, with
which step, how several compose, and that hooks which change nothing change no pixel."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine.hooks import HookError, StepHook

BASE = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 6, "seed": 3, "sampler_name": "Euler",
        "cfg_scale": 5.0}


def px(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


class NoOp(StepHook):
    """Overrides every method and changes nothing."""

    def unet_inputs(self, call):
        return {}

    def combine(self, guidance):
        return None

    def after_cfg(self, guidance, denoised):
        return denoised

    def after_step(self, step, x):
        return x


class Recorder(StepHook):
    def __init__(self, start=0.0, end=1.0):
        self.start, self.end = start, end
        self.seen: list[tuple[str, int]] = []

    def unet_inputs(self, call):
        assert len(call.images) == len(call.uncond) == call.x.shape[0]
        self.seen.append(("unet", call.step.index))

    def after_cfg(self, guidance, denoised):
        self.seen.append(("cfg", guidance.step.index))
        return denoised

    def after_step(self, step, x):
        self.seen.append(("step", step.index))
        return x


def test_no_op_hooks_change_no_pixel(session_engine):
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    hooked = session_engine.generate(Txt2ImgRequest(**BASE), hooks=[NoOp(), NoOp(), NoOp()])
    assert np.array_equal(px(plain), px(hooked))


def test_windows_are_by_sampling_step_not_denoiser_call(session_engine):
    whole, late = Recorder(), Recorder(start=0.5)
    session_engine.generate(Txt2ImgRequest(**{**BASE, "sampler_name": "Heun"}), hooks=[whole, late])
    calls = [i for kind, i in whole.seen if kind == "cfg"]
    # Heun: two denoiser calls per step except the last (to sigma 0), both seeing the step's index
    assert calls == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert [i for kind, i in whole.seen if kind == "step"] == [0, 1, 2, 3, 4, 5]
    assert {i for _, i in late.seen} == {3, 4, 5}  # 3/6 = 0.5 <= fraction <= 1


def test_combine_replaces_guidance_and_after_cfg_follows_it(session_engine):
    class PlainCFG1(StepHook):
        def combine(self, guidance):
            return guidance.cfg(1.0)

    class Later(StepHook):
        def combine(self, guidance):
            raise AssertionError("the first hook's combine won")

    cfg1 = session_engine.generate(Txt2ImgRequest(**{**BASE, "cfg_scale": 1.0}))
    hooked = session_engine.generate(Txt2ImgRequest(**BASE), hooks=[PlainCFG1(), Later()])
    assert np.array_equal(px(cfg1), px(hooked))


def test_after_step_sets_the_latent_the_next_step_starts_from(session_engine):
    class Freeze(StepHook):  # after the first step, the latent no longer moves from what it was then
        def __init__(self):
            self.kept = None

        def after_step(self, step, x):
            if self.kept is None:
                self.kept = x.clone()
            return self.kept

    frozen = session_engine.generate(Txt2ImgRequest(**BASE), hooks=[Freeze()])
    plain = session_engine.generate(Txt2ImgRequest(**BASE))
    assert not np.array_equal(px(frozen), px(plain))


def test_unet_inputs_of_several_hooks_are_merged():
    """ControlNet-style residuals add up; any other input may come from one hook only."""
    from sdstudio.engine.hooks import SamplingPlan, Step, UNetCall

    class Residuals(StepHook):
        def __init__(self, scale, extra=None):
            self.scale, self.extra = scale, extra or {}

        def unet_inputs(self, call):
            return {"down_block_additional_residuals": [torch.full((1, 2), self.scale), torch.full((1, 3), self.scale)],
                    "mid_block_additional_residual": torch.full((1, 4), 2 * self.scale), **self.extra}

    def merged(*hooks):
        plan = SamplingPlan(None, None, "epsilon", [], [], 7.0, torch.float32, torch.device("cpu"), steps=4,
                            hooks=list(hooks))
        call = UNetCall(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 8), [0], [False],
                        Step(0, 4, torch.ones(1)))
        return plan.unet_inputs(call)

    out = merged(Residuals(0.5), Residuals(0.25, {"cross_attention_kwargs": {"scale": 1.0}}))
    assert [float(t[0, 0]) for t in out["down_block_additional_residuals"]] == [0.75, 0.75]
    assert float(out["mid_block_additional_residual"][0, 0]) == 1.5
    assert out["cross_attention_kwargs"] == {"scale": 1.0}
    with pytest.raises(HookError, match="already given"):
        merged(Residuals(1, {"cross_attention_kwargs": {}}), Residuals(1, {"cross_attention_kwargs": {}}))


def test_applied_is_entered_around_the_pass_and_left_on_errors(session_engine):
    events = []

    class Around(StepHook):
        owner = "Around (test)"

        def applied(self, unet):
            @contextlib.contextmanager
            def ctx():
                events.append("enter")
                try:
                    yield
                finally:
                    events.append("exit")
            return ctx()

    class Broken(StepHook):
        owner = "Broken (a plug-in)"

        def after_cfg(self, guidance, denoised):
            raise ValueError("nope")

    session_engine.generate(Txt2ImgRequest(**BASE), hooks=[Around()])
    assert events == ["enter", "exit"]
    with pytest.raises(HookError, match=r"Broken \(a plug-in\): ValueError: nope") as caught:
        session_engine.generate(Txt2ImgRequest(**BASE), hooks=[Around(), Broken()])
    assert caught.value.owner == "Broken (a plug-in)" and events[-1] == "exit"
