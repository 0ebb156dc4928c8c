"""Deforum settings files, prompts by frame, seeds, batch names and file settings, against the extension's
behaviour (hand-computed values; the extension's seed stepping re-enacted step by step)."""

import json
import re
import time

import pytest

from sdstudio.core.deforum import (
    DEFORUM_DEFAULTS,
    DEFORUM_OPTIONS,
    DeforumSettingsError,
    check_files,
    expand_backticks,
    fixed_seed,
    format_batch_name,
    frame_filename,
    guided_images,
    load_settings,
    local_path,
    make_timestring,
    next_seed,
    prompts_by_frame,
    run_timestring,
    seeds_by_frame,
    settings_filename,
)

MIRROR = "/work/.mirror/deforum-art+sd-webui-deforum/repo"


def test_defaults_are_the_extensions():
    d = DEFORUM_DEFAULTS
    assert (d["max_frames"], d["diffusion_cadence"], d["fps"], d["color_coherence"], d["border"]) == \
        (120, 2, 15, "LAB", "replicate")
    assert d["animation_mode"] == "2D" and d["zoom"] == "0: (1.0025+0.002*sin(1.25*3.14*t/30))"
    assert d["angle"] == "0: (0)" and d["translation_z"] == "0: (1.75)" and d["strength_schedule"] == "0: (0.65)"
    assert d["noise_type"] == "perlin" and (d["perlin_octaves"], d["perlin_persistence"]) == (4, 0.5)
    assert d["seed_behavior"] == "iter" and d["seed_iter_N"] == 1 and d["seed"] == -1
    assert d["batch_name"] == "Deforum_{timestring}" and d["optical_flow_cadence"] == "None"
    assert d["seed_schedule"] == '0:(s), 1:(-1), "max_f-2":(-1), "max_f-1":(s)'
    assert d["cn_1_weight"] == "0:(1)" and d["cn_5_resize_mode"] == "Inner Fit (Scale to Fit)"
    assert (d["W"], d["H"], d["sampler"], d["steps"]) == (512, 512, "Euler a", 25)
    assert d["negative_prompts"] == "nsfw, nude" and d["positive_prompts"] == ""
    assert DEFORUM_OPTIONS["deforum_ffmpeg_crf"] == 17 and DEFORUM_OPTIONS["deforum_ffmpeg_preset"] == "slow"


def test_defaults_load_clean():
    s = load_settings({**DEFORUM_DEFAULTS})
    assert s.unknown == {} and s.notes == []
    assert s.values == {**DEFORUM_DEFAULTS}
    assert s.max_frames == 120 and s["zoom"] == DEFORUM_DEFAULTS["zoom"]


def test_missing_keys_take_defaults_and_unknown_are_kept():
    s = load_settings('{"max_frames": 24, "zoom": "0:(1.01)", "my_tool_key": [1, 2], "sd_model_name": "x"}')
    assert s.max_frames == 24 and s.zoom == "0:(1.01)" and s.fps == 15
    assert s.unknown == {"my_tool_key": [1, 2]}
    assert any("my_tool_key" in n for n in s.notes)
    assert s["sd_model_name"] == "x"  # the extension's own metadata is known
    again = load_settings(s.to_json())
    assert again.values == s.values and again.unknown == s.unknown
    assert json.loads(s.to_json())["my_tool_key"] == [1, 2]


def test_legacy_colormatch_as_the_extension_reads_files():
    assert load_settings({}).legacy_colormatch is True
    assert any("legacy_colormatch" in n for n in load_settings({}).notes)
    assert load_settings({"legacy_colormatch": False}).legacy_colormatch is False
    assert load_settings({}, legacy_colormatch_default=False).legacy_colormatch is False


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_frames": "abc"}, "max_frames: expected a whole number"),
    ({"max_frames": 0}, "max_frames: must be at least 1"),
    ({"diffusion_cadence": 0}, "diffusion_cadence: must be at least 1"),
    ({"diffusion_cadence": 2.5}, "diffusion_cadence: expected a whole number"),
    ({"border": "mirror"}, "border: expected one of 'replicate', 'wrap'"),
    ({"zoom": "10:(1)"}, "schedule 'zoom' has no key at frame 0"),
    ({"angle": "0:(1+foo)"}, "schedule 'angle', key 0, column 6: unknown name 'foo'"),
    ({"cn_2_weight": "0:(bar)"}, "schedule 'cn_2_weight'"),
    ({"sampler_schedule": "5: (\"Euler\")"}, "schedule 'sampler_schedule' has no key at frame 0"),
    ({"use_init": "maybe"}, "use_init: expected true or false"),
    ({"strength": [1]}, "strength: expected a number"),
    ({"fps": float("nan")}, "fps: expected a finite number"),
    ({"prompts": "not json"}, "prompts: not valid JSON"),
    ({"prompts": ["a"]}, "prompts: expected a JSON object"),
    ({"prompts": {"0": 5}}, "prompts, key 0: the prompt must be text"),
    ({"prompts": {"0": "a", "bad key": "b"}}, "prompts, key bad key"),
    ({"prompts": {"0": "a `t*foo` b"}}, "prompts, key 0, column 6: `t*foo`: unknown name 'foo'"),
    ({"prompts": {}}, "prompts: no prompt"),
    ({"sampler": 3}, "sampler: expected a sampler name"),
    ({"fill": 9}, "fill: expected 0..3"),
    ({"batch_name": 5}, "batch_name: expected text"),
])
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(DeforumSettingsError) as err:
        load_settings(changes)
    assert message in str(err.value)


def test_not_json():
    with pytest.raises(DeforumSettingsError, match="settings: not valid JSON"):
        load_settings("{nope")
    with pytest.raises(DeforumSettingsError, match="expected a JSON object"):
        load_settings("[1, 2]")


def test_old_names_and_values():
    s = load_settings({"flip_2d_perspective": True, "skip_video_for_run_all": True, "histogram_matching": True,
                       "color_coherence": "Match Frame 0 LAB", "optical_flow_cadence": False,
                       "hybrid_composite": True, "add_soundtrack": True, "cn_1_weight": 0.8,
                       "cn_2_resize_mode": "Envelope (Outer Fit)", "use_zoe_depth": True, "fill": 1,
                       "animation_prompts": {"0": "x"}, "animation_prompts_negative": "bad"})
    assert s.enable_perspective_flip is True and s.skip_video_creation is True
    assert "histogram_matching" not in s.values and "histogram_matching" not in s.unknown
    assert (s.color_coherence, s.optical_flow_cadence, s.hybrid_composite, s.add_soundtrack) == \
        ("LAB", "None", "Normal", "File")
    assert s.cn_1_weight == "0:(0.8)" and s.cn_2_resize_mode == "Outer Fit (Shrink to Fit)"
    assert s.depth_algorithm == "Zoe+AdaBins (old)" and s.fill == "original"
    assert s.prompts == {"0": "x"} and s.negative_prompts == "bad"
    assert len(s.notes) >= 9


def test_typed_from_strings_and_normalised():
    s = load_settings({}).updated({"max_frames": "24", "use_init": "true", "strength": "0.5", "W": 515,
                                   "animation_mode": "video input", "seed": "7", "strength_schedule": 0.4,
                                   "diffusion_redo": 1, "resume_timestring": 20240101120000})
    assert (s.max_frames, s.use_init, s.strength, s.W, s.animation_mode, s.seed) == \
        (24, True, 0.5, 512, "Video Input", 7)
    assert s.strength_schedule == "0:(0.4)" and s.diffusion_redo == "1" and s.resume_timestring == "20240101120000"
    assert any("W: 515 is rounded down to 512" in n for n in s.notes)
    assert load_settings({"strength": 1.5}).strength == 1.0  # clamped, as the extension does


def test_schedules_expand_every_key():
    s = load_settings({"max_frames": 10, "steps_schedule": "0:(20), 9:(29.9)", "zoom": "0:(1), 9:(1.9)"})
    sch = s.schedules(seed=3)
    assert sch["zoom"] == pytest.approx([1 + 0.1 * i for i in range(10)])
    assert sch["steps_schedule"] == [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # int() of 20 + 1.1 * i
    assert sch["seed_schedule"] == [3, -1, -1, -1, -1, -1, -1, -1, 3, 3]
    assert "cn_1_weight" in sch and "hybrid_comp_alpha_schedule" in sch
    assert s.string_schedule("checkpoint_schedule").values() == ["model1.ckpt"] * 10


# ---- prompts ----

def _s(**kw):
    base = {"positive_prompts": "", "negative_prompts": "", "legacy_colormatch": False}
    return load_settings({**base, **kw})


def test_prompts_held_until_the_next_key():
    s = _s(max_frames=8, prompts={"0": "a forest", "3": "a city --neg fog", "max_f/2+2": "night"})
    got = prompts_by_frame(s)  # max_f/2+2 = 3.5+2 -> 5
    assert got == [("a forest", "")] * 3 + [("a city", "fog")] * 2 + [("night", "")] * 3


def test_positive_and_negative_added_to_every_frame():
    s = _s(max_frames=3, prompts={"0": "a forest", "2": "a city --neg fog"}, positive_prompts="masterpiece,",
           negative_prompts="--neg blurry")
    assert prompts_by_frame(s) == [("masterpiece, a forest", "blurry")] * 2 + [("masterpiece, a city", "fog blurry")]


def test_prompts_before_the_first_key_and_keys_outside_the_run():
    s = _s(max_frames=6, prompts={"2": "a", "4": "b", "100": "never", "-3": "neither"})
    assert [p for p, _ in prompts_by_frame(s)] == ["a", "a", "a", "a", "b", "b"]
    with pytest.raises(DeforumSettingsError, match="no key inside frames 0..5"):
        prompts_by_frame(_s(max_frames=6, prompts={"10": "a"}))


def test_backtick_expressions_per_frame():
    s = _s(max_frames=4, prompts={"0": "a cat:`1+t*0.5`, (sitting:`sqrt(t)`) --neg `max_f-t` dogs"})
    got = prompts_by_frame(s, seed=9)
    assert got[0] == ("a cat:1.0, (sitting:0.0)", "3 dogs")
    assert got[1] == ("a cat:1.5, (sitting:1.0)", "2 dogs")
    assert got[3] == (f"a cat:2.5, (sitting:{3 ** 0.5!r})", "0 dogs")
    assert expand_backticks("seed `s`, `t` and `t/2`", 5, 10, seed=42) == "seed 42, 5 and 2.5"
    assert expand_backticks("totally `t`", 5, 10) == "totally 5"  # the extension would print 'to5ally'
    with pytest.raises(DeforumSettingsError, match="is inf at frame 0"):
        expand_backticks("`1/t`", 0, 10)


def test_interpolation_mode_blends_with_composable_weights():
    s = _s(max_frames=7, animation_mode="Interpolation", prompts={"0": "a", "4": "b --neg x"})
    got = prompts_by_frame(s)
    assert got[0] == ("a", "")
    assert got[1] == ("(a):0.75 AND (b):0.25", "(x):0.25")
    assert got[2] == ("(a):0.5 AND (b):0.5", "(x):0.5")
    assert got[3] == ("(a):0.25 AND (b):0.75", "(x):0.75")
    assert got[4] == got[5] == got[6] == ("b", "x")
    # three-frame gap: the extension's 1/gap steps (1 - 1/3 = 0.6666666666666667)
    s = _s(max_frames=4, animation_mode="Interpolation", prompts={"0": "a --neg n", "3": "b --neg m"})
    assert prompts_by_frame(s)[1] == ("(a):0.6666666666666667 AND (b):0.3333333333333333",
                                      "(n):0.6666666666666667 AND (m):0.3333333333333333")
    # a key past the end still pulls the last frames toward it, as in the extension
    s = _s(max_frames=3, animation_mode="Interpolation", prompts={"0": "a", "4": "b"})
    assert prompts_by_frame(s)[2] == ("(a):0.5 AND (b):0.5", "")


def test_interpolation_weights_parse_as_composable_prompts():
    from sdstudio.core.prompt import split_and

    s = _s(max_frames=200001, animation_mode="Interpolation", prompts={"0": "a", "200000": "b"})
    positive = prompts_by_frame(s)[1][0]
    parts = split_and(positive)
    assert [w for _, w in parts] == pytest.approx([1 - 1 / 200000, 1 / 200000])  # no 5e-06 that A1111 cannot read


# ---- seeds ----

def extension_seeds(behavior, seed, steps, iter_n=1):
    """The extension's seed.py, re-enacted: the seed used by each diffusion, stepping after each one."""
    internal, out = 0, []
    for _ in range(steps):
        out.append(seed)
        if behavior == "iter":
            seed += 1 if internal % iter_n == 0 else 0
            internal += 1
        elif behavior == "ladder":
            seed += 2 if internal == 0 else -1
            internal = 1 if internal == 0 else 0
        elif behavior == "alternate":
            seed += 1 if internal == 0 else -1
            internal = 1 if internal == 0 else 0
    return out


@pytest.mark.parametrize(("behavior", "iter_n"), [("iter", 1), ("iter", 2), ("iter", 3), ("iter", 5),
                                                  ("ladder", 1), ("alternate", 1), ("fixed", 1)])
def test_seeds_step_as_the_extension(behavior, iter_n):
    s = _s(max_frames=40, seed_behavior=behavior, seed_iter_N=iter_n, diffusion_cadence=1)
    want = extension_seeds(behavior, 1000, 40, iter_n)
    assert [next_seed(behavior, 1000, f, s) for f in range(40)] == want
    assert seeds_by_frame(s, 1000) == want


def test_hand_seed_sequences():
    s = _s(diffusion_cadence=1)
    assert [next_seed("ladder", 10, f, s) for f in range(6)] == [10, 12, 11, 13, 12, 14]
    assert [next_seed("alternate", 10, f, s) for f in range(4)] == [10, 11, 10, 11]
    assert [next_seed("iter", 10, f, _s(seed_iter_N=2, diffusion_cadence=1)) for f in range(5)] == \
        [10, 11, 11, 12, 12]


def test_seeds_follow_diffusions_not_frames():
    s = _s(diffusion_cadence=3, animation_mode="2D")
    assert [next_seed("iter", 5, f, s) for f in (0, 3, 6, 9)] == [5, 6, 7, 8]
    assert next_seed("iter", 5, 4, s) == 6  # a cadence frame: the last diffusion's seed
    video = _s(diffusion_cadence=3, animation_mode="Video Input")
    assert [next_seed("iter", 5, f, video) for f in range(4)] == [5, 6, 7, 8]


def test_random_seeds_are_reproducible():
    s = _s(max_frames=50, seed_behavior="random", diffusion_cadence=1)
    a, b = seeds_by_frame(s, 123), seeds_by_frame(s, 123)
    assert a == b and a[0] == 123
    assert all(0 <= x <= 2**32 - 1 for x in a) and len(set(a)) == 50
    assert seeds_by_frame(s, 124)[1:] != a[1:]


def test_schedule_seeds():
    s = _s(max_frames=6, seed_behavior="schedule")
    seeds = seeds_by_frame(s, 77)
    assert seeds[0] == 77 and seeds[4:] == [77, 77]  # 0:(s), "max_f-1":(s)
    assert all(x != -1 for x in seeds[1:4]) and len(set(seeds[1:4])) == 3  # -1: drawn from the seed
    assert seeds == seeds_by_frame(s, 77) == [next_seed("schedule", 77, f, s) for f in range(6)]
    s = _s(max_frames=4, seed_behavior="schedule", seed_schedule="0:(s+t*10)")
    assert seeds_by_frame(s, 1) == [1, 11, 21, 31]
    with pytest.raises(DeforumSettingsError, match="seed_behavior"):
        next_seed("sideways", 1, 0, s)


def test_fixed_seed():
    assert fixed_seed(5) == 5
    import random

    r = fixed_seed(-1, random.Random(0))
    assert 0 <= r < 4294967294 and r == fixed_seed(-1, random.Random(0))


# ---- names and files ----

def test_batch_names():
    s = _s(batch_name="Deforum_{timestring}", prompts={"0": "a cat, in space / at night"})
    assert format_batch_name(s, "20240101120000", 5) == "Deforum_20240101120000"
    assert format_batch_name(s.updated({"batch_name": "{seed}_{W}x{h}_{nothing}"}), "t", 5) == "5_512x512_nothing"
    assert format_batch_name(s.updated({"batch_name": "{prompts}"}), "t", 5) == "a_cat__in_space___at_night"
    assert format_batch_name(s.updated({"batch_name": "x{use_init}"}), "t", 5) == "x_"  # false -> _
    assert format_batch_name(s.updated({"batch_name": "{sampler}"}), "t", 5) == "Euler_a"


def test_timestrings():
    now = time.mktime((2024, 3, 5, 6, 7, 8, 0, 0, -1))
    assert make_timestring(now) == "20240305060708"
    assert re.fullmatch(r"\d{14}", make_timestring())
    s = _s(resume_from_timestring=True, resume_timestring="20230129210106")
    assert run_timestring(s, now) == "20230129210106"
    assert run_timestring(_s(), now) == "20240305060708"
    assert frame_filename("20240305060708", 12) == "20240305060708_000000012.png"
    assert settings_filename("20240305060708") == "20240305060708_settings.txt"


def test_remote_urls_are_never_fetched():
    s = load_settings({})
    assert local_path(s, "init_image") is None  # an unused web default
    assert local_path(s, "video_init_path") is None and local_path(s, "soundtrack_path") is None
    assert check_files(s) == {}
    used = s.updated({"use_init": True})
    with pytest.raises(DeforumSettingsError) as err:
        local_path(used, "init_image")
    assert "init_image is https://deforum.github.io/a1/I1.png" in str(err.value)
    assert "put the file here (I1.png) and give its path in init_image" in str(err.value)
    mine = s.updated({"use_init": True, "init_image": "/data/start.png", "animation_mode": "Video Input",
                      "video_init_path": "file:///data/in.mp4", "cn_1_enabled": True, "cn_1_vid_path": "/d/c.mp4"})
    assert check_files(mine) == {"init_image": "/data/start.png", "video_init_path": "/data/in.mp4",
                                 "cn_1_vid_path": "/d/c.mp4"}
    with pytest.raises(DeforumSettingsError, match="soundtrack_path is https"):
        local_path(s.updated({"add_soundtrack": "File"}), "soundtrack_path")
    with pytest.raises(DeforumSettingsError, match="init_images, key 0 is https"):
        guided_images(s.updated({"use_looper": True}))
    looper = s.updated({"use_looper": True, "init_images": '{"0": "/a.png", "max_f/2": "/b.png"}'})
    assert guided_images(looper) == {0: "/a.png", 59: "/b.png"}


def test_quick():
    start = time.perf_counter()
    s = load_settings({})
    s.schedules(seed=1)
    prompts_by_frame(s)
    seeds_by_frame(s, 1)
    assert time.perf_counter() - start < 1.0
