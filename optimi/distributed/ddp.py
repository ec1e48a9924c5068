"""Gradient release on ``DistributedDataParallel`` models through a communication hook.

[Note: what happens when under DDP]
DDP's reducer copies each parameter's gradient into a flat *bucket* (~25 MiB) as autograd
produces it, and when a bucket is full it runs the bucket's communication hook. A plain
post-accumulate-grad release hook would run *before* that, on the local, un-averaged gradient,
and the replicas would silently diverge. So optimi registers a communication hook instead which,
for every bucket, in backward:

1. divides the bucket by the world size, starts an asynchronous all-reduce of it (the average, as
   DDP's default hook) and drops each of its parameters' ``.grad``: the bucket holds a copy of it
   (or ``.grad`` is a view of the bucket), so gradients are freed as early as when the hook waited
   for the all-reduce. Then it returns at once, so autograd goes on computing the earlier layers'
   gradients while the bucket is being reduced;
2. when the all-reduce completes, a callback chained on its future (``Future.then``, torch's
   "hook then optimizer" pattern) steps each of the bucket's parameters with its view of the
   averaged bucket (``optimi.gradient_release.release_step``), folding it into the optimizer state
   only while ``optimizer.optimizer_accumulation`` is set;
3. the chained future, which DDP waits for at the end of backward, returns the bucket. The reducer
   is told that the optimizer runs in backward (``reducer._set_optimizer_in_backward()``), so at the
   end of backward it neither copies the bucket back into ``.grad`` (``gradient_as_bucket_view=False``)
   nor re-points ``.grad`` at the bucket (``gradient_as_bucket_view=True``). Without that, the
   step's scratch use of the bucket would come back as a stale gradient that the next backward
   accumulates into and that would be applied a second time.

Where the callback runs: with gloo the all-reduce completes on one of the process group's worker
threads, and the callback runs there, while the main thread continues backward; the callbacks of
one model take a lock, because the gloo workers may complete two buckets at once and the optimizer
(its group index, the fused backend's compile cache) is not thread-safe. Each callback enters
``torch.no_grad()`` itself, since grad mode is per thread. With NCCL the future completes as soon
as the all-reduce is enqueued and the callback runs at once on the host, with a current stream that
waits for the all-reduce (``Future.then``'s contract for CUDA tensors): the step's kernels are
ordered after the reduction on the device, the host never blocks, and the step may overlap the
rest of backward on the device. When DDP waits for the returned future at the end of backward, the
backward's stream waits for the step's kernels. A parameter's bucket is ready only after autograd
has finished every use of that parameter in this backward, so stepping it concurrently with the
rest of backward reads and writes nothing that backward still needs.

Every replica steps the same parameters with bit-identical averaged buckets and identical state,
so the replicas stay bit-identical, and the results are those of waiting for each all-reduce
(what this hook did before, kept as the benchmark's baseline: ``_DDPReleaseState.wait_for_all_reduce``).
The bucket buffers themselves belong to DDP and stay allocated (one gradient-sized buffer per
replica, as in normal DDP); what release saves is the separate ``.grad`` tensors (with
``gradient_as_bucket_view=False``) and the optimizer's peak.

``no_sync()`` skips step 1 and would let gradients pile up locally without any step, so a forward
under ``no_sync()`` raises while release is active: for accumulation keep syncing and set
``optimizer.optimizer_accumulation = True`` for the micro-steps (each is reduced and folded in).

The installer below is registered for the ``"ddp"`` kind; the checks, the up-front state and the
removal are shared with the other kinds ([Note: one installer for every kind of model] in
``optimi/gradient_release.py``).

Limits (DDP allows a communication hook to be registered once, and has no way to unset "optimizer
in backward"): after ``remove_gradient_release`` the hook stays installed but behaves like DDP's
default (average, then ``.grad`` = the averaged gradient: a view of the bucket with
``gradient_as_bucket_view=True``, a copy otherwise), so ``optimizer.step()`` works normally again.
A model with a user-registered communication hook cannot be prepared. With
``find_unused_parameters=True`` a globally unused parameter arrives as zeros in its bucket and is
stepped with a zero gradient (momentum and weight decay still act), where normal DDP would leave its
``.grad`` untouched. An error in a step (for example accumulation with plain SGD) is raised by
``backward()`` when DDP waits for the bucket's future, as a ``RuntimeError`` whose message carries
the original error ("Got the following error when running the callback: ValueError: ...").
"""

# no `from __future__ import annotations`: DDP checks the comm hook's annotations at runtime

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from optimi.gradient_release import (
    ReleaseInstaller,
    Removable,
    named_trainable,
    register_release_installer,
    release_step,
)
from optimi.optimizer import OptimiOptimizer

__all__: list[str] = []

# attribute on the DDP module holding the hook state (it outlives remove_gradient_release)
_STATE_ATTR = "_optimi_ddp_gradient_release"


@dataclass
class _DDPReleaseState:
    """The communication hook's state: whom to step and whether release is on."""

    #: the optimizer stepped from the hook
    optimizer: OptimiOptimizer
    #: the process group DDP reduces over
    process_group: Any
    #: whether DDP's ``.grad`` are views of its buckets (decides how grads are restored when inactive)
    gradient_as_bucket_view: bool
    #: release on (step + free) or off (behave like DDP's default averaging all-reduce)
    active: bool = True
    #: wait for each all-reduce inside the hook and step there, as this hook did before it chained
    #: the step on the all-reduce's future; same results, no overlap. Only
    #: ``scripts/bench_ddp_release.py`` sets it, to measure what the overlap gains
    wait_for_all_reduce: bool = False
    #: held by each bucket's step callback: two gloo worker threads may complete buckets at once
    step_lock: threading.Lock = field(default_factory=threading.Lock)


class _ReleaseSwitch:
    """The "handle" of the communication hook: DDP cannot unregister one, so removal switches it off."""

    def __init__(self, state: _DDPReleaseState):
        self.state = state

    def remove(self) -> None:
        self.state.active = False


def _trainable(model: DistributedDataParallel) -> list[tuple[str, Tensor]]:
    """The wrapped module's trainable parameters, named without DDP's ``module.`` prefix."""
    return named_trainable(model.module)


def _refuse_foreign_comm_hook(model: DistributedDataParallel) -> None:
    """Raise if a communication hook other than optimi's is registered: DDP allows only one."""
    if getattr(model, _STATE_ATTR, None) is None and model._comm_hooks:
        names = ", ".join(getattr(hook, "__qualname__", repr(hook)) for hook, _ in model._comm_hooks)
        raise ValueError(
            f"this DDP model already has a communication hook ({names}); DDP allows only one, and optimi's "
            "gradient release needs its own to step each bucket after its all-reduce. Wrap the model in a "
            "fresh DistributedDataParallel without register_comm_hook to use gradient release"
        )


def _install(
    model: DistributedDataParallel, optimizer: OptimiOptimizer, trainable: list[tuple[str, Tensor]]
) -> list[Removable]:
    """Register the release communication hook (once per model) and the forward pre-hook refusing ``no_sync()``."""
    state: _DDPReleaseState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = _DDPReleaseState(optimizer, model.process_group, model.gradient_as_bucket_view)
        try:
            model.register_comm_hook(state, _release_comm_hook)
        except RuntimeError as error:  # a builtin hook registered through the private API
            raise ValueError(
                f"could not register optimi's gradient release communication hook: {error}. DDP allows only one "
                "communication hook; use a DistributedDataParallel module without one"
            ) from error
        # the optimizer runs inside backward: the reducer must not write buckets back into .grad
        model.reducer._set_optimizer_in_backward()
        setattr(model, _STATE_ATTR, state)
    state.optimizer = optimizer
    state.active = True
    return [_ReleaseSwitch(state), model.register_forward_pre_hook(_refuse_no_sync)]


register_release_installer(
    "ddp", ReleaseInstaller(trainable=_trainable, install=_install, refuse=_refuse_foreign_comm_hook)
)


@torch.no_grad()
def _release_comm_hook(state: _DDPReleaseState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average one bucket with an asynchronous all-reduce and chain its parameters' steps on it.

    See [Note: what happens when under DDP].
    """
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(state.process_group))
    reduced = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()
    if state.wait_for_all_reduce:
        reduced.wait()  # then `then` below runs the callback inline, here
    # read now, in the hook: what release does with this bucket is decided when DDP hands it over
    active, optimizer = state.active, state.optimizer
    params = bucket.parameters()
    grads = bucket.gradients()  # views of `buffer`, shaped like the parameters
    if active:
        # the bucket holds the gradients now (DDP copied them in, or .grad is a view of it): drop
        # .grad here, when autograd hands the bucket over, not when the all-reduce completes, so
        # that overlapping keeps no more gradients alive than stepping inside the hook did
        for param in params:
            param.grad = None

    def step_bucket(all_reduce: torch.futures.Future[list[Tensor]]) -> Tensor:
        # value() re-raises a failed all-reduce instead of stepping on an unreduced bucket
        all_reduce.value()
        # this runs on a gloo worker thread or, with NCCL, inline: grad mode is per thread
        with state.step_lock, torch.no_grad():
            if active:
                for param, grad in zip(params, grads):
                    release_step(optimizer, param, grad)
            else:
                for param, grad in zip(params, grads):
                    if state.gradient_as_bucket_view:
                        param.grad = grad
                    elif param.grad is None:
                        param.grad = grad.clone()
                    else:
                        param.grad.copy_(grad)
        return buffer

    return reduced.then(step_bucket)


@contextlib.contextmanager
def reducing_each_parameter(model: DistributedDataParallel, optimizer: OptimiOptimizer) -> Iterator[None]:
    """A backward in this block averages and steps each gradient itself: ``release_backward``'s second pass.

    DDP's reducer all-reduces only the first backward after a forward, so the second backward of
    ``optimi.release_backward`` runs under ``no_sync()`` (the reducer stays out of it) with a
    post-accumulate-grad hook on every parameter that all-reduces its gradient, averages it and
    runs the release step. One all-reduce per parameter, unbucketed: every rank runs the same
    backward, so the hooks, and their collectives, come in the same order on every rank.
    """
    world = dist.get_world_size(model.process_group)

    def hook(param: Tensor) -> None:
        assert param.grad is not None
        dist.all_reduce(param.grad, group=model.process_group)
        param.grad.div_(world)
        release_step(optimizer, param)

    handles = [param.register_post_accumulate_grad_hook(hook) for _, param in _trainable(model)]
    try:
        with model.no_sync():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _refuse_no_sync(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: under ``no_sync()`` the comm hook would not run and nothing would step."""
    if torch.is_grad_enabled() and not module.require_backward_grad_sync:
        raise RuntimeError(
            "DistributedDataParallel.no_sync() is active while optimi gradient release is installed: the backward "
            "would skip the all-reduce, so no parameter would be stepped and unreduced gradients would pile up. "
            "For accumulation keep gradient sync on and set optimizer.optimizer_accumulation = True for the "
            "micro-steps instead (each micro-step is then averaged and folded into the optimizer state)"
        )
