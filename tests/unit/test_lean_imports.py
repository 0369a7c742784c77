"""A rank imports megatron-core without TorchInductor, and leaves torch.compile as it found it."""

import subprocess
import sys

from tests.support.waiting import DEADLINE

CHECK = """
import sys, torch
real = torch.compile
from trainers.lean_imports import import_megatron_without_torch_compile
import_megatron_without_torch_compile()
import megatron.core.jit
assert torch.compile is real, "torch.compile restored"
assert megatron.core.jit.jit_fuser is not real, "megatron's fusion decorator is not torch.compile"
assert "torch._inductor.compile_fx" not in sys.modules, "TorchInductor was imported"
print("ok")
"""


def test_megatron_imports_without_compiling_its_fusion_helpers():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
