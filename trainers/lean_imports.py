"""A rank's start-up without TorchInductor.

megatron-core decorates its fusion helpers with `torch.compile` when its modules are imported (`megatron.core.jit`
picks `torch.compile` on torch ≥ 2.2). Applying that decorator imports TorchDynamo and TorchInductor: about 5 s of
CPU per rank on the 2-core CI machine, 40 % of a rank's import time, paid by every rank of every attempt. The
trainer calls none of those helpers (its model uses megatron-core's tensor-parallel layers and cross-entropy
only), so megatron-core is imported with `torch.compile` standing in as the identity, exactly what megatron's own
`disable_jit_fuser()` would do had it run before the decorators."""

from __future__ import annotations

import sys


def _identity_compile(model=None, **_options):
    return model if model is not None else (lambda fn: fn)


def import_megatron_without_torch_compile() -> None:
    """Imports megatron-core with its fusion helpers left uncompiled. A no-op once megatron-core is imported."""
    if "megatron.core" in sys.modules:
        return
    import torch

    real_compile = torch.compile
    torch.compile = _identity_compile
    try:
        import megatron.core.tensor_parallel  # noqa: F401  (imports the package and its fusion modules)
    finally:
        torch.compile = real_compile
