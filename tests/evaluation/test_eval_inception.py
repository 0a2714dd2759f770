"""The FID Inception: pytorch-fid key layout -> our converter -> same features as a torch reference.

pytorch-fid itself cannot be imported here (its torchvision import fails beside
this torch build), so the reference is a compact torch re-statement of its
network written in this file, independent of our code: torchvision's
Inception-v3 layer table with pytorch-fid's FID patches (avg pools without
padding in the average in Mixed_5*/6b-e/7b, a max pool in Mixed_7c, 1008
classes). A width multiplier shrinks both implementations for speed; the
full-size network is checked for names, shapes and parameter count.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.evaluation import features
from ldm_jax.evaluation import inception as inc
from ldm_jax.interop import inception as inc_io
from ldm_jax.interop import weights
from ldm_jax.interop.naming import StateDictMismatchError

torch = pytest.importorskip("torch")
tnn, F = torch.nn, torch.nn.functional

WIDTH = 0.125
FULL_SIZE_PARAMS = 23_850_960  # torchvision inception_v3 without aux logits, 1008 classes


def _w(c, width):
  return max(1, round(c * width))


class RefConv(tnn.Module):
  def __init__(self, cin, cout, width, k, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, _w(cout, width), k, stride=stride, padding=padding, bias=False)
    self.bn = tnn.BatchNorm2d(_w(cout, width), eps=0.001)
    self.out = _w(cout, width)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg3(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class RefA(tnn.Module):
  def __init__(self, cin, pool_features, w):
    super().__init__()
    self.branch1x1 = RefConv(cin, 64, w, 1)
    self.branch5x5_1 = RefConv(cin, 48, w, 1)
    self.branch5x5_2 = RefConv(_w(48, w), 64, w, 5, padding=2)
    self.branch3x3dbl_1 = RefConv(cin, 64, w, 1)
    self.branch3x3dbl_2 = RefConv(_w(64, w), 96, w, 3, padding=1)
    self.branch3x3dbl_3 = RefConv(_w(96, w), 96, w, 3, padding=1)
    self.branch_pool = RefConv(cin, pool_features, w, 1)
    self.out = _w(64, w) * 2 + _w(96, w) + _w(pool_features, w)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg3(x)),
    ], 1)


class RefB(tnn.Module):
  def __init__(self, cin, w):
    super().__init__()
    self.branch3x3 = RefConv(cin, 384, w, 3, stride=2)
    self.branch3x3dbl_1 = RefConv(cin, 64, w, 1)
    self.branch3x3dbl_2 = RefConv(_w(64, w), 96, w, 3, padding=1)
    self.branch3x3dbl_3 = RefConv(_w(96, w), 96, w, 3, stride=2)
    self.out = _w(384, w) + _w(96, w) + cin

  def forward(self, x):
    dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class RefC(tnn.Module):
  def __init__(self, cin, c7, w):
    super().__init__()
    c7w = _w(c7, w)
    self.branch1x1 = RefConv(cin, 192, w, 1)
    self.branch7x7_1 = RefConv(cin, c7, w, 1)
    self.branch7x7_2 = RefConv(c7w, c7, w, (1, 7), padding=(0, 3))
    self.branch7x7_3 = RefConv(c7w, 192, w, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = RefConv(cin, c7, w, 1)
    self.branch7x7dbl_2 = RefConv(c7w, c7, w, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = RefConv(c7w, c7, w, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = RefConv(c7w, c7, w, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = RefConv(c7w, 192, w, (1, 7), padding=(0, 3))
    self.branch_pool = RefConv(cin, 192, w, 1)
    self.out = 4 * _w(192, w)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for i in range(1, 6):
      d = getattr(self, f"branch7x7dbl_{i}")(d)
    return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class RefD(tnn.Module):
  def __init__(self, cin, w):
    super().__init__()
    self.branch3x3_1 = RefConv(cin, 192, w, 1)
    self.branch3x3_2 = RefConv(_w(192, w), 320, w, 3, stride=2)
    self.branch7x7x3_1 = RefConv(cin, 192, w, 1)
    self.branch7x7x3_2 = RefConv(_w(192, w), 192, w, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = RefConv(_w(192, w), 192, w, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = RefConv(_w(192, w), 192, w, 3, stride=2)
    self.out = _w(320, w) + _w(192, w) + cin

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class RefE(tnn.Module):
  def __init__(self, cin, w, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = RefConv(cin, 320, w, 1)
    self.branch3x3_1 = RefConv(cin, 384, w, 1)
    self.branch3x3_2a = RefConv(_w(384, w), 384, w, (1, 3), padding=(0, 1))
    self.branch3x3_2b = RefConv(_w(384, w), 384, w, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = RefConv(cin, 448, w, 1)
    self.branch3x3dbl_2 = RefConv(_w(448, w), 384, w, 3, padding=1)
    self.branch3x3dbl_3a = RefConv(_w(384, w), 384, w, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = RefConv(_w(384, w), 384, w, (3, 1), padding=(1, 0))
    self.branch_pool = RefConv(cin, 192, w, 1)
    self.out = _w(320, w) + 4 * _w(384, w) + _w(192, w)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
    return torch.cat([
        self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled),
    ], 1)


class RefFIDInception(tnn.Module):
  def __init__(self, w=1.0):
    super().__init__()
    self.Conv2d_1a_3x3 = RefConv(3, 32, w, 3, stride=2)
    self.Conv2d_2a_3x3 = RefConv(_w(32, w), 32, w, 3)
    self.Conv2d_2b_3x3 = RefConv(_w(32, w), 64, w, 3, padding=1)
    self.Conv2d_3b_1x1 = RefConv(_w(64, w), 80, w, 1)
    self.Conv2d_4a_3x3 = RefConv(_w(80, w), 192, w, 3)
    self.Mixed_5b = RefA(_w(192, w), 32, w)
    self.Mixed_5c = RefA(self.Mixed_5b.out, 64, w)
    self.Mixed_5d = RefA(self.Mixed_5c.out, 64, w)
    self.Mixed_6a = RefB(self.Mixed_5d.out, w)
    self.Mixed_6b = RefC(self.Mixed_6a.out, 128, w)
    self.Mixed_6c = RefC(self.Mixed_6b.out, 160, w)
    self.Mixed_6d = RefC(self.Mixed_6c.out, 160, w)
    self.Mixed_6e = RefC(self.Mixed_6d.out, 192, w)
    self.Mixed_7a = RefD(self.Mixed_6e.out, w)
    self.Mixed_7b = RefE(self.Mixed_7a.out, w, max_pool=False)
    self.Mixed_7c = RefE(self.Mixed_7b.out, w, max_pool=True)
    self.fc = tnn.Linear(self.Mixed_7c.out, 1008)

  def forward(self, images_01_NCHW):
    """pytorch-fid's InceptionV3.forward on [0, 1] images, plus the fc."""
    x = F.interpolate(images_01_NCHW, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool, self.fc(pool)


def _randomise(module, seed):
  """He-scaled convs and random BatchNorm statistics keep activations O(1) through the depth."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
      elif isinstance(m, tnn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
  return module.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Reference net, its state dict as a .pth, and our converted variables loaded back."""
  ref = _randomise(RefFIDInception(WIDTH), seed=0)
  tmp = tmp_path_factory.mktemp("inception")
  pth, npz = str(tmp / "pt_inception_tiny.pth"), str(tmp / "tiny.npz")
  torch.save(ref.state_dict(), pth)  # includes num_batches_tracked, as real files may
  model = inc.InceptionV3(width_multiplier=WIDTH)
  inc_io.convert_inception_checkpoint(pth, npz, model=model)
  return ref, model, inc_io.load_inception_params(npz, model=model)


def test_tiny_forward_matches_torch_reference(tiny):
  ref, model, variables = tiny
  rng = np.random.default_rng(0)
  images01 = rng.uniform(size=(3, 64, 80, 3)).astype(np.float32)  # non-square, upsampled to 299
  # Through the sharded extractor (2 devices: the batch of 3 is padded to 4).
  extract = features.ShardedFeatureExtractor(model.apply, variables, features.data_parallel_mesh(jax.devices()[:2]))
  out = extract(images01 * 2 - 1)
  with torch.no_grad():
    pool, logits = copy.deepcopy(ref).double()(torch.from_numpy(images01).double().permute(0, 3, 1, 2))
  bias = ref.fc.bias.detach().numpy()
  for name, want in (("pool", pool.numpy()), ("logits", logits.numpy()), ("logits_unbiased", logits.numpy() - bias)):
    got = np.asarray(out[name], np.float64)
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"{name}: max relative error {rel:.2e}"
  assert np.abs(pool.numpy()).max() > 0.1  # activations did not die out


def test_uint8_input_equals_scaled_float_input():
  images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 30, 3), dtype=np.uint8)
  np.testing.assert_allclose(
      inc.preprocess_for_inception(jnp.asarray(images)),
      inc.preprocess_for_inception(jnp.asarray(images / 127.5 - 1.0, jnp.float32)), atol=1e-6)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    inc.preprocess_for_inception(jnp.ones((2, 3, 32, 32)))


def test_full_size_names_shapes_and_parameter_count(tmp_path):
  ref = RefFIDInception(1.0)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert sum(p.numel() for p in ref.parameters()) == FULL_SIZE_PARAMS
  variables = inc_io.convert_inception_state_dict(state)  # every key matched and shape-checked
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == FULL_SIZE_PARAMS
  shapes = jax.eval_shape(inc.InceptionV3().apply, variables, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
  assert {k: v.shape for k, v in shapes.items()} == {"pool": (2, 2048), "logits": (2, 1008),
                                                     "logits_unbiased": (2, 1008)}
  # The command-line converter writes the same variables.
  pth, out = str(tmp_path / "full.pth"), str(tmp_path / "full.safetensors")
  torch.save(ref.state_dict(), pth)
  inc_io.main(["--convert", pth, "--out", out])
  loaded = inc_io.load_inception_params(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_conversion_and_loading_errors(tmp_path):
  model = inc.InceptionV3(width_multiplier=WIDTH)
  state_ok = {k: v.numpy() for k, v in RefFIDInception(WIDTH).state_dict().items()}
  state = dict(state_ok)
  state["Mixed_5b.branch_pool.conv.weight"] = state["Mixed_5b.branch_pool.conv.weight"][:1]
  del state["fc.bias"]
  with pytest.raises(StateDictMismatchError, match=r"(?s)fc/bias.*Mixed_5b\.branch_pool\.conv\.weight"):
    inc_io.convert_inception_state_dict(state, model)
  wrong_width = str(tmp_path / "wrong_width.npz")
  weights.save_variables(wrong_width, inc_io.convert_inception_state_dict(state_ok, model))
  wider = inc.InceptionV3(width_multiplier=0.25)
  with pytest.raises(StateDictMismatchError, match=r"(?s)wrong_width\.npz.*Conv2d_1a_3x3/bn/mean: file \(4,\)"):
    inc_io.load_inception_params(wrong_width, model=wider)
  missing = str(tmp_path / "nowhere" / "fid_inception.npz")
  with pytest.raises(FileNotFoundError, match=r"(?s)nowhere/fid_inception\.npz.*--convert"):
    inc_io.load_inception_params(missing)


@pytest.mark.slow
def test_full_size_matches_pytorch_fid_when_installed(monkeypatch):
  """pytorch-fid's own InceptionV3 wrapper (resize, scaling, blocks) on random full-size weights."""
  pf = pytest.importorskip("pytorch_fid.inception")  # needs a torchvision that imports beside torch

  net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    setattr(net, name, pf.FIDInceptionC(768, channels_7x7=c7))
  net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
  net = _randomise(net, seed=1)
  monkeypatch.setattr(pf, "fid_inception_v3", lambda: net)  # instead of downloading the weights
  wrapper = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

  images01 = np.random.default_rng(2).uniform(size=(2, 80, 96, 3)).astype(np.float32)
  with torch.no_grad():
    pool = wrapper(torch.from_numpy(images01).permute(0, 3, 1, 2))[0].flatten(1)
    logits = net.fc(pool).numpy()
  variables = inc_io.convert_inception_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
  out = jax.jit(inc.InceptionV3().apply)(variables, jnp.asarray(images01 * 2 - 1))
  for name, want in (("pool", pool.numpy()), ("logits", logits)):
    rel = np.abs(np.asarray(out[name]) - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"{name}: max relative error {rel:.2e}"
