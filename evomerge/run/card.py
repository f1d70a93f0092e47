"""The model card an export writes beside the merged weights (``model/README.md``), as the Hugging
Face Hub reads one: front matter through ``huggingface_hub``'s :class:`ModelCard` (``base_model``:
the merged models; ``tags``; ``library_name``), then the parents, the search's and the held-out
scores against the parents and the default merge, the recipe, and the commands that rebuild the
model with mergekit or evomerge."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

TAGS = ["merge", "evomerge", "mergekit"]


def write_model_card(model_dir: Path, report: dict, recipe, table_text: Callable[[dict], str],
                     chain_lines: list[str]) -> Path:
    """``model_dir/README.md`` for the export ``report`` of ``recipe`` (a :class:`Recipe`, or the
    :class:`LayerPath` a data-flow search found). ``table_text`` renders the report's score table;
    ``chain_lines`` say how to rebuild the parents evomerge built (none when there are none)."""
    from huggingface_hub import ModelCard, ModelCardData

    models = recipe.model_names()
    method, base = recipe.to_dict()["merge_method"], getattr(recipe, "base_model", None)
    data = ModelCardData(base_model=models, tags=TAGS, library_name="transformers")
    cfg = report["provenance"]["config"]
    driver = cfg.get("driver", {})
    roles = [f"- `{m}`" + (" (base)" if m == base else "") for m in models]
    body = [
        f"# {report['run']}: candidate #{report['candidate']}", "",
        f"A merge of {len(models)} models with `{method}`, whose recipe evomerge "
        f"{report['provenance']['versions']['evomerge']} found by search ({driver.get('name', 'cma')}; suite "
        f"`{report['provenance']['suite']}`, seed {report['provenance']['seed']}).", "",
        "## Merged models", "", *roles, "",
        "## Scores", "",
        "On the suite's search split (what the search optimized) and, where scored, its held-out split, "
        "against each parent alone and the method's default recipe:", "",
        table_text(report), "",
        *[f"**Warning:** {w}.\n" for w in report.get("warnings") or []],
        "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "",
        "## Rebuilding it", "",
        "Save the recipe above as `recipe.yaml` (the export holds it beside `model/`), then run either of:", "",
        "```sh", "mergekit-yaml recipe.yaml OUT_DIR", "evomerge merge recipe.yaml OUT_DIR", "```", "",
        *chain_lines,
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path
