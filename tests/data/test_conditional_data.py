"""The conditional tasks' data: layouts, label maps, and make_iterator batches with low-res inputs and masks."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import layout as layout_lib
from ldm_jax.data.config import default_data_config
from ldm_jax.data.folder_source import decode_label_map
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.data.preprocess import Preprocess
from ldm_jax.data.transforms import Geometry
from ldm_jax.models.build import build_latent_diffusion
from ldm_jax.models.conditioners import layout_to_tokens, tokens_to_layout
from ldm_jax.models.latent_diffusion import corners_to_xywh

NUM_IMAGES, HEIGHT, WIDTH, SIZE, NUM_CLASSES = 6, 40, 48, 32, 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Images with a label map each (in a sibling folder) and a layout JSON beside each."""
  root = tmp_path_factory.mktemp("conditional")
  (root / "images" / "sub").mkdir(parents=True)
  (root / "labels" / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  maps, layouts = {}, {}
  for i in range(NUM_IMAGES):
    name = f"sub/{i}" if i % 2 else str(i)
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    maps[name] = rng.integers(0, NUM_CLASSES, (HEIGHT, WIDTH), dtype=np.uint8)
    Image.fromarray(maps[name]).save(root / "labels" / f"{name}.png")
    n = int(rng.integers(1, 5))
    corners = np.sort(rng.random((n, 2, 2)), axis=1)  # per box: (x0, y0) <= (x1, y1)
    layouts[name] = {"boxes": corners.reshape(n, 4).tolist(), "labels": rng.integers(0, 7, n).tolist()}
    (root / "images" / f"{name}.json").write_text(json.dumps(layouts[name]))
  return root, maps, layouts


def _config(root, **conditioning):
  c = default_data_config()
  c.update(source="folder", path=str(root / "images"), image_size=SIZE, num_threads=0)
  c.conditioning.update(conditioning)
  return c


def _batches(config, batch_size=NUM_IMAGES, **kw):
  return make_iterator(config, "train", global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1, **kw)


def _names():
  return sorted((f"sub/{i}" if i % 2 else str(i) for i in range(NUM_IMAGES)), key=lambda n: n + ".jpg")


def _nearest_resize_and_centre_crop(array):
  """Pillow's NEAREST resize (output pixel i reads input floor((i + 0.5) * in / out)), then the centre crop."""
  new_h, new_w = SIZE, round(WIDTH * SIZE / HEIGHT)
  rows = np.floor((np.arange(new_h) + 0.5) * HEIGHT / new_h).astype(int)
  cols = np.floor((np.arange(new_w) + 0.5) * WIDTH / new_w).astype(int)
  left = (new_w - SIZE) // 2
  return array[rows][:, cols][:, left:left + SIZE]


# ----------------------------------------------------------------------------- layouts

def test_layout_json_becomes_tfds_ordered_boxes_and_bad_files_are_named(tmp_path):
  path = tmp_path / "a.json"
  path.write_text(json.dumps({"boxes": [[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1]], "labels": [4, 0]}))
  boxes, labels = layout_lib.read_layout_json(path)
  np.testing.assert_allclose(boxes, [[0.2, 0.1, 0.9, 0.5], [0, 0, 1, 1]])  # (ymin, xmin, ymax, xmax)
  np.testing.assert_array_equal(labels, [4, 0])
  bad = {
      "not json": "{boxes",
      "boxes must be normalised": json.dumps({"boxes": [[0.5, 0.2, 0.1, 0.9]], "labels": [1]}),
      "2 boxes but 1 labels": json.dumps({"boxes": [[0, 0, 1, 1]] * 2, "labels": [1]}),
      "4 numbers": json.dumps({"boxes": [[0, 0, 1]], "labels": [1]}),
      "non-negative integers": json.dumps({"boxes": [[0, 0, 1, 1]], "labels": [-2]}),
      "'boxes' and 'labels'": json.dumps([1, 2]),
  }
  for problem, text in bad.items():
    path.write_text(text)
    with pytest.raises(ValueError, match=problem if problem != "not json" else "not valid JSON") as error:
      layout_lib.read_layout_json(path)
    assert str(path) in str(error.value)


def test_tfds_detection_objects_are_padded_or_truncated():
  record = {"objects": {"bbox": np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0], [0, 0, 1, 1]], np.float32),
                        "label": np.array([7, 2, 9], np.int64)}}
  padded = layout_lib.layout_from_tfds(record, 5)
  np.testing.assert_array_equal(padded["boxes"][:3], record["objects"]["bbox"])
  np.testing.assert_array_equal(padded["boxes"][3:], 0)
  np.testing.assert_array_equal(padded["box_labels"], [7, 2, 9, -1, -1])
  assert padded["num_objects"] == 3 and padded["box_labels"].dtype == np.int32
  cut = layout_lib.layout_from_tfds(record, 2)
  assert cut["boxes"].shape == (2, 4) and cut["num_objects"] == 2
  np.testing.assert_array_equal(cut["box_labels"], [7, 2])
  with pytest.raises(ValueError, match="3 boxes but 2 labels"):
    layout_lib.layout_from_tfds({"objects": {"bbox": record["objects"]["bbox"], "label": [1, 2]}}, 5)
  # The pipeline's path: a TFDS source renames the two fields to boxes / box_labels (any count per record).
  preprocess = Preprocess(Geometry(8), layout_max_objects=4)
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  for n in (3, 6):
    boxes = np.tile(record["objects"]["bbox"], (2, 1))[:n]
    out = preprocess({"image": image, "boxes": boxes, "box_labels": np.arange(n, dtype=np.int64)},
                     np.random.default_rng(0))
    assert out["num_objects"] == min(n, 4) and out["box_labels"].dtype == np.int32
    np.testing.assert_allclose(out["boxes"][:min(n, 4)], boxes[:4])
    np.testing.assert_array_equal(out["box_labels"], [0, 1, 2, -1] if n == 3 else [0, 1, 2, 3])


def test_folder_layouts_follow_the_crop_and_become_layout_tokens(folder):
  root, _, layouts = folder
  batch = next(_batches(_config(root, layout_max_objects=5)))
  assert batch["boxes"].shape == (NUM_IMAGES, 5, 4) and batch["box_labels"].shape == (NUM_IMAGES, 5)
  new_w = round(WIDTH * SIZE / HEIGHT)
  left = (new_w - SIZE) // 2
  for i, name in enumerate(_names()):
    x0, y0, x1, y1 = np.asarray(layouts[name]["boxes"]).T
    # The centre crop keeps all rows and cuts `left` columns: x moves, y does not.
    crop_x = lambda x: np.clip((x * new_w - left) / SIZE, 0, 1)  # noqa: E731
    expected = np.stack([y0, crop_x(x0), y1, crop_x(x1)], 1)
    keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    n = int(batch["num_objects"][i])
    assert n == keep.sum()
    np.testing.assert_allclose(batch["boxes"][i, :n], expected[keep], atol=1e-6)
    np.testing.assert_array_equal(batch["box_labels"][i, :n], np.asarray(layouts[name]["labels"])[keep])
    assert np.all(batch["box_labels"][i, n:] == -1) and np.all(batch["boxes"][i, n:] == 0)
  # What the layout cond stage reads: tokens that decode back to the boxes (x0, y0, w, h) on its grid.
  grid = 16
  tokens = layout_to_tokens(corners_to_xywh(batch["boxes"]), batch["box_labels"], batch["num_objects"],
                            num_classes=7, grid_size=grid, max_objects=5)
  boxes, labels, num, _ = tokens_to_layout(tokens, grid_size=grid, max_objects=5, vocab_size=grid * grid + 1)
  np.testing.assert_array_equal(num, batch["num_objects"])
  for i in range(NUM_IMAGES):
    n = num[i]
    np.testing.assert_array_equal(labels[i, :n], batch["box_labels"][i, :n])
    np.testing.assert_allclose(boxes[i, :n], corners_to_xywh(batch["boxes"])[i, :n], atol=1 / (grid - 1))


# ----------------------------------------------------------------------------- label maps

def test_label_maps_are_cropped_and_resized_with_the_image_exactly(folder):
  root, maps, _ = folder
  batch = next(_batches(_config(root, segmentation_folder=str(root / "labels"), num_seg_classes=NUM_CLASSES)))
  assert batch["segmentation"].shape == (NUM_IMAGES, SIZE, SIZE) and batch["segmentation"].dtype == np.uint8
  for i, name in enumerate(_names()):
    np.testing.assert_array_equal(batch["segmentation"][i], _nearest_resize_and_centre_crop(maps[name]))


def test_sixteen_bit_label_maps_keep_ids_above_255(tmp_path):
  ids = np.random.default_rng(1).integers(0, 1000, (HEIGHT, WIDTH)).astype(np.uint16)
  path = tmp_path / "m.png"
  Image.fromarray(ids).save(path)
  decoded = decode_label_map(path.read_bytes(), str(path), num_classes=1000)
  assert decoded.dtype == np.int32
  np.testing.assert_array_equal(decoded, ids)


def test_bad_label_maps_are_skipped_with_an_error_naming_the_file(folder, tmp_path):
  root, maps, _ = folder
  with pytest.raises(ValueError, match=r"m\.png: label map holds class id 12, but data.conditioning.num_seg_classes"):
    decode_label_map(np.full((4, 4), 12, np.uint8), "m.png", NUM_CLASSES)
  rgb = tmp_path / "rgb.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
  with pytest.raises(ValueError, match="rgb.png: a label map must be a single-channel PNG"):
    decode_label_map(rgb.read_bytes(), str(rgb))
  # In the pipeline: one map with an id past the classes, one missing, one of the wrong size.
  labels = tmp_path / "labels"
  for name, array in maps.items():
    (labels / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(labels / f"{name}.png")
  names = _names()
  Image.fromarray(np.full((HEIGHT, WIDTH), 200, np.uint8)).save(labels / f"{names[0]}.png")
  (labels / f"{names[1]}.png").unlink()
  Image.fromarray(maps[names[2]][:20]).save(labels / f"{names[2]}.png")
  it = _batches(_config(root, segmentation_folder=str(labels), num_seg_classes=NUM_IMAGES * 2), batch_size=3,
                drop_remainder=False)
  batch = next(it)
  assert it.num_skipped == 3 and len(batch["segmentation"]) == 3
  errors = " | ".join(it._recent_errors)
  assert f"{labels / names[0]}.png: label map holds class id 200" in errors
  assert f"has no label map '{labels / names[1]}.png'" in errors
  assert f"{labels / names[2]}.png: label map is 48x20 but its image {names[2]}.jpg is 48x40" in errors


# ----------------------------------------------------------------------------- make_iterator batches

def test_super_resolution_batches_carry_bsr_low_res_images(folder):
  root, _, _ = folder
  config = _config(root, low_res="bsr", low_res_factor=4)
  batch = next(_batches(config))
  assert batch["image"].shape == (NUM_IMAGES, SIZE, SIZE, 3)
  assert batch["low_res"].shape == (NUM_IMAGES, SIZE // 4, SIZE // 4, 3) and batch["low_res"].dtype == np.float32
  assert -1 <= batch["low_res"].min() and batch["low_res"].max() <= 1
  np.testing.assert_array_equal(batch["low_res"], next(_batches(config))["low_res"])  # a function of (seed, index)
  bicubic = next(_batches(_config(root, low_res="bicubic", low_res_factor=2)))
  assert bicubic["low_res"].shape == (NUM_IMAGES, SIZE // 2, SIZE // 2, 3)
  # The host transforms leave the crop alone: same images as without them.
  np.testing.assert_array_equal(batch["image"], next(_batches(_config(root)))["image"])


def test_inpainting_batches_carry_lama_masks(folder):
  root, _, _ = folder
  batch = next(_batches(_config(root, masks="lama", lama_preset="thick")))
  mask = batch["mask"]
  assert mask.shape == (NUM_IMAGES, SIZE, SIZE, 1) and mask.dtype == np.float32
  assert set(np.unique(mask)) == {0.0, 1.0}
  assert np.all(mask.mean(axis=(1, 2, 3)) > 0) and np.all(mask.mean(axis=(1, 2, 3)) <= 0.5)
  assert len({m.tobytes() for m in mask}) == NUM_IMAGES
  rectangles = next(_batches(_config(root, masks="rectangles")))["mask"]
  assert rectangles.shape == mask.shape
  assert "mask" not in next(_batches(_config(root))) and "low_res" not in next(_batches(_config(root)))


def test_bad_conditioning_settings_fail_at_start(folder):
  root, _, _ = folder
  cases = {
      "data.conditioning.low_res must be one of": dict(low_res="lanczos"),
      "low_res_factor must be a positive integer dividing data.image_size 32": dict(low_res="bsr", low_res_factor=3),
      "data.conditioning.masks must be one of": dict(masks="circles"),
      "lama_preset must be one of": dict(masks="lama", lama_preset="huge"),
      "layout_max_objects must be an integer >= 0": dict(layout_max_objects=-1),
      "does not exist": dict(segmentation_folder=str(root / "nowhere")),
  }
  for message, conditioning in cases.items():
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      _batches(_config(root, **conditioning))
  shapes = default_data_config()
  shapes.conditioning.segmentation_folder = str(root / "labels")
  with pytest.raises(ValueError, match="segmentation_folder needs source 'folder'"):
    _batches(shapes)


# ----------------------------------------------------------------------------- the model takes them

_TINY_FIRST_STAGE = dict(kind="kl", embed_dim=3, ddconfig=dict(
    double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=(1, 2, 2),
    num_res_blocks=1, attn_resolutions=(), dropout=0.0, norm_num_groups=8, use_mid_attn=False))


def _model(concat):
  extra = 4 if concat["kind"] == "inpaint" else 3
  unet = dict(image_size=8, in_channels=3 + extra, out_channels=3, model_channels=32, num_res_blocks=1,
              attention_resolutions=(), channel_mult=(1,), num_head_channels=16, norm_num_groups=8)
  return build_latent_diffusion(unet=unet, first_stage=_TINY_FIRST_STAGE, concat=concat)


def test_the_model_uses_the_batchs_low_res_and_mask_and_makes_them_when_absent():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  sr = _model(dict(kind="low_res", low_res_size=8, rescaler=dict(n_stages=0)))
  low_res = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  inputs = sr.host_inputs({"image": images, "low_res": low_res})
  np.testing.assert_array_equal(sr.derive_inputs(inputs, images)["low_res"], low_res)
  assert sr.derive_inputs({}, images)["low_res"].shape == (2, 8, 8, 3)  # device bicubic, as before
  with pytest.raises(ValueError, match="low_res_factor to image size / 8"):
    sr.derive_inputs({"low_res": rng.uniform(-1, 1, (2, 16, 16, 3))}, images)
  inpaint = _model(dict(kind="inpaint"))
  mask = (rng.random((2, SIZE, SIZE, 1)) < 0.3).astype(np.float32)
  device_mask = np.ones_like(mask)
  out = inpaint.derive_inputs(inpaint.host_inputs({"image": images, "mask": mask}), images, device_mask)
  np.testing.assert_array_equal(out["mask"], mask)  # the batch's mask wins over the step's
  np.testing.assert_allclose(out["masked_image"], images * (1 - mask))
  np.testing.assert_array_equal(inpaint.derive_inputs({}, images, device_mask)["mask"], device_mask)
  assert "mask" not in sr.host_inputs({"image": images, "mask": mask})
