"""The training library beneath the commands (`mmrec_model.pretrain`, `bench.quality`, the
benches), by concern:

    settings.py    TrainSettings: steps, batch, learning rate and schedule, clipping, ...
    data.py        the byte corpus, its split, the windows of a step and of validation
    optim.py       the loss, AdamW, the warm-up + cosine schedule, one training step
    loop.py        Trainer: the loop, its clocks, hooks and checkpoints, exact resume
    evaluate.py    the validation loss
    checkpoint.py  checkpoint files, written atomically, read with weights_only
    device.py      --device, bf16 autocast, the sum over torchrun processes
"""

from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .data import Corpus, DataError, load_corpus, train_batch, validation_offsets
from .device import DeviceError, autocast, default_autocast_dtype, pick_device
from .evaluate import evaluate
from .loop import Progress, Trainer
from .optim import bits_per_byte, make_optimizer, make_scheduler, next_byte_loss, token_losses, train_step
from .settings import SettingsError, TrainSettings

__all__ = [
    "CheckpointError",
    "Corpus",
    "DataError",
    "DeviceError",
    "Progress",
    "SettingsError",
    "TrainSettings",
    "Trainer",
    "autocast",
    "bits_per_byte",
    "default_autocast_dtype",
    "evaluate",
    "load_checkpoint",
    "load_corpus",
    "load_model",
    "make_optimizer",
    "make_scheduler",
    "next_byte_loss",
    "pick_device",
    "save_checkpoint",
    "token_losses",
    "train_batch",
    "train_step",
    "validation_offsets",
]
