"""CLIP score of a captioned folder through ``evaluate.run`` against transformers' CLIPModel.

A tiny random CLIPModel and a tiny BPE vocabulary are written by the test
as a transformers model folder; ``evaluate.run`` loads both towers and the
tokenizer from it. The reference is the transformers model's projected
embeddings of the same preprocessed pixels and token ids, compared in
float64.
"""

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_clip_vocab import write_clip_vocab  # noqa: E402

from ldm_jax.apps.evaluate import EvalRequest, run  # noqa: E402
from ldm_jax.evaluation.clip_image import preprocess_for_clip  # noqa: E402

CAPTIONS = ["red cat", "cat", "a red car", "tea", "red", "cab act"]
LENGTH = 16


def _write_clip_folder(folder) -> None:
  vocab = write_clip_vocab(folder)
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=LENGTH,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
      projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # move every weight off its initial value (LayerNorms start at 1 / 0)
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip_score")
  _write_clip_folder(root / "clip")
  images = np.random.default_rng(0).integers(0, 256, size=(len(CAPTIONS), 40, 48, 3), dtype=np.uint8)
  (root / "images").mkdir()
  for i, (image, caption) in enumerate(zip(images, CAPTIONS)):
    Image.fromarray(image).save(root / "images" / f"{i}.png")
    (root / "images" / f"{i}.txt").write_text(caption)
  report = run(EvalRequest(images_dir=str(root / "images"), metrics=["clip_score"], clip_weights=str(root / "clip"),
                           image_size=40, batch_size=4, output=str(root / "report.json")))
  return root, images, report


def test_clip_score_matches_transformers(setup):
  root, images, report = setup
  model = transformers.CLIPModel.from_pretrained(str(root / "clip")).eval().double()
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "clip"))
  tokens = tokenizer(CAPTIONS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
  # The folder reader centre-crops 40x48 to 40x40; CLIP preprocessing then resizes to 32.
  crops = images[:, :, 4:44]
  pixels = np.asarray(preprocess_for_clip(crops, 32), np.float64).transpose(0, 3, 1, 2)
  with torch.no_grad():
    out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                pixel_values=torch.from_numpy(pixels))
  cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()  # both are unit vectors
  want = float(np.mean(100 * np.maximum(cos, 0)))
  assert report["metrics"]["clip_score"] == pytest.approx(want, rel=1e-4)
  assert report["clip"]["path"] == str(root / "clip") and len(report["clip"]["weights_sha256"]) == 64


def test_clip_score_needs_captions_and_weights(setup, tmp_path):
  root, _, _ = setup
  (tmp_path / "bare").mkdir()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 7).save(tmp_path / "bare" / "a.png")
  with pytest.raises(ValueError, match="caption for every image"):
    run(EvalRequest(images_dir=str(tmp_path / "bare"), metrics=["clip_score"], clip_weights=str(root / "clip"),
                    image_size=40, output=str(tmp_path / "r.json")))
  with pytest.raises(FileNotFoundError, match="--clip_weights=<empty> is not a folder"):
    run(EvalRequest(images_dir=str(tmp_path / "bare"), metrics=["clip_score"], output=str(tmp_path / "r.json")))
