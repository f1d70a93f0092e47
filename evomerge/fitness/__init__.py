"""Fitness: suites of tasks (:mod:`.suite`), their results (:mod:`.result`) and the backends that
score a live model on them (:mod:`.base`: the Protocol and the registry; :mod:`.native`,
:mod:`.lmeval`). Nothing is imported here, so the registry stays cheap to read."""
