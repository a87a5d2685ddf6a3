"""One entry point for every tokenizer kind: train (or fit) from a recipe, evaluate a saved one.

``aion tokenizer train|eval`` call these. A recipe's top-level ``kind`` (image / spectrum /
scalar) picks the trainer; a saved tokenizer's ``config.json`` picks the evaluator. Output
layout of ``train_tokenizer(recipe, data, out)``: ``out/tokenizer`` holds what
:func:`aion.tokenizers.pretokenize.load_tokenizer_set` loads (one ``save_pretrained``
directory, or one per scalar modality), next to ``recipe.yaml`` and ``train_metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from aion.config import load_yaml
from aion.tokenizers.base import CONFIG_NAME

PathLike = str | os.PathLike
KINDS = ("image", "spectrum", "scalar")
REPO_RECIPES = Path(__file__).resolve().parents[2] / "tokenizers"
DEFAULT_RECIPES = ("scalars.yaml", "image_cpu.yaml", "spectrum_cpu.yaml")
"""The CPU presets that make the default tokenizer set for the embedded mock universe."""


def default_recipes() -> list[Path]:
    paths = [REPO_RECIPES / name for name in DEFAULT_RECIPES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"default tokenizer recipes not found: {missing}; they live in the repository's "
                                "tokenizers/ folder (install from a checkout, or pass --recipe)")
    return paths


def recipe_kind(recipe: PathLike) -> str:
    data = load_yaml(recipe)
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"recipe {recipe}: top-level 'kind' must be one of {list(KINDS)}, got {kind!r}")
    return kind


def train_tokenizer(recipe: PathLike, data_dir: PathLike, out_dir: PathLike, progress: bool = True,
                    ) -> dict[str, Any]:
    """Train (image, spectrum) or fit (scalar) the tokenizer(s) of ``recipe`` on ``data_dir``."""
    kind = recipe_kind(recipe)
    out = Path(out_dir)
    if kind == "image":
        from aion.tokenizers.image import train_image_tokenizer

        return train_image_tokenizer(recipe, data_dir, out, progress=progress)
    if kind == "spectrum":
        from aion.tokenizers.spectrum import train_spectrum_tokenizer

        return train_spectrum_tokenizer(recipe, data_dir, out, progress=progress)
    import shutil

    from aion.tokenizers.scalar import fit_scalar_tokenizers, load_scalar_recipe, save_scalar_tokenizers

    t0 = time.perf_counter()
    rec = load_scalar_recipe(recipe)
    toks = fit_scalar_tokenizers(data_dir, rec)
    if not toks:
        raise ValueError(f"{data_dir}: none of the recipe's scalar modalities were found in surveys {rec.surveys}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_scalar_tokenizers(toks, tmp)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tmp.rename(out / "tokenizer")
    shutil.copyfile(recipe, out / "recipe.yaml")
    metrics = {"kind": "scalar", "modalities": sorted(toks), "fit_seconds": time.perf_counter() - t0}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _saved_kind(directory: Path) -> str:
    cfg = directory / CONFIG_NAME
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("tokenizer_type", "?")
    subs = [p for p in directory.iterdir() if (p / CONFIG_NAME).is_file()] if directory.is_dir() else []
    if subs and all(json.loads((p / CONFIG_NAME).read_text()).get("tokenizer_type") == "scalar" for p in subs):
        return "scalar"
    raise FileNotFoundError(f"{directory}: neither a saved tokenizer ({CONFIG_NAME}) nor a folder of saved "
                            "scalar tokenizers")


def evaluate_tokenizer(tokenizer_dir: PathLike, data_dir: PathLike, out_dir: PathLike,
                       max_objects: int | None = None) -> dict[str, Any]:
    """Held-out metrics (``out_dir/metrics.json``) and plots for a saved tokenizer (or scalar set)."""
    directory = Path(tokenizer_dir)
    if not (directory / CONFIG_NAME).is_file() and (directory / "tokenizer").is_dir():
        directory = directory / "tokenizer"  # the train output folder was given
    kind = _saved_kind(directory)
    if kind == "image":
        from aion.tokenizers.image import evaluate_image_tokenizer

        return evaluate_image_tokenizer(directory, data_dir, out_dir, max_objects=max_objects)
    if kind == "spectrum":
        from aion.tokenizers.spectrum import evaluate_spectrum_tokenizer

        return evaluate_spectrum_tokenizer(directory, data_dir, out_dir, max_objects=max_objects)
    if kind != "scalar":
        raise ValueError(f"{directory}: no evaluator for tokenizer type {kind!r}")
    from aion.tokenizers.scalar import evaluate_scalar_tokenizers

    return evaluate_scalar_tokenizers(directory, data_dir, out_dir, max_objects=max_objects)
