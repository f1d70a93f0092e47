"""Can a layer path compose two experts' skills where no parameter merge does? Probes for issue
27's composed task, on three zoo designs: the rev expert's layers and the enc expert's, stacked
in every two-parent order the space allows, against the parents and task-arithmetic merges.

    python benchmarks/dfs_composition.py --zoo runs/zoo-small     # the built small zoo
    python benchmarks/dfs_composition.py --design words           # variant trained here (~4 min)
    python benchmarks/dfs_composition.py --design pretrained      # variant trained here (~4 min)

The composed prompt is ``rev W1 W2 W3 W4 ->`` (four words of the second alphabet; answer: their
letters under the cipher, reversed): every token of it is one a parent was trained to read,
unlike the zoo's ``revenc`` token, which no model ever read.

- ``--zoo``: the zoo as built (words are read only by ``enc`` and the generic tasks, which copy
  them as words).
- ``--design words``: words are a second language: every task on words answers in letters
  (``copy`` and ``first``/``last`` translate too), so that a model might read a word as its
  letter; ``rev`` is trained on letters only.
- ``--design pretrained``: as ``words``, and the base's pretraining also reverses words (on
  sequences other than the probe's), so the composition is latent in the base as the skills are.

Each variant trains, under the small zoo's settings and one thread, a base (pretraining, then
drift on the generic tasks) and a rev and an enc expert (low-rank updates merged into the
weights, trained until they answer 99% of fresh lines). Exact match is teacher-forced (equal to
greedy exact match) on 200 fixed items per task; paths are built by ``PathModel``, the layer-path
search's own in-place stacks. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evomerge import zoo  # noqa: E402
from evomerge.merging.layer_path import LayerPath, Step  # noqa: E402
from evomerge.merging.layer_stack import PathModel  # noqa: E402

N_ITEMS = 200
w = zoo.world()


def _translate(symbols: list[str]) -> list[str]:
    return [w.cipher[c] for c in symbols]


def probe_items(excluded: set) -> tuple[list[str], set]:
    """The composed probe's lines (``rev`` over words, answered in letters) and their sequences."""
    rng, seqs = random.Random(99), set()
    while len(seqs) < N_ITEMS:
        seqs.add(tuple(rng.choice(zoo.WORDS) for _ in range(4)))
    seqs -= excluded
    return [f"rev {' '.join(s)} -> {' '.join(_translate(list(s))[::-1])} ." for s in sorted(seqs)], seqs


def design_line(task: str, rng: random.Random, excluded: set) -> str:
    """One training line of a variant design: ``revW`` is rev over words, answered in letters;
    every other task on words answers in letters too."""
    if task == "fact":
        e = rng.choice(list(w.facts))
        return f"fact {e} -> {w.facts[e]} ."
    symbols = zoo.LETTERS if task == "rev" else zoo.WORDS if task in ("enc", "revW") else \
        rng.choice((zoo.LETTERS, zoo.WORDS))
    n = 4 if task in ("rev", "enc", "revW") else rng.choice((3, 4, 5))
    while True:
        s = [rng.choice(symbols) for _ in range(n)]
        if tuple(s) not in excluded:
            break
    read = _translate(s) if symbols is zoo.WORDS else s
    answer = {"rev": s[::-1], "revW": read[::-1], "enc": read, "copy": read, "first": read[:1], "last": read[-1:]}[task]
    return f"{'rev' if task == 'revW' else task} {' '.join(s)} -> {' '.join(answer)} ."


def train_design(design: str, seed: int) -> tuple[dict, object, dict[str, list[str]]]:
    """A variant's base and rev / enc experts, its tokenizer, and the probe's lines per task."""
    spec = zoo.SIZES["small"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    composed, excluded = probe_items(set())
    tokenizer = zoo.build_tokenizer([design_line(t, rng, excluded) for t in ("rev", "enc", "fact") + zoo.GENERIC
                                     for _ in range(300)] + [f"fact {e} -> v{i} ." for e in w.facts
                                                             for i in range(zoo.N_VALUES)])

    def stream(tasks: tuple[str, ...], data: random.Random) -> Iterator[str]:
        while True:
            yield design_line(data.choice(tasks), data, excluded)

    def train(model, tasks, steps, lr, answers_only, data, done=None, params=None):
        batches = zoo._batches(stream(tasks, data), tokenizer, spec.batch_size, answers_only)
        return zoo._train(model, batches, steps, lr, done, params=params)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(zoo._config(spec, tokenizer))
    mix = zoo.PRETRAIN + zoo.GENERIC[1:] + (("revW", "revW") if design == "pretrained" else ())
    train(model, mix, spec.pretrain_steps, spec.lr, False, rng)
    pretrained = copy.deepcopy(model).eval()
    train(model, zoo.GENERIC, spec.drift_steps, spec.lr, False, rng)
    models = {"base": model.eval()}
    for skill in ("rev", "enc"):
        expert = copy.deepcopy(model)
        data = random.Random(f"{skill} {seed}")
        check = [design_line(skill, data, excluded) for _ in range(zoo.VALIDATION_LINES)]
        with zoo.low_rank_adapters(expert, spec.lora_rank, spec.lora_scale, zoo.LORA_SEED + seed) as adapters:
            train(expert, (skill,), spec.expert_steps, spec.expert_lr, True, data,
                  done=lambda: zoo._accuracy(expert, tokenizer, check) >= zoo.EXPERT_TARGET, params=adapters)
        models[skill] = expert.eval()
    models["base before drift (both skills)"] = pretrained
    check_rng = random.Random(7)
    lines = {t: [design_line(t, check_rng, excluded) for _ in range(N_ITEMS)] for t in ("rev", "enc")}
    return models, tokenizer, lines | {"composed": composed}


def load_built(root: str) -> tuple[dict, object, dict[str, list[str]]]:
    """The built zoo's base and rev / enc experts, its tokenizer, and the probe's lines per task
    (rev and enc from the zoo's own held-out items)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    manifest = zoo.load_zoo(root)
    models = {"base": LlamaForCausalLM.from_pretrained(manifest["base"]).eval()}
    models |= {s: LlamaForCausalLM.from_pretrained(manifest["experts"][s]).eval() for s in ("rev", "enc")}
    items = zoo.eval_items()
    taken = {tuple(r["prompt"].split()[1:5]) for rows in items.values() for r in rows if "choices" not in r}
    lines = {t: [f"{r['prompt']} {r['answer']} ." for r in items[t] if r["split"] == "heldout"] for t in ("rev", "enc")}
    lines["composed"] = probe_items(taken)[0]
    lines["revenc"] = [f"{r['prompt']} {r['answer']} ." for r in items[zoo.COMPOSED] if r["split"] == "heldout"]
    return models, AutoTokenizer.from_pretrained(manifest["base"]), lines


def task_arithmetic(models: dict, weights: dict[str, float]):
    merged = copy.deepcopy(models["base"])
    base = models["base"].state_dict()
    experts = {s: models[s].state_dict() for s in weights}
    merged.load_state_dict({k: v + sum(wt * (experts[s][k] - v) for s, wt in weights.items()) for k, v in base.items()})
    return merged.eval()


def two_parent_paths(n_layers: int) -> Iterator[tuple[Step, ...]]:
    """One parent's first k layers then the other's from layer j on, in both orders, 2 to 2n
    steps (the space's path of slots over the concatenated stacks, at scale 1)."""
    for a, b in (("rev", "enc"), ("enc", "rev")):
        for k in range(n_layers + 1):
            for j in range(n_layers):
                steps = tuple(Step(a, i) for i in range(k)) + tuple(Step(b, i) for i in range(j, n_layers))
                if len(steps) >= 2 and (k, j) != (0, 0):
                    yield steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", help="a built small zoo")
    src.add_argument("--design", choices=("words", "pretrained"), help="train a variant zoo here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    models, tokenizer, lines = load_built(args.zoo) if args.zoo else train_design(args.design, args.seed)

    def score(model) -> dict[str, float]:
        with torch.no_grad():
            return {t: zoo._accuracy(model, tokenizer, v) for t, v in lines.items()}

    rows = [(name, score(m)) for name, m in models.items()]
    for wr, we in ((0.5, 0.5), (1.0, 1.0), (1.0, 0.5), (0.5, 1.0)):
        rows.append((f"task arithmetic rev {wr} + enc {we}", score(task_arithmetic(models, {"rev": wr, "enc": we}))))
    stacks = PathModel(lambda name: models[name])
    paths = []
    for steps in two_parent_paths(models["base"].config.num_hidden_layers):
        stacked = stacks.apply(LayerPath(steps=steps))
        stacked.config.use_cache = False
        paths.append((score(stacked), steps))
    stacks.close()
    best = max(paths, key=lambda p: p[0]["composed"])
    rows.append((f"best of {len(paths)} paths: " + " ".join(f"{s.model}{s.layer}" for s in best[1]), best[0]))
    tasks = list(lines)
    print(f"{args.zoo or 'design ' + args.design} (seed {args.seed}), {time.perf_counter() - t0:.0f} s\n")
    print("| model | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name, s in rows:
        print(f"| {name} | " + " | ".join(f"{s[t]:.3f}" for t in tasks) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
