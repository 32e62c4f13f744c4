"""A small GRPO trainer with VIGOR rewards (``vigor train``), nanoGPT-sized: one module per concern.

settings    typed settings sections: help text and range rule per field, YAML, overrides, old keys
config      vigor train's and vigor sft's sections (configs/README.md's tables: config_docs)
tokenizer   the built-in character tokenizer, or a local one
tasks       the synthetic arithmetic task, generated offline from a seed
data        prompts from local JSONL / parquet through ``datasets``; the step's prompt order
model       the policy (tiny random or local directory), LoRA, gradient checkpointing, the reference
sampling    groups of completions from ``generate``, with the loss masks VIGOR and GRPO use
rewards     the trainer's own rewards (math, random, external functions) and their weighted mix
scoring     the weighted rewards of a step and their group advantages
grpo        log-probs, the clipped surrogate, the KL term
checkpoint  safetensors weights + optimizer/scheduler/RNG state, written atomically
metrics     metrics.jsonl and the PNG plots
loop        the training loop
"""

from vigor.trainer.checkpoint import CheckpointError
from vigor.trainer.config import ConfigError, TrainConfig, load_config
from vigor.trainer.data import DataError
from vigor.trainer.loop import Trainer, TrainingDiverged, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_config",
    "train",
]
