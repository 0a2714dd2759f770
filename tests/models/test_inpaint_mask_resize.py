"""Inpainting masks reach latent size the way the references resize them:
``torch.nn.functional.interpolate(mask, size)`` in its default "nearest" mode
(diffusers' SD inpainting pipeline, the paper's inpaint script)."""

import numpy as np
import pytest

from ldm_jax.models.latent_diffusion import nearest_downsample

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("size_in,size_out", [((32, 32), (4, 4)), ((30, 44), (8, 6)), ((8, 8), (8, 8))])
def test_matches_torch_nearest(size_in, size_out):
  mask = (np.random.default_rng(0).uniform(size=(2, *size_in, 1)) > 0.5).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(mask).permute(0, 3, 1, 2), size=size_out)
  np.testing.assert_array_equal(np.asarray(nearest_downsample(mask, size_out)), want.permute(0, 2, 3, 1).numpy())
