"""CLIP image tower against transformers' CLIPVisionModelWithProjection, its preprocessing, CLIP score."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ldm_jax.evaluation import clip_image, clip_score  # noqa: E402
from ldm_jax.interop import clip_image as clip_image_io  # noqa: E402

TINY_HF = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=40,
               patch_size=8, projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random transformers model saved as a model directory, and ours loaded from it."""
  torch.manual_seed(0)
  ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_HF)).eval()
  with torch.no_grad():  # perturb everything (LayerNorms start at 1 / 0) so that every weight matters
    for p in ref.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  path = str(tmp_path_factory.mktemp("clip") / "tiny_clip")
  ref.save_pretrained(path)
  model, variables = clip_image_io.load_clip_vision_checkpoint(path)
  return ref, model, variables


def test_config_read_from_model_directory(tiny):
  _, model, _ = tiny
  for k, v in TINY_HF.items():
    assert getattr(model, k) == v, k


def test_embeddings_match_transformers(tiny):
  ref, model, variables = tiny
  pixels = np.random.default_rng(0).normal(size=(3, 3, 40, 40)).astype(np.float32)
  with torch.no_grad():
    want = ref.double()(pixel_values=torch.from_numpy(pixels).double())
  ref.float()
  got = jax.jit(model.apply)(variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  for ours, theirs in (("image_embeds", want.image_embeds), ("last_hidden_state", want.last_hidden_state)):
    theirs = theirs.numpy()
    rel = np.abs(np.asarray(got[ours], np.float64) - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-4, f"{ours}: max relative error {rel:.2e}"


def test_whole_clip_checkpoint_and_bad_inputs(tiny, tmp_path):
  ref, model, variables = tiny
  # A full CLIPModel file also holds text weights: only the vision part is taken.
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  state["text_model.embeddings.token_embedding.weight"] = np.ones((10, 4), np.float32)
  state["logit_scale"] = np.array(2.6592, np.float32)
  converted = clip_image_io.convert_clip_vision_state_dict(state, model)
  jax.tree.map(np.testing.assert_array_equal, converted, variables)
  with pytest.raises(ValueError, match="expects 40x40 images"):
    model.apply(variables, jnp.ones((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="no 'vision_model"):
    clip_image_io.convert_clip_vision_state_dict({"text_model.x.weight": np.ones(2)}, model)


@pytest.mark.parametrize("height,width", [(50, 70), (300, 260)])  # upsampling, antialiased downsampling
def test_preprocessing_matches_clip_image_processor(height, width):
  processor = transformers.CLIPImageProcessorPil()
  images = np.random.default_rng(height).integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
  # PIL rounds each 8-bit resize pass to integers, we keep floats: 0.5/255
  # after the first pass (amplified <= 1.25x by the second pass's taps) plus
  # 0.5/255 after the second, over min(std) = 0.261, bounds the difference
  # by 0.017 in normalised units. Noise images make the clipping between
  # passes matter (without it the difference reaches 0.29).
  want = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.asarray(clip_image.preprocess_for_clip(jnp.asarray(images)))
  assert got.shape == want.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(got, want, atol=0.017)
  assert np.abs(got - want).mean() < 0.006
  floats = jnp.asarray(images / 127.5 - 1.0, jnp.float32)  # the project's [-1, 1] range
  np.testing.assert_allclose(clip_image.preprocess_for_clip(floats), got, atol=1e-5)


def test_full_size_configs_parameter_counts():
  # transformers' openai/clip-vit-{large-patch14,base-patch32} vision tower + projection.
  for name, count in (("vit_l14", 303_966_208), ("vit_b32", 87_849_216)):
    model = clip_image.clip_vision_model(name)
    pixels = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), pixels)
    assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)) == count, name


def test_clip_score_closed_forms():
  rng = np.random.default_rng(1)
  img = rng.normal(size=(4, 6))
  ortho = rng.normal(size=(4, 6))
  ortho -= (np.sum(ortho * img, 1) / np.sum(img * img, 1))[:, None] * img  # Gram-Schmidt
  np.testing.assert_allclose(clip_score.clip_score_per_sample(img, img * 3.7), 100.0)
  np.testing.assert_allclose(clip_score.clip_score_per_sample(img, ortho), 0.0, atol=1e-12)
  np.testing.assert_allclose(clip_score.clip_score_per_sample(img, -img), 0.0)  # clamped at 0
  txt = rng.normal(size=(4, 6))
  cos = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img, txt)])
  np.testing.assert_allclose(clip_score.clip_score(img, txt), np.mean(100 * np.maximum(cos, 0)), rtol=1e-12)
  with pytest.raises(ValueError, match="one shape"):
    clip_score.clip_score(img, txt[:, :5])


def test_clip_score_for_images_with_text_encoder_callable(tiny):
  _, model, variables = tiny
  images = np.random.default_rng(2).uniform(-1, 1, size=(3, 40, 40, 3)).astype(np.float32)
  embed_fn = jax.jit(clip_image.clip_image_embed_fn(model))
  embed_images = lambda x: embed_fn(variables, x)  # noqa: E731
  projection = np.random.default_rng(3).normal(size=(7, 24))
  embed_texts = lambda ids: projection[ids].sum(axis=1)  # stands in for the CLIP text tower  # noqa: E731
  token_ids = np.array([[1, 2], [3, 4], [5, 6]])
  image_embeds = embed_images(images)
  assert image_embeds.shape == (3, 24)
  got = clip_score.clip_score_for_images(images, token_ids, embed_images=embed_images, embed_texts=embed_texts)
  assert got == pytest.approx(clip_score.clip_score(image_embeds, embed_texts(token_ids)), rel=1e-12)
  assert got == pytest.approx(
      clip_score.clip_score_for_images(images, embed_texts(token_ids), embed_images=embed_images), rel=1e-12)
