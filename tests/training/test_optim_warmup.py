"""The reference's LambdaLR schedules (CompVis ldm/lr_scheduler.py) and torch AdamW, reproduced by
``ldm_jax.training.optim``: against a float64 re-implementation of the reference formulas at the
YAML values, and against torch's AdamW + LambdaLR over a few steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.training.optim import default_optim_config, lambda_multiplier, make_optimizer

# lsun_churches-ldm-kl-8.yaml scheduler_config (LambdaLinearScheduler, lists of one cycle).
CHURCHES = dict(warm_up_steps=[10000], f_start=[1e-6], f_max=[1.0], f_min=[1.0], cycle_lengths=[10000000000000])
# models/ldm/inpainting_big/config.yaml scheduler_config (LambdaWarmUpCosineScheduler).
INPAINTING = dict(warm_up_steps=1000, max_decay_steps=50000, lr_start=0.001, lr_max=0.1, lr_min=0.0001)
STEPS = [0, 1, 2, 7, 999, 1000, 1001, 4999, 9999, 10000, 10001, 25000, 49999, 50000, 60000, 1_234_567]


def reference_lambda_linear(n, warm_up_steps, f_start, f_max, f_min, cycle_lengths):
  """LambdaLinearScheduler.schedule(n) in float64, cycles included."""
  cum = np.cumsum([0] + list(cycle_lengths))
  cycle = next(i for i, c in enumerate(cum[1:]) if n <= c)
  n = n - cum[cycle]
  if n < warm_up_steps[cycle]:
    return (f_max[cycle] - f_start[cycle]) / warm_up_steps[cycle] * n + f_start[cycle]
  return f_min[cycle] + (f_max[cycle] - f_min[cycle]) * (cycle_lengths[cycle] - n) / cycle_lengths[cycle]


def reference_warmup_cosine(n, warm_up_steps, max_decay_steps, lr_start, lr_max, lr_min):
  """LambdaWarmUpCosineScheduler.schedule(n) in float64."""
  if n < warm_up_steps:
    return (lr_max - lr_start) / warm_up_steps * n + lr_start
  t = min((n - warm_up_steps) / (max_decay_steps - warm_up_steps), 1.0)
  return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))


def ours(kind, warmup, f_start, f_max, f_min, cycle):
  factor = jax.jit(lambda_multiplier(kind, warmup, f_start, f_max, f_min, cycle))
  return np.array([float(factor(jnp.int32(n))) for n in STEPS])


# float32 arithmetic: a few ulps of relative error.
RTOL = 2e-6


def test_lambda_linear_matches_the_reference_at_the_churches_values():
  want = np.array([reference_lambda_linear(n, **CHURCHES) for n in STEPS])
  got = ours("lambda_linear", 10000, 1e-6, 1.0, 1.0, 10**13)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
  assert got[0] == np.float32(1e-6) and got[STEPS.index(10000)] == 1.0


def test_lambda_linear_decays_after_warmup_as_the_reference():
  # f_min != f_max so that the after-warm-up branch is not a constant.
  values = dict(warm_up_steps=[1000], f_start=[0.01], f_max=[1.0], f_min=[0.25], cycle_lengths=[2_000_000])
  want = np.array([reference_lambda_linear(n, **values) for n in STEPS])
  np.testing.assert_allclose(ours("lambda_linear", 1000, 0.01, 1.0, 0.25, 2_000_000), want, rtol=RTOL, atol=0)
  # closed form half-way through the warm-up: f_start + (f_max - f_start) / 2
  half = float(lambda_multiplier("lambda_linear", 1000, 0.01, 1.0, 0.25, 2_000_000)(500))
  assert half == pytest.approx(0.505, rel=1e-6)


def test_lambda_warmup_cosine_matches_the_reference_at_the_inpainting_values():
  want = np.array([reference_warmup_cosine(n, **INPAINTING) for n in STEPS])
  got = ours("lambda_warmup_cosine", 1000, 0.001, 0.1, 0.0001, 50000)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
  assert got[-1] == pytest.approx(1e-4, rel=1e-6)  # past max_decay_steps: lr_min


def test_schedule_is_the_base_rate_times_the_factor():
  c = default_optim_config()
  c.update(learning_rate=5e-5, schedule="lambda_linear", warmup_steps=10000, f_start=1e-6)
  _, unscaled = make_optimizer(c, total_steps=100, global_batch=96)
  assert float(unscaled(5000)) == pytest.approx(5e-5 * (1e-6 + (1 - 1e-6) / 2), rel=1e-6)
  c.scale_lr_by_batch = True
  _, scaled = make_optimizer(c, total_steps=100, global_batch=96)
  assert float(scaled(5000)) == pytest.approx(96 * float(unscaled(5000)), rel=1e-6)


def test_bad_lambda_settings_name_the_keys():
  c = default_optim_config()
  c.update(schedule="lambda_linear", warmup_steps=0)
  with pytest.raises(ValueError, match=r"optim.schedule='lambda_linear' needs 1 <= optim.warmup_steps"):
    make_optimizer(c, total_steps=10)
  c.update(schedule="lambda_cosine", warmup_steps=10)
  with pytest.raises(ValueError, match="optim.schedule must be one of .*lambda_warmup_cosine"):
    make_optimizer(c, total_steps=10)


@pytest.mark.parametrize("kind", ["lambda_linear", "lambda_warmup_cosine"])
def test_adamw_with_lambda_schedule_matches_torch(kind):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal((5, 3))
  grads = [rng.standard_normal((5, 3)) for _ in range(6)]
  base = 0.05
  if kind == "lambda_linear":
    values = dict(warm_up_steps=[3], f_start=[0.1], f_max=[1.0], f_min=[0.5], cycle_lengths=[8])
    lam = lambda n: reference_lambda_linear(n, **values)  # noqa: E731
    settings = dict(warmup_steps=3, f_start=0.1, f_max=1.0, f_min=0.5, cycle_length=8)
  else:
    values = dict(warm_up_steps=2, max_decay_steps=5, lr_start=0.1, lr_max=1.0, lr_min=0.2)
    lam = lambda n: reference_warmup_cosine(n, **values)  # noqa: E731
    settings = dict(warmup_steps=2, f_start=0.1, f_max=1.0, f_min=0.2, cycle_length=5)

  param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
  opt = torch.optim.AdamW([param], lr=base)  # the reference's optimizer: default weight_decay 0.01
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lam)
  for g in grads:
    param.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    sched.step()

  c = default_optim_config()
  c.update(learning_rate=base, schedule=kind, **settings)
  assert c.weight_decay == 0.01
  tx, _ = make_optimizer(c, total_steps=len(grads))
  p = jnp.asarray(p0, jnp.float32)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = p + updates
  # float32 against float64 over six steps of size ~lr.
  np.testing.assert_allclose(np.asarray(p), param.detach().numpy(), rtol=0, atol=2e-6)
