"""The training engine: the GPT's layers in a DeepSpeed PipelineModule over the pipeline stages, with ZeRO
stage 1 sharding the optimizer state over data parallelism. One code path for every layout, (1, 1, 1)
included.

DeepSpeed runs the pipeline schedule: each `train_batch` pulls this rank's micro-batches of one global
batch, runs forward and backward through the stages, averages gradients over data parallelism and steps
the optimizer. The loss it returns is the mean over the global batch, on every rank."""

from __future__ import annotations

import logging

import torch

from contract.spec import JobSpec
from trainers.model import Block, Embedding, GPTConfig, Head, loss_fn
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
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, t),
                                           config=ds_config)
    return engine


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, micro_batch_size: int):
    """What DeepSpeed's pipeline pulls from: (inputs, labels) per micro-batch."""
    return iter(list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True)))
