"""The domain-free training loop shared by molecular assembly and image generation.

``loop`` (``Trainer``: the loop, logs, determinism) < ``checkpoints`` (run-folder errors, data identity, atomic
resumable checkpoints, ``load_checkpoint``) and ``optim`` (warm-up + cosine LR, EMA, the seeded batch order). The
names below import from ``kflow.core.training`` as before the split.
"""
from kflow.core.training.checkpoints import (CHECKPOINT_KIND, RUN_LOCK, CheckpointError, ConfigMismatchError, Resume,
                                            RunBusyError, RunExistsError, check_fresh_run_folder, data_identity,
                                            load_checkpoint)
from kflow.core.training.loop import NON_STRUCTURAL_KEYS, Trainer
from kflow.core.training.optim import (EMA_WARMUP, EPOCH_SEED_STRIDE, STEP_SEED_STRIDE, EpochBatchSampler,
                                      ExponentialMovingAverage, cosine_with_warmup)

__all__ = ["Trainer", "ExponentialMovingAverage", "CheckpointError", "ConfigMismatchError", "RunExistsError",
           "RunBusyError", "Resume", "data_identity", "check_fresh_run_folder", "load_checkpoint", "cosine_with_warmup",
           "EpochBatchSampler", "NON_STRUCTURAL_KEYS", "RUN_LOCK", "CHECKPOINT_KIND", "EMA_WARMUP", "EPOCH_SEED_STRIDE",
           "STEP_SEED_STRIDE"]
