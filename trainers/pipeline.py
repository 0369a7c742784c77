"""The training engine: the GPT's layers in a DeepSpeed PipelineModule over the pipeline stages, with ZeRO
stage 1 sharding the optimizer state over data parallelism. One code path for every layout, (1, 1, 1)
included.

DeepSpeed runs the pipeline schedule. Its `train_batch` does a whole step in one call; here it is taken in its
two halves, so that the training loop shows what comes between them: `forward_backward` pulls this rank's
micro-batches of one global batch, runs forward and backward through the stages, averages gradients over
data parallelism and returns the loss (the mean over the global batch, on every rank); `optimizer_step` steps
the optimizer. The instructions are DeepSpeed's own, in the same order; only the loss is averaged before the
optimizer step rather than after it (it does not depend on the step)."""

from __future__ import annotations

import logging

import torch

import offload
from contract.spec import JobSpec
from trainers.model import Block, Embedding, GPTConfig, Head, global_named_parameters, loss_fn, parameter_table
from trainers.optim import build_optimizer
from trainers.parallel import ParallelDims


def build_engine(spec: JobSpec, dims: ParallelDims, topology):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    config = GPTConfig.from_spec(spec.model)
    seed = spec.training.seed
    # Each layer is built (and initialised) only on the stage that owns it; stages get equal numbers of
    # blocks, the embedding goes with the first and the head with the last.
    layers = [LayerSpec(Embedding, config, dims.tp, dims.tp_rank, seed)]
    layers += [LayerSpec(Block, config, dims.tp, dims.tp_rank, seed, i) for i in range(config.layers)]
    layers += [LayerSpec(Head, config, dims.tp, dims.tp_rank, seed)]
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method="type:Block",
                            activation_checkpoint_interval=0)
    t = spec.training
    ds_config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dims.dp),
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if t.precision == "bf16":
        # bf16 weights, activations and gradients; ZeRO-1 keeps fp32 master weights and optimizer state.
        ds_config["bf16"] = {"enabled": True}
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # The optimizer for training.offload, and what DeepSpeed needs for it (offload: ZeRO-1's CPU offload).
    built = build_optimizer(global_named_parameters(module), parameter_table(config), t)
    ds_config = offload.merge_ds_config(ds_config, built.ds_config)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=built.optimizer, config=ds_config)
    return engine


def offloaded_optimizer(engine) -> offload.HybridAdam | None:
    """The HybridAdam that ZeRO-1 steps when training.offload is on; None without offload."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, offload.HybridAdam) else None


def prefetch_optimizer_state(engine) -> None:
    """With interleaved offload, starts copying the first device subgroups' weights and moments to the
    accelerator, so that the next optimizer step starts its device work at once. Call it at the start of a
    step (the state does not change until that step's optimizer step; a checkpoint snapshot only reads it)."""
    optimizer = offloaded_optimizer(engine)
    if optimizer is not None:
        optimizer.prefetch()


def _schedule_without_optimizer_step(engine):
    """DeepSpeed's training schedule for this stage, less its last instruction (the optimizer step)."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep, TrainSchedule

    class WithoutOptimizerStep(TrainSchedule):
        def steps(self):
            for commands in super().steps():
                yield [command for command in commands if not isinstance(command, OptimizerStep)]

    return WithoutOptimizerStep(micro_batches=engine.micro_batches, stages=engine.num_stages,
                                stage_id=engine.stage_id)


def forward_backward(engine, batches) -> float:
    """The first half of DeepSpeed's `train_batch`: forward and backward over `batches` (this rank's
    micro-batches), gradients reduced over data parallelism; returns the loss, the mean over the global batch.
    The weights and the optimizer's state are left as they were."""
    engine.set_dataiterator(batches)
    engine.module.train()
    engine.total_loss = None
    engine.total_additional_losses = None
    engine._compute_loss = True
    engine._exec_schedule(_schedule_without_optimizer_step(engine))
    with torch.no_grad():
        engine.agg_train_loss = engine._aggregate_total_loss()  # a collective: the loss on every rank
    return engine.agg_train_loss.item()


def optimizer_step(engine) -> None:
    """The second half of DeepSpeed's `train_batch`: the optimizer step (ZeRO-1: each rank updates its
    partition, then the weights are gathered over data parallelism)."""
    engine._exec_optimizer_step()


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, micro_batch_size: int):
    """What DeepSpeed's pipeline pulls from: (inputs, labels) per micro-batch."""
    return iter(list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True)))


class OffloadPlacement:
    """The checkpointer's view of the offload placement (trainers.checkpoint.PlacementRecord): which subgroups
    of this rank's optimizer state the accelerator updates."""

    def __init__(self, engine):
        self.engine = engine

    def record(self) -> dict | None:
        optimizer = offloaded_optimizer(self.engine)
        if optimizer is None:
            return None
        mode = "cpu" if optimizer.device is None else "interleaved"
        return {"mode": mode, "subgroup_size": optimizer.subgroup_size, "subgroups": len(optimizer.table),
                **optimizer.placement.record()}

    def restore(self, record: dict) -> str | None:
        optimizer = offloaded_optimizer(self.engine)
        if optimizer is None or optimizer.device is None or record.get("mode") != "interleaved":
            return None  # nothing on the device, before or now: nothing to place
        if record.get("subgroup_size") != optimizer.subgroup_size or record.get("subgroups") != len(optimizer.table):
            return (f"it was cut into {record.get('subgroups')} subgroups of {record.get('subgroup_size')}, this "
                    f"run into {len(optimizer.table)} of {optimizer.subgroup_size}")
        try:
            optimizer.set_placement(offload.Placement(frozenset(record["on_device"]), int(record["slots"])))
        except (KeyError, TypeError, ValueError) as exc:
            return f"unusable record: {exc}"
        return None
