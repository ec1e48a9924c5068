"""optimi: fast, memory-efficient, low-precision PyTorch optimizers."""

from optimi._fused import FusedCompileError
from optimi._torch_internals import report as fused_optimizations
from optimi.adam import Adam
from optimi.adamw import AdamW
from optimi.adan import Adan
from optimi.gradient_release import prepare_for_gradient_release, release_backward, remove_gradient_release
from optimi.lion import Lion
from optimi.optimizer import OptimiOptimizer
from optimi.radam import RAdam
from optimi.ranger import Ranger
from optimi.sgd import SGD
from optimi.stableadamw import StableAdamW
from optimi.utils import param_groups_weight_decay, to_low_precision

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "Adan",
    "FusedCompileError",
    "Lion",
    "OptimiOptimizer",
    "RAdam",
    "Ranger",
    "SGD",
    "StableAdamW",
    "fused_optimizations",
    "param_groups_weight_decay",
    "prepare_for_gradient_release",
    "release_backward",
    "remove_gradient_release",
    "to_low_precision",
    "__version__",
]
