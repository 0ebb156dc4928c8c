"""Which device and dtypes to run on, and moving components there when memory is tight.

CUDA with fp16 when present (fp32 with ``--no-half`` / ``--precision full``; the VAE in fp32 with
``--no-half-vae``); fp32 on the CPU. ``--medvram`` keeps only the component in use on the GPU;
``--lowvram`` streams the UNet's blocks one at a time (accelerate's sequential offload).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import torch

from ..core.paths import DeviceOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    offload: str = "none"  # "none", "model" (--medvram), "sequential" (--lowvram)
    xformers: bool = False

    @property
    def compute_device(self) -> torch.device:
        return self.device


def plan_devices(opts: DeviceOptions | None = None) -> DevicePlan:
    opts = opts or DeviceOptions()
    if torch.cuda.is_available() and not opts.use_cpu:
        device = torch.device("cuda")
        full = opts.no_half or opts.precision == "full"
        dtype = torch.float32 if full else torch.float16
        vae_dtype = torch.float32 if (full or opts.no_half_vae) else torch.float16
        offload = "sequential" if opts.lowvram else "model" if opts.medvram else "none"
    else:
        device, dtype, vae_dtype, offload = torch.device("cpu"), torch.float32, torch.float32, "none"
    use_xformers = False
    if opts.xformers:
        if importlib.util.find_spec("xformers") is None:
            log.warning("--xformers given but xformers is not installed; using PyTorch SDPA attention")
        else:
            use_xformers = device.type == "cuda"
    return DevicePlan(device, dtype, vae_dtype, offload, use_xformers)


class Placement:
    """Puts a model's components on the compute device according to the plan's offload policy."""

    def __init__(self, plan: DevicePlan):
        self.plan = plan
        self._prepared: set[int] = set()

    def prepare(self, module: torch.nn.Module) -> None:
        """Called once per module after loading."""
        if id(module) in self._prepared:
            return
        self._prepared.add(id(module))
        if self.plan.offload == "none":
            module.to(self.plan.device)
        elif self.plan.offload == "sequential" and hasattr(module, "down_blocks"):
            from accelerate import cpu_offload

            cpu_offload(module, execution_device=self.plan.device)
        if self.plan.xformers and hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()

    @contextlib.contextmanager
    def use(self, module: torch.nn.Module):
        """Within the block the module is on the compute device."""
        self.prepare(module)
        moved = self.plan.offload == "model" or (self.plan.offload == "sequential" and not hasattr(module, "down_blocks"))
        if moved:
            module.to(self.plan.device)
        try:
            yield module
        finally:
            if moved:
                module.to("cpu")
                if self.plan.device.type == "cuda":
                    torch.cuda.empty_cache()
