"""The paper's evaluation settings as configs (the same values ``evaluate.py --recipe`` uses).

  python -c "from ldm_jax.config import load_config; print(load_config('configs/evaluation.py:cin256_v2'))"

Recipes: celebahq, ffhq, lsun_churches, lsun_bedrooms, cin256_v2, txt2img_coco.
Each value and its source are in ``ldm_jax/evaluation/recipes.py``.
"""

import dataclasses

import ml_collections

from ldm_jax.evaluation.recipes import RECIPES, get_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError(f"name a recipe: configs/evaluation.py:NAME with NAME in {sorted(RECIPES)}")
  recipe = dataclasses.asdict(get_recipe(arg))
  recipe["metrics"] = tuple(recipe["metrics"])
  return ml_collections.ConfigDict({"name": arg, **recipe})
