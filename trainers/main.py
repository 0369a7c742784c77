"""The rank's training loop: `python -m trainers`, one process per rank.

This trainer handles single-rank and data-parallel jobs (tp = pp = 1) on CPU, with gloo between ranks. Each
step trains on one global batch (trainers.data), split across the data-parallel ranks and, within a rank, into
micro-batches whose gradients accumulate before one AdamW step. Rank 0 prints one line per step and queues
one metric point per step for the control plane (trainers.reporting).

The environment contract, test hooks included, is in trainers.env. Exit codes:

    0   trained every step
    1   failed: the traceback is on stderr (bad data, a peer rank gone, any bug)
    2   cannot run as configured: bad environment, unreadable spec, or a layout this trainer lacks
    3   the control plane said stop (cancelled, or a newer attempt): the reason is printed
    17  RH_FAULT_EXIT_AT_STEP fired (a simulated crash)
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from orchestrator.spec import JobSpec
from trainers.data import Batch, TextData
from trainers.env import ConfigError, RankEnv, TestHooks, load_spec
from trainers.model import GPT, build_model
from trainers.optim import build_optimizer, set_lr
from trainers.reporting import make_reporter, metric_point
from trainers.schedule import lr_at

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_FAULT = 17
PROCESS_GROUP_TIMEOUT = timedelta(seconds=120)


def main() -> int:
    try:
        env = RankEnv.from_environ()
        hooks = TestHooks.from_environ()
        spec = load_spec(env.spec_file)
        check_layout(spec, env)
    except ConfigError as exc:
        print(f"roundhouse trainer: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        return train(spec, env, hooks)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return EXIT_FAILED


def check_layout(spec: JobSpec, env: RankEnv) -> None:
    p = spec.parallelism
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(f"this job asks for tp={p.tp} pp={p.pp}, but this trainer runs data parallelism "
                          f"only: tensor/pipeline parallel arrive with the 3D trainer")
    if env.world_size != spec.world_size:
        raise ConfigError(f"WORLD_SIZE={env.world_size}, but the spec's tp*pp*dp = {spec.world_size}")


def train(spec: JobSpec, env: RankEnv, hooks: TestHooks) -> int:
    t, dp = spec.training, spec.parallelism.dp
    rank0 = env.rank == 0
    distributed = env.world_size > 1
    reporter = make_reporter(env)
    reporter.start()  # heartbeats begin before the rendezvous, which may wait for slow peers
    try:
        if distributed:
            torch.set_num_threads(1)  # one core per rank; more threads only fight over the same cores
            dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                    rank=env.rank, world_size=env.world_size, timeout=PROCESS_GROUP_TIMEOUT)
        if env.start_step and rank0:
            print(f"roundhouse trainer: ROUNDHOUSE_START_STEP={env.start_step}, but this trainer does not resume "
                  f"from checkpoints yet: training from step 1", flush=True)
        torch.manual_seed(t.seed)
        data = TextData.from_path(spec.data.path, spec.model.seq_length, t.seed)
        model = build_model(spec.model, t.seed)
        trained = DistributedDataParallel(model) if dp > 1 else model
        optimizer = build_optimizer(model, t)
        accumulation = t.global_batch_size // (t.micro_batch_size * dp)
        tokens_per_step = t.global_batch_size * spec.model.seq_length
        if rank0:
            print(f"roundhouse trainer: {env.job or spec.name} attempt {env.attempt}, {env.world_size} rank(s) "
                  f"(dp={dp}), {model.num_parameters() / 1e6:.2f}M parameters, corpus "
                  f"{len(data.train) + len(data.val)} bytes ({spec.data.path or 'built-in'}), "
                  f"{accumulation} micro-batch(es) of {t.micro_batch_size} per rank per step", flush=True)

        for step in range(1, t.steps + 1):
            if hooks.should_crash(env.rank, step):
                print(f"rank {env.rank}: RH_FAULT_EXIT_AT_STEP={step}: exiting with code {EXIT_FAULT}", flush=True)
                sys.stderr.flush()
                os._exit(EXIT_FAULT)
            started = time.perf_counter()
            lr = lr_at(step, t)
            set_lr(optimizer, lr)
            batch = data.train_batch(step, t.global_batch_size, env.rank, dp)
            local_loss = train_step(trained, optimizer, batch, t.micro_batch_size)
            loss, stop = agree(local_loss, reporter.stop_reason is not None, distributed)
            tokens_per_second = tokens_per_step / (time.perf_counter() - started)
            reporter.set_step(step)

            val_loss = None
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                val_loss = evaluate(model, data, env.rank, dp, t.micro_batch_size, distributed)
            if rank0:
                print(f"step {step}/{t.steps} loss {loss:.6f} lr {lr:.1e} tok/s {tokens_per_second:.0f}",
                      flush=True)
                if val_loss is not None:
                    print(f"step {step}/{t.steps} val_loss {val_loss:.6f}", flush=True)
                reporter.add_point(metric_point(step, env.attempt, env.rank, loss=loss, val_loss=val_loss,
                                                tokens_per_second=tokens_per_second, learning_rate=lr))
            if stop:
                reason = reporter.stop_reason or "another rank was told to stop"
                print(f"rank {env.rank}: stopping after step {step}: {reason}", flush=True)
                return EXIT_STOPPED
            if hooks.step_sleep:
                time.sleep(hooks.step_sleep)
        return EXIT_OK
    finally:
        reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, micro_batch_size: int) -> float:
    """One optimizer step over this rank's share of the global batch; returns its mean loss.

    Each micro-batch's loss is divided by the number of micro-batches, so the accumulated gradient is the mean
    over the rank's share; DDP then averages across ranks: together, the mean over the global batch."""
    optimizer.zero_grad(set_to_none=True)
    micro_batches = list(zip(batch.inputs.split(micro_batch_size), batch.targets.split(micro_batch_size)))
    total = 0.0
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced once, on the last micro-batch.
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with no_sync:
            loss = model(inputs, targets)
            (loss / len(micro_batches)).backward()
        total += loss.item()
    optimizer.step()
    return total / len(micro_batches)


def agree(local_loss: float, stop: bool, distributed: bool) -> tuple[float, bool]:
    """The step's loss averaged over ranks, and whether any rank was told to stop (so all stop together)."""
    if not distributed:
        return local_loss, stop
    values = torch.tensor([local_loss, float(stop)], dtype=torch.float64)
    dist.all_reduce(values)
    return values[0].item() / dist.get_world_size(), values[1].item() > 0


@torch.no_grad()
def evaluate(model: GPT, data: TextData, dp_rank: int, dp: int, micro_batch_size: int, distributed: bool) -> float:
    """Mean loss per token over the fixed held-out windows, each rank taking its share."""
    model.eval()
    batch = data.val_batch(dp_rank, dp)
    totals = torch.zeros(2, dtype=torch.float64)  # loss summed over tokens, tokens
    for inputs, targets in zip(batch.inputs.split(micro_batch_size), batch.targets.split(micro_batch_size)):
        if not targets.numel():
            continue  # more ranks than held-out windows: this rank has none
        totals[0] += model(inputs, targets).item() * targets.numel()
        totals[1] += targets.numel()
    if distributed:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()
