"""Merge speed: mergekit 0.1.5 vs evomerge, same recipes, same models, same machine, same run.

Builds (once, cached) a bf16 Llama of ~230M parameters (hidden 1024, 12 layers, vocab 32000) and
3 experts, then times for TIES and DARE-TIES:
  - mergekit's merge to disk (mergekit-yaml, its CLI) and evomerge's (evomerge merge), each in its
    own process, with the process's peak memory;
  - evomerge's in-place apply of a new recipe into a live model, after the engine is built.
Prints the ratios, and the in-place apply's effective memory bandwidth against a plain copy_ on
the same device (a device-to-device copy on a GPU).

    python benchmarks/merge_speed.py [--device cuda] [--skip-mergekit] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.tiny import TinySpec, build_family  # noqa: E402

SPEC = TinySpec(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=16, num_key_value_heads=16, dtype=torch.bfloat16)


def family(cache: Path) -> dict:
    """The model family, built in a child process so that this process stays small (see
    timed_process)."""
    marker = cache / "family.json"
    if not marker.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-family", str(cache)], check=True)
        print(f"built the model family in {time.perf_counter() - t:.0f} s ({cache})", flush=True)
    return json.loads(marker.read_text())


def recipe(method: str, fam: dict, density: float = 0.5, weights=(0.5, 0.3, 0.2), seed: int = 0) -> dict:
    return {"merge_method": method, "base_model": fam["base"], "dtype": "bfloat16", "random_seed": seed,
            "models": [{"model": e, "parameters": {"weight": w, "density": density}}
                       for e, w in zip(fam["experts"], weights)]}


def timed_process(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes) of a child process. Linux keeps a process's
    peak across exec, so a child's figure includes this process's resident memory at fork time:
    every child is therefore started before this process loads any model (the same small
    baseline for both tools)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20, repeats: int = 20) -> float:
    """Bytes per second a plain ``copy_`` moves on ``device`` (read + write)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    sync()
    return 2 * nbytes * repeats / (time.perf_counter() - t)


def apply_bytes(n_params: int, method: str, n_experts: int = 3) -> int:
    """The least traffic of one bf16 in-place apply: the base and each task vector read, the
    result written, and DARE's int16 draws."""
    moved = n_params * 2 * (1 + n_experts + 1)
    return moved + (n_params * 2 * n_experts if method.startswith("dare") else 0)


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench_models"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--methods", default="ties,dare_ties")
    ap.add_argument("--repeats", type=int, default=5, help="in-place applies timed per method")
    ap.add_argument("--build-family", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_family:
        build_family(Path(args.build_family), SPEC, n_experts=3, seed=0, scale=0.02)
        return
    cache = Path(args.cache)
    fam = family(cache)
    work = cache / "work"
    work.mkdir(exist_ok=True)
    bin_dir = Path(sys.executable).parent
    methods = args.methods.split(",")
    print(f"model: ~229M parameters, bf16, 3 experts; device {args.device}; torch threads {torch.get_num_threads()}",
          flush=True)
    disk = {}
    for method in methods:  # merges to disk first, while this process is small
        f = work / f"{method}.yaml"
        f.write_text(yaml.safe_dump(recipe(method, fam)))
        mk = None
        if not args.skip_mergekit:
            mk = timed_process([str(bin_dir / "mergekit-yaml"), str(f), str(work / f"mk_{method}"),
                                *(["--cuda"] if args.device.startswith("cuda") else []), "--quiet"])
            print(f"{method}: mergekit-yaml {mk[0]:.1f} s, peak RSS {mk[1] / 2**30:.2f} GiB", flush=True)
        ev = timed_process([sys.executable, "-m", "evomerge.cli", "merge", str(f), str(work / f"ev_{method}"),
                            "--overwrite", "--device", args.device])
        print(f"{method}: evomerge merge {ev[0]:.1f} s, peak RSS {ev[1] / 2**30:.2f} GiB", flush=True)
        disk[method] = (mk, ev)

    from transformers import AutoModelForCausalLM

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe

    model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.bfloat16).to(args.device)
    rows = []
    for method in methods:
        t = time.perf_counter()
        engine = MergeEngine(Recipe.from_dict(recipe(method, fam)), device=args.device)
        build = time.perf_counter() - t
        times = []
        for i in range(args.repeats):
            ri = Recipe.from_dict(recipe(method, fam, density=0.3 + 0.1 * i, weights=(0.4 + 0.05 * i, 0.3, 0.2)))
            times.append(engine.apply(ri, model))
        apply_s = statistics.median(times)
        print(f"{method}: engine built in {build:.1f} s ({engine.placement}, {engine.cache_bytes / 2**30:.2f} GiB); "
              f"in-place apply median {apply_s:.3f} s over {args.repeats} recipes", flush=True)
        rows.append((method, *disk[method], apply_s))
        del engine

    print("\nresults (ratios: mergekit time / evomerge time; memory: evomerge peak / mergekit peak)")
    for method, mk, ev, apply_s in rows:
        if mk:
            print(f"  {method:10s} merge to disk: {mk[0] / ev[0]:5.1f}x faster (goal >= 10x), "
                  f"peak memory {ev[1] / mk[1]:.2f}x mergekit's (goal <= 1)")
            print(f"  {method:10s} in-place apply: {mk[0] / apply_s:5.1f}x faster than mergekit's merge to disk "
                  f"(goal >= 50x)")
        else:
            print(f"  {method:10s} merge to disk {ev[0]:.1f} s; in-place apply {apply_s:.3f} s")
    copy_bw = copy_bandwidth(args.device)
    where = f"GPU {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else f"CPU ({args.device})"
    print(f"\n{where}: a plain copy_ moves {copy_bw / 1e9:.1f} GB/s (read + write)")
    for method, _, _, apply_s in rows:
        moved = apply_bytes(params_of(model), method)
        print(f"  {method}: in-place apply moves >= {moved / 2**30:.2f} GiB in {apply_s * 1e3:.1f} ms, where copy_ "
              f"moves them in {moved / copy_bw * 1e3:.1f} ms: {moved / apply_s / copy_bw:.0%} of copy bandwidth")


if __name__ == "__main__":
    main()
