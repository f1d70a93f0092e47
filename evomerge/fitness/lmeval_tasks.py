"""lm-eval tasks a suite names: from lm-eval's registry, or from the user's own task YAML.

``{lm_eval: NAME, include: PATH}`` takes task NAME from PATH, resolved from the suite file: a
directory scanned for task YAML (lm-eval's ``include_path``) or one YAML file. In such a YAML,
relative ``dataset_kwargs.data_files`` and a relative local ``dataset_path`` resolve from the
YAML's own directory, so a run reads the same data from any working directory. Its ``include:``
templates and ``!function`` modules load as lm-eval loads them.

Which documents are searched: by default an lm-eval task's evaluation documents (its test split
when it has one) are halved by a seeded permutation into search and held-out items, and
:func:`check_tasks` warns when that split is the test split. ``search_split: validation`` (or
``train``) searches on the task's validation (training) split and keeps its test split whole for
the held-out check.

The native scorer scores an lm-eval task as lm-eval does where it can (:func:`native_items`):
zero-shot multiple choice (``acc``, ``acc_norm``, ``margin``), and greedy ``generate_until``
scored by ``exact_match`` (``ignore_case`` allowed) after no filter or one ``regex`` filter; each
item's prompt is lm-eval's own zero-shot context of the document.
"""

from __future__ import annotations

import functools
import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evomerge.errors import SuiteError, one_line
from evomerge.fitness.result import INVALID

if TYPE_CHECKING:
    from evomerge.fitness.suite import Item, Scoring, Suite, Task

SPLIT_KEYS = {"validation": "validation_split", "train": "training_split"}


def _where(task: "Task") -> str:
    return f"suite {task.suite.name}, task {task.name}"


@functools.cache
def _registry() -> Any:
    """lm-eval's task registry, indexed once per process (several seconds): the run's checks, the
    backends and the fingerprint all read it."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


class Resolver:
    """Finds the YAML behind each lm-eval task of a suite, indexing lm-eval's registry only when a
    task is taken from it, and each include directory once."""

    def __init__(self):
        self._dirs: dict[Path, Any] = {}

    @property
    def registry(self) -> Any:
        return _registry()

    def _dir_index(self, root: Path) -> dict:
        if root not in self._dirs:
            from lm_eval.tasks import TaskManager

            self._dirs[root] = TaskManager(include_path=str(root), include_defaults=False).task_index
        return self._dirs[root]

    def yaml_path(self, task: "Task") -> Optional[Path]:
        """The YAML file that defines ``task`` (None for a registry task defined in Python only);
        an unknown name is refused in one line."""
        name, root = task.spec.lm_eval, task.include
        if root is not None and root.is_file():
            raw = _load(task, root, resolve_func=False)
            if raw.get("task") != name:
                raise SuiteError(f"{_where(task)}: {root} defines lm-eval task {raw.get('task')!r}, not {name!r}")
            return root
        index = self._dir_index(root) if root is not None else self.registry.task_index
        entry = index.get(name)
        if entry is None:
            where = f"in {root} (it defines: {', '.join(sorted(index)) or 'no task'})" if root else "to lm-eval"
            raise SuiteError(f"{_where(task)}: lm-eval task {name!r} is not known {where}")
        if entry.kind.name not in ("TASK", "PY_TASK"):
            raise SuiteError(f"{_where(task)}: {name!r} is an lm-eval {entry.kind.name.lower()}; name one of its tasks")
        return entry.yaml_path

    def config(self, task: "Task", search: bool) -> Any:
        """What lm-eval's ``TaskManager.load`` takes for ``task``: its registry name, or its full
        config with included data paths resolved and, for the search with ``search_split``, the
        search split in place of the test split."""
        if task.include is None and task.spec.search_split is None:
            return task.spec.lm_eval
        path = self.yaml_path(task)
        if path is None:
            raise SuiteError(f"{_where(task)}: search_split needs a task defined in YAML; "
                             f"{task.spec.lm_eval!r} is defined in Python")
        cfg = _load(task, path, resolve_func=True)
        if task.include is not None:
            cfg = _resolved_data(cfg, path.parent)
        split = search_split_name(task, cfg)
        if search and split is not None:
            cfg["test_split"] = split
        return cfg

    def raw(self, task: "Task") -> dict:
        """``task``'s config with includes merged and functions left unresolved (what splits it
        has); an unknown task is refused in one line."""
        path = self.yaml_path(task)
        return {} if path is None else _load(task, path, resolve_func=False)


def _load(task: "Task", path: Path, resolve_func: bool) -> dict:
    """A task YAML with its includes merged, through lm-eval's loader; an error in one line."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=resolve_func)
    except Exception as e:  # noqa: BLE001 - a YAML, include or !function error, in one line
        raise SuiteError(f"{_where(task)}: {path}: {one_line(e)}") from None


def search_split_name(task: "Task", cfg: dict) -> Optional[str]:
    """The dataset split a task with ``search_split`` searches on; refused in one line when the
    task lacks it, or lacks a distinct test split to hold out."""
    choice = task.spec.search_split
    if choice is None:
        return None
    split, test = cfg.get(SPLIT_KEYS[choice]), cfg.get("test_split")
    if not split:
        raise SuiteError(f"{_where(task)}: search_split {choice}: lm-eval task {task.spec.lm_eval!r} has no "
                         f"{SPLIT_KEYS[choice]}")
    if not test or test == split:
        raise SuiteError(f"{_where(task)}: search_split {choice}: lm-eval task {task.spec.lm_eval!r} has no "
                         "test split apart from it to hold out")
    return split


def _resolved_data(cfg: dict, base: Path) -> dict:
    """``cfg`` with relative local data paths made absolute against ``base``."""
    def fix(p: Any) -> Any:
        if isinstance(p, str) and "://" not in p and not Path(p).is_absolute():
            return str((base / p).resolve())
        return p

    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        if isinstance(files, dict):
            kwargs["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
        else:
            kwargs["data_files"] = [fix(x) for x in files] if isinstance(files, list) else fix(files)
        cfg = {**cfg, "dataset_kwargs": kwargs}
    path = cfg.get("dataset_path")
    if isinstance(path, str) and (base / path).exists():
        cfg = {**cfg, "dataset_path": str((base / path).resolve())}
    return cfg


def definition_files(task: "Task", resolver: Resolver) -> dict[str, Path]:
    """The files whose content defines an included task, by a name relative to the include: its
    YAML and the templates it includes, the modules its ``!function`` tags name, and its local
    data files (``data_files`` globs expanded, a local ``dataset_path`` directory's files)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    root = task.include
    top = resolver.yaml_path(task)
    files: list[Path] = []
    stack = [top]
    while stack:
        p = stack.pop().resolve()
        if p in files or not p.is_file():
            continue
        files.append(p)
        raw = load_yaml(p, resolve_func=False, recursive=False)
        inc = raw.get("include")
        stack += [p.parent / i for i in ([inc] if isinstance(inc, str) else inc or [])]
        files += _function_modules(raw, p.parent)
    cfg = _resolved_data(_load(task, top, resolve_func=False), top.parent)
    data = (cfg.get("dataset_kwargs") or {}).get("data_files")
    for pattern in _strings(data):
        files += [Path(f) for f in sorted(glob.glob(pattern, recursive=True))]
    local = cfg.get("dataset_path")
    if isinstance(local, str) and Path(local).is_dir():
        files += sorted(f for f in Path(local).rglob("*") if f.is_file())
    base = root if root.is_dir() else root.parent
    return {_label(f, base): f for f in files}


def _function_modules(raw: dict, base: Path) -> list[Path]:
    """The module files of the ``!function`` tags in ``raw`` (lm-eval's loader leaves each as
    ``BASE/module.function`` when not resolving)."""
    out = []
    prefix = str(base) + "/"
    for s in _strings(raw):
        if s.startswith(prefix) and "." in s[len(prefix):]:
            module = base / (s[len(prefix):].rpartition(".")[0].replace(".", "/") + ".py")
            if module.is_file():
                out.append(module.resolve())
    return out


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _label(f: Path, base: Path) -> str:
    try:
        return str(f.relative_to(base.resolve()))
    except ValueError:
        return str(f)


def check_tasks(suite: "Suite", resolver: Optional[Resolver] = None) -> list[str]:
    """Refuse a suite whose lm-eval tasks are unknown or whose ``search_split`` does not apply; the
    warnings of tasks searched on their test split (none for a local suite)."""
    warnings = []
    resolver = resolver or Resolver()
    for t in suite.tasks:
        if t.local:
            continue
        raw = resolver.raw(t)
        if search_split_name(t, raw) is None and raw.get("test_split"):
            offer = [k for k, key in SPLIT_KEYS.items() if raw.get(key) and raw.get(key) != raw["test_split"]]
            warnings.append(f"{_where(t)}: the search optimizes on the test split ({raw['test_split']!r}) of "
                            f"lm-eval task {t.spec.lm_eval!r}; held-out figures from that split are not an independent "
                            "estimate of it" + (f" (search_split: {offer[0]} searches elsewhere)" if offer else ""))
    return warnings


def load(entries: list, resolver: Resolver) -> dict:
    """lm-eval task objects by name for ``entries`` (registry names or configs); lm-eval's
    registry is indexed only when an entry names a task of it."""
    from lm_eval.tasks import TaskManager

    manager = resolver.registry if any(isinstance(e, str) for e in entries) else TaskManager(include_defaults=False)
    try:
        return manager.load(entries)["tasks"]
    except Exception as e:  # noqa: BLE001 - a data set that cannot be read (offline, a bad path), in one line
        names = ", ".join(repr(e if isinstance(e, str) else e.get("task")) for e in entries)
        raise SuiteError(f"lm-eval could not load task(s) {names}: {one_line(e)}") from None


def native_items(task: "Task", split: str, obj: Any) -> tuple[list["Item"], "Scoring"]:
    """The items of ``task``'s lm-eval task object ``obj`` (loaded for ``split``) as the native
    scorer scores them, and how: lm-eval's zero-shot context of each document, its choices and
    target delimiter, its stop strings, token limit and answer filter. A task the native scorer
    cannot score as lm-eval does is refused in one line saying why."""
    from evomerge.fitness.suite import Item, Scoring

    cfg, name = obj.config, task.spec.lm_eval

    def cannot(why: str) -> SuiteError:
        return SuiteError(f"{_where(task)}: the native scorer cannot score lm-eval task {name!r}, {why} "
                          "(use fitness.backend lm-eval or vllm)")

    mc = cfg.output_type == "multiple_choice"
    if cfg.output_type not in ("multiple_choice", "generate_until"):
        raise cannot(f"whose output_type is {cfg.output_type}")
    for why, bad in (("with few-shot examples", cfg.num_fewshot), ("with a process_results function",
                     cfg.process_results is not None), ("with a gen_prefix", cfg.gen_prefix),
                     ("with several inputs or targets per document",
                      getattr(obj, "multiple_input", 0) or getattr(obj, "multiple_target", 0))):
        if bad:
            raise cannot(why)
    allowed = ("acc", "acc_norm", "margin") if mc else ("exact_match",)
    if task.spec.metric not in allowed:
        raise cannot(f"on metric {task.spec.metric!r} (it computes {', '.join(allowed)})")
    if mc:
        how = Scoring("multiple_choice", task.spec.metric)
    else:
        gen = dict(cfg.generation_kwargs or {})
        if gen.get("do_sample") or gen.get("temperature", 0):
            raise cannot("with sampled generation")
        options = next((m for m in cfg.metric_list or [] if m.get("metric") == "exact_match"), {})
        extra = sorted(k for k, v in options.items()
                       if v and k not in ("metric", "aggregation", "higher_is_better", "ignore_case"))
        if extra:
            raise cannot(f"with exact_match options {', '.join(extra)}")
        until = gen.get("until") or []
        how = Scoring("generate", "exact_match", tuple([until] if isinstance(until, str) else until),
                      int(gen.get("max_gen_toks", 256)), _answer_regex(cfg.filter_list, task.spec.filter, cannot),
                      bool(options.get("ignore_case")))
    docs = obj.eval_docs
    items = []
    for i in task.lm_eval_indices(len(docs), split):
        doc = docs[i]
        prompt = obj.fewshot_context(doc, 0)
        if not isinstance(prompt, str):
            raise cannot("whose prompt is not one string")
        target = obj.doc_to_target(doc)
        choices = tuple(obj.doc_to_choice(doc)) if cfg.doc_to_choice is not None else None
        if mc:
            answer = choices.index(target) if isinstance(target, str) else int(target)
        else:
            answer, choices = str(choices[target] if choices is not None else target), None
        items.append(Item(f"{task.name}-{i}", i, prompt, answer, choices, cfg.target_delimiter))
    return items, how


def _answer_regex(filters: Any, name: str, cannot) -> Optional[str]:
    """The pattern of filter ``name`` when it is lm-eval's regex filter (first match, first
    non-empty group) then take_first; None for no filter (or take_first alone)."""
    entry = next((f for f in filters or [] if isinstance(f, dict) and f.get("name") == name), None)
    if entry is None:
        if name == "none":
            return None
        raise cannot(f"which has no filter {name!r}")
    steps = entry.get("filter") or []
    functions = [step.get("function") for step in steps]
    if functions == ["take_first"]:
        return None
    regex = steps[0] if functions == ["regex", "take_first"] else {}
    if regex and regex.get("group_select", 0) == 0 and regex.get("fallback", INVALID) == INVALID:
        return regex.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")  # lm-eval's default pattern
    raise cannot(f"with filter {name!r} ({' then '.join(map(str, functions))})")
