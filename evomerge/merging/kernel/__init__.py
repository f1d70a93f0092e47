"""Merge kernels: compile-and-verify utilities (:mod:`.compile`), sparsification primitives
(:mod:`.sparsify`) and the fused mix of the task-arithmetic family (:mod:`.mix`). The methods
themselves live in :mod:`evomerge.merging.methods`."""
