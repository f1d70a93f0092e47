"""Reading a run: ``evomerge status`` (text and PNG plots) and ``evomerge export``."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError
from evomerge.fitness.estimate import usage
from evomerge.fitness.record import Fidelity
from evomerge.fitness.suite import Suite
from evomerge.run.card import write_model_card
from evomerge.rundb.secrets import redact
from evomerge.rundb.store import Row, Score, best_row, pareto_front
from evomerge.rundb.trackers import Trackers
from evomerge.run.rundir import Run, parents, reference_recipes, run_budget, run_identity, versions


def _fmt(v: Optional[float]) -> str:
    return f"{v:.4f}" if v is not None else "failed"


def _fitness_cell(r: Row) -> str:
    """A row's fitness, or what it is doing instead: running, waiting (to be redone), failed, -."""
    if r.fitness is not None:
        return f"{r.fitness:.4f}"
    return {"running": "running", "waiting": "waiting", "interrupted": "-"}.get(r.state, "failed")


def status_text(run: Run, recent: int = 8) -> str:
    """``evomerge status``'s text. It reads every candidate's :class:`Score` and only the records
    it shows (the best, the recent ones), so it costs little more at 20,000 candidates than at 100."""
    rows = run.db.scores()
    refs = run.db.references()
    counted = [r for r in rows if r.counted]
    failed = [r for r in rows if r.state == "failed"]
    interrupted = [r for r in rows if r.state == "interrupted"]
    running = [r for r in rows if r.state == "running"]
    budget = run_budget(run)
    max_candidates, max_minutes = budget.get("max_candidates"), budget.get("max_minutes")
    elapsed = run.db.metadata.elapsed()
    lines = [f"run {run.name} ({run.run_dir}): {run.cfg.merge_method}, {run.space_summary()}, "
             f"driver {run.cfg.driver.name}"
             + (f"/{run.cfg.driver.sampler}" if run.cfg.driver.sampler else "")]
    progress = f"{len(counted)}" + (f"/{max_candidates}" if max_candidates else "") + " candidates"
    progress += f" ({len(failed)} failed, {len(interrupted)} interrupted and redone)"
    progress += f", {len(running)} running" if running else ""
    progress += f"; search time {elapsed / 60:.1f} min" + (f" of {max_minutes:g}" if max_minutes else "")
    lines.append(progress)
    if counted and elapsed > 0:
        rate = len(counted) / elapsed * 60
        left = []
        if max_candidates:
            left.append(max(max_candidates - len(counted), 0) / rate * 60)
        if max_minutes:
            left.append(max(max_minutes * 60 - elapsed, 0))
        lines.append(f"throughput {rate:.1f} candidates/min; time left about {min(left) / 60:.1f} min" if left
                     else f"throughput {rate:.1f} candidates/min")
    best = best_row(rows)
    best = run.db.row(best.trial_id) if best else None
    tasks = list(best.tasks) if best else next((list(r.tasks) for r in refs if r.tasks), [])
    header = f"  {'':24s}{'fitness':>10s}" + "".join(f"{t:>10s}" for t in tasks)
    lines += ["", "reference rows and best so far (search split):", header]
    for r in refs + ([best] if best else []):
        label = r.name if r.name else f"best #{r.number}"
        lines.append(f"  {label:24s}{_fmt(r.fitness):>10s}" + "".join(f"{r.tasks.get(t, float('nan')):10.4f}" for t in tasks))
    default = next((r for r in refs if r.name == "default"), None)
    if best and default and default.fitness is not None:
        lines.append(f"  best - default: {best.fitness - default.fitness:+.4f}")
    used = usage([r.summary for r in counted])
    if used:
        lines.append(f"  fitness estimate: {used['stopped']} candidates stopped before all items (their fitness is "
                     f"estimated); {used['items']} item evaluations, {used['share']:.1%} of scoring all on every item")
    if run.db.n_objectives > 1:
        lines += [""] + pareto_text(run, rows, refs)
    workers = run.db.registry.all()
    if len(workers) > 1 or any(w.get("mode") == "worker" for w in workers):
        lines += ["", "processes (workers, or sessions of one search):"]
        for w in workers:
            state = f"ended {w['ended']}" if "ended" in w else f"joined {w.get('joined', '?')}, running or killed"
            stats = (f", {w['own']} candidates, idle {w['idle_share']:.1%}" if w.get("idle_share") is not None
                     else "")
            lines.append(f"  w{w['slot']:<3d}{w.get('host', '?')}:{w.get('pid', '?')} {w.get('device', '')} "
                         f"({w.get('mode', '')}) {state}{stats}")
    if rows:
        lines += ["", f"recent candidates (of {len(rows)}):"]
        for r in (run.db.row(x.trial_id) for x in rows[-recent:] if recent > 0):
            extra = f"  {r.error}" if r.error else ""
            estimated = r.record.estimated_from()
            if estimated:
                extra += f"  {estimated}"
            lines.append(f"  #{r.number:<6d}{r.state:12s}{_fitness_cell(r):>10s}  merge {r.record.merge_s * 1e3:5.0f} ms"
                         f"  eval {r.record.eval_s * 1e3:6.0f} ms{extra}")
    return "\n".join(lines)


def objective_names(run: Run) -> list[str]:
    return run.db.metadata.get().get("objectives") or Suite.resolve(run.cfg.fitness.suite).objective_names


def pareto_text(run: Run, rows: list[Score], refs: list[Row]) -> list[str]:
    names = objective_names(run)
    front = pareto_front(rows)
    complete = sum(r.state == "complete" for r in rows)
    lines = [f"Pareto front: {len(front)} of {complete} completed candidates (objectives, all maximized):",
             f"  {'':24s}" + "".join(f"{n:>12s}" for n in names) + f"{'fitness':>12s}"]
    for label, r in [(r.name, r) for r in refs if r.values] + [(f"#{r.number}", r) for r in front]:
        lines.append(f"  {label:24s}" + "".join(f"{v:12.4f}" for v in r.values) + f"{_fmt(r.fitness):>12s}")
    return lines


def _save_figure(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto_plot(run: Run, rows: list[Score], refs: list[Row], plt) -> Optional[Path]:
    """pareto.png: every completed candidate in each pair of objectives, the front highlighted
    and joined, the reference rows marked."""
    names = objective_names(run)
    k = len(names)
    done = [r for r in rows if r.state == "complete" and r.values]
    if k < 2 or not done:
        return None
    front = pareto_front(rows)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)][:6]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    refs = [r for r in refs if r.values]
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter([r.values[i] for r in done], [r.values[j] for r in done], s=10, alpha=0.35, label="candidate")
        pts = sorted((r.values[i], r.values[j]) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", markersize=5,
                label=f"Pareto front ({len(front)})")
        for n, r in enumerate(refs):
            ax.scatter([r.values[i]], [r.values[j]], marker="*", s=90, color=f"C{(n + 4) % 10}", label=r.name)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.legend(fontsize=7)
    fig.suptitle(f"run {run.name}: objectives (search split, higher is better)")
    return _save_figure(fig, run.run_dir / "pareto.png", plt)


def write_plots(run: Run) -> list[Path]:
    """fitness.png (every candidate, best so far, references), best_recipe.png (the best
    recipe's parameters per layer) and, with several objectives, pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows, refs = run.db.scores(), run.db.references()
    rows = [r for r in all_rows if r.fitness is not None]
    out = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if rows:
        xs = [r.number for r in rows]
        ys = [r.fitness for r in rows]
        best, running = [], float("-inf")
        for y in ys:
            running = max(running, y)
            best.append(running)
        ax.scatter(xs, ys, s=10, alpha=0.6, label="candidate")
        ax.step(xs, best, where="post", color="black", label="best so far")
    for r in refs:
        if r.fitness is not None:
            ax.axhline(r.fitness, linestyle="--", linewidth=0.8, label=r.name, color="C3" if r.name == "default" else None)
    ax.set_xlabel("candidate")
    ax.set_ylabel("fitness (search split)")
    ax.set_title(f"run {run.name}")
    if ax.get_legend_handles_labels()[0]:  # nothing scored yet: no legend
        ax.legend(fontsize=7, loc="lower right")
    out.append(_save_figure(fig, run.run_dir / "fitness.png", plt))

    best = best_row(rows)
    best = run.db.row(best.trial_id) if best else None
    if best is not None and best.params:
        names, cols, grid = run.space.layer_table({c.name: c.value(best.params[c.name]) for c in run.space.coordinates})
        if names:
            fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(cols) + 3), max(3, 0.35 * len(names) + 1.5)))
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xticks(range(len(cols)), cols, fontsize=7)
            ax.set_xlabel("layer")
            ax.set_title(f"best recipe (#{best.number}, fitness {best.fitness:.4f})")
            fig.colorbar(im, ax=ax)
            out.append(_save_figure(fig, run.run_dir / "best_recipe.png", plt))
    path = _pareto_plot(run, all_rows, refs, plt)
    if path is not None:
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------
# export


def pick(run: Run, trial: Optional[int]) -> Row:
    """The candidate an export writes: number ``trial``, or the best (:func:`best_row`)."""
    rows = run.db.scores()
    if trial is None:
        best = best_row(rows)
        if best is None:
            raise EvomergeError(f"run {run.run_dir}: no candidate has a fitness yet")
        return run.db.row(best.trial_id)
    found = [run.db.row(r.trial_id) for r in rows if r.number == trial]
    if not found:
        raise EvomergeError(f"run {run.run_dir}: no candidate #{trial}")
    if len(found) > 1:  # rows deleted by hand, then the run resumed by an evomerge that reused numbers
        raise EvomergeError(f"run {run.run_dir}: {len(found)} candidates hold number #{trial} (rows were deleted "
                            "from the run database and an older evomerge gave their numbers again); export "
                            "another one, or the best")
    if found[0].recipe is None:
        raise EvomergeError(f"run {run.run_dir}: candidate #{trial} has no recipe ({found[0].state})")
    return found[0]


def run_inputs(run: Run) -> list[Path]:
    """What an export must never replace: the run directory and the run's local models."""
    return [run.run_dir, *(Path(m) for m in parents(run).values() if Path(m).exists())]


def export(run: Run, out_dir: str | Path, trial: Optional[int] = None, overwrite: bool = False,
           heldout: bool = True) -> dict:
    """Write OUT_DIR/recipe.yaml, OUT_DIR/model (the merged model), OUT_DIR/report.{json,md}.
    The directory appears only when complete."""
    from evomerge.search.evaluator import Evaluator
    from evomerge.merging.plan import read_recipe
    from evomerge.merging.to_disk import merge_to_disk
    from evomerge.merging.model_io import atomic_directory

    row = pick(run, trial)
    recipe = read_recipe(row.recipe, source=f"candidate #{row.number}")
    if row.params and run.space.decode([row.params[n] for n in run.space.names]).to_dict() != recipe.to_dict():
        raise EvomergeError(f"candidate #{row.number}: its recorded recipe differs from its decoded vector")
    suite = Suite.resolve(run.cfg.fitness.suite)
    evaluator = Evaluator(run.cfg, suite)
    with atomic_directory(out_dir, overwrite=overwrite, protected=run_inputs(run)) as tmp:
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        chain = _recipe_chain(recipe, tmp)
        model_dir = merge_to_disk(recipe, tmp / "model", device=run.cfg.device, allow_pickle=run.cfg.allow_pickle,
                                  trust_remote_code=run.cfg.trust_remote_code)
        table: dict[str, dict] = {}
        splits = ("search", "heldout") if heldout else ("search",)
        for name, path in parents(run).items():
            table[name] = {s: _scores(ev) for s, ev in evaluator.score_model_dir(path, splits).items()}
        for name, ref in reference_recipes(run).items():
            table[name] = {s: _scores(evaluator.score_recipe(ref, s)) for s in splits}
        winner = {s: _scores(ev) for s, ev in evaluator.score_model_dir(str(model_dir), splits).items()}
        table[f"best #{row.number}"] = winner
        recomputed = winner["search"]["fitness"]
        report = {
            "run": run.name, "candidate": row.number, "fitness_recorded": row.fitness,
            "fitness_recomputed_from_export": recomputed, "fidelity_recorded": _fidelity_json(row),
            "estimates": _check_estimates(run, evaluator),
            "warnings": split_warnings(suite),
            "table": table,
            "chain": chain,
            "provenance": {
                "config": run.cfg.to_dict(), "seed": run.cfg.seed, "storage": redact(run.db.url),
                "suite": suite.name, "task_seeds": {t.name: t.spec.seed for t in suite.tasks},
                "subsample_ids": evaluator.items("search"),
                "heldout_ids": evaluator.items("heldout") if heldout else None,
                "versions": versions(), "exported": _dt.datetime.now().isoformat(timespec="seconds"),
                "started": run.db.metadata.get().get("started"),
            },
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(report_markdown(report))
        write_model_card(model_dir, report, recipe, comparison_table, _chain_text(chain))
    trackers = Trackers.open(run.cfg, run.run_dir, run.name, run.db, run_identity(run))
    trackers.winner(report, recipe.to_yaml())
    trackers.close()
    return report


CHECKED = 5  # estimated candidates scored on every item at export


def _check_estimates(run: Run, evaluator) -> Optional[dict]:
    """With ``fitness.estimate``: the item evaluations used, and the best few candidates whose
    fitness was estimated, scored now on every search item (estimate against truth)."""
    from evomerge.merging.plan import read_recipe

    rows = run.db.scores()
    used = usage([r.summary for r in rows if r.counted])
    if used is None:
        return None
    estimated = sorted((r for r in rows if r.fitness is not None and not r.full), key=lambda r: -r.fitness)[:CHECKED]
    checked = []
    for r in (run.db.row(x.trial_id) for x in estimated):
        ev = evaluator.score_recipe(read_recipe(r.recipe), "search")
        checked.append({"candidate": r.number, "estimate": r.fitness, "truth": ev.fitness,
                        "items": r.record.fidelity.items, "of": r.record.fidelity.of})
    return used | {"checked": checked}


def split_warnings(suite: Suite) -> list[str]:
    """The warnings of the suite's lm-eval tasks searched on their test split (none for a local suite)."""
    if all(t.local for t in suite.tasks):
        return []
    from evomerge.fitness.lmeval_tasks import check_tasks

    return check_tasks(suite)


def _scores(ev) -> dict:
    return {"fitness": ev.fitness, "tasks": {k: t.value for k, t in (ev.result.tasks.items() if ev.result else [])},
            "error": ev.error}


def comparison_table(report: dict) -> str:
    """Markdown table: every row's fitness (and per-task values) on each split."""
    table = report["table"]
    splits = list(next(iter(table.values())))
    tasks = list(next((v["search"]["tasks"] for v in table.values() if v["search"]["tasks"]), {}))
    head = "| model | " + " | ".join(f"fitness ({s})" for s in splits) + " | " + \
        " | ".join(f"{t} ({s})" for s in splits for t in tasks) + " |"
    lines = [head, "|" + "---|" * (1 + len(splits) * (1 + len(tasks)))]
    for name, by_split in table.items():
        cells = [_fmt(by_split[s]["fitness"]) for s in splits]
        cells += [f"{by_split[s]['tasks'].get(t, float('nan')):.4f}" for s in splits for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _recipe_chain(recipe, out: Path) -> dict[str, str]:
    """The recipes of the parents that evomerge built (a merge this recipe stacks or merges again,
    as in a hybrid search), copied to ``out/chain/``: parent directory -> the copy's path in ``out``."""
    chain = {}
    for model in recipe.model_names():
        src = Path(model) / "evomerge_recipe.yaml"
        if src.is_file():
            name = Path(model).parent.name if Path(model).name == "model" else Path(model).name
            dst = out / "chain" / f"{len(chain)}-{name}.yaml"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)
            chain[model] = str(dst.relative_to(out))
    return chain


def _chain_text(chain: Optional[dict]) -> list[str]:
    if not chain:
        return []
    lines = ["## Recipe chain", "", "Some parents are merges evomerge built; their recipes are in `chain/`. To rebuild "
             "this model from the original models: build each with `evomerge merge chain/FILE.yaml DIR` (or "
             "`mergekit-yaml`), point `recipe.yaml`'s path at DIR, then build `recipe.yaml`.", ""]
    return lines + [f"- `{model}`: `{copy}`" for model, copy in chain.items()] + [""]


def report_markdown(report: dict) -> str:
    p = report["provenance"]
    lines = [f"# evomerge export: run {report['run']}, candidate #{report['candidate']}", "",
             comparison_table(report), "",
             *[f"**Warning:** {w}." for w in report.get("warnings") or []],
             *([""] if report.get("warnings") else []),
             f"Fitness recorded during the search: {_fmt(report['fitness_recorded'])}; recomputed from the exported "
             f"model: {_fmt(report['fitness_recomputed_from_export'])}"
             + _fidelity_text(report.get("fidelity_recorded")) + ".", "",
             *_estimates_text(report.get("estimates")),
             *_chain_text(report.get("chain")),
             "## Provenance", "",
             f"- suite `{p['suite']}`, task seeds {p['task_seeds']}, run seed {p['seed']}",
             "- search subsample: " + ", ".join(f"{k}: {len(v)} items" for k, v in p["subsample_ids"].items()),
             f"- storage `{p['storage']}`, started {p['started']}, exported {p['exported']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
             "", "Full config, subsample ids and held-out ids: report.json."]
    return "\n".join(lines) + "\n"


def _fidelity_json(row: Row) -> Optional[dict]:
    return row.record.fidelity.to_json() if row.record.fidelity is not None else None


def _fidelity_text(f: Optional[dict]) -> str:
    fidelity = Fidelity.from_json(f)
    estimated = fidelity.text() if fidelity is not None else None
    return f" (the recorded fitness was {estimated} of the search split)" if estimated else ""


def _estimates_text(e: Optional[dict]) -> list[str]:
    if not e:
        return []
    lines = [f"Fitness estimate: {e['stopped']} candidates stopped before all search items; {e['items']} item "
             f"evaluations, {e['share']:.1%} of scoring every candidate on every item. The best estimated "
             "candidates, scored on every search item at export:", "",
             "| candidate | items scored | estimate | truth |", "|---|---|---|---|"]
    lines += [f"| #{c['candidate']} | {c['items']} of {c['of']} | {_fmt(c['estimate'])} | {_fmt(c['truth'])} |"
              for c in e["checked"]]
    return lines + [""]


def export_pareto(run: Run, out_dir: str | Path, overwrite: bool = False, heldout: bool = True,
                  models: bool = False) -> dict:
    """Every Pareto-optimal candidate: OUT_DIR/candidate-NNNN/recipe.yaml (and model/ with
    ``models``), and OUT_DIR/pareto.{json,md} with each one's objectives on the search split and,
    with ``heldout``, on the held-out split (re-scored here). Written atomically."""
    from evomerge.search.evaluator import Evaluator
    from evomerge.merging.plan import read_recipe
    from evomerge.merging.to_disk import merge_to_disk
    from evomerge.merging.model_io import atomic_directory

    names = objective_names(run)
    if len(names) < 2:
        raise EvomergeError(f"run {run.run_dir}: the suite has one objective; --pareto needs several "
                            "(declare 'objectives' in the suite)")
    rows = run.db.scores()
    front = [run.db.row(r.trial_id) for r in pareto_front(rows)]
    if not front:
        raise EvomergeError(f"run {run.run_dir}: no candidate has completed yet")
    evaluator = Evaluator(run.cfg, Suite.resolve(run.cfg.fitness.suite)) if heldout else None
    members = []
    with atomic_directory(out_dir, overwrite=overwrite, protected=run_inputs(run)) as tmp:
        for r in front:
            recipe = read_recipe(r.recipe, source=f"candidate #{r.number}")
            sub = tmp / f"candidate-{r.number:04d}"
            sub.mkdir()
            (sub / "recipe.yaml").write_text(recipe.to_yaml())
            entry = {"candidate": r.number, "recipe": f"{sub.name}/recipe.yaml",
                     "search": dict(zip(names, r.values)), "fitness_search": r.fitness,
                     "fidelity": _fidelity_json(r)}
            if evaluator is not None:
                ev = evaluator.score_recipe(recipe, "heldout")
                entry["heldout"] = dict(zip(names, ev.values)) if ev.values else None
                entry["fitness_heldout"] = ev.fitness
                entry["error_heldout"] = ev.error
            if models:
                merge_to_disk(recipe, sub / "model", device=run.cfg.device, allow_pickle=run.cfg.allow_pickle,
                              trust_remote_code=run.cfg.trust_remote_code)
                entry["model"] = f"{sub.name}/model"
            members.append(entry)
        refs = {x.name: dict(zip(names, x.values)) for x in run.db.references() if x.values}
        report = {"run": run.name, "objectives": names, "completed": sum(r.state == "complete" for r in rows),
                  "front": members, "references_search": refs,
                  "exported": _dt.datetime.now().isoformat(timespec="seconds")}
        (tmp / "pareto.json").write_text(json.dumps(report, indent=2))
        (tmp / "pareto.md").write_text(pareto_markdown(report))
    return report


def pareto_markdown(report: dict) -> str:
    names = report["objectives"]
    heldout = any("heldout" in m for m in report["front"])
    cols = [f"{n} (search)" for n in names] + ([f"{n} (held-out)" for n in names] if heldout else [])
    lines = [f"# evomerge Pareto export: run {report['run']}", "",
             f"{len(report['front'])} Pareto-optimal candidates of {report['completed']} completed; "
             "every objective is maximized.", "",
             "| candidate | " + " | ".join(cols) + " | recipe |", "|" + "---|" * (len(cols) + 2)]
    for m in report["front"]:
        cells = [f"{m['search'][n]:.4f}" for n in names]
        if heldout:
            cells += [f"{m['heldout'][n]:.4f}" if m.get("heldout") else "failed" for n in names]
        lines.append(f"| #{m['candidate']} | " + " | ".join(cells) + f" | {m['recipe']} |")
    for name, values in report["references_search"].items():
        lines.append(f"| {name} (reference) | " + " | ".join(f"{values[n]:.4f}" for n in names)
                     + (" | " + " | ".join("" for _ in names) if heldout else "") + " | |")
    return "\n".join(lines) + "\n"
