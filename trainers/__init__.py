"""The rank side of Roundhouse: `python -m trainers` trains one rank of a job.

Modules, one concern each: env (the environment contract), data (byte tokens, corpus, sampler), model (the
GPT), optim (AdamW), schedule (the learning rate), reporting (heartbeats and metrics to the control plane),
main (the training loop)."""

import os as _os
import sys as _sys

# DeepSpeed's compiled ops (the CPU communication op) live in this environment, built once by `make install`:
# never in the user-wide ~/.cache/torch_extensions, which every other venv on the machine shares and rebuilds.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))
