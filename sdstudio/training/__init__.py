"""Training: kohya-style datasets and the LoRA / LoCon trainer (queue jobs, CLI and UI build on these)."""

from .dataset import DatasetError, TrainingDataset
from .lora import LoraConfig, TrainingError, TrainProgress, TrainResult, engine_sampler, train_lora

__all__ = ["DatasetError", "LoraConfig", "TrainProgress", "TrainResult", "TrainingDataset", "TrainingError",
           "engine_sampler", "train_lora"]
