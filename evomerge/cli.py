"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import EvomergeError


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_to_disk
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe)
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
    from .zoo import build_zoo, format_report

    manifest = build_zoo(args.out_dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(format_report(manifest["report"]))
    print(f"built the {args.size} zoo in {manifest['build_seconds']:.0f} s "
          f"(training {manifest['train_seconds']:.0f} s): {manifest['root']}")
    return 0 if manifest["report"]["goals_met"] else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fitness import Suite, get_backend

    suite = Suite.load(args.suite)
    backend = get_backend(args.backend, model_dir=args.model_dir, batch_size=args.batch_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="auto",
                                                     trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvomergeError(f"model {args.model_dir}: cannot be loaded ({str(e).splitlines()[0]})") from None
    model = model.to(args.device).eval()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge-recipe optimizer for LLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models from a mergekit-style YAML recipe")
    m.add_argument("recipe", help="recipe YAML (mergekit syntax)")
    m.add_argument("out_dir", help="output model directory (written atomically)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                   help="merge dtype (overrides the recipe's dtype)")
    m.add_argument("--out-dtype", choices=["float32", "float16", "bfloat16", "float64"],
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
    zb.add_argument("--size", choices=["tiny", "small"], default="tiny")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--overwrite", action="store_true", help="replace an existing zoo")
    zb.set_defaults(func=_cmd_zoo_build)

    e = sub.add_parser("eval", help="score a saved model on a fitness suite")
    e.add_argument("model_dir")
    e.add_argument("--suite", required=True, help="a suite file, or the name of one in fitness/ (e.g. zoo)")
    e.add_argument("--backend", choices=["native", "lm-eval", "vllm"], default="native")
    e.add_argument("--split", choices=["search", "heldout"], default="search")
    e.add_argument("--json", help="write the full result (per-item correctness included) to this file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--trust-remote-code", action="store_true")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except EvomergeError as e:
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
