"""A1111 sampler and schedule names, as data.

Each sampler row says which k-diffusion-style function in :mod:`sdstudio.engine.samplers` runs it
and the options A1111 gives it (default schedule for "Automatic", whether the next-to-last sigma is
discarded, whether it uses the eta-noise-seed-delta or Brownian noise). Adding a sampler is one row
here plus one function there.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnknownNameError(ValueError):
    """An unknown sampler or schedule name; the message lists the valid ones."""


@dataclass(frozen=True)
class SamplerInfo:
    label: str
    function: str
    aliases: tuple[str, ...] = ()
    scheduler: str = "automatic"  # the schedule "Automatic" resolves to
    discard_next_to_last_sigma: bool = False
    uses_ensd: bool = False
    brownian_noise: bool = False
    second_order: bool = False
    timesteps: bool = False  # DDIM-family: A1111 picks timesteps, not a sigma schedule
    cfg_scale_multiplier: float = 1.0  # A1111 scales CFG for CFG++ samplers (DDIM CFG++: 1 / 12.5)


SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), scheduler="karras"),
    SamplerInfo("DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",), scheduler="karras", second_order=True,
                brownian_noise=True),
    SamplerInfo("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",), scheduler="exponential",
                brownian_noise=True),
    SamplerInfo("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", ("k_dpmpp_2m_sde_heun",), scheduler="exponential",
                brownian_noise=True),
    SamplerInfo("DPM++ 2S a", "dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), scheduler="karras", uses_ensd=True,
                second_order=True),
    SamplerInfo("DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",), scheduler="exponential",
                discard_next_to_last_sigma=True, brownian_noise=True),
    SamplerInfo("Euler a", "euler_ancestral", ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
    SamplerInfo("Euler", "euler", ("k_euler",)),
    SamplerInfo("LMS", "lms", ("k_lms",)),
    SamplerInfo("Heun", "heun", ("k_heun",), second_order=True),
    SamplerInfo("DPM2", "dpm_2", ("k_dpm_2",), scheduler="karras", discard_next_to_last_sigma=True,
                second_order=True),
    SamplerInfo("DPM2 a", "dpm_2_ancestral", ("k_dpm_2_a",), scheduler="karras",
                discard_next_to_last_sigma=True, uses_ensd=True, second_order=True),
    SamplerInfo("DPM fast", "dpm_fast", ("k_dpm_fast",), uses_ensd=True),
    SamplerInfo("DPM adaptive", "dpm_adaptive", ("k_dpm_ad",), uses_ensd=True),
    SamplerInfo("Restart", "restart", ("restart",), scheduler="karras", second_order=True),
    SamplerInfo("DDIM", "ddim", ("ddim",), timesteps=True),
    SamplerInfo("DDIM CFG++", "ddim_cfgpp", ("ddim_cfgpp",), timesteps=True, cfg_scale_multiplier=1 / 12.5),
    SamplerInfo("PLMS", "plms", ("plms",), timesteps=True),
    SamplerInfo("UniPC", "unipc", ("unipc",), timesteps=True),
    SamplerInfo("LCM", "lcm", ("k_lcm",)),
)


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    label: str
    aliases: tuple[str, ...] = ()


SCHEDULES: tuple[ScheduleInfo, ...] = (
    ScheduleInfo("automatic", "Automatic"),
    ScheduleInfo("uniform", "Uniform"),
    ScheduleInfo("karras", "Karras"),
    ScheduleInfo("exponential", "Exponential"),
    ScheduleInfo("polyexponential", "Polyexponential"),
    ScheduleInfo("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ScheduleInfo("kl_optimal", "KL Optimal"),
    ScheduleInfo("align_your_steps", "Align Your Steps"),
    ScheduleInfo("simple", "Simple"),
    ScheduleInfo("normal", "Normal"),
    ScheduleInfo("ddim", "DDIM"),
    ScheduleInfo("beta", "Beta"),
)


def _key(name: str) -> str:
    return name.strip().lower()


_SAMPLER_INDEX = {_key(n): s for s in SAMPLERS for n in (s.label, *s.aliases)}
_SCHEDULE_INDEX = {_key(n): s for s in SCHEDULES for n in (s.name, s.label, *s.aliases)}
# Plug-ins' samplers and schedule types (sdstudio.plugins), added at start-up: sampler names are
# process-wide, as they are in infotexts and in every client's requests.
_PLUGIN_SAMPLERS: list[SamplerInfo] = []
_PLUGIN_SCHEDULES: list[ScheduleInfo] = []


def register_sampler(info: SamplerInfo) -> None:
    """A plug-in's sampler, known by its label and aliases from now on (a taken name is refused)."""
    taken = [n for n in (info.label, *info.aliases) if _key(n) in _SAMPLER_INDEX]
    if taken and _SAMPLER_INDEX.get(_key(info.label)) != info:
        raise ValueError(f"sampler name {taken[0]!r} is taken")
    if not taken:
        _PLUGIN_SAMPLERS.append(info)
        _SAMPLER_INDEX.update({_key(n): info for n in (info.label, *info.aliases)})


def register_schedule(info: ScheduleInfo) -> None:
    """A plug-in's schedule type, known by its name, label and aliases from now on."""
    taken = [n for n in (info.name, info.label, *info.aliases) if _key(n) in _SCHEDULE_INDEX]
    if taken and _SCHEDULE_INDEX.get(_key(info.name)) != info:
        raise ValueError(f"schedule type name {taken[0]!r} is taken")
    if not taken:
        _PLUGIN_SCHEDULES.append(info)
        _SCHEDULE_INDEX.update({_key(n): info for n in (info.name, info.label, *info.aliases)})


def sampler_labels() -> list[str]:
    return [s.label for s in (*SAMPLERS, *_PLUGIN_SAMPLERS)]


def schedule_labels() -> list[str]:
    return [s.label for s in (*SCHEDULES, *_PLUGIN_SCHEDULES)]


def get_sampler(name: str) -> SamplerInfo:
    try:
        return _SAMPLER_INDEX[_key(name)]
    except KeyError:
        raise UnknownNameError(
            f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_labels())}") from None


def find_sampler(name: str) -> SamplerInfo | None:
    """The sampler a label or alias names, or None (an unknown name, "" for "the same sampler")."""
    try:
        return get_sampler(name)
    except UnknownNameError:
        return None


def is_timestep_sampler(name: str) -> bool:
    """DDIM-family (A1111's CompVis samplers: DDIM, DDIM CFG++, PLMS, UniPC); False for unknown names."""
    sampler = find_sampler(name)
    return sampler is not None and sampler.timesteps


UNI_PC_VARIANTS = ("bh1", "bh2", "vary_coeff")  # A1111's settings "UniPC variant" and "UniPC skip type"
UNI_PC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")  # where its noise levels lie


def get_schedule(name: str | None) -> ScheduleInfo:
    try:
        return _SCHEDULE_INDEX[_key(name or "automatic")]
    except KeyError:
        raise UnknownNameError(
            f"unknown schedule type {name!r}; valid schedule types: {', '.join(schedule_labels())}") from None


def split_legacy_sampler(name: str) -> tuple[str, str | None]:
    """``"DPM++ 2M Karras"`` (pre-1.9 infotexts) -> ``("DPM++ 2M", "Karras")``; other names unchanged."""
    if _key(name) in _SAMPLER_INDEX:
        return _SAMPLER_INDEX[_key(name)].label, None
    for schedule in SCHEDULES[1:]:
        suffix = " " + schedule.label
        if name.endswith(suffix) and _key(name[: -len(suffix)]) in _SAMPLER_INDEX:
            return _SAMPLER_INDEX[_key(name[: -len(suffix)])].label, schedule.label
    return name, None


def resolve_schedule(sampler: SamplerInfo, schedule: str | None) -> ScheduleInfo:
    """The concrete schedule a (sampler, schedule type) pair runs with; "Automatic" -> the sampler's default."""
    chosen = get_schedule(schedule)
    if chosen.name == "automatic":
        chosen = get_schedule(sampler.scheduler) if sampler.scheduler != "automatic" else get_schedule("uniform")
    return chosen


# Hires. fix's latent upscalers: A1111 name -> (torch interpolate mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
