"""The offload planner: for a model's parameter count at a layout, whether it fits on a device with and without
offloading the optimizer state, which mode to use, and the predicted update times that explain the choice.

The memory arithmetic is the contract's (contract.sizing), shared with the control plane's planner, which asks
it when it places or reshapes a job that declares resources.accelerator_memory. Per rank (ZeRO-1; n = parameters
/ (tp * pp), the rank's model-parallel share):
  on the device, always:   weights and gradients in the training precision, 2 * n * weight_bytes
  without offload, also:    fp32 master, exp_avg, exp_avg_sq and the fp32 gradient partition, 16 * n / dp
  with offload, also:       the ring of K slots (interleaved), nothing (cpu)
  pinned on the host:       (16 + weight_bytes) * n / dp with offload (the ~18 bytes per parameter / dp for bf16)
Activations depend on the batch and sequence: pass them (activation_bytes; `python -m offload plan --spec`
estimates them from the spec) or read the answer as "before activations". A share of the device
(USABLE_FRACTION) is kept for the CUDA context, allocator fragmentation and communication buffers."""

from __future__ import annotations

from dataclasses import dataclass

from contract.layout import Layout
from contract.sizing import GiB, USABLE_FRACTION, pinned_host_bytes, rank_memory, state_share, usable_bytes
from offload.perf_model import Decision, MachineProfile, choose_placement
from offload.subgroups import DEFAULT_SUBGROUP_SIZE, build_table



@dataclass(frozen=True)
class PlanReport:
    params: int
    tp: int
    pp: int
    dp: int
    weight_bytes: int
    profile: MachineProfile
    device_memory_bytes: int
    usable_bytes: int
    activation_bytes: int
    device_bytes_no_offload: int
    device_bytes_offload: int      # before the ring
    host_pinned_bytes_offload: int
    fits_without_offload: bool
    fits_with_offload: bool
    mode: str                      # "none" | "cpu" | "interleaved" | "does not fit"
    decision: Decision | None      # the interleaved placement and predicted times (None: nothing fits)

    def explain(self) -> str:
        p, d = self.profile, self.decision
        lines = [
            f"model: {self.params:,} parameters; layout tp={self.tp} pp={self.pp} dp={self.dp}; "
            f"weights and gradients at {self.weight_bytes} bytes",
            f"machine: {p.name} ({'ESTIMATE from public specs' if p.estimate else 'measured'}; {p.source})",
            f"  device memory {_gib(self.device_memory_bytes)}, usable {_gib(self.usable_bytes)} "
            f"({USABLE_FRACTION:.0%}); activations counted: {_gib(self.activation_bytes)}",
            f"  copies {p.h2d_bytes_per_s / 1e9:.1f} GB/s in, {p.d2h_bytes_per_s / 1e9:.1f} GB/s out alone, "
            f"{p.h2d_concurrent_bytes_per_s / 1e9:.1f}/{p.d2h_concurrent_bytes_per_s / 1e9:.1f} GB/s together; "
            f"Adam {p.cpu_adam_params_per_s / 1e9:.2f} G params/s on the CPU "
            f"({p.cpu_adam_during_copies_params_per_s / 1e9:.2f} while copying), "
            f"{p.device_adam_params_per_s / 1e9:.1f} G params/s on the device",
            f"per rank on the device: no offload {_gib(self.device_bytes_no_offload)} "
            f"-> {'fits' if self.fits_without_offload else 'does NOT fit'}; "
            f"with offload {_gib(self.device_bytes_offload)} + ring "
            f"{_gib(d.ring_bytes) if d else '-'} -> {'fits' if self.fits_with_offload else 'does NOT fit'}",
            f"pinned host memory per rank with offload: {_gib(self.host_pinned_bytes_offload)}",
        ]
        if d is not None:
            lines += [
                f"interleaved: K={d.placement.slots} slots, {len(d.placement.on_device)} subgroups on the device "
                f"({d.device_fraction:.0%} of the elements), spread evenly",
                f"predicted update time: no offload {d.no_offload_s * 1e3:.1f} ms"
                f"{'' if self.fits_without_offload else ' (does not fit)'}; DeepSpeed CPU offload "
                f"{d.cpu_offload_s * 1e3:.1f} ms; interleaved {d.interleaved_s * 1e3:.1f} ms "
                f"({d.interleaved_s / d.cpu_offload_s:.2f}x of DeepSpeed's)",
            ]
        lines.append(f"decision: {self._reason()}")
        return "\n".join(lines)

    def _reason(self) -> str:
        if self.mode == "none":
            return "mode none: the optimizer state fits on the device; offloading would only slow the update"
        if self.mode == "cpu":
            return ("mode cpu: the model fits only with the optimizer state on the host, and on this machine the "
                    "device would not shorten the update (its copies cost more than they save)")
        if self.mode == "interleaved":
            return ("mode interleaved: the model fits only with the optimizer state on the host; interleaving "
                    "updates part of it on the device")
        return "does not fit at this layout even with offload: add ranks (tp, pp or dp) or a bigger device"


def plan(params: int, profile: MachineProfile, dp: int = 1, tp: int = 1, pp: int = 1, weight_bytes: int = 2,
         activation_bytes: int = 0, subgroup_size: int = DEFAULT_SUBGROUP_SIZE,
         device_memory_bytes: int | None = None) -> PlanReport:
    for field, value in (("params", params), ("dp", dp), ("tp", tp), ("pp", pp), ("weight_bytes", weight_bytes),
                         ("subgroup_size", subgroup_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if activation_bytes < 0:
        raise ValueError(f"activation_bytes must be >= 0, got {activation_bytes!r}")
    memory = profile.device_memory_bytes if device_memory_bytes is None else device_memory_bytes
    usable = usable_bytes(memory)
    layout = Layout(tp, pp, dp)
    need = rank_memory(params, layout, weight_bytes, activation_bytes)
    no_offload, with_offload = need.without_offload, need.with_offload
    # The rank's flat partition as one group (ZeRO-1 has one per parameter group; the no-decay group is small).
    table = build_table([[state_share(params, layout)]], subgroup_size)
    decision = None
    if with_offload <= usable:
        decision = choose_placement(table, profile, free_bytes=usable - with_offload, weight_bytes=weight_bytes)
    fits_without = no_offload <= usable
    fits_with = decision is not None and with_offload + decision.ring_bytes <= usable
    if fits_without:
        mode = "none"
    elif fits_with:
        mode = "interleaved" if decision.placement.on_device else "cpu"
    else:
        mode = "does not fit"
    return PlanReport(params=params, tp=tp, pp=pp, dp=dp, weight_bytes=weight_bytes, profile=profile,
                      device_memory_bytes=memory, usable_bytes=usable, activation_bytes=activation_bytes,
                      device_bytes_no_offload=no_offload, device_bytes_offload=with_offload,
                      host_pinned_bytes_offload=pinned_host_bytes(params, layout, weight_bytes),
                      fits_without_offload=fits_without,
                      fits_with_offload=fits_with, mode=mode, decision=decision)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"
