"""The rank's side of µP's σ_max metrics (trainers.reporting): a metric point carries them by global name, and
the reporter's batches stay within a byte bound whatever the points carry."""

from __future__ import annotations

from collections import deque

from contract.metrics import MAX_PARAMETER_NAME, MAX_SIGMA_PARAMETERS
from trainers.reporting import first_batch, metric_point


def test_a_metric_point_carries_sigma_max_by_parameter_name_only_when_given():
    point = metric_point(50, 1, 0, loss=2.5, sigma_max={"blocks.0.attn.qkv.weight": 1.25, "head.out.weight": 3.0})
    assert dict(point.sigma_max) == {"blocks.0.attn.qkv.weight": 1.25, "head.out.weight": 3.0}
    assert point.loss == 2.5 and point.step == 50
    assert len(metric_point(51, 1, 0, loss=2.4).sigma_max) == 0


def test_a_batch_stops_at_its_byte_bound_but_always_holds_a_point():
    names = [f"blocks.{i}.mlp.proj.weight".ljust(MAX_PARAMETER_NAME, "x") for i in range(MAX_SIGMA_PARAMETERS)]
    heavy = metric_point(1, 1, 0, loss=1.0, sigma_max=dict.fromkeys(names, 1.0))
    pending = deque((sequence, heavy) for sequence in range(100))
    size = heavy.ByteSize()
    assert size > 4000  # the largest point contract.metrics allows

    batch = first_batch(pending, max_points=512, max_bytes=10 * size)
    assert [sequence for sequence, _ in batch] == list(range(10))
    assert len(first_batch(pending, max_points=3, max_bytes=10 * size)) == 3
    assert len(first_batch(pending, max_points=512, max_bytes=1)) == 1  # one point always goes
    assert first_batch(deque(), max_points=512, max_bytes=size) == []
