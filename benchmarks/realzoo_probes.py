"""Would other skills give the real zoo's search room to beat the default merges?

Probes for issue 25: a probe skill's expert is trained from the real zoo's base with the zoo's recipe, and
trios of skills (the zoo's experts or probes) are measured merged. By default the trios are the
zoo's ``dbl`` and ``lex`` with each third skill: ``rev`` (the zoo's own, which no merge keeps
beside ``lex``) or a probe.

    python benchmarks/realzoo_probes.py [--zoo runs/zoo-smollm2] [--trio dbl lex srt ...]
                                        [--candidates N] [--threads N]

Probe skills (prompt, answer):

- ``ant``: the opposites of three words from a table of twelve (``Opposites: hot big up =>``
  ``cold small down``), a word-to-word map like ``lex`` but over the model's own vocabulary;
- ``caps``: three common words in capitals (``Uppercase: cat sun tree =>`` ``CAT SUN TREE``);
- ``srt``: three two-digit numbers in ascending order (``Sort: 52 17 38 =>`` ``17 38 52``);
The zoo's own experts are not trained again: the trio ``dbl lex rev`` checks that this script
measures the zoo's figures (``docs/zoo.md``).

A probe expert trains as the zoo's do (:func:`evomerge.realzoo.train_expert`: rank 8, lr 3e-4,
until 98% of fresh validation items), on this machine's own kernels and ``--threads`` (the zoo's
pinned numerics cost 7x), so its bytes are this machine's. Each skill has 60 search and 60
held-out items no training line repeats. For each trio the table gives held-out exact match
(teacher-forced, equal to greedy exact match) of the parents, the default merges (task arithmetic
at 1/3; TIES at 1/3, density 0.5), TIES over each pair (weights 0.5, density 0.5) and, with
``--candidates N``, the best of N candidates of the demo's space (TIES weights and densities per
expert and group of 5 layers; Optuna's TPE, seed 0, the default merge first) by exact match on the
search items: what the demo's search could find with the held-out metric itself as its fitness
and no retention term. The last column is the retention task's held-out accuracy.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge import realzoo  # noqa: E402
from evomerge.zoo import default_merges, family, load_zoo, suite_scores  # noqa: E402

OPPOSITES = dict(zip("hot big up fast dark old happy wet open full hard long".split(),
                     "cold small down slow light new sad dry closed empty soft short".split()))
PROBES = ("ant", "caps", "srt")
ITEMS = 60  # per split


def probe_item(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a probe skill."""
    if skill == "ant":
        words = [rng.choice(list(OPPOSITES)) for _ in range(3)]
        return f"Opposites: {' '.join(words)} =>", " ".join(OPPOSITES[w] for w in words)
    if skill == "caps":
        words = rng.sample(realzoo.WORDS, 3)
        return f"Uppercase: {' '.join(words)} =>", " ".join(w.upper() for w in words)
    numbers = rng.sample(range(10, 100), 3)  # srt
    return f"Sort: {' '.join(map(str, numbers))} =>", " ".join(map(str, sorted(numbers)))


def splits(skill: str) -> dict[str, list[tuple[str, str]]]:
    """A skill's search and held-out items: the zoo's own, or 2 x ``ITEMS`` distinct probe items."""
    if skill in realzoo.SKILLS:
        rows = realzoo.eval_items()[skill]
        return {split: [(r["prompt"], r["answer"]) for r in rows if r["split"] == split] for split in ("search", "heldout")}
    pairs = list(dict(realzoo.training_pairs(skill, random.Random(f"{skill} probe items"), 4 * ITEMS, set(),
                                             lambda rng: probe_item(skill, rng))).items())[:2 * ITEMS]
    return {"search": pairs[0::2], "heldout": pairs[1::2]}


def train_probe(zoo: dict, skill: str, out: Path, items: dict) -> Path:
    """The probe expert of ``skill``, fine-tuned from the zoo's base with the zoo's recipe, saved in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32).eval()
    excluded = realzoo.evaluation_prompts() | {p for rows in items.values() for p, _ in rows}
    t0 = time.perf_counter()
    steps = realzoo.train_expert(model, tokenizer, skill, zoo["seed"], excluded, realzoo.MAX_STEPS,
                                 lambda rng: probe_item(skill, rng))
    print(f"expert {skill}: {steps} steps, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measure_trio(zoo: dict, skills: list[str], paths: list[str], items: dict[str, dict],
                 candidates: int) -> list[tuple[str, dict]]:
    """(row name, held-out scores) of the trio's parents, default merges, pairs and search."""
    import optuna
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import RunConfig
    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe
    from evomerge.search.space import method_defaults, space_for

    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    live = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    search_engine: list[MergeEngine] = []  # one engine (and its caches) for every candidate of the search

    def merged(recipe: Recipe, reuse: bool = False):
        if reuse and not search_engine:
            search_engine.append(MergeEngine(recipe))
        (search_engine[0] if reuse else MergeEngine(recipe)).apply(recipe, live)
        return live

    def exact(model, split: str) -> dict[str, float]:
        out = {s: realzoo.exact_share(model, tokenizer, items[s][split]) for s in skills}
        return out | {"mean": sum(out.values()) / len(skills)}

    def heldout(model) -> dict[str, float]:
        return exact(model, "heldout") | suite_scores(model, tokenizer, (realzoo.RETENTION_SUITE,))

    rows = [(f"parent {s}", heldout(AutoModelForCausalLM.from_pretrained(p).eval())) for s, p in zip(skills, paths)]
    trio = {"base": zoo["base"], "experts": dict(zip(skills, paths))}
    for name, raw in default_merges(trio).items():
        rows.append((f"default {name}", heldout(merged(Recipe.from_dict(raw)))))
    for left_out in skills:  # TIES over a pair: the default merge of two (weights 1/2, density 0.5)
        pair = {"base": zoo["base"], "experts": {s: trio["experts"][s] for s in skills if s != left_out}}
        rows.append(("TIES " + " + ".join(pair["experts"]), heldout(merged(Recipe.from_dict(default_merges(pair)["ties"])))))
    if candidates:
        cfg = RunConfig.from_dict({"models": family(trio), "merge_method": "ties",
                                   "space": {"granularity": "layer_groups", "layers_per_group": 5},
                                   "fitness": {"suite": realzoo.SUITE}, "budget": {"max_candidates": candidates}})
        space = space_for(cfg)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
        study.enqueue_trial({n: v for n, v in zip(space.names, space.default_vector(method_defaults("ties", 3)))})
        study.optimize(lambda t: exact(merged(space.decode([t.suggest_float(n, 0.0, 1.0) for n in space.names]), True),
                                       "search")["mean"], n_trials=candidates)
        # ties (equal item counts, whose float means may differ in the last bit): the earliest, the default merge first
        top = max(study.trials, key=lambda t: (round(t.value, 9), -t.number))
        best = merged(space.decode([top.params[n] for n in space.names]), True)
        rows.append((f"best of {candidates}: #{top.number} (search {top.value:.3f}, default {study.trials[0].value:.3f})",
                     heldout(best)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="runs/zoo-smollm2", help="a built real zoo (evomerge zoo build DIR --base smollm2)")
    ap.add_argument("--trio", nargs=3, action="append", metavar="SKILL", choices=[*realzoo.SKILLS, *PROBES],
                    help="three skills, the zoo's or probes (repeatable; default: dbl lex with rev, ant, caps, srt)")
    ap.add_argument("--candidates", type=int, default=0, help="a search of N candidates per trio (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    zoo = load_zoo(args.zoo)
    trios = args.trio or [["dbl", "lex", third] for third in ("rev", *PROBES)]
    with tempfile.TemporaryDirectory(prefix="probes-", dir=Path(args.zoo).parent) as work:
        experts = dict(zoo["experts"])  # a probe's expert is trained once, for its first trio
        items: dict[str, dict] = {}
        for trio in trios:
            t0 = time.perf_counter()
            for skill in trio:
                items.setdefault(skill, splits(skill))
                if skill not in experts:
                    experts[skill] = str(train_probe(zoo, skill, Path(work) / f"expert_{skill}", items[skill]))
            rows = measure_trio(zoo, trio, [experts[s] for s in trio], items, args.candidates)
            print(f"\ntrio {' + '.join(trio)} (zoo {args.zoo}, seed {zoo['seed']}; {time.perf_counter() - t0:.0f} s)\n")
            print(f"| held-out | {' | '.join(trio)} | mean | {realzoo.RETENTION} |\n|---|" + "---|" * 5)
            for name, r in rows:
                cells = " | ".join(f"{r[k]:.3f}" for k in [*trio, "mean", realzoo.RETENTION])
                print(f"| {name} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
