"""Smoke test of benchmarks/compression_study.py (--tiny): the pixel-space LDM-1 trains with the periodic
Frechet distance, the report and the figure are written; the per-f configs fit together and their
measured FLOPs scale with the latent area."""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks import compression_study as study  # noqa: E402
from ldm_jax.assembly import FirstStageWeights, build_model, random_first_stage  # noqa: E402
from ldm_jax.models.first_stage import make_first_stage  # noqa: E402


@pytest.mark.slow  # trains, samples and judges end to end (about a minute of CPU, mostly compiles)
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 8 samples, 64 judge features: a singular covariance
def test_tiny_study_writes_report_and_figure(tmp_path):
  workdir, settings = study.parse_args(["--workdir", str(tmp_path / "cs"), "--tiny", "--factors", "1"])
  assert settings.factors == (1,) and settings.tiny and settings.ldm_steps == 4
  report = study.run_study(workdir, settings)
  saved = json.loads((tmp_path / "cs" / study.RESULTS_FILE).read_text())
  assert saved["runs"] == json.loads(json.dumps(report["runs"]))
  (run,) = saved["runs"]
  assert run["f"] == 1 and run["first_stage"]["kind"] == "identity"
  assert run["first_stage"]["scale_factor"] > 1.0  # 1 / std of pixels in [-1, 1]
  assert abs(run["first_stage"]["floor_fd"]) < 1e-3  # the identity's round trip loses nothing
  assert run["cost"]["latent_shape"] == [32, 32, 3] and run["cost"]["flops_per_step"] > 0
  assert run["ldm"]["steps"] == 4
  assert [step for step, _ in run["ldm"]["fd"]] == [2, 4]  # eval_every=2, one point per step
  assert all(np.isfinite(v) and v >= 0 for _, v in run["ldm"]["fd"])
  image = np.asarray(Image.open(tmp_path / "cs" / study.FIGURE_FILE).convert("RGB"))
  assert image.shape == (520, 1200, 3)
  assert (image == study.COLOURS[1]).all(-1).sum() > 50  # LDM-1's line and legend are drawn


def test_bad_factor_is_refused(capsys):
  with pytest.raises(SystemExit):
    study.parse_args(["--factors", "1,3"])
  assert "--factors: each must be one of (1, 2, 4, 8)" in capsys.readouterr().err


@pytest.mark.parametrize("f", [2, 4, 8])
def test_configs_fit_each_factor(f, tmp_path):
  settings = study.StudySettings(tiny=False)
  ae = study.autoencoder_config(f, settings)
  assert make_first_stage(ae.model).downsample_factor == f
  assert ae.data.shapes.to_dict() == study.ldm_config(1, settings, str(tmp_path)).data.shapes.to_dict()
  ldm = study.ldm_config(f, settings, str(tmp_path))
  assert ldm.first_stage.checkpoint == str(tmp_path / f"f{f}" / "autoencoder")
  build_model(ldm, ae.model.to_dict(), 1.0)  # checks image size, latent channels and UNet in/out channels
  assert ldm.unet.image_size == 32 // f and ldm.eval.feature_net == "shapes_judge"


def test_flops_scale_with_latent_area():
  settings = study.tiny_settings((1, 2))
  costs = {}
  for f in (1, 2):
    config = study.ldm_config(f, settings, "unused")
    if f == 2:
      ae = study.autoencoder_config(2, settings)
      config.first_stage.model = ae.model
      config.first_stage.random_init = True
    fs = random_first_stage(config.first_stage, config.data.image_size, abstract=True)
    costs[f] = study.train_step_cost(config, FirstStageWeights(fs.variables, fs.model_config, 1.0))
  assert costs[1]["unet_params"] == costs[2]["unet_params"]  # one UNet for every f
  # 4x the latent pixels: the convolutions' FLOPs 4x, attention's more; the optimiser's the same.
  ratio = costs[1]["flops_per_step"] / costs[2]["flops_per_step"]
  assert 3.0 < ratio < 6.0, ratio
