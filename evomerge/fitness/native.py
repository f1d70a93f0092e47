"""The native scorer: fast fitness for local suites (and the lm-eval tasks it can score as lm-eval
does: see :func:`evomerge.fitness.lmeval_tasks.native_items`), with lm-eval's metrics.

Each suite is tokenized once per tokenizer and kept. Log-likelihood requests are sorted by length
and batched with right padding (like lm-eval's causal models); only the continuation positions'
logits are normalized. Generation is greedy with a KV cache, batched by prompt length, stopping at
the stop strings or EOS. Tokenization, truncation at stop strings and the metrics follow lm-eval
0.4's HF model, so ``acc`` / ``acc_norm`` / ``exact_match`` equal lm-eval's on the same items.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from evomerge.fitness.result import (CandidateFailed, FitnessResult, ItemResult, TaskResult, choose, combine, exact_match,
                     regex_extract)
from evomerge.fitness.suite import REFERENCE_METRICS, SPLITS, Item, Scoring, Suite, SuiteError, Task


@dataclass
class _Request:
    key: tuple  # (item position, choice index)
    context: list[int]
    continuation: list[int]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into tokens: trailing spaces of the context move
    to the continuation; the whole string is encoded and the context's tokens cut off its front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def check_suite(suite: Suite) -> None:
    """Refuse, before a run, an lm-eval task of the suite that the native scorer cannot score as
    lm-eval does (reading each one's items for both splits)."""
    native = NativeBackend()
    for t in suite.tasks:
        for split in SPLITS if not t.local else ():
            native.items(t, split)


class NativeBackend:
    name = "native"

    def __init__(self, batch_size: int = 64, max_batch_tokens: int = 65536):
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._prepared: dict[tuple, object] = {}
        self._lm_eval: dict[tuple, object] = {}  # lm-eval task objects the native scorer reads items from

    # -- preparation (once per suite, split and tokenizer) ------------------------------------

    def _prepare(self, task: Task, split: str, tokenizer) -> tuple[list[Item], Scoring, list[_Request], list]:
        key = (id(task), split, id(tokenizer))
        if key not in self._prepared:
            if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
                raise SuiteError(f"suite {task.suite.name}: the tokenizer has neither a pad nor an EOS token")
            items, how = self.items(task, split)
            reqs: list[_Request] = []
            prompts = []
            for i, it in enumerate(items):
                if it.choices is not None:
                    for j, c in enumerate(it.choices):
                        reqs.append(_Request((i, j), *encode_pair(tokenizer, it.prompt, it.delimiter + c)))
                else:
                    if how.metric in REFERENCE_METRICS:
                        reqs.append(_Request((i, 0), *encode_pair(tokenizer, it.prompt, it.delimiter + it.answer)))
                    if not how.teacher_forced:
                        prompts.append(tokenizer.encode(it.prompt))
            for r in reqs:
                if not r.continuation:
                    raise SuiteError(f"suite {task.suite.name}, task {task.name}: item {items[r.key[0]].id}: "
                                     "the continuation encodes to no tokens")
            self._prepared[key] = (items, how, reqs, prompts)
        return self._prepared[key]

    def items(self, task: Task, split: str) -> tuple[list[Item], Scoring]:
        """The items of ``split`` the native scorer scores ``task`` on, and how: a local task's
        from its file and spec, an lm-eval task's from its documents and config (refused in one
        line where the native scorer cannot score it as lm-eval does)."""
        if task.local:
            return task.items(split), task.scoring
        from evomerge.fitness.lmeval_tasks import native_items

        key = _lm_eval_key(task, split)
        if key not in self._lm_eval:
            self._load_lm_eval(task, split)
        return native_items(task, split, self._lm_eval[key])

    def _load_lm_eval(self, task: Task, split: str) -> None:
        """Load ``task``'s lm-eval task object for ``split``, with those of the other lm-eval tasks
        of its suite not loaded yet, in one lm-eval load (a name already in the batch waits for a
        load of its own)."""
        from evomerge.fitness.lmeval_tasks import Resolver, load

        batch: dict[str, tuple[tuple, Task]] = {}
        for t in [task, *task.suite.tasks]:
            key = _lm_eval_key(t, split) if not t.local else None
            if key is not None and key not in self._lm_eval and t.spec.lm_eval not in batch:
                batch[t.spec.lm_eval] = (key, t)
        resolver = Resolver()
        loaded = load([resolver.config(t, search=key[-1]) for key, t in batch.values()], resolver)
        for name, (key, _) in batch.items():
            self._lm_eval[key] = loaded[name]

    # -- scoring --------------------------------------------------------------------------------

    def score(self, model, tokenizer, suite: Suite, split: str = "search") -> FitnessResult:
        t0 = time.perf_counter()
        results: dict[str, TaskResult] = {}
        try:
            for task in suite.tasks:
                results[task.name] = self._score_task(model, tokenizer, task, split)
        except CandidateFailed as e:
            return FitnessResult(None, results, failed=str(e), split=split, backend=self.name,
                                 seconds=time.perf_counter() - t0)
        return FitnessResult(combine(results), results, split=split, backend=self.name,
                             seconds=time.perf_counter() - t0)

    def _score_task(self, model, tokenizer, task: Task, split: str) -> TaskResult:
        items, how, reqs, prompts = self._prepare(task, split, tokenizer)
        lls = self.loglikelihoods(model, reqs, where=f"task {task.name}") if reqs else {}
        per_item: list[ItemResult] = []
        sums: dict[str, float] = defaultdict(float)
        if how.kind == "multiple_choice":
            for i, it in enumerate(items):
                m = choose([lls[(i, j)][0] for j in range(len(it.choices))], it.choices, it.answer)
                for k, v in m.items():
                    sums[k] += v
                per_item.append(ItemResult(it.id, bool(m["acc" if how.metric == "margin" else how.metric]),
                                           m[how.metric]))
        elif how.teacher_forced:  # the margin, and whether the reference is the greedy continuation
            lengths = {r.key[0]: len(r.continuation) for r in reqs}
            for i, it in enumerate(items):
                ll, greedy = lls[(i, 0)]
                sums["greedy"] += greedy
                sums["margin"] += ll / lengths[i]
                per_item.append(ItemResult(it.id, greedy, float(greedy) if how.metric == "greedy" else ll / lengths[i]))
        else:
            outputs = self.generate(model, tokenizer, prompts, list(how.stop), how.max_new_tokens)
            pattern = re.compile(how.answer_regex) if how.answer_regex else None
            lengths = {r.key[0]: len(r.continuation) for r in reqs}
            for i, (it, out) in enumerate(zip(items, outputs)):
                got = regex_extract(pattern, out)
                ok = exact_match(got, it.answer, how.ignore_case)
                sums["exact_match"] += ok
                value = float(ok)
                if how.metric == "margin":  # mean log-prob per token of the reference answer
                    value = lls[(i, 0)][0] / lengths[i]
                    sums["margin"] += value
                per_item.append(ItemResult(it.id, ok, value, got))
        n = len(items)
        metrics = {k: v / n for k, v in sums.items()}
        return TaskResult(task.name, how.metric, metrics[how.metric], task.spec.weight, metrics, per_item)

    @torch.inference_mode()
    def loglikelihoods(self, model, reqs: list[_Request], where: str = "") -> dict[tuple, tuple[float, bool]]:
        """Summed log-probability of each request's continuation, and whether every continuation
        token is the greedy choice (lm-eval's ``is_greedy``); raises CandidateFailed on non-finite
        logits."""
        device = next(model.parameters()).device
        order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i].context) + len(reqs[i].continuation)))
        out: dict[tuple, tuple[float, bool]] = {}
        pad = 0
        start = 0
        while start < len(order):
            longest = len(reqs[order[start]].context) + len(reqs[order[start]].continuation) - 1
            size = max(1, min(self.batch_size, self.max_batch_tokens // max(1, longest)))
            batch = [reqs[i] for i in order[start:start + size]]
            start += size
            rows = [(r.context + r.continuation)[:-1] for r in batch]
            width = max(len(x) for x in rows)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows], device=device)
            first = min(len(r.context) - 1 for r in batch)  # earliest position whose logits we need
            logits = model(input_ids=ids, logits_to_keep=width - first).logits
            for b, r in enumerate(batch):
                s = len(r.context) - 1 - first
                picked = logits[b, s:s + len(r.continuation)].float()
                if not torch.isfinite(picked).all():
                    raise CandidateFailed(f"non-finite logits in {where}")
                target = torch.tensor(r.continuation, device=device)
                lp = torch.log_softmax(picked, -1).gather(1, target[:, None])
                out[r.key] = (float(lp.sum()), bool((picked.argmax(-1) == target).all()))
        return out

    @torch.inference_mode()
    def generate(self, model, tokenizer, prompts: list[list[int]], stop: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` (token ids), decoded and cut at the first stop string
        (and EOS), like lm-eval's ``generate_until``."""
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        stops = [s for s in stop + ([tokenizer.eos_token] if tokenizer.eos_token else []) if s]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p)].append(i)
        texts: list[Optional[str]] = [None] * len(prompts)
        for length in sorted(by_len, reverse=True):
            group = by_len[length]
            for s in range(0, len(group), self.batch_size):
                idx = group[s:s + self.batch_size]
                ids = torch.tensor([prompts[i] for i in idx], device=device)
                new = self._greedy(model, tokenizer, ids, eos, stops, max_new_tokens)
                for i, toks in zip(idx, new):
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    for term in stops:
                        text = text.split(term)[0]
                    texts[i] = text
        return texts  # type: ignore[return-value]

    def _greedy(self, model, tokenizer, ids: torch.Tensor, eos: Optional[int], stops: list[str],
                max_new_tokens: int) -> list[list[int]]:
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
        new: list[list[int]] = [[] for _ in range(ids.shape[0])]
        done = [False] * ids.shape[0]
        for _ in range(max_new_tokens):
            if not torch.isfinite(logits).all():
                raise CandidateFailed("non-finite logits during generation")
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    new[b].append(t)
                    if t == eos or any(s in tokenizer.decode(new[b], skip_special_tokens=False) for s in stops):
                        done[b] = True
            if all(done):
                break
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return new


def _lm_eval_key(task: Task, split: str) -> tuple:
    """One lm-eval task object per task and split role: a task with ``search_split`` is loaded
    apart for the search; otherwise both splits share one."""
    search = split == "search" and task.spec.search_split is not None
    return (task.include, task.spec.lm_eval, task.spec.search_split, search)
