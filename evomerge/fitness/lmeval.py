"""The lm-eval backend: a live model wrapped once, task dicts built once per search.

Local JSONL tasks become lm-eval task configs (``dataset_path: json``), so lm-eval scores exactly
the items the native scorer does; named tasks come from lm-eval's registry or the suite's own task
YAML (:mod:`evomerge.fitness.lmeval_tasks`). Items are chosen with
explicit sorted ``samples`` indices (never ``limit``), and no lm-eval cache is used (``use_cache``
and ``cache_requests`` would return stale answers after the weights change).
"""

from __future__ import annotations

import math
import time
from typing import Optional

from evomerge.fitness.lmeval_tasks import Resolver, check_tasks, load
from evomerge.fitness.result import CandidateFailed, FitnessResult, ItemResult, TaskResult, choose, combine
from evomerge.fitness.suite import REFERENCE_METRICS, Suite, SuiteError, Task


def check_margin_tasks(suite: Suite) -> None:
    """Refuse a suite that needs the native scorer's margin on a generate task."""
    for t in suite.tasks:
        if t.local and t.spec.kind == "generate" and t.spec.metric in REFERENCE_METRICS:
            raise SuiteError(f"suite {suite.name}, task {t.name}: metric {t.spec.metric} on a generate task is "
                             "computed by the native backend only")


def _task_name(task: Task) -> str:
    return f"evomerge_{task.suite.name}_{task.name}".replace("-", "_") if task.local else task.spec.lm_eval


def task_config(task: Task, num_fewshot: int = 0) -> dict:
    """An lm-eval task config scoring ``task``'s local JSONL file like the native scorer. Few-shot
    examples, when asked for, are drawn from the search split only (never from held-out items;
    lm-eval leaves out the item being scored)."""
    spec = task.spec
    cfg = {"task": _task_name(task), "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"test": str(task.path)}}, "test_split": "test",
           "doc_to_text": "prompt", "doc_to_target": "answer"}
    if num_fewshot:
        cfg |= {"num_fewshot": num_fewshot, "fewshot_config": {"sampler": "default",
                                                               "samples": lambda: _search_docs(task)}}
    if spec.kind == "multiple_choice":
        cfg |= {"output_type": "multiple_choice", "doc_to_choice": "choices",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    else:
        cfg |= {"output_type": "generate_until",
                "generation_kwargs": {"until": list(spec.stop), "max_gen_toks": spec.max_new_tokens,
                                      "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": spec.ignore_case}]}
        if spec.answer_regex:
            cfg["filter_list"] = [{"name": "extract", "filter": [
                {"function": "regex", "regex_pattern": spec.answer_regex, "group_select": 0},
                {"function": "take_first"}]}]
    return cfg


def _search_docs(task: Task) -> list[dict]:
    """The search split's rows of a local task, as lm-eval's JSON loader gives them."""
    import datasets

    rows = datasets.load_dataset("json", data_files={"test": str(task.path)}, split="test")
    return [row for row in rows if row["split"] == "search"]


def _filter(task: Task) -> str:
    if task.local:
        return "extract" if task.spec.kind == "generate" and task.spec.answer_regex else "none"
    return task.spec.filter


class LmEvalBackend:
    """Scores through ``lm_eval.evaluator.evaluate`` with an ``HFLM`` wrapping the live model."""

    name = "lm-eval"

    def __init__(self, batch_size: int = 32, options: Optional[dict] = None):
        """``options``: lm-eval's request options (:class:`evomerge.config.LmEvalOptions` fields)."""
        self.batch_size = batch_size
        self.options = dict(options or {})
        self._lm = None
        self._wrapped: Optional[int] = None
        self._task_dicts: dict[int, dict] = {}

    def _wrap(self, model, tokenizer):
        if self._wrapped != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            self._wrapped = id(model)
        return self._lm

    def task_dict(self, suite: Suite, split: str = "search") -> dict:
        """lm-eval task objects for scoring ``suite`` on ``split``, built once (lm-eval's registry is
        only indexed when the suite takes a task from it). A task with ``search_split`` is loaded
        once per split; otherwise both splits share one task dict."""
        role = split if any(t.spec.search_split for t in suite.tasks if not t.local) else "both"
        key = (id(suite), role)
        if key not in self._task_dicts:
            check_margin_tasks(suite)
            resolver = Resolver()
            check_tasks(suite, resolver)
            shots = self.options.get("num_fewshot")
            entries = [task_config(t, shots or 0) if t.local else resolver.config(t, search=split == "search")
                       for t in suite.tasks]
            tasks = load(entries, resolver)  # leaf tasks by name
            for task in tasks.values():  # as lm-eval's simple_evaluate sets them up
                if shots is not None and task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=shots)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                if task.get_config("output_type") == "generate_until" and self.options.get("gen_kwargs"):
                    task.set_config(key="generation_kwargs", value=dict(self.options["gen_kwargs"]), update=True)
                task.set_fewshot_seed(seed=self.options.get("fewshot_seed", 1234))
            self._task_dicts[key] = tasks
        return self._task_dicts[key]

    def _indices(self, suite: Suite, tasks: dict, split: str) -> dict[str, list[int]]:
        out = {}
        for t in suite.tasks:
            name = _task_name(t)
            if t.local:
                out[name] = [it.index for it in t.items(split)]
            else:
                out[name] = t.lm_eval_indices(len(tasks[name].eval_docs), split)
        return out

    def _evaluate(self, lm, tasks: dict, samples: dict[str, list[int]]) -> dict:
        from lm_eval import evaluator

        o = self.options
        return evaluator.evaluate(lm, tasks, samples=samples, bootstrap_iters=0, log_samples=True,
                                  cache_requests=False, verbosity="WARNING",
                                  system_instruction=o.get("system_instruction"),
                                  apply_chat_template=o.get("apply_chat_template", False),
                                  fewshot_as_multiturn=o.get("fewshot_as_multiturn", False))

    def score(self, model, tokenizer, suite: Suite, split: str = "search") -> FitnessResult:
        t0 = time.perf_counter()
        lm = self._wrap(model, tokenizer)
        flat = self.task_dict(suite, split)
        samples = self._indices(suite, flat, split)
        out = self._evaluate(lm, flat, samples)
        results: dict[str, TaskResult] = {}
        try:
            for t in suite.tasks:
                results[t.name] = self._task_result(t, out, flat)
        except CandidateFailed as e:
            return FitnessResult(None, results, failed=str(e), split=split, backend=self.name,
                                 seconds=time.perf_counter() - t0)
        return FitnessResult(combine(results), results, split=split, backend=self.name,
                             seconds=time.perf_counter() - t0)

    def _task_result(self, task: Task, out: dict, tasks: dict) -> TaskResult:
        name, filt, metric = _task_name(task), _filter(task), task.spec.metric
        rows = sorted((s for s in out["samples"][name] if s.get("filter", filt) == filt), key=lambda s: s["doc_id"])
        if out["samples"][name] and not rows:
            have = sorted({s.get("filter") for s in out["samples"][name]})
            raise SuiteError(f"suite {task.suite.name}, task {task.name}: lm-eval task {name!r} has no filter {filt!r} "
                             f"(it has: {', '.join(have)})")
        ids = [it.id for it in task.all_items()] if task.local else None
        items, sums = [], {}
        for s in rows:
            if metric == "margin" or "acc" in s:
                lls = [float(r[0]) for r in s["filtered_resps"]] if "filtered_resps" in s else []
                if any(not math.isfinite(x) for x in lls):
                    raise CandidateFailed(f"non-finite log-likelihoods in task {task.name}")
            if metric == "margin":
                doc = s["doc"]
                task_obj = tasks[name]
                choices = task_obj.doc_to_choice(doc)
                m = choose(lls, choices, int(task_obj.doc_to_target(doc)))
                value, ok = m["margin"], bool(m["acc"])
                sums["margin"] = sums.get("margin", 0.0) + value
            else:
                if metric not in s:
                    raise SuiteError(f"suite {task.suite.name}, task {task.name}: lm-eval reports no {metric!r} "
                                     f"for filter {filt!r} (it has: {', '.join(k for k in s if k in METRIC_KEYS)})")
                value = float(s[metric])
                ok = value >= 1.0
            for k in {*METRIC_KEYS, metric} - {"margin"}:
                if k in s:
                    sums[k] = sums.get(k, 0.0) + float(s[k])
            item_id = ids[s["doc_id"]] if ids else f"{task.name}-{s['doc_id']}"
            resps = s.get("filtered_resps") or [None]
            out_text = resps[0] if isinstance(resps[0], str) else None  # a generation (not log-likelihoods)
            items.append(ItemResult(item_id, ok, value, out_text))
        n = max(1, len(items))
        metrics = {k: v / n for k, v in sums.items()}
        return TaskResult(task.name, metric, metrics[metric], task.spec.weight, metrics, items)


METRIC_KEYS = ("acc", "acc_norm", "exact_match")
