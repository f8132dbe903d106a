"""LongLive's training recipe: Self-Forcing DMD (stage 1) and streaming long tuning (stage 2)."""

from .config import TRAINING_PRESETS, TrainingConfig
from .trainer import DMDTrainer

__all__ = ["TRAINING_PRESETS", "DMDTrainer", "TrainingConfig"]
