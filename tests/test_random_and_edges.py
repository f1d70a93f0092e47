"""Seeded random methods (DARE, DELLA): determinism and statistics; edge values of every method."""

import math

import pytest
import torch
from conftest import load_dir, mergekit_merge

from evomerge.merging.kernel.mix import merge_task_arithmetic, prepare_expert
from evomerge.merging.methods.slerp import merge_slerp
from evomerge.merging.to_disk import merge_to_disk, merged_tensors
from evomerge.merging.methods import METHODS
from evomerge.merging.recipe import Recipe


def recipe_for(method, fam, weights=(0.5, -0.3, 0.8), seed=0, **params):
    return {"merge_method": method, "base_model": fam["base"], "random_seed": seed,
            "models": [{"model": e, "parameters": {"weight": w, **params}} for e, w in zip(fam["experts"], weights)]}


def single_expert_delta(method: str, delta: torch.Tensor, seed=0, **params) -> torch.Tensor:
    """What one expert's task vector becomes after trimming (weight 1, no consensus partner)."""
    base = torch.zeros_like(delta)
    st = prepare_expert(delta, METHODS[method], seed=seed, tensor_name="t", expert_index=0)
    glob = {"normalize": False, "rescale": params.pop("rescale", False)}
    return merge_task_arithmetic(METHODS[method], base, [st], [{"weight": 1.0, **params}], glob)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_same_seed_bit_identical_other_seed_differs(method, families):
    fam = families("bf16")
    r = Recipe.from_dict(recipe_for(method, fam, density=0.4, seed=3))
    a = dict(merged_tensors(r))
    b = dict(merged_tensors(r))
    c = dict(merged_tensors(Recipe.from_dict(recipe_for(method, fam, density=0.4, seed=4))))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_l1_rescale(density):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(400, 500, generator=g)
    kept = single_expert_delta("dare_linear", delta, density=density)
    frac = (kept != 0).float().mean().item()
    n = delta.numel()
    assert abs(frac - density) < 4 * math.sqrt(density * (1 - density) / n)
    assert torch.equal(kept[kept != 0], delta[kept != 0])
    rescaled = single_expert_delta("dare_linear", delta, density=density, rescale=True)
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # kept values are scaled, dropped ones are zero: the same mask
    assert torch.equal(rescaled != 0, kept != 0)
    # draws of different experts and seeds are independent: overlap of two masks ~ density^2
    other = single_expert_delta("dare_linear", delta, seed=1, density=density) != 0
    both = ((kept != 0) & other).float().mean().item()
    assert abs(both - density**2) < 4 * math.sqrt(density**2 * (1 - density**2) / n)


def test_della_keep_probability_grows_with_magnitude_rank():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(200, 1000, generator=g)
    density, eps = 0.5, 0.2
    kept = single_expert_delta("della_linear", delta, density=density, epsilon=eps) != 0
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / 999
    n = delta.numel()
    assert abs(kept.float().mean().item() - density) < 4 * math.sqrt(0.25 / n)
    low = kept[ranks < 0.1].float().mean().item()
    high = kept[ranks > 0.9].float().mean().item()
    # expected keep probability: density - eps + 2*eps*rank -> ~0.32 in the lowest decile, ~0.68 in the highest
    assert low == pytest.approx(density - 0.9 * eps, abs=0.02)
    assert high == pytest.approx(density + 0.9 * eps, abs=0.02)


def test_della_rejects_epsilon_outside_density_before_writing(families, tmp_path):
    from evomerge.errors import RecipeError

    fam = families("fp32")
    r = Recipe.from_dict(recipe_for("della", fam, density=0.1, epsilon=0.2))
    with pytest.raises(RecipeError, match=r"della: density 0.1 \+/- epsilon 0.2 must lie in \(0, 1\) "
                                          r"\(model .*expert_0, tensor model.embed_tokens.weight\)"):
        merge_to_disk(r, tmp_path / "out")
    assert not list(tmp_path.iterdir())


# -- edge values, against mergekit where mergekit is defined ------------------------------------------

EDGES = {
    "ties_density_0": lambda f: recipe_for("ties", f, density=0.0),
    "ties_density_1": lambda f: recipe_for("ties", f, density=1.0),
    "ties_weight_0": lambda f: recipe_for("ties", f, weights=(0.0, 0.0, 0.0), density=0.5),
    "ta_weights_sum_0_normalized": lambda f: {**recipe_for("task_arithmetic", f, weights=(0.5, -0.5, 0.0)),
                                              "parameters": {"normalize": True}},
    "breadcrumbs_gamma_0": lambda f: recipe_for("breadcrumbs", f, density=0.3, gamma=0.0),
    "breadcrumbs_density_0": lambda f: recipe_for("breadcrumbs", f, density=0.0),
    "breadcrumbs_density_1": lambda f: recipe_for("breadcrumbs", f, density=1.0),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_edges_match_mergekit(name, families, tmp_path):
    fam = families("fp32")
    recipe = EDGES[name](fam)
    ref = mergekit_merge(recipe, tmp_path / "mk")
    ours = load_dir(merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ev"))
    for k in ref:
        assert torch.isfinite(ours[k]).all()
        assert torch.equal(ref[k], ours[k]), k


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties"])
def test_density_0_gives_the_base(method, families):
    fam = families("bf16")
    base = load_dir(fam["base"])
    params = {"density": 0.0}
    for k, v in merged_tensors(Recipe.from_dict(recipe_for(method, fam, **params))):
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_density_1_of_random_methods_equals_their_deterministic_twin(method, families):
    fam = families("fp32")
    twin = {"dare_ties": "ties", "della": "ties"}[method]
    a = dict(merged_tensors(Recipe.from_dict(recipe_for(method, fam, density=1.0))))
    b = dict(merged_tensors(Recipe.from_dict(recipe_for(twin, fam, density=1.0))))
    if method == "dare_ties":  # dare_ties does not normalize, ties does
        b = dict(merged_tensors(Recipe.from_dict({**recipe_for(twin, fam, density=1.0),
                                                  "parameters": {"normalize": False}})))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_weights_summing_to_zero_stay_finite(families):
    fam = families("fp32")
    r = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                              for m, w in zip(fam["experts"], (1.0, -1.0, 0.0))]}
    experts = [load_dir(e) for e in fam["experts"]]
    for k, v in merged_tensors(Recipe.from_dict(r)):
        assert torch.isfinite(v).all()
        assert torch.equal(v, experts[0][k] * 1.0 + experts[1][k] * -1.0 + experts[2][k] * 0.0)


def test_slerp_of_parallel_and_nearly_parallel_tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 70, generator=g)
    for b in (a.clone(), a * 1.0001, a * 3.0, -a):
        out = merge_slerp(a, b, 0.3)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, 0.7 * a + 0.3 * b)  # falls back to linear interpolation
    zero = torch.zeros(10)
    assert torch.equal(merge_slerp(zero, zero, 0.5), zero)
    orth = merge_slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(orth, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della", "task_arithmetic"])
def test_compiled_kernel_equals_eager(method, families, monkeypatch):
    """The fused, compiled kernel gives eager PyTorch's bits (and so mergekit's), and its first
    call per variant was checked against eager."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")  # compiled here even in the fast tier
    from evomerge.merging.kernel import compile as kernel

    monkeypatch.setattr(kernel, "_verified", {})
    fam = families("bf16_small")
    r = Recipe.from_dict({**recipe_for(method, fam, density=0.4), "parameters": {"lambda": 0.9}})
    compiled = dict(merged_tensors(r))
    assert any(key[0] == "_mix" for key in kernel._verified)
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    eager = dict(merged_tensors(r))
    for k in compiled:
        assert torch.equal(compiled[k], eager[k]), k


def test_a_compiler_that_rounds_differently_is_caught(families, monkeypatch, caplog):
    """A compiled variant whose first result differs from eager is logged and replaced by eager."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")  # compiled here even in the fast tier
    from evomerge.merging.kernel import compile as kernel
    from evomerge.merging.kernel import mix

    def sloppy(fn):
        if fn is not mix._mix:
            return fn

        def run(out, *args, **kwargs):
            fn(out, *args, **kwargs)
            out.view(torch.int16).add_(1)  # one unit in the last place off everywhere
        return run

    monkeypatch.setattr(kernel, "_verified", {})
    monkeypatch.setattr(kernel, "compiled", sloppy)
    fam = families("bf16_small")
    r = Recipe.from_dict(recipe_for("ties", fam, density=0.4))
    with caplog.at_level("WARNING", logger="evomerge.merging.kernel"):
        got = dict(merged_tensors(r))
    assert "rounds differently from eager" in caplog.text
    assert False in kernel._verified.values()
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    for k, v in merged_tensors(r):
        assert torch.equal(got[k], v), k


def test_a_large_call_is_checked_on_its_first_elements(monkeypatch, caplog):
    """A large call's variant is checked against eager on a prefix only, and a sloppy compiler
    is still caught there; the full call then gives eager's result."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")  # compiled here even in the fast tier
    from evomerge.merging.kernel import compile as kernel

    seen = []

    def fn(out, d, scale):
        seen.append((d.numel(), d._base is not None))
        out.copy_((d.float() * scale).to(d.dtype))

    def sloppy(out, d, scale):
        fn(out, d, scale)
        out.view(torch.int16).add_(1)

    monkeypatch.setattr(kernel, "_verified", {})
    n = 5 * kernel._VERIFY_NUMEL + 7
    d = torch.randn(n).to(torch.bfloat16)
    whole, view = torch.empty_like(d), torch.empty(n + 3, dtype=torch.bfloat16)[3:]
    with caplog.at_level("WARNING", logger="evomerge.merging.kernel"):
        kernel.run(fn, sloppy, n, whole, d, torch.tensor(0.5), writes_first=True)
        kernel.run(fn, sloppy, n, view, d[:n], torch.tensor(0.5), writes_first=True)
    assert "rounds differently from eager" in caplog.text
    k = kernel._VERIFY_NUMEL
    # the check (compiled, eager) on a copy of the prefix, then eagerly on everything; the view's
    # call has the same variant, already found sloppy
    assert seen == [(k, False), (k, False), (n, False), (n, True)]
    expected = (d.float() * 0.5).to(torch.bfloat16)
    assert torch.equal(whole, expected) and torch.equal(view, expected)

    monkeypatch.setattr(kernel, "_verified", {})
    kernel.run(fn, fn, n, whole, d, torch.tensor(2.0), writes_first=True)
    assert list(kernel._verified.values()) == [True] and torch.equal(whole, (d.float() * 2).to(d.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ties", "zeros", "distinct"])
def test_the_engines_magnitude_order_finds_the_same_cuts(dtype, kind):
    """The engine's magnitude order (positions kept) and the scans used by evomerge merge agree
    on every k-th magnitude and tie cut, where equal magnitudes run to tens of thousands (a
    bucket refined in several gathers), where most of a task vector is zero, and where
    magnitudes are mostly distinct (no tie to cut)."""
    from evomerge.merging.kernel.sparsify import MagnitudeOrder, nth_equal_index

    g = torch.Generator().manual_seed(3)
    d = torch.randn(300_000, generator=g) * 0.01
    if kind != "distinct":
        d = d.round(decimals=3)  # many equal magnitudes
    if kind == "zeros":
        d = torch.where(torch.rand(d.shape, generator=g) < 0.9, 0.0, d)
    d = d.to(dtype)
    kept = MagnitudeOrder(d.abs(), positions=True)
    scan = MagnitudeOrder(d.abs())
    for k in (1, 17, 1000, 150_000, 280_000, 299_999, 300_000):
        for descending in (True, False):
            v, before, at = kept.kth(d, k, descending)
            sv, sbefore, sat = scan.kth(d, k, descending)
            assert (v.item(), before, at) == (sv.item(), sbefore, sat)
            equal = torch.nonzero(d.abs() == v).reshape(-1)  # every element of magnitude v, in index order
            assert equal.numel() == at and before < k <= before + at
            for nth in {1, max(1, at // 2), at}:
                assert kept.nth_equal(d, v, nth) == nth_equal_index(d, v, nth) == int(equal[nth - 1])


def test_a_failed_compilation_names_its_cause_and_runs_eagerly(monkeypatch, caplog):
    """Dynamo wraps the backend's error in one whose first line only names the backend: the
    warning names the inner error too, and the call gives eager's result."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")  # compiled here even in the fast tier
    from torch._dynamo.exc import BackendCompilerFailed

    from evomerge.merging.kernel import compile as kernel

    def fn(out, d, scale):
        out.copy_((d.float() * scale).to(d.dtype))

    def inductor():
        pass

    def failing(out, d, scale):
        raise BackendCompilerFailed(inductor, OSError("cannot write the kernel's shared object"), None)

    monkeypatch.setattr(kernel, "_verified", {})
    monkeypatch.setattr(kernel, "_compile_failed", False)
    n = 3 * kernel._COMPILE_MIN_NUMEL
    d, out = torch.randn(n).to(torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="evomerge.merging.kernel"):
        kernel.run(fn, failing, n, out, d, torch.tensor(0.5), writes_first=True)
    assert "BackendCompilerFailed: backend='inductor' raised: OSError: cannot write the kernel's shared object" \
        in caplog.text
    assert kernel._compile_failed
    assert torch.equal(out, (d.float() * 0.5).to(torch.bfloat16))


@pytest.mark.slow  # two processes compiling: half a minute
def test_a_pinned_process_compiles_beside_a_cache_of_native_kernels(families, tmp_path):
    """Inductor's caches are not keyed on ATEN_CPU_CAPABILITY: a kernel one process generated with
    the machine's vectors used to reach g++ without them in a pinned process (the zoo's builds),
    which then merged eagerly. Each capability now compiles into a cache of its own."""
    import os
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for("ties", families("fp32"), density=0.5)))
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env |= {"EVOMERGE_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for name, extra in (("native", {}), ("pinned", {"ATEN_CPU_CAPABILITY": "default"})):
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(tmp_path / name)],
                              env=env | extra, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "torch.compile failed" not in proc.stderr, proc.stderr
    assert (tmp_path / "inductor" / "aten-default").is_dir()
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == (tmp_path / "pinned" / "model.safetensors").read_bytes()
