"""The candidates fixed searches propose and the fitness they record, on the tiny zoo: run it on
two checkouts and compare the JSON to show that a change left search trajectories identical
(``merge_hashes.py`` does the same for merges).

    python benchmarks/search_trajectories.py CHECKOUT [ZOO] > trajectories.json

CHECKOUT is the source tree whose evomerge is imported; ZOO (default runs/trajectory-zoo) keeps
the tiny zoo between runs, so both sides search the same models. Three searches: CMA-ES over a
per-layer TIES space with references, DARE with racing (``fitness.estimate``), and Optuna's TPE
over breadcrumbs; one thread, so that a run's floats do not depend on the load.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, sys.argv[1])
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.run.loop import run_search  # noqa: E402
from evomerge.run.rundir import create_run  # noqa: E402
from evomerge.zoo import build_zoo, family, load_zoo  # noqa: E402

torch.set_num_threads(1)
root = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/trajectory-zoo").resolve()
if not (root / "zoo.json").exists():
    build_zoo(root, size="tiny", seed=0)
zoo = load_zoo(root)
models = family(zoo)
SEARCHES = {
    "ties-per_layer": {"merge_method": "ties", "space": "per_layer", "budget": {"max_candidates": 10}},
    "dare-racing": {"merge_method": "dare_ties", "space": "global", "budget": {"max_candidates": 24},
                    "fitness": {"suite": "zoo-smooth", "estimate": {"racing": {"rungs": [0.1, 0.3], "z": 1.0}}}},
    "breadcrumbs-tpe": {"merge_method": "breadcrumbs", "space": "global", "budget": {"max_candidates": 8},
                        "driver": {"name": "optuna", "sampler": "tpe"}},
}
out = {}
for name, over in SEARCHES.items():
    work = Path(tempfile.mkdtemp(prefix="evomerge-trajectory-"))
    cfg = {"name": name, "models": models, "fitness": {"suite": "zoo-smooth"}, "references": True,
           "driver": {"name": "cma", "popsize": 4}, "seed": 1} | over
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(work / "config.yaml", work / "run")
    run_search(run, live=False)
    out[name] = {"candidates": [[r.number, r.state, r.fitness, sorted(r.params.items())] for r in run.db.rows()],
                 "references": [[r.name, r.fitness] for r in run.db.references()]}
    run.db.close()
json.dump(out, sys.stdout, indent=1, sort_keys=True)
