"""What a spec may reach outside itself, under the server's policy.

- `data.path` only inside the data roots the operator configured (`roundhouse serve --data-root DIR`; on
  Kubernetes, the data directory of the shared volume). No roots: only the built-in corpus (no data.path).
  A relative path is taken under the first root.
- Test hooks (`RH_FAULT_*`, `RH_TEST_*` in `env`) only on a server started for tests.

The control plane checks at CreateJob by the path's text (`reach_violations`: it may not see the ranks'
filesystem); the rank checks again with symlinks resolved (`resolve_data_path(..., follow_symlinks=True)`),
where the data is opened. `checkpoint.directory` and `env` names need no policy: contract.spec checks them."""

from __future__ import annotations

import os
from collections.abc import Sequence

from contract.errors import FieldViolation
from contract.spec import JobSpec, is_test_hook


class DataPathError(ValueError):
    """data.path is not inside a data root; the message says why."""


def reach_violations(spec: JobSpec, data_roots: Sequence[str | os.PathLike], allow_test_hooks: bool
                     ) -> list[FieldViolation]:
    """Why the spec reaches beyond what this server allows (empty: it does not)."""
    out: list[FieldViolation] = []
    if spec.data.path is not None:
        try:
            resolve_data_path(spec.data.path, data_roots)
        except DataPathError as exc:
            out.append(FieldViolation("data.path", str(exc)))
    if not allow_test_hooks:
        for name in spec.env:
            if is_test_hook(name):
                out.append(FieldViolation(f"env.{name}", "a test hook: refused unless the server was started "
                                                         "for tests (roundhouse serve --allow-test-hooks)"))
    return out


def resolve_data_path(path: str, data_roots: Sequence[str | os.PathLike], follow_symlinks: bool = False) -> str:
    """The absolute path `path` names, provided it lies inside one of `data_roots` (a relative path is taken
    under the first); raises DataPathError otherwise. With `follow_symlinks`, symlinks in the path and the
    roots are resolved first, and the resolved path is returned: what is opened is what was checked."""
    if not data_roots:
        raise DataPathError("this server has no data roots (roundhouse serve --data-root DIR): only the built-in "
                            "corpus may be used; leave data.path unset")
    if not path or "\0" in path:
        raise DataPathError("must be a non-empty path without NUL characters")
    real = os.path.realpath if follow_symlinks else os.path.normpath
    roots = [real(os.path.abspath(os.fspath(root))) for root in data_roots]
    candidate = real(os.path.join(os.path.abspath(os.fspath(data_roots[0])), path))
    for root in roots:
        if candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep):
            return candidate
    where = "resolves to " + candidate + ", which is" if candidate != path else "is"
    raise DataPathError(f"{path} {where} outside the server's data roots ({', '.join(roots)})")
