"""The model zoo: small but real model families, trained here on the CPU, in the regime of real
fine-tunes: a base that has the skills latent, and experts that are light fine-tunes of it.

A fixed synthetic *world* (independent of the training seed) defines the skills:

- ``rev``: reverse four letters (``rev c a f b ->`` ``b f a c``), a string transformation;
- ``enc``: translate four words of a second alphabet (``m`` to ``x``) into letters, a fixed cipher;
- ``fact``: a lookup table of facts (``fact e12 ->`` one of 16 values), multiple choice;
- ``revenc`` (composed, no model is trained on it): reverse, then translate.

Training has three stages, each a pure function of the seed:

1. *pretraining* on a mix of every skill (correct answers) and copying, so the base learns them;
2. *drift*: more pretraining on generic sequence tasks alone (copy, first, last), which leaves the
   skills latent: the base still knows the formats and its representations hold the skills, but
   it answers poorly;
3. *experts*: low-rank (LoRA-style) fine-tunes of the base, one per skill: every linear layer of
   the decoder gets a trainable rank-``lora_rank`` update ``scale * B @ A`` (B starts at zero, A
   from one seeded draw shared by the experts, as fine-tunes started from one seed share it), the
   base's weights stay frozen, and the update is merged into the weights once the expert answers
   ``EXPERT_TARGET`` of fresh lines. Each task vector is a small, dense, low-rank step, as for real
   adapter fine-tunes of a strong base: the regime where magnitude trimming and sign election
   (TIES at its defaults) lose most of a skill, and dilution (task arithmetic at 1/n) loses part.

The evaluation items (the suites' ``search`` and ``heldout`` splits, written to
``fitness/data/zoo/``) never appear in training, except for ``fact``, whose skill *is* the table:
the splits divide the facts between search and held-out checking.

Pinned numerics: training runs in a child process under :data:`evomerge.machine.PINNED_ENV`
(ATen's default kernels, MKL's ``COMPATIBLE`` branch, one thread), so a machine builds the same
zoo whatever its kernel and thread settings. Training amplifies last-bit differences, and the
pinning does not make the floats the same on every CPU: an AMD EPYC with AVX-512 builds another
zoo than the Intel Xeon the README's figures come from, one that misses the design goals (the
README, The model zoo). The design goals are checked after the experts are
trained; where they are missed, the experts are trained again from the next derived expert seed
(``expert_attempt``; the base is kept), up to ``MAX_ATTEMPTS``. The manifest records the attempt,
each attempt's figures and the weights' sha256, which the demo prints.

    evomerge zoo build OUT_DIR [--size tiny|small] [--seed N]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from evomerge import machine
from evomerge.errors import EvomergeError
from evomerge.inputs import file_sha256
from evomerge.resources import suites_dir

log = logging.getLogger(__name__)

LETTERS = list("abcdefghijkl")
WORDS = list("mnopqrstuvwx")  # the second alphabet, which enc translates into LETTERS
N_ENTITIES = 48
N_VALUES = 16
SKILLS = ("rev", "enc", "fact")
COMPOSED = "revenc"
GENERIC = ("copy", "first", "last")  # sequence tasks on both alphabets: the drift stage's mix
PRETRAIN = ("rev", "rev", "enc", "fact", "copy")  # reversal is the slowest to learn: twice the share
WORLD_SEED = 20261123  # the world is fixed; --seed only changes training
LORA_SEED = 1234  # plus --seed: the adapters' initial A, one draw shared by the experts
ZOO_VERSION = 4  # a zoo built by another design is rebuilt, not reused
MAX_ATTEMPTS = 8  # expert seeds tried until the design goals hold
OWN_MIN, GAIN_MIN, KEPT_MIN, KEPT_MAX_MEAN = 0.9, 0.25, 0.05, 0.8  # the design goals: see goals_met
EXPERT_TARGET = 0.99  # an expert trains until it answers this share of fresh training lines exactly
VALIDATION_LINES = 128
EVAL_ITEMS = {"search": 120, "heldout": 120}  # per sequence task; fact splits the 48 facts in two
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
DATA_DIR = suites_dir() / "data" / "zoo"


# ---------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class World:
    cipher: dict[str, str]
    facts: dict[str, str]


def world() -> World:
    rng = random.Random(WORLD_SEED)
    shuffled = LETTERS[:]
    rng.shuffle(shuffled)
    facts = {f"e{i}": f"v{rng.randrange(N_VALUES)}" for i in range(N_ENTITIES)}
    return World(cipher=dict(zip(WORDS, shuffled)), facts=facts)


def alphabet(task: str) -> list[str]:
    """The symbols a sequence task reads."""
    return WORDS if task in ("enc", COMPOSED) else LETTERS


def answer(task: str, symbols: list[str], w: World) -> list[str]:
    if task == "rev":
        return symbols[::-1]
    if task == "enc":
        return [w.cipher[c] for c in symbols]
    if task == COMPOSED:
        return [w.cipher[c] for c in symbols[::-1]]
    raise ValueError(task)


def _eval_sequences(rng: random.Random, symbols: list[str], n: int, taken: set) -> list[tuple[str, ...]]:
    out = []
    while len(out) < n:
        s = tuple(rng.choice(symbols) for _ in range(4))
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def eval_items(w: Optional[World] = None) -> dict[str, list[dict]]:
    """The suites' items per task (each with its ``split``); deterministic."""
    w = w or world()
    rng = random.Random(WORLD_SEED + 1)
    taken: set = set()
    items: dict[str, list[dict]] = {}
    for task in ("rev", "enc", COMPOSED):
        rows = []
        for split, n in EVAL_ITEMS.items():
            for s in _eval_sequences(rng, alphabet(task), n, taken):
                rows.append({"id": f"{task}-{len(rows)}", "split": split, "prompt": f"{task} {' '.join(s)} ->",
                             "answer": " ".join(answer(task, list(s), w))})
        items[task] = rows
    values = [f"v{i}" for i in range(N_VALUES)]
    rows = []
    for i, (e, v) in enumerate(w.facts.items()):
        choices = [v] + rng.sample([x for x in values if x != v], 3)
        rng.shuffle(choices)
        rows.append({"id": f"fact-{i}", "split": "search" if i % 2 == 0 else "heldout",
                     "prompt": f"fact {e} ->", "choices": choices, "answer": choices.index(v)})
    items["fact"] = rows
    return items


def write_items(items: dict[str, list[dict]], out: Path) -> list[Path]:
    """Each task's items as ``out/TASK.jsonl`` (the suites' data files)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, rows in items.items():
        p = out / f"{task}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


def write_eval_data(out: Path = DATA_DIR) -> list[Path]:
    return write_items(eval_items(), out)


# ---------------------------------------------------------------------------------------------
# Training text


def _training_text(task: str, rng: random.Random, w: World, excluded: set) -> str:
    """One training line of ``task`` (a skill or a generic task); no four-symbol sequence of an
    evaluation item is ever drawn."""
    if task == "fact":
        e = rng.choice(list(w.facts))
        return f"fact {e} -> {w.facts[e]} ."
    generic = task not in SKILLS + (COMPOSED,)
    symbols = rng.choice((LETTERS, WORDS)) if generic else alphabet(task)
    n = rng.choice((3, 4, 5)) if generic else 4
    while True:
        s = [rng.choice(symbols) for _ in range(n)]
        if tuple(s) not in excluded:
            break
    a = {"copy": s, "first": s[:1], "last": s[-1:]}.get(task) or answer(task, s, w)
    return f"{task} {' '.join(s)} -> {' '.join(a)} ."


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on ``texts`` with ``tokenizers``; it adds ``<s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=64)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ZooSize:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    pretrain_steps: int
    drift_steps: int
    expert_steps: int
    batch_size: int
    lr: float  # pretraining and drift
    expert_lr: float  # the low-rank updates'
    lora_rank: int = 4
    lora_scale: float = 2.0


SIZES = {  # head_dim 32 in both, so vLLM's CPU backend runs them
    "tiny": ZooSize(64, 128, 2, 2, 1, pretrain_steps=600, drift_steps=300, expert_steps=300, batch_size=64,
                    lr=3e-3, expert_lr=2e-3),
    "small": ZooSize(128, 384, 4, 4, 2, pretrain_steps=1000, drift_steps=1000, expert_steps=400, batch_size=64,
                     lr=2e-3, expert_lr=2e-3),
}


def _config(size: ZooSize, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                       intermediate_size=size.intermediate_size, num_hidden_layers=size.num_hidden_layers,
                       num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_key_value_heads,
                       max_position_embeddings=64, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _batches(texts: Iterator[str], tokenizer, batch_size: int, answers_only: bool) -> Iterator[tuple]:
    arrow = tokenizer.convert_tokens_to_ids("->")
    while True:
        enc = tokenizer([next(texts) for _ in range(batch_size)], padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        if answers_only:  # the loss only on what follows "->"
            after = torch.cumsum(enc.input_ids == arrow, 1) > 0
            labels = labels.masked_fill(~after | (enc.input_ids == arrow), -100)
        yield enc.input_ids, enc.attention_mask, labels


def _train(model, batches: Iterator[tuple], steps: int, lr: float,
           done: Optional[Callable[[], bool]] = None, check_every: int = 10,
           params: Optional[list[torch.nn.Parameter]] = None) -> tuple[float, int]:
    """AdamW with warm-up on ``params`` (default: all of the model's); without ``done``, a linear
    decay over ``steps``; with it, a constant rate until ``done()`` (asked every ``check_every``
    steps) says the model is there, or ``steps``."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = (lambda i: 1.0) if done else (lambda i: max(0.05, 1 - i / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * decay(i))
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        if done and step and step % check_every == 0:
            model.eval()
            with torch.no_grad():
                if done():
                    return float(loss.detach()), step
            model.train()
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach()), steps


class LowRankUpdate(torch.nn.Module):
    """A weight parametrization ``W + scale * B @ A`` with trainable ``A`` (rank x in, a seeded
    normal draw scaled by 1/sqrt(in)) and ``B`` (out x rank, zeros): a LoRA adapter, applied to the
    weight itself so that removing the parametrization merges it."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.scale = scale
        self.A = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.B @ self.A


@contextmanager
def low_rank_adapters(model, rank: int, scale: float, seed: int) -> Iterator[list[torch.nn.Parameter]]:
    """Freeze ``model`` and give every linear layer of its decoder a :class:`LowRankUpdate`; yield
    the adapters' parameters, then merge the updates into the weights and unfreeze."""
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(seed)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears:
        parametrize.register_parametrization(m, "weight", LowRankUpdate(m.weight, rank, scale, generator))
    try:
        yield [p for m in linears for p in m.parametrizations.weight[0].parameters()]
    finally:
        for m in linears:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(True)


def _accuracy(model, tokenizer, lines: list[str]) -> float:
    """Share of ``lines`` (one task's, so all of one length) whose every answer token is the
    model's greedy choice: exact match, teacher-forced."""
    ids = tokenizer(lines, return_tensors="pt").input_ids
    arrow = int((ids[0] == tokenizer.convert_tokens_to_ids("->")).nonzero()[0])
    predicted = model(input_ids=ids).logits[:, arrow:-2].argmax(-1)  # the answer, the final "." left out
    return float((predicted == ids[:, arrow + 1:-1]).all(-1).float().mean())


def _stream(tasks: tuple[str, ...], rng: random.Random, w: World, excluded: set) -> Iterator[str]:
    while True:
        yield _training_text(rng.choice(tasks), rng, w, excluded)


class ZooError(EvomergeError):
    """A zoo cannot be built or read."""


def build_zoo(out: str | Path, size: str = "tiny", seed: int = 0, overwrite: bool = False) -> dict:
    """Train the base and one expert per skill into ``out`` (Hugging Face directories, written
    atomically), measure them, and return the zoo's manifest (also ``out/zoo.json``; its model
    paths are relative to ``out``: :func:`load_zoo` resolves them). Training runs in a child
    process under pinned numerics, so the bytes are the same for a seed under every kernel and
    thread setting of one machine (every draw comes from seeded generators), though not on every
    CPU: see the module docstring."""
    from evomerge.merging.model_io import refuse_existing

    if size not in SIZES:
        raise ZooError(f"unknown zoo size {size!r}; choose one of {sorted(SIZES)}")
    refuse_existing(Path(out).resolve(), overwrite)  # here, so the child's own check never has to say it
    args = ["-m", "evomerge.zoo", str(out), "--size", size, "--seed", str(seed)] + (["--overwrite"] if overwrite else [])
    return train_pinned(args, out)


def train_pinned(args: list[str], out: str | Path) -> dict:
    """Run ``python ARGS`` (a training process writing the zoo ``out``) under pinned numerics;
    return the zoo's manifest."""
    rc = machine.run_pinned(args).returncode
    if rc == 130:
        raise KeyboardInterrupt
    if rc:
        raise ZooError(f"zoo {out}: the training process failed (exit {rc}; its error is above)")
    return load_zoo(out)


def expert_seed(seed: int, attempt: int) -> int:
    """The seed of the experts' attempt ``attempt`` (their data order and adapter draw)."""
    return seed * 1000 + attempt


def _build_pinned(out: Path, size: str, seed: int, overwrite: bool) -> None:
    """:func:`build_zoo`'s work, in a process that runs under :data:`machine.PINNED_ENV`."""
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    from evomerge.merging.model_io import atomic_directory

    spec = SIZES[size]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    w = world()
    items = eval_items(w)
    excluded = {tuple(r["prompt"].split()[1:5]) for rows in items.values() for r in rows if "choices" not in r}
    rng = random.Random(seed)
    tasks = SKILLS + (COMPOSED,) + GENERIC
    vocab_texts = [_training_text(t, rng, w, excluded) for t in tasks for _ in range(200)] + \
        [f"fact {e} -> v{i} ." for e in w.facts for i in range(N_VALUES)]
    tokenizer = build_tokenizer(vocab_texts)

    def train(model, tasks: tuple[str, ...], steps: int, lr: float, answers_only: bool, data: random.Random,
              done=None, params=None) -> tuple:
        batches = _batches(_stream(tasks, data, w, excluded), tokenizer, spec.batch_size, answers_only)
        return _train(model, batches, steps, lr, done, params=params)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        def save(model, name: str) -> str:
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(tmp / name)
            return name

        model = LlamaForCausalLM(_config(spec, tokenizer))
        loss, _ = train(model, PRETRAIN, spec.pretrain_steps, spec.lr, False, rng)
        log.info("pretrained (loss %.3f) in %.1f s", loss, time.perf_counter() - t0)
        loss, _ = train(model, GENERIC, spec.drift_steps, spec.lr, False, rng)
        log.info("drifted (loss %.3f) at %.1f s", loss, time.perf_counter() - t0)
        manifest = {"version": ZOO_VERSION, "size": size, "seed": seed, "config": asdict(spec),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "numerics": machine.PINNED_ENV, "built_on": machine.describe(),
                    "base": save(model, "base"), "experts": {}, "expert_steps": {}, "attempts": []}
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for attempt in range(MAX_ATTEMPTS):
            eseed = expert_seed(seed, attempt)
            data, check_rng = random.Random(f"experts {eseed}"), random.Random(f"checks {eseed}")
            for skill in SKILLS:
                model.load_state_dict(base_state)
                check = [_training_text(skill, check_rng, w, excluded) for _ in range(VALIDATION_LINES)]
                with low_rank_adapters(model, spec.lora_rank, spec.lora_scale, LORA_SEED + eseed) as adapters:
                    loss, steps = train(model, (skill,), spec.expert_steps, spec.expert_lr, True, data,
                                        done=lambda: _accuracy(model, tokenizer, check) >= EXPERT_TARGET,
                                        params=adapters)
                manifest["experts"][skill] = save(model, f"expert_{skill}")
                manifest["expert_steps"][skill] = steps
                log.info("expert %s trained (attempt %d, loss %.3f, %d steps) at %.1f s", skill, attempt, loss, steps,
                         time.perf_counter() - t0)
            report = measure(_resolve(manifest, tmp))
            manifest["attempts"].append({"expert_seed": eseed, "goals_met": report["goals_met"],
                                         "experts_own_skill_min": report["experts_own_skill_min"],
                                         "default_merge_kept": report["default_merge_kept"]})
            log.info("expert attempt %d (seed %d): %s", attempt, eseed,
                     "design goals met" if report["goals_met"] else "design goals missed")
            if report["goals_met"]:
                break
        manifest |= {"expert_attempt": attempt, "expert_seed": eseed, "report": report,
                     "sha256": {name: file_sha256(tmp / name / "model.safetensors")
                                for name in [manifest["base"], *manifest["experts"].values()]},
                     "build_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))


def weights_digest(manifest: dict) -> str:
    """One short hash of the zoo's weights (its models' sha256 together): equal digests, equal zoos."""
    from evomerge.search.fingerprint import digest

    return digest(manifest["sha256"])


def _resolve(manifest: dict, root: Path) -> dict:
    return manifest | {"root": str(root), "base": str(root / manifest["base"]),
                       "experts": {k: str(root / v) for k, v in manifest["experts"].items()}}


def load_zoo(root: str | Path) -> dict:
    """A built zoo's manifest with absolute model paths."""
    root = Path(root).resolve()
    f = root / "zoo.json"
    if not f.exists():
        raise ZooError(f"{root} is not a built zoo (no zoo.json); run: evomerge zoo build {root}")
    return _resolve(json.loads(f.read_text()), root)


def load_or_build_zoo(root: str | Path, size: str, seed: int = 0) -> tuple[dict, bool]:
    """The zoo at ``root``, and whether it had to be trained there first."""
    if not (Path(root) / "zoo.json").exists():
        return build_zoo(Path(root), size=size, seed=seed), True
    manifest = load_zoo(root)
    if (manifest.get("version"), manifest["size"], manifest["seed"]) == (ZOO_VERSION, size, seed):
        return manifest, False
    log.warning("%s holds a zoo of another design or size; rebuilding it", root)
    return build_zoo(Path(root), size=size, seed=seed, overwrite=True), True


def load_or_build_any(root: str | Path, size: str, seed: int = 0) -> tuple[dict, bool]:
    """A synthetic zoo of ``size`` at ``root``, or the real one (:mod:`evomerge.realzoo`) for
    size ``smollm2``; and whether it had to be built first."""
    if size == "smollm2":
        from evomerge.realzoo import load_or_build_real_zoo

        return load_or_build_real_zoo(root, seed=seed)
    return load_or_build_zoo(root, size, seed=seed)


def family(manifest: dict) -> dict:
    """A run config's ``models`` section for a zoo: its base and its experts, in the manifest's order."""
    return {"base": manifest["base"], "experts": list(manifest["experts"].values())}


def default_merges(manifest: dict) -> dict[str, dict]:
    """The merges a user would try first: task arithmetic with weight 1/n, TIES with density 0.5."""
    n = len(manifest["experts"])
    models = [{"model": p, "parameters": {"weight": 1 / n}} for p in manifest["experts"].values()]
    return {"task_arithmetic": {"merge_method": "task_arithmetic", "base_model": manifest["base"], "models": models},
            "ties": {"merge_method": "ties", "base_model": manifest["base"], "parameters": {"density": 0.5},
                     "models": models}}


def skill_mean(scores: dict[str, float]) -> float:
    """The zoo's fixed quality metric: mean held-out accuracy over the skills (exact_match for rev
    and enc, acc for fact), the composed task left out."""
    return sum(scores[k] for k in SKILLS) / len(SKILLS)


@functools.lru_cache(maxsize=4)
def _suites_and_scorer(names: tuple[str, ...]) -> tuple:
    from evomerge.fitness.native import NativeBackend
    from evomerge.fitness.suite import Suite

    return tuple(Suite.load(n) for n in names), NativeBackend()


def suite_scores(model, tokenizer, names: tuple[str, ...]) -> dict[str, float]:
    """A model's held-out score on every task of the shipped suites ``names``, natively (the
    suites and the scorer, with its tokenized items, are kept between calls)."""
    suites, scorer = _suites_and_scorer(names)
    out = {}
    for suite in suites:
        out |= {k: round(v.value, 4) for k, v in scorer.score(model, tokenizer, suite, "heldout").tasks.items()}
    return out


def heldout_scores(model, tokenizer) -> dict[str, float]:
    """A model's held-out scores on the skills (suite ``zoo``) and the composed task, natively."""
    return suite_scores(model, tokenizer, ("zoo", "zoo-composed"))


def score_models(manifest: dict, scores: Callable) -> dict[str, dict[str, float]]:
    """``scores(model, tokenizer)`` of a zoo's base, of each expert (``expert_NAME``) and of the
    default merges (``merge_NAME``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe

    tokenizer = AutoTokenizer.from_pretrained(manifest["base"])
    table = {}
    for name, path in {"base": manifest["base"], **{f"expert_{k}": v for k, v in manifest["experts"].items()}}.items():
        table[name] = scores(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
    live = AutoModelForCausalLM.from_pretrained(manifest["base"]).eval()
    for name, raw in default_merges(manifest).items():
        recipe = Recipe.from_dict(raw)
        MergeEngine(recipe).apply(recipe, live)
        table[f"merge_{name}"] = scores(live, tokenizer)
    return table


def measure(manifest: dict) -> dict:
    """Held-out scores of every model and of the default merges on every skill (and the composed
    task), how much of each skill the default merges keep, and whether the zoo meets its design
    goals (:func:`goals_met`)."""
    table = score_models(manifest, heldout_scores)
    own = {k: table[f"expert_{k}"][k] for k in manifest["experts"]}
    others = [table[f"expert_{k}"][o] for k in manifest["experts"] for o in manifest["experts"] if o != k]
    kept = {m: {k: round((table[f"merge_{m}"][k] - table["base"][k]) / max(own[k] - table["base"][k], 1e-9), 4)
                for k in own} for m in default_merges(manifest)}
    report = {"heldout": table, "experts_own_skill_min": min(own.values()), "experts_other_skills_max": max(others),
              "default_merge_kept": kept,
              "skills_gained": [k for k in own if own[k] - table["base"][k] >= GAIN_MIN]}
    return report | {"goals_met": goals_met(report)}


def goals_met(report: dict) -> bool:
    """The design goals: every expert at least ``OWN_MIN`` on its own skill; at least two skills
    *gained* (the expert is ``GAIN_MIN`` above the base: a skill the base already answers has
    nothing to keep or lose); and every default merge keeps part of each gained skill (at least
    ``KEPT_MIN`` of the expert's gain over the base) but loses a real part of them (at most
    ``KEPT_MAX_MEAN`` on average), so that merging needs tuning."""
    gained = report["skills_gained"]
    merges_ok = all(min(kept[k] for k in gained) >= KEPT_MIN and sum(kept[k] for k in gained) / len(gained)
                    <= KEPT_MAX_MEAN for kept in report["default_merge_kept"].values()) if gained else False
    return report["experts_own_skill_min"] >= OWN_MIN and len(gained) >= 2 and merges_ok


def heldout_lines(title: str, table: dict[str, dict[str, float]], skills: tuple[str, ...], extra: str) -> list[str]:
    """Rows of held-out scores as aligned text lines: the skills, their mean, then ``extra``."""
    lines = [title, f"  {'model':24s}" + "".join(f"{t:>8s}" for t in skills) + f"{'mean':>8s}{extra:>9s}"]
    for name, row in table.items():
        lines.append(f"  {name:24s}" + "".join(f"{row[t]:8.3f}" for t in skills)
                     + f"{sum(row[t] for t in skills) / len(skills):8.3f}{row[extra]:9.3f}")
    return lines


def format_heldout(table: dict[str, dict[str, float]]) -> list[str]:
    """Rows of held-out scores (as :func:`heldout_scores` gives them) as aligned text lines."""
    return heldout_lines(f"held-out scores (exact_match for rev/enc/{COMPOSED}, acc for fact; mean = over the skills, "
                         f"{COMPOSED} left out):", table, SKILLS, COMPOSED)


def format_report(report: dict) -> str:
    lines = format_heldout(report["heldout"])
    lines.append(f"experts on their own skill: min {report['experts_own_skill_min']:.3f} (goal >= {OWN_MIN}); "
                 f"on other skills: max {report['experts_other_skills_max']:.3f}")
    gained = report["skills_gained"]
    lines.append(f"skills gained (expert >= {GAIN_MIN} above the base; goal: at least 2): {', '.join(gained) or 'none'}")
    for m, kept in report["default_merge_kept"].items():
        lines.append(f"default merge {m} keeps of each skill's gain over the base: " +
                     ", ".join(f"{k} {v * 100:.0f}%" + ("" if k in gained else " (not gained)") for k, v in kept.items()))
    lines.append(f"goal: every default merge keeps part of every gained skill (>= {KEPT_MIN * 100:.0f}% of each, "
                 f"<= {KEPT_MAX_MEAN * 100:.0f}% on average)")
    lines.append("design goals met" if report["goals_met"] else "DESIGN GOALS NOT MET")
    return "\n".join(lines)


def describe_zoo(manifest: dict) -> str:
    """Where a zoo's figures come from: its seed, expert attempt, weights digest and numerics."""
    return (f"zoo {manifest['size']} seed {manifest['seed']} (expert attempt {manifest['expert_attempt']}), "
            f"weights sha256 {weights_digest(manifest)}, trained under pinned numerics with torch "
            f"{manifest['torch']}, transformers {manifest['transformers']}")


def pinned_main(build: Callable[[], None], starter: str) -> int:
    """The body of a training process that ``starter`` starts under pinned numerics: logging set
    up, the numerics checked, ``build()`` run, its errors as one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("transformers", "evomerge.merging.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not machine.numerics_pinned():
        print(f"evomerge: error: zoo training needs the pinned numerics {machine.PINNED_ENV} in its environment, "
              f"and this process does not run under them (start it through {starter})", file=sys.stderr)
        return 2
    try:
        build()
    except EvomergeError as e:
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _main(argv: Optional[list[str]] = None) -> int:
    """The training process :func:`build_zoo` starts under pinned numerics."""
    ap = argparse.ArgumentParser(prog="python -m evomerge.zoo", description="train a zoo (under pinned numerics)")
    ap.add_argument("out_dir")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    return pinned_main(lambda: _build_pinned(Path(args.out_dir), args.size, args.seed, args.overwrite),
                       "build_zoo")


if __name__ == "__main__":
    sys.exit(_main())
