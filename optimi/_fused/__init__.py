"""The fused backend: each optimizer's update rule compiled into one pass over memory per tensor.

The package, one concern per module:

* ``ops.py``: :class:`~optimi._fused.ops.FusedOps`, the primitives' in-kernel numerics;
* ``packing.py``: bf16 columns packed two values to an int32 word (CPU);
* ``masters.py``: ``"stochastic"``/``"remainder"`` bf16 parameters stepped through a float32
  master that the kernel builds and writes back itself;
* ``compilation.py``: one configuration's step under ``torch.compile``, its self-checks and
  :class:`FusedCompileError`;
* ``cpp_rewrites.py``: rewrites of the C++ Inductor generates on CPU;
* ``dispatch.py``: :func:`run_fused`, which finds each row's configuration, flat views and
  packed scalars, and the fallback when a compile fails.

[Note: the fused backend]
``run_fused`` runs the same ``_<name>_update(ops, ...)`` function that the for-loop backend runs
(see [Note: one update rule, three backends] in ``optimi/_ops.py``), per tensor, under
``torch.compile``. Inductor fuses the dozen in-place primitives of the rule into one loop that
reads the parameter, gradient and states once and writes the parameter and states once:
vectorized C++ on CPU, a Triton kernel on CUDA. There is no second copy of the math.

What keeps compilation to once per *configuration* (update rule, device type, dtype, which
optional tensors are ``None``, the rule's ``bool``/``None`` switches) rather than once per shape
or step:

* every tensor is passed as a flat 1-D view with a dynamic length, so parameters of any shape
  share one kernel (lengths 0 and 1 are specialized by Dynamo: at most one more compile each);
* numeric hyperparameters (learning rate, betas, bias corrections, ...) travel packed in one
  float64 tensor, so a scheduler changing them never triggers a recompile. float64 keeps their
  Python arithmetic (``1 - beta1``, ``-lr / bias_correction1``) bit-identical to the other
  backends before they are rounded to the kernel's compute dtype;
* each configuration is its own compiled region, so Dynamo's per-function recompile limit is
  never shared between optimizers or configurations;
* after a configuration's first call its compiled graph is called without Dynamo (see [Note:
  calling the compiled graph directly] in ``compilation.py``).

On CPU the arithmetic the kernel derives from the packed scalars is moved out of its loop before
the kernel is built ([Note: hoisting the hyperparameters] in ``cpp_rewrites.py``): Inductor writes
it inside the loop, where the compiler has to redo it for every vector.

[Note: reductions and collectives]
An update rule may reduce over its tensor into a 0-d tensor it is given (``ops.sum_into_``):
Inductor then emits a reduction loop. StableAdamW splits its step into two rules, a pure
reduction and the update ([Note: StableAdamW's two passes] in ``stableadamw.py``), and combines
the sums eagerly in between, so that its optional ``reduce_sums`` (an all-reduce across DTensor
shards) never enters a graph. A callable passed among a rule's scalars would be wrapped in
``torch.compiler.disable``, so Dynamo splits the compiled region around it.
"""

from optimi._fused.compilation import FusedCompileError
from optimi._fused.dispatch import FALLBACK_BACKEND, compiled_configurations, fallen_back_configurations, run_fused

__all__ = [
    "FALLBACK_BACKEND",
    "FusedCompileError",
    "compiled_configurations",
    "fallen_back_configurations",
    "run_fused",
]
