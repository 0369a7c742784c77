"""The µP coordinate check (trainers.coord_check) on the trainer's own layers: under µP each layer's output
change per coordinate does not grow with the width (|slope| ≤ 0.2 from step 3 on, for block outputs and the
logits), under the standard parametrization the block outputs' change grows at least linearly (slope ≥ 1.0),
so a broken µP fails the first assertion. One process, widths 64 to 512, 5 steps: about 40 s."""

from __future__ import annotations

import pytest

from contract.spec import parse_spec
from trainers import coord_check

SPEC = {"name": "coord-check",
        "model": {"layers": 2, "hidden_size": 64, "heads": 4, "seq_length": 32, "mup": {"base_hidden_size": 64}},
        "training": {"learning_rate": 0.005, "seed": 7}}
WIDTHS = [64, 128, 256, 512]
STEPS = 5


@pytest.fixture(scope="module")
def checks() -> dict[str, coord_check.CoordCheck]:
    spec = parse_spec(SPEC)
    return {"mup": coord_check.run(spec, WIDTHS, STEPS), "standard": coord_check.run(spec, WIDTHS, STEPS,
                                                                                      standard=True)}


def test_under_mup_block_outputs_and_logits_change_alike_at_every_width(checks):
    check = checks["mup"]
    assert check.layers == ["embedding", "blocks.0", "blocks.1", "logits"]
    for step, slopes in enumerate(check.slopes()[2:], start=3):
        for layer in ("blocks.0", "blocks.1", "logits"):
            assert abs(slopes[layer]) <= 0.2, (step, layer, slopes)


def test_under_the_standard_parametrization_block_outputs_change_more_the_wider(checks):
    for step, slopes in enumerate(checks["standard"].slopes()[2:], start=3):
        for layer in ("blocks.0", "blocks.1"):
            assert slopes[layer] >= 1.0, (step, layer, slopes)


def test_at_the_base_width_both_parametrizations_train_alike(checks):
    # m = 1: µP differs only in not decaying embeddings and the readout, and this run has no weight decay.
    for step in range(STEPS):
        for layer in checks["mup"].layers:
            assert checks["mup"].changes[step][layer][0] == pytest.approx(checks["standard"].changes[step][layer][0],
                                                                          rel=1e-5), (step, layer)


def test_the_command_line_prints_slopes_and_writes_a_png(tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: cc\nmodel: {layers: 1, hidden_size: 32, heads: 2, seq_length: 16, "
                         "mup: {base_hidden_size: 32}}\n")
    plot = tmp_path / "out.png"
    assert coord_check.main([str(spec_file), "--widths", "32,64", "--steps", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "coordinate check (µP)" in out and "blocks.0" in out and "logits" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        coord_check.main([str(spec_file), "--widths", "32,x"])
    with pytest.raises(ValueError, match="--widths: 33 does not split into 2 heads"):
        coord_check.main([str(spec_file), "--widths", "33,64"])
