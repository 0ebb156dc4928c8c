"""Training: kohya-style datasets, the LoRA / LoCon and Dreambooth trainers (queue jobs, CLI and UI build
on these); textual inversion and hypernetworks live in their own modules."""

from .dataset import DatasetError, TrainingDataset
from .dreambooth import DreamboothConfig, train_dreambooth
from .loop import TrainingError, TrainProgress, TrainResult
from .lora import LoraConfig, engine_sampler, train_lora

__all__ = ["DatasetError", "DreamboothConfig", "LoraConfig", "TrainProgress", "TrainResult", "TrainingDataset",
           "TrainingError", "engine_sampler", "train_dreambooth", "train_lora"]
