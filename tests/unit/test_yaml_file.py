"""Reading spec files strictly (contract/yaml_file.py): duplicate keys, wrong types, non-UTF-8 and oversized
files are refused with a message, never a traceback or a silent choice."""

from __future__ import annotations

import pytest

from contract.errors import SpecError
from contract.spec import load_spec_file
from contract.sweep import load_sweep_file
from contract.yaml_file import MAX_FILE_BYTES, load_yaml_file, load_yaml_text


def refusal(path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec_file(str(path))
    return info.value


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\ntraining:\n  steps: 5\n  steps: 50\n")
    error = refusal(path)
    assert "found the key 'steps' twice (first on line 3)" in str(error) and "line 4" in str(error)


def test_a_duplicate_top_level_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nname: b\n")
    assert "twice" in str(refusal(path))


def test_a_merged_key_may_be_overridden():
    data = load_yaml_text("base: &b {steps: 5, seed: 1}\ntraining:\n  <<: *b\n  steps: 50\n")
    assert data["training"] == {"steps": 50, "seed": 1}


def test_floats_without_a_dot_are_numbers():
    assert load_yaml_text("a: 1e-3\nb: -2E+2\nc: 1.5e3\nd: '1e-3'\ne: 10\n") == {
        "a": 0.001, "b": -200.0, "c": 1500.0, "d": "1e-3", "e": 10}


@pytest.mark.parametrize(("text", "field"), [
    ("name: a\ntraining: {steps: true}\n", "training.steps"),
    ("name: a\ntraining: {steps: '100'}\n", "training.steps"),
    ("name: a\ncheckpoint: {async_save: 'no'}\n", "checkpoint.async_save"),
    ("name: a\nenv: {DEBUG: on}\n", "env.DEBUG"),
    ("name: 12\n", "name"),
])
def test_values_of_the_wrong_type_are_refused(tmp_path, text, field):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert field in [v.field for v in refusal(path).violations]


def test_a_rate_in_exponent_notation_is_accepted(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: a\ntraining: {learning_rate: 3e-4}\n")
    assert load_spec_file(str(path)).training.learning_rate == 3e-4


def test_a_file_that_is_not_utf8_is_refused_with_the_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text: byte 0xe9 at offset 9" in str(refusal(path))


def test_an_oversized_file_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(SpecError) as info:
        load_yaml_file(str(path))
    assert "larger than" in str(info.value)


def test_a_sweep_file_is_read_strictly_too(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\nname: t\n")
    with pytest.raises(SpecError) as info:
        load_sweep_file(str(path))
    assert "twice" in str(info.value)


def test_a_sweep_refusal_quotes_a_huge_value_briefly():
    """Aliases can make a small file into a huge structure: a refusal shows a short repr of it."""
    text = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n" \
           "name: s\ngrid: {learning_rates: [*d]}\n"
    from contract.sweep import parse_sweep

    with pytest.raises(SpecError) as info:
        parse_sweep(load_yaml_text(text))
    assert len(str(info.value)) < 2000
