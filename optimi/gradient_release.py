"""Gradient release: step each parameter during backward and free its gradient at once.

``prepare_for_gradient_release(model, optimizer)`` registers a post-accumulate-grad hook on every
trainable parameter of ``model``. As soon as autograd has accumulated a parameter's gradient the
hook calls ``optimizer.step_param(param)`` and drops ``param.grad``, so at most one parameter's
gradient is alive at a time instead of the whole model's. With ``optimizer.optimizer_accumulation``
set, the same hook folds the gradient into the optimizer state without touching the weights.

[Note: gradient release reads the live param group]
Each hook holds the optimizer and the parameter, nothing else. ``step_param`` looks the
parameter's group up on every call (``OptimiOptimizer.group_of``), because frameworks replace the
group dicts behind your back (``load_state_dict`` during accelerate's ``prepare``, Lightning's
state moves): a hook holding an old group would silently keep training with a frozen learning rate.

[Note: state is allocated before the first backward]
Creating moments lazily inside the first backward interleaves long-lived optimizer state with
short-lived gradients in the allocator, which fragments memory so that the freed gradients never
lower the process's peak (measured: ~9 MiB saved of ~200 MiB of bf16 gradients on CPU). So
``prepare_for_gradient_release`` allocates every parameter's state up front.

[Note: one installer for every kind of model]
A plain module, an FSDP2 model and a ``DistributedDataParallel`` module are prepared by the same
helper, :func:`install_release_hooks`: check the model, allocate every parameter's state, install
the hooks, mark the optimizer active; :func:`uninstall_release_hooks` undoes it. The kinds differ
only in *where* a gradient is ready to step, and each kind describes that in a
:class:`ReleaseInstaller` registered under its name (:func:`register_release_installer`):

- ``plain``: the parameter's post-accumulate-grad hook (this module);
- ``fsdp2``: the sharded parameter's post-accumulate-grad hook, which FSDP2 calls after the
  reduce-scatter (``optimi/distributed/fsdp.py``);
- ``ddp``: a communication hook, after the bucket's all-reduce (``optimi/distributed/ddp.py``); a
  plain hook would step each replica on its local, un-averaged gradient.

Every kind steps through :func:`release_step`, which steps the parameter, frees its gradient and
tells LR schedulers that the optimizer stepped, so none of that can differ between the kinds.
:func:`model_kind` is the one place that tells the kinds apart.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optimi.optimizer import OptimiOptimizer

__all__ = ["prepare_for_gradient_release", "release_backward", "remove_gradient_release"]


def prepare_for_gradient_release(
    model: nn.Module, optimizer: OptimiOptimizer, ignore_existing_hooks: bool = False
) -> None:
    """Step ``optimizer`` on each parameter of ``model`` as soon as its gradient is ready.

    Registers a post-accumulate-grad hook on every parameter with ``requires_grad=True`` that
    calls ``optimizer.step_param(param)`` and then sets ``param.grad = None``. While the hooks are
    installed ``optimizer.step()`` and ``optimizer.zero_grad()`` are no-ops, and
    ``optimizer.step(closure)`` only evaluates the closure (its backward performs the steps) and
    returns its loss. Learning-rate and momentum schedulers keep working, also after
    ``optimizer.load_state_dict`` ([Note: gradient release reads the live param group]), and
    ``scheduler.step()`` does not need an ``optimizer.step()`` call before it.
    Debiasing uses each parameter's own step count.

    All optimizer state is allocated here, before the first backward
    ([Note: state is allocated before the first backward]).

    A ``DistributedDataParallel`` module or an FSDP2 model (``fully_shard`` applied) is prepared
    by ``optimi.distributed``'s installer for its kind ([Note: one installer for every kind of model]).

    Args:
        model: The module whose parameters ``optimizer`` updates.
        optimizer: An optimi optimizer constructed with ``gradient_release=True``.
        ignore_existing_hooks: Install the hooks even if a parameter already has
            post-accumulate-grad hooks. Hooks registered earlier run before the step and see the
            gradient; hooks registered later see ``param.grad`` as ``None`` (default: False).

    Raises:
        TypeError: ``optimizer`` is not an optimi optimizer.
        ValueError: ``optimizer`` was built without ``gradient_release=True``; a trainable
            parameter of ``model`` is not in ``optimizer``; ``model`` is already prepared; a
            parameter already has post-accumulate-grad hooks and ``ignore_existing_hooks`` is False.
        NotImplementedError: ``model`` is distributed and ``optimi.distributed`` is unavailable.
    """
    check_release_optimizer(optimizer)
    install_release_hooks(model, optimizer, ignore_existing_hooks=ignore_existing_hooks)


def remove_gradient_release(model: nn.Module) -> None:
    """Remove the hooks of :func:`prepare_for_gradient_release` and restore normal stepping.

    Only the hooks gradient release installed are removed. Warns if ``model`` has none. On a
    ``DistributedDataParallel`` module the communication hook stays and behaves like DDP's default
    (see ``optimi/distributed/ddp.py``).

    Raises:
        NotImplementedError: ``model`` is distributed and ``optimi.distributed`` is unavailable.
    """
    # a distributed model without optimi.distributed raises here, as it does in prepare
    installer_for(model_kind(model))
    if not uninstall_release_hooks(model):
        warnings.warn("model has no gradient release hooks to remove", stacklevel=2)


def release_backward(loss: Tensor, optimizer: OptimiOptimizer) -> None:
    """``loss.backward()`` under gradient release, with the exact gradient clip: two backward passes.

    The first pass (``retain_graph=True``) only measures: each release hook adds its gradient's
    squares to the global norm and frees the gradient, so peak memory stays that of release. The
    second pass steps every parameter with its gradient scaled by
    ``min(1, max_grad_norm / (norm + 1e-6))`` of *this* backward's norm, as
    ``clip_grad_norm_`` + ``step()`` would without release (LOMO's two-pass clipping). A
    non-finite norm skips the whole step, without the second pass (``optimizer.skipped_steps``).
    ([Note: clipping under gradient release] in ``optimi/_clipping.py``.)

    Works on one process, under FSDP2 (each pass reduce-scatters the gradients again: twice the
    gradient communication) and under DDP, whose reducer all-reduces only the first backward after
    a forward: there the second pass all-reduces each parameter's gradient itself, unbucketed
    (``optimi/distributed/ddp.py``).

    Raises:
        ValueError: ``optimizer`` has no ``max_grad_norm`` or no gradient release hooks installed.
    """
    if optimizer.max_grad_norm is None:
        raise ValueError("release_backward needs an optimizer with max_grad_norm set (the clip it makes exact)")
    released = getattr(optimizer, "_release_model", lambda: None)()
    if not optimizer._gradient_release_active or released is None:
        raise ValueError("release_backward needs gradient release: call prepare_for_gradient_release first")
    clipping = optimizer._release_clipping
    optimizer._finish_release_backward()  # a previous backward's norm, if one is pending
    clipping.measuring = True
    try:
        loss.backward(retain_graph=True)
    finally:
        clipping.measuring = False
    # this backward's norm and exact coefficient (completed at the end of the pass, or here)
    optimizer._finish_release_backward()
    norm = optimizer._grad_norm
    if norm is None or not bool(torch.isfinite(norm)):
        optimizer._count_skipped("optimizer step (release_backward)")
        return
    if model_kind(released) == "ddp":
        from optimi.distributed.ddp import reducing_each_parameter  # [Note: the single lazy import]

        with reducing_each_parameter(released, optimizer):
            loss.backward()
    else:
        loss.backward()


# -- the installer registry -----------------------------------------------------------------------


class Removable(Protocol):
    """Anything :func:`uninstall_release_hooks` can undo: a hook handle, DDP's hook switch."""

    def remove(self) -> None: ...


@dataclass(frozen=True)
class ReleaseInstaller:
    """How gradient release is installed on one kind of model ([Note: one installer for every kind of model])."""

    #: ``model -> [(name, parameter)]``: the trainable parameters, named as the user knows them
    #: (a DDP module's without the ``module.`` prefix)
    trainable: Callable[[nn.Module], list[tuple[str, Tensor]]]
    #: ``(model, optimizer, trainable) -> handles``: installs the hooks that call :func:`release_step`;
    #: runs after every check and after the state is allocated, and returns what removes them
    install: Callable[[nn.Module, OptimiOptimizer, list[tuple[str, Tensor]]], list[Removable]]
    #: ``model -> None``: raises ``ValueError`` if this model cannot be prepared for a reason of its
    #: kind (DDP: a user's communication hook); ``None`` when there is no such reason
    refuse: Callable[[nn.Module], None] | None = None


# kind ("plain", "ddp", "fsdp2") -> its installer; optimi.distributed registers "ddp" and "fsdp2"
_INSTALLERS: dict[str, ReleaseInstaller] = {}


def register_release_installer(kind: str, installer: ReleaseInstaller) -> None:
    """Install gradient release on models of ``kind`` (a name :func:`model_kind` returns) with ``installer``."""
    _INSTALLERS[kind] = installer


def model_kind(model: nn.Module) -> str:
    """``"ddp"``, ``"fsdp2"`` (``fully_shard`` applied to ``model`` or a submodule) or ``"plain"``.

    The one place that tells the kinds apart. torch.distributed is imported lazily: single-process
    code never pays for it, and builds without distributed support have no DDP or FSDP models.
    """
    if not torch.distributed.is_available():
        return "plain"
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2 cannot produce an FSDP2 model
        return "plain"
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        return "fsdp2"
    return "plain"


_DISTRIBUTED_REASONS = {
    "ddp": "DDP all-reduces gradients after the post-accumulate-grad hooks run, so a plain release hook "
    "would step every replica on its local, un-averaged gradient and the replicas would silently diverge",
    "fsdp2": "FSDP2 parameters are DTensor shards: the step must run on the reduce-scattered local shard "
    "with optimizer state sharded like the parameter",
}


def installer_for(kind: str) -> ReleaseInstaller:
    """The installer registered for ``kind``, importing ``optimi.distributed`` for a distributed kind.

    The DDP and FSDP2 installers register themselves when ``optimi.distributed`` is imported, and
    this is the single deliberate place where gradient release imports it, lazily, the first time
    it meets a distributed model ([Note: the single lazy import] in ``optimi/optimizer.py``): at
    module level it would be an import cycle, since ``optimi.distributed`` imports this module (the
    registry, the checks, :func:`release_step`), and single-process users would pay for
    torch.distributed. Where it cannot be imported, a distributed model is refused with
    ``NotImplementedError``, never given plain hooks.
    """
    if kind not in _INSTALLERS:
        try:
            # [Note: the single lazy import]: imported for its side effect, registering the installers
            import optimi.distributed  # noqa: F401
        except ImportError as error:
            # only a missing optimi.distributed means "not implemented"; any other import error is a real bug
            if error.name is not None and not error.name.startswith("optimi.distributed"):
                raise
    installer = _INSTALLERS.get(kind)
    if installer is None:
        raise NotImplementedError(
            f"gradient release for a {kind.upper()} model needs optimi.distributed, which is not available: "
            f"{_DISTRIBUTED_REASONS[kind]}"
        )
    return installer


# -- installing and removing ------------------------------------------------------------------------

# attribute on the model that holds what install_release_hooks installed (see _ReleaseHooks)
_HOOKS_ATTR = "_optimi_gradient_release"


@dataclass
class _ReleaseHooks:
    """What :func:`install_release_hooks` installed on a model, so that it can be removed."""

    #: the optimizer the hooks step; its ``_gradient_release_active`` flag is reset on removal
    optimizer: OptimiOptimizer
    #: the installer's handles, removed in order
    handles: list[Removable] = field(default_factory=list)


def install_release_hooks(model: nn.Module, optimizer: OptimiOptimizer, *, ignore_existing_hooks: bool) -> None:
    """Prepare ``model`` of any kind for gradient release ([Note: one installer for every kind of model]).

    ``optimizer`` must have passed :func:`check_release_optimizer`. Raises like
    :func:`prepare_for_gradient_release`; nothing is installed or allocated when it raises.
    """
    installer = installer_for(model_kind(model))
    if getattr(model, _HOOKS_ATTR, None) is not None:
        raise ValueError(
            "model is already prepared for gradient release; call optimi.remove_gradient_release(model) first"
        )
    trainable = installer.trainable(model)
    check_managed(optimizer, trainable)
    check_no_existing_hooks(trainable, ignore_existing_hooks)
    if installer.refuse is not None:
        installer.refuse(model)

    # [Note: state is allocated before the first backward]; under FSDP2 zeros_like of a DTensor
    # parameter is a DTensor with its placements, so the state is sharded like the parameter
    for _, param in trainable:
        optimizer.init_param_state(param, optimizer.group_of(param))

    setattr(model, _HOOKS_ATTR, _ReleaseHooks(optimizer, installer.install(model, optimizer, trainable)))
    optimizer.set_gradient_release_active(True)
    # release_backward needs the model: a second backward through a DDP graph is not all-reduced
    optimizer._release_model = weakref.ref(model)


def uninstall_release_hooks(model: nn.Module) -> bool:
    """Remove what :func:`install_release_hooks` installed on ``model``; False if it installed nothing."""
    hooks: _ReleaseHooks | None = getattr(model, _HOOKS_ATTR, None)
    if hooks is None:
        return False
    for handle in hooks.handles:
        handle.remove()
    hooks.optimizer.set_gradient_release_active(False)
    delattr(model, _HOOKS_ATTR)
    return True


# -- the step every kind runs -----------------------------------------------------------------------


def release_step(optimizer: OptimiOptimizer, param: Tensor, grad: Tensor | None = None) -> None:
    """Step ``param`` from a release hook, free its gradient and tell LR schedulers a step ran.

    ``grad`` defaults to ``param.grad``; DDP passes the parameter's view of the averaged bucket,
    which doubles as the step's scratch buffer because nothing reads it afterwards.
    """
    # step_param reads the live param group ([Note: gradient release reads the live param group])
    optimizer.step_param(param, grad)
    param.grad = None
    mark_optimizer_stepped(optimizer)


def mark_optimizer_stepped(optimizer: OptimiOptimizer) -> None:
    """Tell ``torch.optim.lr_scheduler`` that ``optimizer`` stepped, as its wrapper of ``step()`` would.

    An ``LRScheduler`` wraps ``optimizer.step`` to set ``optimizer._opt_called``, and its first
    ``scheduler.step()`` warns "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
    when the flag is unset. Under gradient release the steps happen in backward and a loop need not
    call ``optimizer.step()`` at all, so every release step sets the flag itself.
    """
    optimizer._opt_called = True


def hook_each_parameter(optimizer: OptimiOptimizer, trainable: list[tuple[str, Tensor]]) -> list[RemovableHandle]:
    """A post-accumulate-grad hook on every parameter of ``trainable`` that runs :func:`release_step`."""

    def hook(param: Tensor) -> None:
        release_step(optimizer, param)

    return [param.register_post_accumulate_grad_hook(hook) for _, param in trainable]


def named_trainable(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``module``'s parameters with ``requires_grad=True``, with their names."""
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def _install_plain(
    model: nn.Module, optimizer: OptimiOptimizer, trainable: list[tuple[str, Tensor]]
) -> list[Removable]:
    """A plain module: a parameter's gradient is complete when autograd has accumulated it."""
    return hook_each_parameter(optimizer, trainable)


register_release_installer("plain", ReleaseInstaller(trainable=named_trainable, install=_install_plain))


# -- checks --------------------------------------------------------------------------------------


def check_release_optimizer(optimizer: Any) -> None:
    """Raise unless ``optimizer`` is an optimi optimizer built with ``gradient_release=True``."""
    if not isinstance(optimizer, OptimiOptimizer):
        raise TypeError(
            "gradient release needs an optimi optimizer constructed with gradient_release=True, "
            f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
        )
    if not optimizer.defaults.get("gradient_release", False):
        raise ValueError(
            f"optimizer {type(optimizer).__name__} was constructed with gradient_release=False; "
            "construct it with gradient_release=True to use gradient release"
        )


def check_managed(optimizer: OptimiOptimizer, named_params: list[tuple[str, Tensor]]) -> None:
    """Raise if a trainable parameter is not in ``optimizer`` (release would never step it)."""
    missing = []
    for name, param in named_params:
        try:
            optimizer.group_of(param)
        except ValueError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameter(s) of the model are not in the optimizer, so gradient release "
            f"would never step them: {_name_list(missing)}. Add them to the optimizer (for a distributed model: "
            "build it from the parameters after fully_shard / DistributedDataParallel) or set requires_grad=False"
        )


def check_no_existing_hooks(named_params: list[tuple[str, Tensor]], ignore_existing_hooks: bool) -> None:
    """Raise if a parameter already has post-accumulate-grad hooks, unless told to ignore them.

    ``optimi.distributed.memory_report``'s gradient sampler (marked ``optimi_memory_hook``) only
    reads gradients and does not count.
    """
    if ignore_existing_hooks:
        return
    hooked = [
        name
        for name, p in named_params
        if any(
            not getattr(hook, "optimi_memory_hook", False)
            for hook in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()
        )
    ]
    if hooked:
        raise ValueError(
            f"parameter(s) {_name_list(hooked)} already have post-accumulate-grad hooks: another integration "
            "may already step or free these gradients, and gradient release steps and frees them too (a later "
            "hook would see None). Pass ignore_existing_hooks=True to add the release hooks after the existing ones"
        )


def _name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
