"""Task arithmetic: base + lambda * sum_i w_i * (theta_i - base), no trimming, no sign election."""

from evomerge.merging.methods.base import GTA_GLOBALS, MIX_TASK_VECTORS, WEIGHT, MergeMethod, density

METHODS = (
    MergeMethod("task_arithmetic", MIX_TASK_VECTORS, model=(WEIGHT, density(searched=False)),
                globals_=GTA_GLOBALS, summary="weighted sum of task vectors"),
)
