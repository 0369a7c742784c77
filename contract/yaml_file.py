"""Reading a spec file (a job or a sweep) strictly: UTF-8 text of bounded size, YAML without duplicate keys.

PyYAML alone lets the last of two equal keys win silently, and reads `1e-3` as a string (YAML 1.1 wants a
dot in a float); here a duplicate key is refused with its line, and `1e-3` is the number users meant, so the
spec's strict types (contract.spec) refuse only what is really of the wrong type. Every problem is a
SpecError, which the CLI prints as a message (exit 2), never a traceback."""

from __future__ import annotations

import re
from typing import Any

import yaml

from contract.errors import FieldViolation, SpecError

# A spec is a page of YAML; past this it is not one.
MAX_FILE_BYTES = 1 << 20
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a key twice (merged keys `<<: *anchor` may be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {str(key)[:100]!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats without a dot (1e-3, 5E+2): numbers, as every YAML 1.2 reader and JSON take them.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+\Z"),
                                    list("-+0123456789"))


def load_yaml_file(path: str) -> Any:
    """The data in a YAML spec file; raises SpecError (field "") for a file that is too large, not UTF-8, or
    not valid YAML (a duplicate key included), and OSError if it cannot be read."""
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([FieldViolation("", f"larger than {MAX_FILE_BYTES // 1024} KiB: not a spec")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([FieldViolation("", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                                            f"{exc.start}")]) from None
    return load_yaml_text(text)


def load_yaml_text(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise SpecError([FieldViolation("", f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError([FieldViolation("", "not valid YAML: nested too deeply")]) from None
