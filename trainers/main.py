"""The rank's training loop: `python -m trainers`, one process per rank.

Every job runs as tp × pp × dp ranks training one GPT together (trainers.parallel says how the world is
split): megatron-core's tensor-parallel layers (trainers.model) in a DeepSpeed pipeline with ZeRO-1 over data
parallelism (trainers.pipeline), on CPU with gloo or on GPUs with NCCL. Each step trains on one global batch
(trainers.data), split across the data-parallel ranks and, within a rank, into micro-batches. Rank 0 prints
one line per step and queues one metric point per step for the control plane (trainers.reporting); under µP
every `model.mup.sigma_every_steps` steps that point also carries each matrix's top singular value.

The environment contract is contract.rank_env; what the rank makes of it (spec, test hooks, the paths it may
open) is trainers.env. Exit codes:

    0   trained every step
    1   failed: the traceback is on stderr (bad data, a peer rank gone, any bug)
    2   cannot run as configured: bad environment, unreadable spec, or a world size that is not tp*pp*dp
    3   the control plane said stop (cancelled, or a newer attempt): the reason is printed
    4   preempted: SIGTERM arrived, every rank finished its step, wrote a checkpoint and exited
    17  a fault hook fired (a simulated crash)

Checkpoints (trainers.checkpoint): with a checkpoint directory, a rank first resumes from the newest committed
checkpoint there, whatever layout it was written at, then saves every `checkpoint.interval` steps and at the
end (in the background when `checkpoint.async_save`), and on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from contract.metrics import MAX_SIGMA_PARAMETERS
from contract.spec import JobSpec
from roundhouse.v1 import job_pb2, trainer_service_pb2 as ts
from trainers import parallel
from trainers.checkpoint import Checkpointer, Manifest
from trainers.model import GPTConfig, global_named_parameters, parameter_table
from trainers.mup import record as parametrization_record, reported_matrices, top_singular_values
from trainers.optimizer_state import ZeroOneOptimizerState
from trainers.data import TextData
from trainers.indexed_dataset import TokenWindows, open_dataset
from trainers.env import ConfigError, RankEnv, TestHooks, checkpoint_root, data_path, load_spec, read_rank_env
from trainers.parallel import ParallelDims
from trainers.optim import set_lr
from trainers.pipeline import (OffloadPlacement, build_engine, forward_backward, micro_batches, offloaded_optimizer,
                               optimizer_step, prefetch_optimizer_state)
from trainers.reporting import ReporterLike, make_reporter, metric_point
from trainers.say import say
from trainers.schedule import lr_at

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_PREEMPTED = 4
EXIT_FAULT = 17


def main() -> int:
    try:
        env = read_rank_env()
        hooks = TestHooks.from_environ(enabled=env.test_hooks)
        spec = load_spec(env.spec_file, env.spec_json)
        check_layout(spec, env)
        # The paths the rank opens, checked once here (symlinks resolved) and then used as they are.
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": data_path(spec, env)})})
        root = checkpoint_root(spec, env)
        env = dataclasses.replace(env, checkpoint_dir=str(root) if root else None)
    except ConfigError as exc:
        say(f"roundhouse trainer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return train(spec, env, hooks)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return EXIT_FAILED


def check_layout(spec: JobSpec, env: RankEnv) -> None:
    if env.world_size != spec.world_size:
        raise ConfigError(f"WORLD_SIZE={env.world_size}, but the spec's tp*pp*dp = {spec.world_size}")


def train(spec: JobSpec, env: RankEnv, hooks: TestHooks) -> int:
    t, p = spec.training, spec.parallelism
    dims = ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, rank=env.rank)
    rank0 = env.rank == 0
    if env.world_size > 1:
        torch.set_num_threads(1)  # one core per rank; more threads only fight over the same cores
    preemption = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: preemption.set())
    reporter = make_reporter(env)
    reporter.start()  # heartbeats begin before the rendezvous: a rank waiting for its peers is alive
    try:
        reporter.set_phase(parallel.startup_phase())
        topology = parallel.setup(dims, env.master_addr, env.master_port, env.local_rank)
        torch.manual_seed(t.seed)
        reporter.set_phase("building the model")
        data = open_dataset(spec.data.path, spec.model.seq_length, t.seed, vocab_size=spec.model.vocab_size)
        engine = build_engine(spec, dims, topology)
        checkpointer = make_checkpointer(spec, env, hooks, engine, dims, reporter)
        reporter.set_phase("restoring a checkpoint" if checkpointer else "")
        start = checkpointer.restore() if checkpointer else 0
        reporter.set_phase("")  # training
        tokens_per_step = t.global_batch_size * spec.model.seq_length
        parameters = count_parameters(engine, dims)  # a collective: every rank takes part
        if rank0:
            say(f"roundhouse trainer: {env.job or spec.name} attempt {env.attempt}, {env.world_size} rank(s), "
                  f"layout tp={p.tp} pp={p.pp} dp={p.dp}, {parameters:,} parameters, corpus "
                  f"{len(data.train) + len(data.val):,} tokens ({spec.data.path or 'built-in'}), "
                  f"{engine.gradient_accumulation_steps()} micro-batch(es) of {t.micro_batch_size} per rank "
                  f"per step, {f'resuming after step {start}' if start else 'from the start'}")
        describe_offload(engine, t.offload.mode, rank0)
        reporter.set_step(start)
        sigma_every = spec.model.mup.sigma_every_steps if spec.model.mup is not None else 0
        training_started = time.perf_counter()

        for step in range(start + 1, t.steps + 1):
            if hooks.should_crash(env.rank, step, env.attempt):
                say(f"rank {env.rank}: RH_FAULT_EXIT_AT_STEP={step}: exiting with code {EXIT_FAULT}")
                sys.stderr.flush()
                os._exit(EXIT_FAULT)
            if hooks.should_hang(env.rank, step, env.attempt):
                say(f"rank {env.rank}: RH_FAULT_HANG_AT_STEP={step}: no more heartbeats, blocking")
                reporter.stop_heartbeats()
                while True:
                    time.sleep(3600)
            started = time.perf_counter()
            lr = lr_at(step, t)
            set_lr(engine.optimizer, lr)  # each group's lr_mult times lr; ZeRO's optimizer exposes AdamW's groups
            batch = data.train_batch(step, t.global_batch_size, dims.dp_rank, dims.dp)
            prefetch_optimizer_state(engine)  # interleaved offload: the device's first subgroups, during backward
            loss = forward_backward(engine, micro_batches(batch.inputs, batch.targets, t.micro_batch_size))
            if checkpointer is not None:
                checkpointer.wait_for_snapshot()  # an async save copies the weights and moments until now
            optimizer_step(engine)
            stop, preempted = any_rank(reporter.stop_reason is not None, preemption.is_set())
            tokens_per_second = tokens_per_step / (time.perf_counter() - started)
            reporter.set_step(step)

            val_loss = None
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                val_loss = evaluate(engine, data, dims, t.global_batch_size, t.micro_batch_size)
            sigma_max = None
            if sigma_every and (step % sigma_every == 0 or step == t.steps):
                sigma_max = top_singular_values_of_model(engine, spec, dims)  # reads the weights, changes nothing
            if rank0:
                say(f"step {step}/{t.steps} loss {loss:.9g} lr {lr:.1e} tok/s {tokens_per_second:.0f}")
                if val_loss is not None:
                    say(f"step {step}/{t.steps} val_loss {val_loss:.6f}")
                if sigma_max:
                    largest = max(sigma_max, key=sigma_max.get)
                    say(f"step {step}/{t.steps} sigma_max of {len(sigma_max)} matrices: largest {largest} "
                          f"{sigma_max[largest]:.4g}")
                reporter.add_point(metric_point(step, env.attempt, env.rank, loss=loss, val_loss=val_loss,
                                                tokens_per_second=tokens_per_second, learning_rate=lr,
                                                sigma_max=sigma_max))
            if checkpointer is not None:
                interval = spec.checkpoint.interval
                last = step == t.steps
                if preempted or (interval and (step % interval == 0 or last)):
                    checkpointer.save(step, blocking=preempted or last or not spec.checkpoint.async_save)
            if preempted:
                say(f"rank {env.rank}: SIGTERM: stopped after step {step}"
                      f"{', checkpoint committed' if checkpointer else ' (no checkpoint directory)'}")
                return EXIT_PREEMPTED
            if stop:
                reason = reporter.stop_reason or "another rank was told to stop"
                say(f"rank {env.rank}: stopping after step {step}: {reason}")
                if checkpointer is not None:
                    checkpointer.wait()
                return EXIT_STOPPED
            if hooks.step_sleep:
                time.sleep(hooks.step_sleep)
        if checkpointer is not None:
            checkpointer.wait()
        if rank0:
            say(f"roundhouse trainer: trained steps {start + 1}-{t.steps} in "
                  f"{time.perf_counter() - training_started:.3f} s")
            if torch.cuda.is_available():  # benchmarks/mfu.py reads this line
                say(f"roundhouse trainer: peak GPU memory {torch.cuda.max_memory_allocated()} bytes")
        return EXIT_OK
    finally:
        parallel.teardown()
        reporter.close()  # last: heartbeats go on while the process groups are torn down


def make_checkpointer(spec: JobSpec, env: RankEnv, hooks: TestHooks, engine, dims: ParallelDims,
                      reporter: ReporterLike) -> Checkpointer | None:
    root = env.checkpoint_dir  # resolved by main() (trainers.env.checkpoint_root)
    if not root:
        return None

    def report(event: str, step: int, manifest: Manifest | None, path: str, message: str) -> None:
        layout = job_pb2.Layout(tp=manifest.tp, pp=manifest.pp, dp=manifest.dp) if manifest else None
        reporter.add_checkpoint_report(ts.ReportCheckpointRequest(
            event=ts.CheckpointEvent.Value(f"CHECKPOINT_EVENT_{event}"), step=step, layout=layout, path=path,
            size_bytes=manifest.size_bytes if manifest else 0, message=message))
        if event != "COMMITTED":
            say(f"roundhouse trainer: checkpoint {event.lower()}: step {step} ({path}) {message}")

    def crash_in_save(step: int) -> None:
        if hooks.should_crash_in_save(env.rank, step, env.attempt):
            say(f"rank {env.rank}: RH_FAULT_EXIT_IN_SAVE_AT_STEP={step}: exiting with code {EXIT_FAULT} "
                  "before the manifest")
            os._exit(EXIT_FAULT)

    config = GPTConfig.from_spec(spec.model)
    return Checkpointer(Path(root), ZeroOneOptimizerState(engine), parameter_table(config), dims,
                        global_batch_size=spec.training.global_batch_size,
                        parametrization=parametrization_record(config.mup),
                        keep_last=spec.checkpoint.keep_last, keep_every=spec.checkpoint.keep_every,
                        report=report, on_shards_written=crash_in_save,
                        before_snapshot_copy=lambda step: time.sleep(hooks.snapshot_delay),
                        placement=OffloadPlacement(engine))


def describe_offload(engine, mode: str, rank0: bool) -> None:
    """Rank 0 says where its optimizer state is updated (planning the placement now if it was not yet)."""
    optimizer = offloaded_optimizer(engine)
    if not rank0 or optimizer is None:
        return
    placement = optimizer.placement
    where = f"{len(optimizer.table)} subgroups on {optimizer.cpu_threads} CPU thread(s)"
    if optimizer.device is not None:
        where = (f"{len(placement.on_device)} of {len(optimizer.table)} subgroups on the device "
                 f"({type(optimizer.device).__name__}, {placement.slots} slots), the rest on "
                 f"{optimizer.cpu_threads} CPU thread(s)")
    say(f"roundhouse trainer: optimizer state offloaded to host memory (mode {mode}): rank 0 updates {where}")


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether any rank saw it (so that all ranks stop after the same step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    values = torch.tensor([float(flag) for flag in flags], device=collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in values.tolist())


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def count_parameters(engine, dims: ParallelDims) -> int:
    """Parameters of the whole model: this rank's, summed over tensor and pipeline ranks."""
    local = torch.tensor([float(sum(p.numel() for p in engine.module.parameters()))], dtype=torch.float64,
                         device=collective_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(local)
        local /= dims.dp
    return int(local.item())


def top_singular_values_of_model(engine, spec: JobSpec, dims: ParallelDims) -> dict[str, float] | None:
    """µP's diagnostic: σ_max of each reported matrix (trainers.mup.reported_matrices) at its global shape, in
    the parameter table's order, on rank 0 (None elsewhere). Each stage's tensor-parallel group computes its own
    matrices (data-parallel replicas hold the same weights, so only the first does), then rank 0 gathers them.
    A collective: every rank calls it at the same step. It only reads the weights and draws from its own
    generator, so training goes on exactly as without it."""
    from megatron.core import parallel_state

    table = parameter_table(GPTConfig.from_spec(spec.model))
    reported = set(reported_matrices(table, MAX_SIGMA_PARAMETERS))
    values: dict[str, float] = {}
    if dims.dp_rank == 0:
        held = [(name, param) for name, param in global_named_parameters(engine.module) if name in reported]
        values = top_singular_values(held, table, parallel_state.get_tensor_model_parallel_group())
    if dist.get_world_size() > 1:
        rank0 = dist.get_rank() == 0
        parts: list[dict[str, float]] | None = [{} for _ in range(dist.get_world_size())] if rank0 else None
        dist.gather_object(values if dims.tp_rank == 0 else {}, parts, dst=0)
        if not rank0:
            return None
        values = {name: value for part in parts for name, value in part.items()}
    return {name: values[name] for name in table if name in values}


@torch.no_grad()
def evaluate(engine, data: TextData | TokenWindows, dims: ParallelDims, windows: int, micro_batch_size: int) -> float:
    """Mean loss over a fixed global batch of held-out windows, shaped like a training batch (the pipeline's
    buffers are sized for it), averaged over data-parallel ranks."""
    from megatron.core import parallel_state

    batch = data.val_batch(dims.dp_rank, dims.dp, windows=windows)
    loss = engine.eval_batch(micro_batches(batch.inputs, batch.targets, micro_batch_size))
    loss = loss.detach().to(torch.float64).reshape(1)
    if dims.dp > 1:
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= dims.dp
    return loss.item()
