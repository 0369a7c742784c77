"""`python -m trainers`: run this process's rank of a job (see trainers.main and trainers.env)."""

import sys

from trainers.lean_imports import import_megatron_without_torch_compile
from trainers.quiet import silence_library_noise

silence_library_noise()  # before trainers.main imports megatron-core and DeepSpeed
import_megatron_without_torch_compile()

from trainers.main import main  # noqa: E402

sys.exit(main())
