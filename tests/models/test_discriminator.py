"""PatchGAN discriminator: PyTorch parity (BatchNorm in train and eval mode),
the reference weight init, ActNorm's data-dependent init, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.interop.naming import torch_to_flax
from ldm_jax.models.discriminator import ActNorm, NLayerDiscriminator, patch_logits_size

X_SHAPE = (4, 32, 40, 3)


def torch_patchgan(torch, input_nc, ndf, n_layers):
  """The reference layer sequence, built from PyTorch layers."""
  nn = torch.nn
  layers, mult = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2**n, 8)
    stride = 2 if n < n_layers else 1
    conv = nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False)
    layers += [conv, nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
  layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
  model = nn.Module()
  model.main = nn.Sequential(*layers)
  return model


def test_matches_pytorch_in_train_and_eval_mode():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  ref = torch_patchgan(torch, 3, 8, 3)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "main.3" in name or "main.6" in name or "main.9" in name:
        p.add_(0.2 * torch.randn(p.shape))  # move BatchNorm affine params off 1 / 0
  disc = NLayerDiscriminator(ndf=8)
  template = jax.eval_shape(disc.init, jax.random.key(0), jax.ShapeDtypeStruct(X_SHAPE, jnp.float32))
  variables = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, template, what="PatchGAN")
  x = np.random.default_rng(0).normal(size=X_SHAPE).astype(np.float32)
  x_t = torch.from_numpy(x).permute(0, 3, 1, 2)

  train = jax.jit(lambda v, x: disc.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, updates = train(variables, x)
  ref.train()
  with torch.no_grad():
    ref_logits = ref.main(x_t).permute(0, 2, 3, 1).numpy()
  assert logits.shape == (4, patch_logits_size(32, 3), patch_logits_size(40, 3), 1) == ref_logits.shape
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  bn = ref.main[3]
  n = X_SHAPE[0] * 8 * 10  # values per channel at main_3 (two stride-2 convs)
  np.testing.assert_allclose(updates["batch_stats"]["main_3"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # PyTorch updates running_var with the unbiased batch variance, flax with the biased one.
  np.testing.assert_allclose(
      updates["batch_stats"]["main_3"]["var"], 0.9 + (bn.running_var.numpy() - 0.9) * (n - 1) / n, rtol=1e-5
  )

  ref.eval()  # running statistics from the update above
  variables = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, template, what="PatchGAN")
  with torch.no_grad():
    ref_eval = ref.main(x_t).permute(0, 2, 3, 1).numpy()
  ours_eval = jax.jit(lambda v, x: disc.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(ours_eval, ref_eval, rtol=1e-4, atol=1e-4)


def test_reference_weight_init():
  disc = NLayerDiscriminator()  # ndf=64, n_layers=3
  key = jax.random.key(0, impl="rbg")  # fast to compile; same initialisers
  variables = jax.jit(disc.init)(key, jnp.ones((1, 32, 32, 3)))
  params = variables["params"]
  assert sorted(params) == ["main_0", "main_11", "main_2", "main_3", "main_5", "main_6", "main_8", "main_9"]
  for conv in ("main_2", "main_5", "main_8"):
    w = np.asarray(params[conv]["kernel"])
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert "bias" not in params[conv]  # BatchNorm follows
  for bn in ("main_3", "main_6", "main_9"):
    scale = np.asarray(params[bn]["scale"])
    assert abs(scale.mean() - 1) < 0.01 and 0.01 < scale.std() < 0.03
    assert np.all(np.asarray(params[bn]["bias"]) == 0)
    np.testing.assert_array_equal(variables["batch_stats"][bn]["var"], 1.0)
  assert params["main_11"]["kernel"].shape == (4, 4, 512, 1)


def test_actnorm_data_dependent_init():
  h = np.random.default_rng(0).normal(loc=3.0, scale=2.0, size=(4, 5, 6, 7)).astype(np.float32)
  out, variables = jax.jit(ActNorm().init_with_output)(jax.random.key(0), h)
  np.testing.assert_allclose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(out, axis=(0, 1, 2), ddof=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(variables["params"]["loc"], -h.mean(axis=(0, 1, 2)), rtol=1e-5)

  disc = NLayerDiscriminator(ndf=8, use_actnorm=True)
  params = jax.eval_shape(disc.init, jax.random.key(0), jax.ShapeDtypeStruct(X_SHAPE, jnp.float32))["params"]
  assert set(params["main_3"]) == {"loc", "scale"} and "bias" in params["main_2"]


def test_bad_inputs_are_named():
  disc = NLayerDiscriminator(ndf=8)
  with pytest.raises(ValueError, match="3 channels"):
    jax.eval_shape(disc.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32))
  with pytest.raises(ValueError, match="too small for n_layers=3"):
    jax.eval_shape(disc.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 32, 3), jnp.float32))
