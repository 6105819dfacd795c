"""The one training harness every training loop of the project runs on (RAHF training, LoRA finetuning).

It sits between ``common`` and ``rahf`` in the import order (it needs torch, so it cannot live in the torch-free
``common``) and imports only ``common``. See :mod:`training.harness`.
"""

from training.harness import (
    AVERAGE_FILE,
    CHECKPOINTS_DIR,
    LOG_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TrainingRun,
    WeightAverage,
    accumulate_step,
    adamw,
    batches_per_epoch,
    biases_and_norms,
    checkpoint_steps,
    due,
    epoch_batch_index,
    last_checkpoint,
    load_trainer_state,
    make_accelerator,
    pack_optimizer,
    param_groups,
    prune_checkpoints,
    save_checkpoint,
    show_progress,
    unpack_optimizer,
    write_config,
)

__all__ = [
    "AVERAGE_FILE",
    "CHECKPOINTS_DIR",
    "LOG_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "TrainingRun",
    "WeightAverage",
    "accumulate_step",
    "adamw",
    "batches_per_epoch",
    "biases_and_norms",
    "checkpoint_steps",
    "due",
    "epoch_batch_index",
    "last_checkpoint",
    "load_trainer_state",
    "make_accelerator",
    "pack_optimizer",
    "param_groups",
    "prune_checkpoints",
    "save_checkpoint",
    "show_progress",
    "unpack_optimizer",
    "write_config",
]
