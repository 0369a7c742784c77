"""Known noise from the libraries, filtered at the source so a rank's log starts with what matters.

Each filter names one message seen in every rank's log that tells the user nothing they can act on. Set
TRAINER_LIBRARY_WARNINGS=1 in a job's env to see them all again."""

from __future__ import annotations

import os
import warnings

SHOW_ENV = "TRAINER_LIBRARY_WARNINGS"

# (message regex, category): matched against the start of each warning's text.
KNOWN_NOISE = [
    # megatron-core, four times at import: we use neither (nor do we want them on CPU).
    (r"Transformer Engine and Apex are not installed", UserWarning),
    # torch deprecates the collective that DeepSpeed's ZeRO-1 all-gather still calls.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
]


def silence_library_noise(environ=os.environ) -> None:
    """Installs the filters, before megatron-core and DeepSpeed are imported. A no-op with the flag set."""
    if environ.get(SHOW_ENV, "") not in ("", "0"):
        return
    for message, category in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # DeepSpeed warns "Setting accelerator to CPU" whenever it has to guess; with no CUDA device there is
    # nothing to guess, so say it outright (a user's own DS_ACCELERATOR still wins).
    if "DS_ACCELERATOR" not in environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
