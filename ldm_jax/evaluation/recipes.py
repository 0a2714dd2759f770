"""The paper's evaluation settings, by name (``evaluate.py --recipe=NAME``).

Each recipe fixes what a published number was measured with: the number of
samples, the sampler and its steps, eta and the guidance scale, the
reference split, and the metrics. The sources:

- [LD-README]: the model table of github.com/CompVis/latent-diffusion
  (README.md), which lists FID / IS / precision / recall of the released
  unconditional and class-conditional models with "N DDIM steps, eta=E".
- [LDM-paper]: Rombach et al., CVPR 2022 (arXiv:2112.10752), Tables 1-3
  and Sec. 4: FID on 50k samples for the unconditional and ImageNet
  models; MS-COCO 256x256 text-to-image on 30k samples of the validation
  set with 250 DDIM steps; the guided models (LDM-4-G, LDM-KL-8-G) use
  classifier-free guidance with scale 1.5.

Where a source does not state a value (eta of the guided models) the
recipe says so in ``note`` and uses DDIM's deterministic eta = 0; pass
``--eta`` to change it.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
  model: str  # configs/ldm.py variant the recipe belongs to
  num_samples: int
  sampler: str
  steps: int
  eta: float
  guidance: float
  metrics: tuple[str, ...]
  split: str  # the reference split of the model's dataset
  paper_fid: float | None
  source: str
  note: str = ""
  classes: str = "split"  # class-conditional models: labels from the split, or "balanced"


RECIPES: dict[str, Recipe] = {
    "celebahq": Recipe("celebahq_vq4", 50_000, "ddim", 200, 0.0, 1.0, ("fid", "is", "pr"), "train", 5.11,
                       "[LD-README] LDM-VQ-4 (200 DDIM steps, eta=0): FID 5.11, IS 3.29, P 0.72, R 0.49"),
    "ffhq": Recipe("ffhq_vq4", 50_000, "ddim", 200, 1.0, 1.0, ("fid", "is", "pr"), "train", 4.98,
                   "[LD-README] LDM-VQ-4 (200 DDIM steps, eta=1): FID 4.98, IS 4.50, P 0.73, R 0.50"),
    "lsun_churches": Recipe("lsun_churches_kl8", 50_000, "ddim", 400, 0.0, 1.0, ("fid", "is", "pr"), "train", 4.02,
                            "[LD-README] LDM-KL-8 (400 DDIM steps, eta=0): FID 4.02, IS 2.72, P 0.64, R 0.52"),
    "lsun_bedrooms": Recipe("lsun_bedrooms_vq4", 50_000, "ddim", 200, 1.0, 1.0, ("fid", "is", "pr"), "train", 2.95,
                            "[LD-README] LDM-VQ-4 (200 DDIM steps, eta=1): FID 2.95, IS 2.22, P 0.66, R 0.48"),
    "cin256_v2": Recipe("cin256_v2", 50_000, "ddim", 250, 0.0, 1.5, ("fid", "is", "pr"), "train", 3.60,
                        "[LDM-paper] Table 3, LDM-4-G: FID 3.60, IS 247.67 (250 DDIM steps, guidance 1.5)",
                        "eta is not stated in the source; 50 samples for each of the 1000 classes",
                        classes="balanced"),
    "txt2img_coco": Recipe("txt2img_kl8", 30_000, "ddim", 250, 0.0, 1.5, ("fid", "is"), "validation", 12.63,
                           "[LDM-paper] Table 2, LDM-KL-8-G on MS-COCO 256x256: FID 12.63, IS 30.29 "
                           "(30k validation captions, 250 DDIM steps, guidance 1.5)",
                           "eta is not stated in the source"),
}


def get_recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown evaluation recipe {name!r}; choose from {sorted(RECIPES)}")
  return RECIPES[name]
