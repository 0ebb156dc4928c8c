"""Which device and dtypes to run on, and moving components there when memory is tight.

CUDA with fp16 when present (fp32 with ``--no-half`` / ``--precision full``; the VAE in fp32 with
``--no-half-vae``). On a CPU with native bfloat16 arithmetic (x86 ``avx512_bf16`` / ``amx_bf16``,
Arm ``bf16``) the UNet, text encoders, ControlNets and the VAE run in bfloat16, which such cores
compute about four times as fast as float32 matrix products (the VAE in float32 with
``--no-half-vae``); the helper models (upscalers, face restorers, interrogators) stay in float32
there, and ``--precision full`` / ``--no-half`` keep everything in float32. Other CPUs use float32.
``--medvram`` keeps only the component in use on the GPU; ``--lowvram`` also streams the UNet's
blocks to the GPU one at a time.

Under the default ``--precision autocast`` a narrow UNet (first block under 128 channels, such as the
bundled demo model's 32) stays in float32 on such a CPU, and so does its VAE: their convolutions are
too small for bfloat16 to pay (measured 0.72-0.90x); ``--precision half`` runs every model in
bfloat16. Add-ons that run beside the UNet (ControlNets, IP-Adapters, reference units) follow the
UNet's dtype.

``SDSTUDIO_PRECISION`` in the environment is the default of ``--precision`` (the test suite sets it
to ``full``: its reference comparisons are float32).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import platform
import weakref
from dataclasses import dataclass

import torch

from ..core.paths import DeviceOptions

log = logging.getLogger(__name__)


BF16_MIN_WIDTH = 128  # SD 1.x/2.x/XL start at 320; the demo model at 32
FP8_MODULES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")  # what --fp8 stores


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    offload: str = "none"  # "none", "model" (--medvram), "sequential" (--lowvram)
    xformers: bool = False
    aux_dtype: torch.dtype = torch.float32  # upscalers, face restorers, interrogators
    reason: str = ""  # why these dtypes, for /sdapi/v1/memory and the footer
    channels_last: bool = False  # UNets and ControlNets in channels-last memory (oneDNN's bfloat16 convolutions)
    bf16_min_width: int = 0  # CPU bfloat16: UNets narrower than this (first block's channels) stay float32
    compile: bool = False  # --compile: UNets (and ControlNets) through torch.compile, in place
    fp8: bool = False  # --fp8: the diffusion model's weights stored in float8 e4m3fn (diffusers' layerwise casting)

    def dtype_for(self, unet_width: int | None) -> torch.dtype:
        """The dtype a checkpoint runs in, given its UNet's first block width (None: unknown, or not a UNet)."""
        if self.dtype == torch.bfloat16 and unet_width is not None and unet_width < self.bf16_min_width:
            return torch.float32
        return self.dtype

    def vae_dtype_for(self, unet_width: int | None) -> torch.dtype:
        """The dtype a checkpoint's VAE runs in: a narrow model's (the demo model's) stays float32 where its
        UNet does, since its convolutions are too small for bfloat16 to pay."""
        if self.vae_dtype == torch.bfloat16 and self.dtype_for(unet_width) == torch.float32:
            return torch.float32
        return self.vae_dtype

    def describe(self) -> str:
        """``"cpu, bfloat16 (the CPU has avx512_bf16)"``: the device and the diffusion model's dtype."""
        name = str(self.dtype).removeprefix("torch.")
        return f"{self.device.type}, {name}" + (f" ({self.reason})" if self.reason else "")


def cpu_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU feature giving native bfloat16 arithmetic (``"avx512_bf16"``, ``"amx_bf16"``, Arm's
    ``"bf16"``), or None: CPUs without it emulate bfloat16, slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break
    arm = platform.machine().lower() in ("aarch64", "arm64")
    for feature in ("amx_bf16", "avx512_bf16") + (("bf16",) if arm else ()):
        if feature in flags:
            return feature
    return None


def plan_devices(opts: DeviceOptions | None = None, cpuinfo: str | None = None) -> DevicePlan:
    opts = opts or DeviceOptions()
    full = opts.no_half or opts.precision == "full"
    reason = ""
    if torch.cuda.is_available() and not opts.use_cpu:
        device = torch.device("cuda")
        dtype = torch.float32 if full else torch.float16
        vae_dtype = torch.float32 if (full or opts.no_half_vae) else torch.float16
        aux_dtype = dtype
        offload = "sequential" if opts.lowvram else "model" if opts.medvram else "none"
        if full:
            reason = "--precision full" if opts.precision == "full" else "--no-half"
    else:
        device, dtype, vae_dtype, aux_dtype, offload = torch.device("cpu"), torch.float32, torch.float32, torch.float32, "none"
        feature = cpu_bf16_feature(cpuinfo)
        if full:
            reason = "--precision full" if opts.precision == "full" else "--no-half"
        elif feature is None:
            reason = "the CPU has no native bfloat16"
        else:
            dtype, reason = torch.bfloat16, f"the CPU has {feature}"
            if not opts.no_half_vae:  # measured: 2.2x faster decodes, 46.8-58.9 dB PSNR against float32
                vae_dtype = torch.bfloat16
    use_xformers = False
    if opts.xformers:
        if importlib.util.find_spec("xformers") is None:
            log.warning("--xformers given but xformers is not installed; using PyTorch SDPA attention")
        else:
            use_xformers = device.type == "cuda"
    channels_last = device.type == "cpu" and dtype == torch.bfloat16  # measured: 5 % a step at 512², no loss below
    min_width = BF16_MIN_WIDTH if dtype == torch.bfloat16 and opts.precision == "autocast" else 0
    if min_width:
        reason += f"; UNets under {min_width} channels stay float32"
    if opts.fp8:
        reason += ("; " if reason else "") + "weights stored in float8 (--fp8)"
    return DevicePlan(device, dtype, vae_dtype, offload, use_xformers, aux_dtype, reason, channels_last, min_width,
                      opts.compile, opts.fp8)


class Placement:
    """Puts a model's components on the compute device according to the plan's offload policy.

    The modules keep ordinary parameters under every policy (no meta tensors, no hidden weight maps),
    so code that swaps a weight for a while, as LoRA does, works the same with ``--lowvram``.
    """

    def __init__(self, plan: DevicePlan):
        self.plan = plan
        self._prepared: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # ids get reused; modules don't

    def prepare(self, *modules: torch.nn.Module) -> None:
        """Called after loading, before anything touches the weights; later calls do nothing."""
        for module in modules:
            if module in self._prepared:
                continue
            self._prepared.add(module)
            if self.plan.channels_last and hasattr(module, "down_blocks"):  # a UNet or a ControlNet
                module.to(memory_format=torch.channels_last)
            if self.plan.offload == "none":
                module.to(self.plan.device)
            elif self._streamed(module):
                _stream_blocks(module, self.plan.device)
            if self.plan.fp8 and type(module).__name__ in FP8_MODULES:
                # diffusers' layerwise casting: Linear / Conv weights kept in float8, each layer cast to the
                # module's own dtype for its forward and back after (norms and embeddings stay as they are)
                module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=module.dtype)
            if self.plan.xformers and hasattr(module, "enable_xformers_memory_efficient_attention"):
                module.enable_xformers_memory_efficient_attention()
            if self.plan.compile and hasattr(module, "down_blocks"):
                # nn.Module.compile: the module's own call goes through torch.compile (compiled on the first
                # step; a new size or a changed attention processor compiles again). Weights stay ordinary
                # parameters, so LoRA's swaps and the offload policies work as without it.
                module.compile(dynamic=False)

    def _streamed(self, module: torch.nn.Module) -> bool:
        return self.plan.offload == "sequential" and hasattr(module, "down_blocks")

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module):
        """Within the block the modules are on the compute device (a streamed UNet: block by block)."""
        self.prepare(*modules)
        moved = [m for m in modules if self.plan.offload != "none" and not self._streamed(m)]
        for m in moved:
            m.to(self.plan.device)
        try:
            yield modules[0] if len(modules) == 1 else modules
        finally:
            for m in moved:
                m.to("cpu")
            if moved and self.plan.device.type == "cuda":
                torch.cuda.empty_cache()


def _stream_blocks(unet: torch.nn.Module, device: torch.device) -> None:
    """``--lowvram``: the UNet stays in CPU memory and each top-level block moves to ``device`` when it
    runs, pushing the previous one back (A1111's scheme: one block's weights on the GPU at a time)."""
    blocks: list[torch.nn.Module] = []
    for child in unet.children():
        blocks.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    resident: list[torch.nn.Module] = []

    def bring(block, _args):
        if resident and resident[0] is not block:
            resident.pop().to("cpu")
        if not resident:
            block.to(device)
            resident.append(block)

    for block in blocks:
        block.register_forward_pre_hook(bring)
