"""One rank of a distributed test: ``python -m tests.distributed.worker SCENARIO OUT_DIR``.

Started by ``harness.run_ranks`` with the torchrun environment. Each scenario runs many checks in
one process group (spawning is the expensive part on 2 cores) and writes this rank's results to
``OUT_DIR/rank{RANK}.json``; the pytest side asserts on them. Every sharded or replicated run is
compared with a single-process run of the same model on the full global batch, computed here on
every rank (the models are tiny).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import optimi
from optimi import prepare_for_gradient_release, remove_gradient_release
from optimi.distributed import memory_report
from optimi.distributed.memory import track_gradient_peak

GLOBAL_BATCH = 8
STEPS = 7  # > Ranger's k=6, so the slow weights are synchronised once
MICRO_STEPS = 2  # micro-steps per step under optimizer accumulation


@dataclass(frozen=True)
class OptCase:
    """An optimizer configuration the equivalence checks run."""

    name: str
    build: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def optimizer_cases() -> list[OptCase]:
    return [
        OptCase("adamw", optimi.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
        OptCase("sgd_momentum", optimi.SGD, dict(lr=5e-2, momentum=0.9, weight_decay=1e-3)),
        OptCase("stableadamw", optimi.StableAdamW, dict(lr=1e-2, weight_decay=1e-2)),
        OptCase("ranger", optimi.Ranger, dict(lr=1e-2, weight_decay=1e-3)),
    ]


class Net(nn.Module):
    """Three linears; the last has 7 outputs so 2-way sharding is uneven (rows 4 + 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 24)
        self.l2 = nn.Linear(24, 24)
        self.out = nn.Linear(24, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_data(steps: int, micro: int, dtype: torch.dtype) -> list[list[tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(1234)
    return [
        [
            (
                torch.randn(GLOBAL_BATCH, 12, generator=gen).to(dtype),
                torch.randn(GLOBAL_BATCH, 7, generator=gen).to(dtype),
            )
            for _ in range(micro)
        ]
        for _ in range(steps)
    ]


def train(
    model: nn.Module,
    opt: Any,
    data: list[list[tuple[Tensor, Tensor]]],
    *,
    rows: slice,
    release: bool,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train on ``data``; each micro-batch uses ``rows`` (this rank's share of the global batch).

    All but the last micro-step of a step run with ``optimizer_accumulation``. Without release
    ``opt.step()`` runs after every micro-step (accumulation folds into the state there too).
    """
    for i, micro_batches in enumerate(data):
        if on_step is not None:
            on_step(i)
            release = opt._gradient_release_active
        for j, (x, y) in enumerate(micro_batches):
            opt.optimizer_accumulation = j < len(micro_batches) - 1
            # under a bf16 MixedPrecisionPolicy the output is bf16 and the target fp32: cast the output
            # first, because torch 2.10's mse_loss backward rejects mixed dtypes (newer torch accepts
            # them and gives bit-identical gradients to this cast)
            loss = nn.functional.mse_loss(model(x[rows]).to(y.dtype), y[rows])
            loss.backward()
            if not release:
                opt.step()
                opt.zero_grad()
    opt.optimizer_accumulation = False


SCHEDULER_ORDER_WARNING = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


def scheduler_order_warnings(model: nn.Module, opt: Any) -> list[str]:
    """The scheduler-order warnings of one release step without ``opt.step()``, then ``scheduler.step()``.

    torch's LRScheduler wraps ``opt.step`` to note that it ran and warns at its first step if it did
    not; under gradient release the steps in backward must stand for it, on every kind of model.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    x, y = make_data(1, 1, torch.float32)[0][0]
    rows = my_rows()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        scheduler.step()
    return [str(w.message) for w in caught if SCHEDULER_ORDER_WARNING in str(w.message)]


def reference_params(
    init: dict[str, Tensor], case: OptCase, data: list, dtype: torch.dtype, net: type[nn.Module] | None = None
) -> tuple[dict[str, Tensor], Any]:
    """Single process, full global batch, normal ``opt.step()`` on the for-loop backend.

    The for-loop is the reference whichever backend ``case`` runs on the shards, except bf16 on the
    fused backend: that agrees with the for-loop to one ulp per step (``tests/test_fused.py``), and
    over a whole run those ulps feed back through the gradients, so there one process runs fused too.
    """
    model = (net or Net)().to(dtype)
    model.load_state_dict(init)
    kwargs = dict(case.kwargs)
    if not (kwargs.get("fused") and dtype != torch.float32):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")} | {"foreach": False}
    opt = case.build(model.parameters(), **kwargs)
    train(model, opt, data, rows=slice(None), release=False)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, opt


def rel_err(params: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """max over tensors of ``max|p - ref| / max|ref|`` (in float64)."""
    worst = 0.0
    for name, r in ref.items():
        p = params[name].double()
        r = r.double()
        worst = max(worst, ((p - r).abs().max() / r.abs().max().clamp_min(1e-12)).item())
    return worst


def state_bytes(opt: Any) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))


def my_rows() -> slice:
    rank, world = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world
    return slice(rank * share, (rank + 1) * share)


def fresh_init(dtype: torch.dtype, net: type[nn.Module] | None = None) -> dict[str, Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in (net or Net)().to(dtype).state_dict().items()}


# -- FSDP2 ----------------------------------------------------------------------------------------


def sharded_net(
    init: dict[str, Tensor], dtype: torch.dtype, mp_policy: Any = None, net: type[nn.Module] | None = None
) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = (net or Net)().to(dtype)
    model.load_state_dict(init)
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    fully_shard(model.l1, **kwargs)
    fully_shard(model.l2, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_params(model: nn.Module) -> dict[str, Tensor]:
    from optimi.distributed._dtensor import full_tensor

    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}


def state_is_sharded_like_params(opt: Any) -> bool:
    from torch.distributed.tensor import DTensor

    for param, state in opt.state.items():
        for value in state.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                if not isinstance(value, DTensor) or value.placements != param.placements:
                    return False
                if value.shape != param.shape or value.to_local().shape != param.to_local().shape:
                    return False
    return True


def scenario_fsdp() -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results: dict[str, Any] = {}
    rows = my_rows()
    runs = []  # (label, case, dtype, mode, mp)
    for case in optimizer_cases():
        for mode in ("step", "release", "release_accum"):
            runs.append((f"{case.name}/fp32/{mode}", case, torch.float32, mode, None))
    adamw, sgd = optimizer_cases()[:2]
    for case in optimizer_cases():
        runs.append((f"{case.name}/bf16_kahan/release_accum", case, torch.bfloat16, "release_accum", None))
    runs.append((f"{sgd.name}/bf16_kahan/step", sgd, torch.bfloat16, "step", None))
    # the foreach backend steps whole groups of local shards at once (normal opt.step())
    foreach = OptCase("adamw_foreach", optimi.AdamW, dict(lr=1e-2, weight_decay=1e-2, foreach=True))
    runs.append(("adamw_foreach/fp32/step", foreach, torch.float32, "step", None))
    runs.append(("adamw_foreach/bf16_kahan/step", foreach, torch.bfloat16, "step", None))
    # the fused backend on local shards: compiled once per configuration, called directly after
    # that; StableAdamW's cross-shard reduce_sums is a callable, which keeps Dynamo's dispatch
    fused = OptCase("adamw_fused", optimi.AdamW, dict(lr=1e-2, weight_decay=1e-2, fused=True))
    runs.append(("adamw_fused/fp32/step", fused, torch.float32, "step", None))
    runs.append(("adamw_fused/fp32/release", fused, torch.float32, "release", None))
    runs.append(("adamw_fused/bf16_kahan/release", fused, torch.bfloat16, "release", None))
    stable = OptCase("stableadamw_fused", optimi.StableAdamW, dict(lr=1e-2, weight_decay=1e-2, fused=True))
    runs.append(("stableadamw_fused/fp32/release", stable, torch.float32, "release", None))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    runs.append((f"{adamw.name}/mixed_precision/release", adamw, torch.float32, "release", mp))
    runs.append((f"{adamw.name}/mixed_precision/step", adamw, torch.float32, "step", mp))

    finals: dict[str, dict[str, Tensor]] = {}
    for label, case, dtype, mode, mp_policy in runs:
        micro = MICRO_STEPS if mode.endswith("accum") else 1
        data = make_data(STEPS, micro, dtype)
        init = fresh_init(dtype)
        ref, ref_opt = reference_params(init, case, data, dtype)
        model = sharded_net(init, dtype, mp_policy)
        release = mode.startswith("release")
        opt = case.build(model.parameters(), gradient_release=release, **case.kwargs)
        if release:
            prepare_for_gradient_release(model, opt)
        train(model, opt, data, rows=rows, release=release)
        report = memory_report(model, opt)
        finals[label] = full_params(model)
        entry = {
            "rel_err": rel_err(finals[label], ref),
            "grads_left": sum(p.grad is not None for p in model.parameters()),
            "state_sharded": state_is_sharded_like_params(opt),
            "state_bytes_per_rank": [r.optimizer_states for r in report.ranks],
            "kahan_bytes_per_rank": [r.kahan for r in report.ranks],
            "param_bytes_per_rank": [r.params for r in report.ranks],
            "ref_state_bytes": state_bytes(ref_opt),
            "ref_kahan_bytes": sum(
                v.numel() * v.element_size()
                for st in ref_opt.state.values()
                for k, v in st.items()
                if k.endswith("_comp")
            ),
            "ref_param_bytes": sum(t.numel() * t.element_size() for t in ref.values()),
        }
        if case.kwargs.get("fused"):
            from optimi._fused import dispatch

            # the compiled kernels really ran (a strided shard would have taken the eager rule),
            # and which of them skipped Dynamo after their first call
            entry["fused_steps"] = len(dispatch.COMPILED)
            entry["direct_steps"] = sum(step.direct is not None for step in dispatch.COMPILED.values())
        if release:
            remove_gradient_release(model)
            entry["release_flag_after_remove"] = opt._gradient_release_active
        results[label] = entry

    # StableAdamW's per-tensor RMS clipping must see whole tensors: a gradient spike makes it clip;
    # the same run with the cross-shard reduction switched off shows the check can fail
    from optimi.distributed import _dtensor

    case = next(c for c in optimizer_cases() if c.name == "stableadamw")
    data = make_data(STEPS, 1, torch.float32)
    for x, y in data[3]:
        x.mul_(30)
        y.mul_(30)
    for reduce in (True, False):
        init = fresh_init(torch.float32)
        ref, _ = reference_params(init, case, data, torch.float32)
        model = sharded_net(init, torch.float32)
        opt = case.build(model.parameters(), gradient_release=True, **case.kwargs)
        prepare_for_gradient_release(model, opt)
        original = _dtensor.make_reduce_sums
        if not reduce:
            _dtensor.make_reduce_sums = lambda params: lambda sums, counts: (sums, counts)
        try:
            train(model, opt, data, rows=rows, release=True)
        finally:
            _dtensor.make_reduce_sums = original
        results[f"stableadamw/spike/reduce={reduce}"] = rel_err(full_params(model), ref)

    # release for 3 steps, then remove it and continue with normal steps (SGD: no debiasing, see
    # the DDP variant below)
    sgd_case = optimizer_cases()[1]
    data = make_data(STEPS, 1, torch.float32)
    init = fresh_init(torch.float32)
    ref, _ = reference_params(init, sgd_case, data, torch.float32)
    model = sharded_net(init, torch.float32)
    opt = sgd_case.build(model.parameters(), gradient_release=True, **sgd_case.kwargs)
    prepare_for_gradient_release(model, opt)

    def switch(step: int, model: nn.Module = model) -> None:
        if step == 3:
            remove_gradient_release(model)

    train(model, opt, data, rows=rows, release=True, on_step=switch)
    results["remove_then_step"] = rel_err(full_params(model), ref)

    # mixed precision: release must do exactly what a normal step does (bf16 compute differs from fp32)
    results["mixed_precision_release_vs_step"] = rel_err(
        finals[f"{adamw.name}/mixed_precision/release"], finals[f"{adamw.name}/mixed_precision/step"]
    )

    # state allocated at prepare time, before any backward, already sharded
    model = sharded_net(fresh_init(torch.float32), torch.float32)
    opt = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, opt)
    results["state_up_front"] = len(opt.state) == len(list(model.parameters())) and state_is_sharded_like_params(opt)
    # gradient sync off would skip the reduce-scatter: refused
    model.set_requires_gradient_sync(False)
    try:
        model(torch.randn(2, 12))
        results["sync_off_refused"] = False
    except RuntimeError as error:
        results["sync_off_refused"] = "set_requires_gradient_sync" in str(error)
    model.set_requires_gradient_sync(True)
    results["checkpoint"] = dcp_round_trip(model, opt)

    model = sharded_net(fresh_init(torch.float32), torch.float32)
    opt = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    prepare_for_gradient_release(model, opt)
    results["scheduler_order_warnings"] = scheduler_order_warnings(model, opt)
    return results


def dcp_round_trip(model: nn.Module, opt: Any) -> bool:
    """Save the sharded optimizer state with torch.distributed.checkpoint and load it back."""
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from optimi.distributed._dtensor import local

    x = torch.randn(4, 12).to(next(model.parameters()).dtype)
    nn.functional.mse_loss(model(x).float(), torch.zeros(4, 7)).backward()  # one release step: non-zero state
    # each rank compares its own shards, bit for bit
    before = {id(p): {k: local(v).clone() for k, v in s.items() if isinstance(v, Tensor)} for p, s in opt.state.items()}
    path = [tempfile.mkdtemp(prefix="optimi-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path[0])
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                value.zero_()
    loaded = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(loaded, checkpoint_id=path[0])
    set_optimizer_state_dict(model, opt, loaded["optim"])
    return all(torch.equal(local(opt.state[p][k]), v) for p in opt.state for k, v in before[id(p)].items())


# -- DDP ------------------------------------------------------------------------------------------


def ddp_net(
    init: dict[str, Tensor], dtype: torch.dtype, net: type[nn.Module] | None = None, **ddp_kwargs: Any
) -> nn.parallel.DistributedDataParallel:
    model = (net or Net)().to(dtype)
    model.load_state_dict(init)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def replicas_identical(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def scenario_ddp() -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = my_rows()
    runs = []
    for case in optimizer_cases():
        for mode in ("release", "release_accum"):
            runs.append((f"{case.name}/fp32/{mode}", case, torch.float32, mode, {}))
    adamw = optimizer_cases()[0]
    runs.append(
        (f"{adamw.name}/fp32/release/bucket_view", adamw, torch.float32, "release", {"gradient_as_bucket_view": True})
    )
    runs.append((f"{adamw.name}/fp32/release/tiny_buckets", adamw, torch.float32, "release", {"bucket_cap_mb": 0.001}))
    for case in optimizer_cases():
        runs.append((f"{case.name}/bf16_kahan/release_accum", case, torch.bfloat16, "release_accum", {}))

    for label, case, dtype, mode, ddp_kwargs in runs:
        micro = MICRO_STEPS if mode.endswith("accum") else 1
        data = make_data(STEPS, micro, dtype)
        init = fresh_init(dtype)
        ref, _ = reference_params(init, case, data, dtype)
        model = ddp_net(init, dtype, **ddp_kwargs)
        opt = case.build(model.parameters(), gradient_release=True, **case.kwargs)
        prepare_for_gradient_release(model, opt)
        train(model, opt, data, rows=rows, release=True)
        results[label] = {
            "rel_err": rel_err({n: p.detach() for n, p in model.module.named_parameters()}, ref),
            "identical": replicas_identical(model),
            "grads_left": sum(p.grad is not None for p in model.parameters()),
        }

    # release for 3 steps, then remove it and continue with normal steps: same as the reference.
    # SGD: no debiasing, whose step counter is per group in step() but per parameter under release
    sgd = optimizer_cases()[1]
    for bucket_view in (False, True):
        data = make_data(STEPS, 1, torch.float32)
        init = fresh_init(torch.float32)
        ref, _ = reference_params(init, sgd, data, torch.float32)
        model = ddp_net(init, torch.float32, gradient_as_bucket_view=bucket_view)
        opt = sgd.build(model.parameters(), gradient_release=True, **sgd.kwargs)
        prepare_for_gradient_release(model, opt)

        def switch(step: int, model: nn.Module = model) -> None:
            if step == 3:
                remove_gradient_release(model)

        train(model, opt, data, rows=rows, release=True, on_step=switch)
        results[f"remove_then_step/bucket_view={bucket_view}"] = {
            "rel_err": rel_err({n: p.detach() for n, p in model.module.named_parameters()}, ref),
            "identical": replicas_identical(model),
        }

    model = ddp_net(fresh_init(torch.float32), torch.float32)
    opt = adamw.build(model.parameters(), gradient_release=True, **adamw.kwargs)
    prepare_for_gradient_release(model, opt)
    results["scheduler_order_warnings"] = scheduler_order_warnings(model, opt)

    # no_sync() would skip the all-reduce: refused while release is active
    model = ddp_net(fresh_init(torch.float32), torch.float32)
    opt = adamw.build(model.parameters(), gradient_release=True, **adamw.kwargs)
    prepare_for_gradient_release(model, opt)
    try:
        with model.no_sync():
            model(torch.randn(2, 12))
        results["no_sync_refused"] = False
    except RuntimeError as error:
        results["no_sync_refused"] = "no_sync" in str(error)
    # a user's communication hook: clear error
    model = ddp_net(fresh_init(torch.float32), torch.float32)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = adamw.build(model.parameters(), gradient_release=True, **adamw.kwargs)
    try:
        prepare_for_gradient_release(model, opt)
        results["user_hook_refused"] = False
    except ValueError as error:
        results["user_hook_refused"] = "communication hook" in str(error)
    return results


# -- memory ---------------------------------------------------------------------------------------


def scenario_memory() -> dict[str, Any]:
    """Peak live gradient bytes of one training step, normal vs gradient release."""
    results: dict[str, Any] = {}
    rows = my_rows()
    data = make_data(2, 1, torch.float32)
    for kind in ("fsdp2", "ddp"):
        for release in (False, True):
            init = fresh_init(torch.float32)
            if kind == "fsdp2":
                model = sharded_net(init, torch.float32)
            else:
                model = ddp_net(init, torch.float32, bucket_cap_mb=0.001)
            tracker = track_gradient_peak(model)
            opt = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=release)
            if release:
                prepare_for_gradient_release(model, opt)
            for i, micro_batches in enumerate(data):
                if i == 1:
                    tracker.reset()  # DDP rebuilds its buckets (first bucket: 1 MiB) after iteration 1
                x, y = micro_batches[0]
                nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                if not release:
                    report = memory_report(model, opt)  # before the step: the gradients are alive
                    opt.step()
                    opt.zero_grad()
            if release:
                report = memory_report(model, opt)
            results[f"{kind}/release={release}"] = report.to_dict()
            results[f"{kind}/release={release}/str"] = str(report)
    return results


# -- the fused backend when compiling fails ---------------------------------------------------------


def scenario_fused_fallback() -> dict[str, Any]:
    """FSDP2 with a C++ compiler that always fails: ``fused=None`` falls back, ``fused=True`` raises.

    ``fused=None`` only picks the fused backend for large groups, so the threshold is lowered to
    this tiny model. Each fallback run is compared with the single-process for-loop run.
    """
    import tempfile
    import warnings

    from torch._inductor import config as inductor_config

    from optimi import _fused, optimizer

    results: dict[str, Any] = {}
    rows = my_rows()
    failing = Path(tempfile.mkdtemp()) / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    failing.chmod(0o755)
    optimizer.FUSED_MIN_ELEMENTS = 0
    case = OptCase("adamw", optimi.AdamW, dict(lr=1e-2, weight_decay=1e-2))
    data = make_data(STEPS, 1, torch.float32)
    with inductor_config.patch({"cpp.cxx": (str(failing),), "fx_graph_cache": False}):
        for mode in ("step", "release"):
            init = fresh_init(torch.float32)
            ref, _ = reference_params(init, case, data, torch.float32)
            model = sharded_net(init, torch.float32)
            release = mode == "release"
            opt = case.build(model.parameters(), gradient_release=release, **case.kwargs)
            if release:
                prepare_for_gradient_release(model, opt)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(model, opt, data, rows=rows, release=release)
            results[f"auto/{mode}"] = {
                "rel_err": rel_err(full_params(model), ref),
                "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                "fallen_back": sorted(set(_fused.fallen_back_configurations().values())),
            }
            if release:
                remove_gradient_release(model)
        # an explicit fused=True raises at the first step, before any weight changes
        init = fresh_init(torch.float32)
        model = sharded_net(init, torch.float32)
        opt = case.build(model.parameters(), gradient_release=True, fused=True, **case.kwargs)
        prepare_for_gradient_release(model, opt)
        x, y = data[0][0]
        try:
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            results["explicit_error"] = None
        except _fused.FusedCompileError as error:
            results["explicit_error"] = str(error)
        results["explicit_unchanged"] = rel_err(full_params(model), init) == 0.0
    return results


def scenario_low_precision() -> dict[str, Any]:
    """Stochastic rounding and remainder masters on DDP and FSDP2 ([Note: low-precision update modes])."""
    from optimi._low_precision import stochastic_round_, stream_key
    from optimi.distributed._dtensor import first_element_index, local

    results: dict[str, Any] = {}
    rows = my_rows()
    init = fresh_init(torch.bfloat16)
    data = make_data(20, 1, torch.bfloat16)
    # DDP: every replica draws the same random bits, so the replicas stay bit-identical
    for release in (False, True):
        model = ddp_net(init, torch.bfloat16)
        opt = optimi.AdamW(model.parameters(), lr=1e-3, low_precision="stochastic", gradient_release=release)
        if release:
            optimi.prepare_for_gradient_release(model, opt)
        train(model, opt, data, rows=rows, release=release)
        results[f"ddp_stochastic_identical/{'release' if release else 'step'}"] = replicas_identical(model)
    # FSDP2: a shard draws the bits the whole tensor would (uneven shards included: 7 rows -> 4 + 3)
    model = sharded_net(init, torch.bfloat16)
    same_bits = []
    for param in model.parameters():
        whole = torch.linspace(-3, 3, param.numel()).reshape(param.shape) * (1 + 2**-10)
        expected = torch.empty(param.shape, dtype=torch.bfloat16)
        stochastic_round_(expected, whole.clone(), key=stream_key(3, 5))
        first, mine = first_element_index(param), local(param.detach())
        drawn = torch.empty_like(mine)
        stochastic_round_(drawn, whole.reshape(-1)[first : first + mine.numel()].reshape(mine.shape).clone(),
                          key=stream_key(3, 5), first_index=first)  # fmt: skip
        same_bits.append(torch.equal(drawn.reshape(-1), expected.reshape(-1)[first : first + mine.numel()]))
    results["fsdp_shards_draw_the_whole_tensors_bits"] = all(same_bits)
    # FSDP2 training in each mode, with and without release, against one process
    reference_data = make_data(7, 1, torch.bfloat16)
    for mode in ("stochastic", "remainder"):
        single = Net().to(torch.bfloat16)
        single.load_state_dict(init)
        single_opt = optimi.AdamW(single.parameters(), lr=1e-2, low_precision=mode)
        train(single, single_opt, reference_data, rows=slice(None), release=False)
        reference = {k: v.detach().float() for k, v in single.named_parameters()}
        for release in (False, True):
            model = sharded_net(init, torch.bfloat16)
            opt = optimi.AdamW(model.parameters(), lr=1e-2, low_precision=mode, gradient_release=release)
            if release:
                optimi.prepare_for_gradient_release(model, opt)
            train(model, opt, reference_data, rows=rows, release=release)
            key = f"fsdp_{mode}/{'release' if release else 'step'}"
            results[key] = rel_err(full_params(model), reference)
            if mode == "remainder" and release:
                # StableAdamW's per-tensor RMS is reduced across shards one master at a time
                single = Net().to(torch.bfloat16)
                single.load_state_dict(init)
                single_opt = optimi.StableAdamW(single.parameters(), lr=1e-2, low_precision=mode)
                train(single, single_opt, reference_data, rows=slice(None), release=False)
                sharded = sharded_net(init, torch.bfloat16)
                sharded_opt = optimi.StableAdamW(sharded.parameters(), lr=1e-2, low_precision=mode)
                train(sharded, sharded_opt, reference_data, rows=rows, release=False)
                stable_reference = {k: v.detach().float() for k, v in single.named_parameters()}
                results["fsdp_stableadamw_remainder"] = rel_err(full_params(sharded), stable_reference)
            if mode == "remainder":
                remainders = [state["remainder"] for state in opt.state.values()]
                results[key + "/remainder_sharded"] = state_is_sharded_like_params(opt) and all(
                    r.dtype == torch.int16 for r in remainders
                )
                results[key + "/dcp"] = dcp_round_trip(model, opt)
                if release:
                    results["fsdp_remainder/full_state_dict"] = full_state_dict_round_trip(model, opt, init)
    # an fp32 model cast to bf16 shards keeps its float32 values exactly in the remainders
    init32 = {k: v.float() * (1 + 2**-12) for k, v in init.items()}  # low bits a bf16 cast drops
    model = sharded_net(init32, torch.float32)
    opt = optimi.AdamW(model.parameters(), lr=1e-2, low_precision="remainder")
    optimi.to_low_precision(model, torch.bfloat16, optimizer=opt)
    results["fsdp_to_low_precision_exact"] = all(local(p).dtype == torch.bfloat16 for p in model.parameters()) and all(
        torch.equal(opt.master_param(p).full_tensor(), init32[name]) for name, p in model.named_parameters()
    )
    # ... and trains on as one process cast the same way does (FSDP2 gathers the new bf16 shards)
    single = Net()
    single.load_state_dict(init32)
    single_opt = optimi.AdamW(single.parameters(), lr=1e-2, low_precision="remainder")
    optimi.to_low_precision(single, torch.bfloat16, optimizer=single_opt)
    train(single, single_opt, reference_data, rows=slice(None), release=False)
    train(model, opt, reference_data, rows=rows, release=False)
    results["fsdp_to_low_precision_trains"] = rel_err(
        {n: opt.master_param(p).full_tensor() for n, p in model.named_parameters()},
        {n: single_opt.master_param(p) for n, p in single.named_parameters()},
    )
    return results


def full_state_dict_round_trip(model: nn.Module, opt: Any, init: dict[str, Tensor]) -> dict[str, bool]:
    """The full (all-gathered) optimizer state dict of int16 remainders, into one process and back into shards.

    gloo and NCCL cannot all-gather int16: the state dict carries remainders as bf16-typed bits
    ([Note: remainders travel as bf16 bits] in optimi/optimizer.py).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    masters = {name: opt.master_param(p).full_tensor() for name, p in model.named_parameters()}
    weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    single = Net().to(torch.bfloat16)
    single.load_state_dict(weights)
    single_opt = optimi.AdamW(single.parameters(), lr=1e-2, low_precision="remainder")
    single_opt.load_state_dict(full)
    resharded = sharded_net(init, torch.bfloat16)
    resharded.load_state_dict(model.state_dict())
    resharded_opt = optimi.AdamW(resharded.parameters(), lr=1e-2, low_precision="remainder")
    set_optimizer_state_dict(resharded, resharded_opt, full, options=StateDictOptions(full_state_dict=True))
    return {
        "one_process": all(torch.equal(single_opt.master_param(p), masters[n]) for n, p in single.named_parameters()),
        "resharded": all(
            torch.equal(resharded_opt.master_param(p).full_tensor(), masters[n])
            and resharded_opt.state[p]["remainder"].dtype == torch.int16
            for n, p in resharded.named_parameters()
        ),
    }


def scenario_clipping() -> dict[str, Any]:
    """``max_grad_norm`` with ``step()`` on FSDP2 and DDP against one process running
    ``clip_grad_norm_`` + ``step()`` on the full batch ([Note: gradient clipping and the non-finite guard])."""
    results: dict[str, Any] = {}
    rows = my_rows()
    init = fresh_init(torch.float32)
    data = make_data(6, 1, torch.float32)
    max_norm = 0.2  # below the first steps' norms (about 0.3-0.6): most steps clip
    builders = {
        "adamw": lambda params, **kw: optimi.AdamW(params, lr=1e-2, weight_decay=1e-2, foreach=False, **kw),
        "sgd": lambda params, **kw: optimi.SGD(params, lr=5e-2, momentum=0.9, foreach=False, **kw),
        "stableadamw": lambda params, **kw: optimi.StableAdamW(params, lr=1e-2, foreach=False, **kw),
    }

    def clipped_reference(build: Callable) -> tuple[dict[str, Tensor], list[float]]:
        """One process on the full batch, ``clip_grad_norm_`` + ``step()``: final parameters, norms."""
        single = Net()
        single.load_state_dict(init)
        single_opt = build(single.parameters())
        norms = []
        for ((x, y),) in data:
            nn.functional.mse_loss(single(x), y).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(single.parameters(), max_norm).item())
            single_opt.step()
            single_opt.zero_grad()
        return {k: v.detach().clone() for k, v in single.named_parameters()}, norms

    clipped = {name: clipped_reference(build) for name, build in builders.items()}
    for name, build in builders.items():
        reference, reference_norms = clipped[name]
        for kind in ("fsdp2", "ddp"):
            model = sharded_net(init, torch.float32) if kind == "fsdp2" else ddp_net(init, torch.float32)
            opt = build(model.parameters(), max_grad_norm=max_norm)
            norms = []
            for ((x, y),) in data:
                nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                opt.step()
                opt.zero_grad()
                norms.append(opt.grad_norm.item())
            params = full_params(model.module if kind == "ddp" else model)
            results[f"{kind}/{name}"] = {
                "rel_err": rel_err(params, reference),
                "norm_rel_err": max(abs(a - b) / b for a, b in zip(norms, reference_norms)),
                "clipped_steps": sum(n > max_norm for n in reference_norms),
            }
        # gradient release: each backward is clipped by the previous backward's norm
        single = Net()
        single.load_state_dict(init)
        single_opt = build(single.parameters())
        reference_norms, coefficient = [], None
        for ((x, y),) in data:
            nn.functional.mse_loss(single(x), y).backward()
            grads = [p.grad for p in single.parameters()]
            reference_norms.append(torch.nn.utils.get_total_norm(grads).item())
            if coefficient is not None:
                torch._foreach_mul_(grads, coefficient)
            coefficient = torch.tensor(min(1.0, max_norm / (reference_norms[-1] + 1e-6)))
            single_opt.step()
            single_opt.zero_grad()
        reference = {k: v.detach().clone() for k, v in single.named_parameters()}
        for kind in ("fsdp2", "ddp"):
            model = sharded_net(init, torch.float32) if kind == "fsdp2" else ddp_net(init, torch.float32)
            opt = build(model.parameters(), max_grad_norm=max_norm, gradient_release=True)
            optimi.prepare_for_gradient_release(model, opt)
            norms = []
            for ((x, y),) in data:
                nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                norms.append(opt.grad_norm.item())
            params = full_params(model.module if kind == "ddp" else model)
            results[f"{kind}/{name}/release"] = {
                "rel_err": rel_err(params, reference),
                "norm_rel_err": max(abs(a - b) / b for a, b in zip(norms, reference_norms)),
                "clipped_steps": sum(n > max_norm for n in reference_norms[:-1]),
            }
            optimi.remove_gradient_release(model)
    # release_backward: the exact clip in two passes, against the same reference as step()
    reference, reference_norms = clipped["adamw"]
    for kind in ("fsdp2", "ddp"):
        model = sharded_net(init, torch.float32) if kind == "fsdp2" else ddp_net(init, torch.float32)
        opt = builders["adamw"](model.parameters(), max_grad_norm=max_norm, gradient_release=True)
        optimi.prepare_for_gradient_release(model, opt)
        norms = []
        for ((x, y),) in data:
            optimi.release_backward(nn.functional.mse_loss(model(x[rows]), y[rows]), opt)
            norms.append(opt.grad_norm.item())
        results[f"{kind}/release_backward"] = {
            "rel_err": rel_err(full_params(model.module if kind == "ddp" else model), reference),
            "norm_rel_err": max(abs(a - b) / b for a, b in zip(norms, reference_norms)),
        }
        optimi.remove_gradient_release(model)
    # a non-finite gradient in one parameter (rank 0's input has an inf: only l1.weight's gradient is
    # not finite, tanh saturates the rest) never reaches weights or state, in any mode
    for kind in ("fsdp2", "ddp"):
        for release in (False, True):
            model = sharded_net(init, torch.float32) if kind == "fsdp2" else ddp_net(init, torch.float32)
            opt = builders["adamw"](model.parameters(), max_grad_norm=max_norm, gradient_release=release)
            if release:
                optimi.prepare_for_gradient_release(model, opt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings
                for step, ((x, y),) in enumerate(data[:3]):
                    x = x[rows].clone()
                    if step == 1 and dist.get_rank() == 0:
                        x[0, 3] = float("inf")
                    nn.functional.mse_loss(model(x), y[rows]).backward()
                    if not release:
                        opt.step()
                        opt.zero_grad()
            tensors = [p.detach() for p in model.parameters()]
            tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
            from optimi.distributed._dtensor import local

            results[f"{kind}/{'release' if release else 'step'}/non_finite"] = {
                "finite": all(bool(torch.isfinite(local(t)).all()) for t in tensors),
                "skipped": opt.skipped_steps,
            }
            if release:
                optimi.remove_gradient_release(model)
    return results


# -- 8-bit optimizer state ------------------------------------------------------------------------


class WideNet(nn.Module):
    """Net with two weights that ``state_bits=8`` stores as codes (>= 4096 elements, 2-d).

    ``l1.weight`` is 400 x 12 (rows split 200 + 200, one short block per row); ``l2.weight`` is
    15 x 400 (rows split 8 + 7: uneven shards, two blocks per row of 256 + 144 elements). ``out``
    (7 x 15) and the biases are too small and keep their moments in the parameter's dtype.
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 400)
        self.l2 = nn.Linear(400, 15)
        self.out = nn.Linear(15, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


#: the parameters WideNet quantizes
QUANTIZED_PARAMS = ("l1.weight", "l2.weight")


def recorded_gradients(
    init: dict[str, Tensor], build: Callable[..., Any], kwargs: dict[str, Any], data: list, dtype: torch.dtype
) -> tuple[list[dict[str, Tensor]], nn.Module, Any]:
    """One process, full global batch, ``state_bits=8``: every step's gradients, the model and optimizer."""
    model = WideNet().to(dtype)
    model.load_state_dict(init)
    opt = build(model.parameters(), state_bits=8, **kwargs)
    grads = []
    for ((x, y),) in data:
        nn.functional.mse_loss(model(x), y).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return grads, model, opt


def replay(model: nn.Module, opt: Any, grads: list[dict[str, Tensor]]) -> None:
    """``opt.step()`` on recorded global gradients: an FSDP2 parameter gets its rows of them.

    Every rank then steps with exactly the gradients of the one-process run (a backward on half the
    batch followed by a reduce-scatter rounds differently), so any difference is the optimizer's.
    The gradients are copied: StableAdamW leaves its RMS terms in the gradient buffer.
    """
    from torch.distributed.tensor import DTensor

    from optimi.distributed._dtensor import first_element_index, local

    for step_grads in grads:
        for name, param in model.named_parameters():
            grad = step_grads[name]
            if isinstance(param, DTensor):
                mine = local(param.detach())
                first = first_element_index(param)
                shard = grad.reshape(-1)[first : first + mine.numel()].reshape(mine.shape).clone()
                mesh, placements = param.device_mesh, param.placements
                param.grad = DTensor.from_local(
                    shard, mesh, placements, run_check=False, shape=param.shape, stride=param.stride()
                )
            else:
                param.grad = grad.clone()
        opt.step()
        opt.zero_grad()


def single_replay(
    init: dict[str, Tensor], build: Callable[..., Any], kwargs: dict[str, Any], grads: list, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    model = WideNet().to(dtype)
    model.load_state_dict(init)
    opt = build(model.parameters(), state_bits=8, **kwargs)
    replay(model, opt, grads)
    return model, opt


def whole_state(model: nn.Module, opt: Any) -> dict[str, dict[str, Any]]:
    """Parameters and optimizer state by parameter name, DTensors gathered (collective)."""
    from optimi.distributed._dtensor import full_tensor

    unwrapped = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        name: {
            "param": full_tensor(p.detach()).clone(),
            **{k: full_tensor(v).clone() if isinstance(v, Tensor) else v for k, v in opt.state[p].items()},
        }
        for name, p in unwrapped.named_parameters()
    }


def mismatches(actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> list[str]:
    """``name/key`` of every entry that is not bit-identical (dtype, shape and bits), or missing."""
    wrong = []
    for name in expected.keys() | actual.keys():
        mine, theirs = actual.get(name, {}), expected.get(name, {})
        for key in mine.keys() | theirs.keys():
            a, b = mine.get(key), theirs.get(key)
            if isinstance(a, Tensor) and isinstance(b, Tensor):
                same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            else:
                same = type(a) is type(b) and a == b
            if not same:
                wrong.append(f"{name}/{key}")
    return sorted(wrong)


def quantized_layout(model: nn.Module, opt: Any) -> dict[str, dict[str, Any]]:
    """Per parameter: which states are codes, and the global and local shapes of codes and scales."""
    from torch.distributed.tensor import DTensor

    from optimi.distributed._dtensor import local

    layout = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        codes_keys = sorted(k for k, v in state.items() if isinstance(v, Tensor) and v.dtype == torch.uint8)
        entry: dict[str, Any] = {"codes": codes_keys}
        for key in entry["codes"]:
            codes, scales = state[key], state[f"{key}_scales"]
            entry[key] = {
                "shape": list(codes.shape),
                "local_shape": list(local(codes).shape),
                "scales_dtype": str(scales.dtype),
                "scales_shape": list(scales.shape),
                "scales_local_shape": list(local(scales).shape),
                "param_local_rows": local(p).shape[0],
                # sharded like the parameter: DTensors with its placements (plain for a plain parameter)
                "sharded": all(
                    isinstance(t, DTensor) == isinstance(p, DTensor)
                    and (not isinstance(p, DTensor) or t.placements == p.placements)
                    for t in (codes, scales)
                ),
            }
        layout[name] = entry
    return layout


def codes_identical_across_ranks(opt: Any) -> bool:
    """Every rank holds the same bits in every state tensor (DDP replicas)."""
    flat = torch.cat(
        [
            v.reshape(-1).view(torch.uint8).to(torch.float32)  # the bits, whatever the dtype
            for s in opt.state.values()
            for v in s.values()
            if isinstance(v, Tensor)
        ]
    )
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def init_all_state(opt: Any) -> None:
    """Allocate every parameter's state, so that DCP has tensors (codes, scales) to load into."""
    for group in opt.param_groups:
        for param in group["params"]:
            opt.init_param_state(param, group)


def dcp_save_or_load(model: nn.Module, opt: Any, path: Path, *, load: bool, no_dist: bool) -> None:
    """``get_state_dict`` + ``dcp.save``/``dcp.load`` (+ ``set_state_dict``), under the keys that
    ``optimi.distributed.save_checkpoint`` uses; ``no_dist``: this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if load:
        init_all_state(opt)
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    if not load:
        dcp.save(state, checkpoint_id=path, no_dist=no_dist)
        return
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def scenario_state_bits() -> dict[str, Any]:
    """``state_bits=8`` on FSDP2 and DDP against one process ([Note: 8-bit optimizer state]).

    FSDP2 runs replay the one-process run's global gradients (``replay``), so parameters, codes and
    scales must agree bit for bit; release and DDP runs train on half the batch per rank.
    """
    import copy
    import shutil
    import tempfile

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from optimi.distributed import load_checkpoint, save_checkpoint
    from optimi.distributed._dtensor import local_nbytes

    results: dict[str, Any] = {}
    rows = my_rows()
    steps, saved_at = 4, 2
    adamw_kwargs = dict(lr=1e-2, weight_decay=1e-2)
    cases = {
        "adamw/fp32": (optimi.AdamW, adamw_kwargs, torch.float32),
        # the RMS of each whole tensor: reduced across the shards of a parameter
        "stableadamw/fp32": (optimi.StableAdamW, adamw_kwargs, torch.float32),
        # the random bits hash each element's index in the whole tensor
        "adamw/bf16_stochastic": (optimi.AdamW, dict(adamw_kwargs, low_precision="stochastic"), torch.bfloat16),
    }
    recorded = {}
    # 1. FSDP2 steps on the global gradients of one process: bit-identical weights, codes and scales
    for label, (build, kwargs, dtype) in cases.items():
        init = fresh_init(dtype, WideNet)
        grads, single, single_opt = recorded_gradients(init, build, kwargs, make_data(steps, 1, dtype), dtype)
        recorded[label] = (init, grads, single, single_opt)
        model = sharded_net(init, dtype, net=WideNet)
        opt = build(model.parameters(), state_bits=8, **kwargs)
        replay(model, opt, grads)
        sharded_state, single_state = whole_state(model, opt), whole_state(single, single_opt)
        results[f"fsdp/{label}"] = {
            "mismatches": mismatches(sharded_state, single_state),
            "param_rel_err": rel_err(
                {n: e["param"] for n, e in sharded_state.items()}, {n: e["param"] for n, e in single_state.items()}
            ),
            "layout": quantized_layout(model, opt),
            "reference_layout": quantized_layout(single, single_opt),
        }
        if label == "adamw/fp32":
            # 5. the memory report counts this rank's codes and scales
            report = memory_report(model, opt)

            def local_bytes(optimizer: Any, codes_and_scales_only: bool = False) -> int:
                """This rank's bytes of state tensors (DTensors: the local shard)."""
                return sum(
                    local_nbytes(v)
                    for s in optimizer.state.values()
                    for k, v in s.items()
                    if isinstance(v, Tensor)
                    and (not codes_and_scales_only or v.dtype == torch.uint8 or k.endswith("_scales"))
                )

            results["memory"] = {
                "report_states_per_rank": [r.optimizer_states for r in report.ranks],
                "local_state_bytes": local_bytes(opt),
                "local_code_and_scale_bytes": local_bytes(opt, codes_and_scales_only=True),
                "single_state_bytes": state_bytes(single_opt),
                "single_code_and_scale_bytes": local_bytes(single_opt, codes_and_scales_only=True),
            }

    # 2. FSDP2 and DDP, step() and gradient release, on half the batch per rank: against one process,
    #    release against step(); DDP replicas bit-identical (weights and every state)
    adamw = OptCase("adamw", optimi.AdamW, dict(adamw_kwargs, state_bits=8))
    data = make_data(steps, 1, torch.float32)
    init = fresh_init(torch.float32, WideNet)
    reference, _ = reference_params(init, adamw, data, torch.float32, net=WideNet)
    for kind, wrap in (("fsdp_train", sharded_net), ("ddp", ddp_net)):
        finals = {}
        for mode in ("step", "release"):
            model = wrap(init, torch.float32, net=WideNet)
            release = mode == "release"
            opt = adamw.build(model.parameters(), gradient_release=release, **adamw.kwargs)
            if release:
                prepare_for_gradient_release(model, opt)
            train(model, opt, data, rows=rows, release=release)
            finals[mode] = whole_state(model, opt)
            entry = {"rel_err": rel_err({n: e["param"] for n, e in finals[mode].items()}, reference)}
            if kind == "ddp":
                entry["params_identical"] = replicas_identical(model)
                entry["state_identical"] = codes_identical_across_ranks(opt)
                entry["layout"] = quantized_layout(model.module, opt)
            else:
                entry["grads_left"] = sum(p.grad is not None for p in model.parameters())
                entry["layout"] = quantized_layout(model, opt)
            results[f"{kind}/{mode}"] = entry
            if release:
                remove_gradient_release(model)
        results[f"{kind}/release_vs_step_mismatches"] = mismatches(finals["release"], finals["step"])

    # 4. checkpoints: 2 FSDP2 ranks -> one process and back, exact; the gathered full state dict
    build, kwargs, _ = cases["adamw/fp32"]
    init, grads, single, single_opt = recorded["adamw/fp32"]
    uninterrupted = whole_state(single, single_opt)
    at_save = whole_state(*single_replay(init, build, kwargs, grads[:saved_at], torch.float32))
    root = [tempfile.mkdtemp(prefix="optimi-state-bits-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(root)
    root = Path(root[0])
    try:
        # 2 -> 1: save_checkpoint on 2 ranks; each rank then loads it alone into a plain model
        model = sharded_net(init, torch.float32, net=WideNet)
        opt = build(model.parameters(), state_bits=8, **kwargs)
        replay(model, opt, grads[:saved_at])
        path = save_checkpoint(root / "two", saved_at, model, opt)
        fresh = WideNet()
        fresh_opt = build(fresh.parameters(), state_bits=8, **kwargs)
        dcp_save_or_load(fresh, fresh_opt, path, load=True, no_dist=True)
        loaded = whole_state(fresh, fresh_opt)
        replay(fresh, fresh_opt, grads[saved_at:])
        results["checkpoint/2to1"] = {
            "loaded_mismatches": mismatches(loaded, at_save),
            "continued_mismatches": mismatches(whole_state(fresh, fresh_opt), uninterrupted),
        }
        # full_state_dict=True all-gathers the uint8 codes and float32 scales (gloo)
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        results["full_state_dict/gathered_mismatches"] = mismatches(
            {name: {k: v for k, v in entry.items()} for name, entry in full["state"].items()},
            {name: {k: v for k, v in entry.items() if k != "param"} for name, entry in at_save.items()},
        )
        weights = {name: entry["param"] for name, entry in at_save.items()}
        one = WideNet()
        one.load_state_dict(weights)
        one_opt = build(one.parameters(), state_bits=8, **kwargs)
        # a copy: load_state_dict adopts the dict's tensors (torch's, too, where no cast is needed),
        # and this optimizer steps on in place
        one_opt.load_state_dict(copy.deepcopy(full))
        one_loaded = whole_state(one, one_opt)
        replay(one, one_opt, grads[saved_at:])
        resharded = sharded_net(weights, torch.float32, net=WideNet)
        resharded_opt = build(resharded.parameters(), state_bits=8, **kwargs)
        set_optimizer_state_dict(resharded, resharded_opt, full, options=StateDictOptions(full_state_dict=True))
        resharded_loaded = whole_state(resharded, resharded_opt)
        resharded_layout = quantized_layout(resharded, resharded_opt)
        replay(resharded, resharded_opt, grads[saved_at:])
        results["full_state_dict"] = {
            "one_process_loaded": mismatches(one_loaded, at_save),
            "one_process_continued": mismatches(whole_state(one, one_opt), uninterrupted),
            "resharded_loaded": mismatches(resharded_loaded, at_save),
            "resharded_continued": mismatches(whole_state(resharded, resharded_opt), uninterrupted),
            "resharded_layout": resharded_layout,
        }
        # 1 -> 2: rank 0 saves one process's state alone; the 2 ranks load it into FSDP2 shards
        if dist.get_rank() == 0:
            one, one_opt = single_replay(init, build, kwargs, grads[:saved_at], torch.float32)
            dcp_save_or_load(one, one_opt, root / "one", load=False, no_dist=True)
        dist.barrier()
        model = sharded_net(fresh_init(torch.float32, WideNet), torch.float32, net=WideNet)
        opt = build(model.parameters(), state_bits=8, **kwargs)
        dcp_save_or_load(model, opt, root / "one", load=True, no_dist=False)
        loaded = whole_state(model, opt)
        layout = quantized_layout(model, opt)
        replay(model, opt, grads[saved_at:])
        results["checkpoint/1to2"] = {
            "loaded_mismatches": mismatches(loaded, at_save),
            "continued_mismatches": mismatches(whole_state(model, opt), uninterrupted),
            "layout": layout,
        }
        # ... and load_checkpoint on 2 ranks reads the 2-rank checkpoint back exactly
        model = sharded_net(fresh_init(torch.float32, WideNet), torch.float32, net=WideNet)
        opt = build(model.parameters(), state_bits=8, **kwargs)
        load_checkpoint(path, model, opt)
        loaded = whole_state(model, opt)
        replay(model, opt, grads[saved_at:])
        results["checkpoint/2to2"] = {
            "loaded_mismatches": mismatches(loaded, at_save),
            "continued_mismatches": mismatches(whole_state(model, opt), uninterrupted),
        }
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    return results


SCENARIOS = {
    "clipping": scenario_clipping,
    "low_precision": scenario_low_precision,
    "fsdp": scenario_fsdp,
    "ddp": scenario_ddp,
    "memory": scenario_memory,
    "fused_fallback": scenario_fused_fallback,
    "state_bits": scenario_state_bits,
}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = SCENARIOS[scenario]()
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in destroy_process_group for a peer that may be stuck
    # FSDP2 modules hold the process group through reference cycles: collect them so that the group
    # is destroyed here, not at interpreter shutdown where gloo intermittently aborts a rank
    # (same teardown as scripts/train.py)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
