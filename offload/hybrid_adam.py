"""HybridAdam: AdamW whose update is shared between the host CPU and an accelerator, for DeepSpeed's ZeRO-1
CPU-offload path.

DeepSpeed keeps what it does well (the data-parallel partition, the pinned host fp32 master, gradients copied
to the host, the bf16 refresh and the all-gather) and calls `step()` once per parameter group, with
`param_groups` narrowed to that group and each group holding one flat fp32 partition. Here each such tensor is
cut into subgroups (offload.subgroups). The device subgroups go through a ring of K device slots: state copied
in on the "h2d" stream, fused AdamW on the "compute" stream, results copied back on the "d2h" stream, ordered by
events; meanwhile the CPU runs torch's fused AdamW on the other subgroups' host views. `step()` returns once
every host tensor is final, because DeepSpeed casts the master to bf16 right after.

The state is torch's: `optimizer.state[p]` holds `step` (a float32 scalar tensor), `exp_avg` and `exp_avg_sq`
shaped like `p`, allocated once and updated in place (DeepSpeed's per-parameter fragments are views into
them), so checkpoints are the same with and without offload. Every element gets exactly the arithmetic of
torch.optim.AdamW(fused=True) on the CPU; on a real accelerator the device subgroups differ from it by the
device's rounding only.

Which subgroups go to the device is a `Placement`, fixed until `set_placement` or `replan` is called (the
trainer re-plans only at checkpoint boundaries)."""

from __future__ import annotations

from typing import Callable

import torch

from offload.device import COMPUTE, D2H, H2D, AdamHyper, Device, adamw_fused
from offload.subgroups import DEFAULT_SUBGROUP_SIZE, Placement, Subgroup, build_table, views

Planner = Callable[[list[Subgroup]], Placement]


class _Slot:
    """One ring slot: device buffers for param, grad, exp_avg and exp_avg_sq of one subgroup, and the event
    after which its last results have left the device (so it may be refilled)."""

    def __init__(self, device: Device, numel: int):
        self.buffers = [device.allocate(numel) for _ in range(4)]
        self.free_after = None


class HybridAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, device: Device | None = None,
                 subgroup_size: int = DEFAULT_SUBGROUP_SIZE, placement: Placement | None = None,
                 planner: Planner | None = None, cpu_threads: int | None = None):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if subgroup_size <= 0:
            raise ValueError(f"subgroup_size must be positive, got {subgroup_size}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be positive, got {cpu_threads}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.device = device
        self.subgroup_size = subgroup_size
        self.planner = planner
        # The CPU update's threads (torch's intra-op pool, set only around it): a rank's forward and backward may
        # run on one thread, but the update should use every core the rank was given. None: leave torch's.
        self.cpu_threads = cpu_threads
        # DeepSpeed narrows `param_groups` to one group around each step() and rewrites each group's params after
        # construction; the table is built over this full list of group dicts, kept by identity.
        self._all_groups = self.param_groups
        self._table: list[Subgroup] = []
        self._table_key: tuple | None = None
        self._placement = placement
        self._ring: list[_Slot] = []
        self._prefetched: list[int] = []  # subgroups whose param and moments are already in ring slots 0, 1, ...

    # placement ----------------------------------------------------------------------------------------------
    @property
    def table(self) -> list[Subgroup]:
        self._refresh_table()
        return self._table

    @property
    def placement(self) -> Placement:
        self._refresh_table()
        if self._placement is None:
            self._placement = self.planner(self._table) if self.planner else Placement.all_cpu()
            self._check_placement(self._placement)
        return self._placement

    def set_placement(self, placement: Placement) -> None:
        self._refresh_table()
        self._check_placement(placement)
        if self._ring and placement.slots != len(self._ring):
            self.release_device_memory()
        self._prefetched = []
        self._placement = placement

    def replan(self) -> Placement:
        """Ask the planner again (at a checkpoint boundary: the placement is part of what a checkpoint records)."""
        self._placement = None
        self.release_device_memory()
        return self.placement

    def release_device_memory(self) -> None:
        self._prefetched = []
        for slot in self._ring:
            for buffer in slot.buffers:
                self.device.free(buffer)
        self._ring = []

    def _check_placement(self, placement: Placement) -> None:
        if placement.on_device and self.device is None:
            raise ValueError("placement puts subgroups on the device, but the optimizer has no device")
        bad = [i for i in placement.on_device if not 0 <= i < len(self._table)]
        if bad:
            raise ValueError(f"placement names subgroups {bad[:5]} outside the table of {len(self._table)}")

    def _refresh_table(self) -> None:
        if any(not any(g is a for a in self._all_groups) for g in self.param_groups):
            self._all_groups = self.param_groups  # the list was replaced (load_state_dict, or by its owner)
        key = tuple(tuple(p.numel() for p in g["params"]) for g in self._all_groups)
        if key != self._table_key:
            if self._table_key is not None and self._placement is not None and self.planner is not None:
                self._placement = None  # a different table: plan again; an explicit placement is re-checked
            self._table = build_table([list(k) for k in key], self.subgroup_size)
            self._table_key = key
            self._prefetched = []
            if self._placement is not None:
                self._check_placement(self._placement)

    # the update ---------------------------------------------------------------------------------------------
    def state_of(self, p: torch.Tensor) -> dict:
        """p's state, created on first use (zeros, pinned when there is a device) and kept for good."""
        state = self.state[p]
        if not state:
            pin = self.device.pin if self.device is not None and p.device.type == "cpu" else (lambda t: t)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = pin(torch.zeros_like(p, memory_format=torch.preserve_format))
            state["exp_avg_sq"] = pin(torch.zeros_like(p, memory_format=torch.preserve_format))
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        placement = self.placement
        subgroups_of: dict[tuple[int, int], list[Subgroup]] = {}
        for s in self._table:
            subgroups_of.setdefault((s.group, s.param), []).append(s)

        for group in self.param_groups:
            g = next(i for i, a in enumerate(self._all_groups) if a is group)
            beta1, beta2 = group["betas"]
            hyper = AdamHyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"])
            on_device, on_cpu = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("HybridAdam supports dense real tensors only")
                state = self.state_of(p)
                step_before = float(state["step"])
                state["step"] += 1
                for s in subgroups_of[(g, i)]:
                    (on_device if s.index in placement.on_device else on_cpu).append((p, state, s, step_before))
            self._start_on_device(on_device, hyper, placement.slots)
            self._update_on_cpu(on_cpu, hyper)
            if on_device:
                # The host master must be final when step() returns: DeepSpeed casts it right after.
                self.device.synchronize()
        return loss

    def _update_on_cpu(self, work, hyper: AdamHyper) -> None:
        if not work:
            return
        threads = torch.get_num_threads()
        if self.cpu_threads is not None and self.cpu_threads != threads:
            torch.set_num_threads(self.cpu_threads)
            try:
                self._fused_update(work, hyper)
            finally:
                torch.set_num_threads(threads)
        else:
            self._fused_update(work, hyper)

    def _fused_update(self, work, hyper: AdamHyper) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, state, s, step_before in work:
            params.append(views(p, s))
            grads.append(views(p.grad, s))
            exp_avgs.append(views(state["exp_avg"], s))
            exp_avg_sqs.append(views(state["exp_avg_sq"], s))
            steps.append(torch.tensor(step_before, dtype=torch.float32))
        adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, hyper)

    def _ensure_ring(self, slots: int) -> None:
        numel = max(s.numel for s in self._table)  # sized once, for the largest subgroup of any group
        if len(self._ring) != slots or self._ring[0].buffers[0].numel() < numel:
            self.release_device_memory()
            self._ring = [_Slot(self.device, numel) for _ in range(slots)]

    def prefetch(self) -> int:
        """Start copying in the parameters and moments of the first K device subgroups of the first group
        DeepSpeed will step, so the next step() starts its device work at once and copies only their gradients.
        Call it when the host master and moments will not change before step() (e.g. just before the training
        batch, after any checkpoint load); load_state_dict and placement changes drop a prefetch. Returns the
        number of subgroups prefetched."""
        placement = self.placement
        self._prefetched = []
        if not placement.on_device:
            return 0
        first_group = min(s.group for s in self._table if s.index in placement.on_device)
        params = self._all_groups[first_group]["params"]
        chosen = [s for s in self._table if s.group == first_group and s.index in placement.on_device]
        chosen = chosen[:placement.slots]
        self._ensure_ring(placement.slots)
        for j, s in enumerate(chosen):
            p = params[s.param]
            state = self.state_of(p)
            slot = self._ring[j]
            if slot.free_after is not None:
                self.device.wait(H2D, slot.free_after)
            for dst, src in ((slot.buffers[0], p), (slot.buffers[2], state["exp_avg"]),
                             (slot.buffers[3], state["exp_avg_sq"])):
                self.device.copy(H2D, dst[:s.numel], views(src, s))
            self._prefetched.append(s.index)
        return len(chosen)

    def _start_on_device(self, work, hyper: AdamHyper, slots: int) -> None:
        """Queue every device subgroup through the ring and return at once (the CPU works meanwhile)."""
        if not work:
            return
        self._ensure_ring(slots)
        prefetched = self._prefetched if [s.index for _, _, s, _ in work[:len(self._prefetched)]] == \
            self._prefetched else []
        self._prefetched = []
        device = self.device
        for j, (p, state, s, step_before) in enumerate(work):
            slot = self._ring[j % slots]
            host = [views(p, s), views(p.grad, s), views(state["exp_avg"], s), views(state["exp_avg_sq"], s)]
            param, grad, exp_avg, exp_avg_sq = (b[:s.numel] for b in slot.buffers)
            if j < len(prefetched):
                device.copy(H2D, grad, host[1])  # param and moments came in with prefetch()
            else:
                if slot.free_after is not None:
                    device.wait(H2D, slot.free_after)  # the slot's previous subgroup has left the device
                for dst, src in zip((param, grad, exp_avg, exp_avg_sq), host):
                    device.copy(H2D, dst, src)
            loaded = device.record(H2D)
            device.wait(COMPUTE, loaded)
            device.adamw(COMPUTE, [param], [grad], [exp_avg], [exp_avg_sq], step_before, hyper)
            updated = device.record(COMPUTE)
            device.wait(D2H, updated)
            for dst, src in zip((host[0], host[2], host[3]), (param, exp_avg, exp_avg_sq)):
                device.copy(D2H, dst, src)
            slot.free_after = device.record(D2H)

    # checkpoints --------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then the loaded values copied into the tensors that existed before, so the state stays
        allocated once (DeepSpeed's fragment views keep pointing at live memory)."""
        self._prefetched = []
        before = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        self._all_groups = self.param_groups
        for p, state in self.state.items():
            old = before.get(p, {})
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key not in state:
                    continue
                if key in old and old[key].shape == state[key].shape:
                    old[key].copy_(state[key])
                    state[key] = old[key]
                elif key != "step" and self.device is not None and state[key].device.type == "cpu":
                    state[key] = self.device.pin(state[key])
