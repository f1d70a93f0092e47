"""Reading a run: ``evomerge status`` (text and PNG plots) and ``evomerge export``."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Optional

from .errors import EvomergeError
from .rundb import Row, best_row, redact
from .search import Run, parents, reference_recipes, versions


def _fmt(v: Optional[float]) -> str:
    return f"{v:.4f}" if v is not None else "failed"


def status_text(run: Run, recent: int = 8) -> str:
    rows = run.db.rows()
    refs = run.db.references()
    counted = [r for r in rows if r.counted]
    failed = [r for r in rows if r.state == "failed"]
    interrupted = [r for r in rows if r.state == "interrupted"]
    budget = run.cfg.budget
    saved = run.db.load_state() or {}
    elapsed = saved.get("elapsed", 0.0)
    lines = [f"run {run.name} ({run.run_dir}): {run.cfg.merge_method}, space {run.space.spec.name or 'inline'} "
             f"(dimension {run.space.dimension}), driver {run.cfg.driver.name}"
             + (f"/{run.cfg.driver.sampler}" if run.cfg.driver.sampler else "")]
    progress = f"{len(counted)}" + (f"/{budget.max_candidates}" if budget.max_candidates else "") + " candidates"
    progress += f" ({len(failed)} failed, {len(interrupted)} interrupted and redone)"
    progress += f"; search time {elapsed / 60:.1f} min" + (f" of {budget.max_minutes:g}" if budget.max_minutes else "")
    lines.append(progress)
    if counted and elapsed > 0:
        rate = len(counted) / elapsed * 60
        left = []
        if budget.max_candidates:
            left.append(max(budget.max_candidates - len(counted), 0) / rate * 60)
        if budget.max_minutes:
            left.append(max(budget.max_minutes * 60 - elapsed, 0))
        lines.append(f"throughput {rate:.1f} candidates/min; time left about {min(left) / 60:.1f} min" if left
                     else f"throughput {rate:.1f} candidates/min")
    best = best_row(rows)
    tasks = list(best.tasks) if best else next((list(r.tasks) for r in refs if r.tasks), [])
    header = f"  {'':24s}{'fitness':>10s}" + "".join(f"{t:>10s}" for t in tasks)
    lines += ["", "reference rows and best so far (search split):", header]
    for r in refs + ([best] if best else []):
        label = r.name if r.name else f"best #{r.number}"
        lines.append(f"  {label:24s}{_fmt(r.fitness):>10s}" + "".join(f"{r.tasks.get(t, float('nan')):10.4f}" for t in tasks))
    default = next((r for r in refs if r.name == "default"), None)
    if best and default and default.fitness is not None:
        lines.append(f"  best - default: {best.fitness - default.fitness:+.4f}")
    if rows:
        lines += ["", f"recent candidates (of {len(rows)}):"]
        for r in rows[-recent:]:
            extra = f"  {r.error}" if r.error else ""
            lines.append(f"  #{r.number:<6d}{r.state:12s}{_fmt(r.fitness):>10s}  merge {r.result.get('merge_s', 0) * 1e3:5.0f} ms"
                         f"  eval {r.result.get('eval_s', 0) * 1e3:6.0f} ms{extra}")
    return "\n".join(lines)


def write_plots(run: Run) -> list[Path]:
    """fitness.png (every candidate, best so far, references) and best_recipe.png (the best
    recipe's parameters per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run.db.rows() if r.fitness is not None]
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
    for r in run.db.references():
        if r.fitness is not None:
            ax.axhline(r.fitness, linestyle="--", linewidth=0.8, label=r.name, color="C3" if r.name == "default" else None)
    ax.set_xlabel("candidate")
    ax.set_ylabel("fitness (search split)")
    ax.set_title(f"run {run.name}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = run.run_dir / "fitness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    best = best_row(rows)
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
            fig.tight_layout()
            path = run.run_dir / "best_recipe.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            out.append(path)
    return out


# ---------------------------------------------------------------------------------------------
# export


def _pick(run: Run, trial: Optional[int]) -> Row:
    rows = run.db.rows()
    if trial is None:
        best = best_row(rows)
        if best is None:
            raise EvomergeError(f"run {run.run_dir}: no candidate has a fitness yet")
        return best
    for r in rows:
        if r.number == trial:
            if r.recipe is None:
                raise EvomergeError(f"run {run.run_dir}: candidate #{trial} has no recipe ({r.state})")
            return r
    raise EvomergeError(f"run {run.run_dir}: no candidate #{trial}")


def export(run: Run, out_dir: str | Path, trial: Optional[int] = None, overwrite: bool = False,
           heldout: bool = True) -> dict:
    """Write OUT_DIR/recipe.yaml, OUT_DIR/model (the merged model), OUT_DIR/report.{json,md}.
    The directory appears only when complete."""
    from .evaluator import Evaluator
    from .merge import merge_to_disk
    from .model_io import atomic_directory
    from .recipe import Recipe

    row = _pick(run, trial)
    recipe = Recipe.from_dict(row.recipe, source=f"candidate #{row.number}")
    if row.params and run.space.decode([row.params[n] for n in run.space.names]).to_dict() != recipe.to_dict():
        raise EvomergeError(f"candidate #{row.number}: its recorded recipe differs from its decoded vector")
    suite = run.cfg.suite()
    evaluator = Evaluator(run.cfg, suite)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
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
            "fitness_recomputed_from_export": recomputed,
            "table": table,
            "provenance": {
                "config": run.cfg.to_dict(), "seed": run.cfg.seed, "storage": redact(run.db.url),
                "suite": suite.name, "task_seeds": {t.name: t.spec.seed for t in suite.tasks},
                "subsample_ids": evaluator.items("search"),
                "heldout_ids": evaluator.items("heldout") if heldout else None,
                "versions": versions(), "exported": _dt.datetime.now().isoformat(timespec="seconds"),
                "started": run.db.meta().get("started"),
            },
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(report_markdown(report))
    return report


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


def report_markdown(report: dict) -> str:
    p = report["provenance"]
    lines = [f"# evomerge export: run {report['run']}, candidate #{report['candidate']}", "",
             comparison_table(report), "",
             f"Fitness recorded during the search: {_fmt(report['fitness_recorded'])}; recomputed from the exported "
             f"model: {_fmt(report['fitness_recomputed_from_export'])}.", "",
             "## Provenance", "",
             f"- suite `{p['suite']}`, task seeds {p['task_seeds']}, run seed {p['seed']}",
             "- search subsample: " + ", ".join(f"{k}: {len(v)} items" for k, v in p["subsample_ids"].items()),
             f"- storage `{p['storage']}`, started {p['started']}, exported {p['exported']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
             "", "Full config, subsample ids and held-out ids: report.json."]
    return "\n".join(lines) + "\n"
