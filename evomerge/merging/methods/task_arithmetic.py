"""Task arithmetic: base + lambda * sum_i w_i * (theta_i - base), no trimming, no sign election."""

from evomerge.merging.kernel.mix import merge_task_arithmetic
from evomerge.merging.methods.base import GTA_GLOBALS, WEIGHT, MergeMethod, density

METHODS = (
    MergeMethod("task_arithmetic", merge_task_arithmetic, model=(WEIGHT, density(searched=False)),
                globals_=GTA_GLOBALS, summary="weighted sum of task vectors"),
)
