"""The captioned-shapes dataset: vocabulary, renderer, builder, splits."""

import itertools
import os
import sys

import numpy as np
import pytest

from ldm_jax.data import captioned_shapes as cs

SIZE = 32
COUNTS = (60, 20, 20)  # train, validation, test


def _read_split(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  builder = cs.build_captioned_shapes(tmp_path_factory.mktemp("shapes"), SIZE, *COUNTS, seed=3)
  return builder, {split: _read_split(builder, split) for split in ("train", "validation", "test")}


def _shard_bytes(builder):
  files = sorted(builder.data_path.glob("*.array_record-*"))
  assert len(files) == 3
  return [f.read_bytes() for f in files]


# --- vocabulary -------------------------------------------------------------


def _rgb_distance(a, b):
  return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def test_colours_are_well_separated_from_each_other_and_from_backgrounds():
  colours = list(cs.COLOURS.values())
  assert len(colours) >= 6 and len(cs.SHAPES) >= 5 and 2 <= len(cs.SIZES) <= 3
  assert min(_rgb_distance(a, b) for a, b in itertools.combinations(colours, 2)) >= 100
  assert min(_rgb_distance(c, t) for c in colours for t in cs.BACKGROUND_TONES.values()) >= 100


def test_withheld_pairs_leave_every_colour_and_shape_seen():
  pairs = cs.WITHHELD_PAIRS
  assert len(pairs) == len(cs.SHAPES) * len(cs.COLOURS) // 6
  assert sorted(c for c, _ in pairs) == sorted(cs.COLOURS)  # each colour withheld once only
  assert sorted(s for _, s in pairs) == sorted(cs.SHAPES)


def test_class_labels_round_trip_and_prompts():
  for label in range(cs.NUM_CLASSES):
    colour, shape = cs.class_pair(label)
    assert label == cs.SHAPES.index(shape) * len(cs.COLOURS) + list(cs.COLOURS).index(colour)
    assert cs.class_label(colour, shape) == label and cs.class_name(label) == f"{colour} {shape}"
  assert cs.single_object_prompt("red", "circle", "large") == "a large red circle"
  assert cs.single_object_prompt("blue", "star") == "a blue star"
  prompts = cs.held_out_prompts()
  assert len(prompts) == len(cs.WITHHELD_PAIRS) * len(cs.SIZES)
  assert all(cs.is_withheld(*cs.class_pair(label)) and cs.class_name(label) in p for p, label in prompts)
  with pytest.raises(ValueError, match="Unknown colour 'pink'"):
    cs.single_object_prompt("pink", "circle")
  with pytest.raises(ValueError, match="Unknown size 'huge'"):
    cs.single_object_prompt("red", "circle", "huge")


# --- renderer ---------------------------------------------------------------


def test_single_circle_matches_closed_form_geometry_and_colours():
  size = 64
  obj = cs.SceneObject("circle", "blue", "large", (0.5, 0.5))
  background = cs.Background(tones=("white",))
  scene = cs.render_scene([obj], size, background, rng=None)
  radius_px = cs.SIZES["large"] * size / 2
  area = np.count_nonzero(scene.segmentation == obj.label + 1)
  assert abs(area - np.pi * radius_px**2) / (np.pi * radius_px**2) < 0.03
  half = cs.SIZES["large"] / 2
  np.testing.assert_allclose(scene.boxes[0], [0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], atol=1.5 / size)
  np.testing.assert_array_equal(scene.image[size // 2, size // 2], cs.COLOURS["blue"])
  np.testing.assert_array_equal(scene.image[1, 1], cs.BACKGROUND_TONES["white"])
  # Anti-aliasing: some edge pixels are mixtures of the two colours.
  assert len(np.unique(scene.image.reshape(-1, 3), axis=0)) > 2


def test_renderer_is_deterministic_given_rng_and_later_objects_occlude():
  a = cs.SceneObject("square", "red", "large", (0.5, 0.45))
  b = cs.SceneObject("circle", "green", "small", (0.5, 0.6))
  background = cs.Background(tones=("black", "beige"), split="vertical", split_at=0.4)
  first = cs.render_scene([a, b], SIZE, background, np.random.default_rng(7))
  again = cs.render_scene([a, b], SIZE, background, np.random.default_rng(7))
  other = cs.render_scene([a, b], SIZE, background, np.random.default_rng(8))
  np.testing.assert_array_equal(first.image, again.image)
  assert not np.array_equal(first.image, other.image)
  # The circle lies inside the square and is drawn later: it stays visible.
  assert np.count_nonzero(first.segmentation == b.label + 1) > 0
  assert first.segmentation[16, 19] == b.label + 1


def test_single_object_scenes_render_the_requested_class():
  rng = np.random.default_rng(1)
  for colour, shape in cs.WITHHELD_PAIRS:
    objects, background = cs.sample_single_object(rng, colour, shape, "small")
    scene = cs.render_scene(objects, SIZE, background, rng)
    label = cs.class_label(colour, shape)
    assert cs.caption(objects) == cs.single_object_prompt(colour, shape, "small")
    visible = scene.segmentation == label + 1
    assert set(np.unique(scene.segmentation)) == {0, label + 1}
    # Every object pixel is the object's colour, within the renderer's jitter.
    core = visible & np.roll(visible, 1, 0) & np.roll(visible, -1, 0) & np.roll(visible, 1, 1) & np.roll(visible, -1, 1)
    assert np.abs(scene.image[core].astype(int) - cs.COLOURS[colour]).max() <= 8


# --- builder ----------------------------------------------------------------


def test_build_is_deterministic_idempotent_and_needs_no_tensorflow(built, tmp_path):
  builder, _ = built
  again = cs.build_captioned_shapes(tmp_path / "again", SIZE, *COUNTS, seed=3)
  assert _shard_bytes(again) == _shard_bytes(builder)
  stamps = [os.stat(f).st_mtime_ns for f in sorted(again.data_path.glob("*"))]
  cs.build_captioned_shapes(tmp_path / "again", SIZE, *COUNTS, seed=3)  # already there: no rebuild
  assert [os.stat(f).st_mtime_ns for f in sorted(again.data_path.glob("*"))] == stamps
  reseeded = cs.build_captioned_shapes(tmp_path / "other", SIZE, *COUNTS, seed=4)
  assert _shard_bytes(reseeded) != _shard_bytes(builder)
  assert "tensorflow" not in sys.modules


def test_examples_have_documented_fields(built):
  builder, splits = built
  assert [len(splits[s]) for s in ("train", "validation", "test")] == list(COUNTS)
  for ex in splits["train"]:
    n = ex["num_objects"]
    assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
    assert ex["segmentation"].shape == (SIZE, SIZE) and 1 <= n <= cs.MAX_OBJECTS
    assert ex["label"] == ex["objects"]["label"][0]
    assert np.all(ex["objects"]["label"][n:] == -1) and np.all(ex["objects"]["bbox"][n:] == 0)
  assert len({ex["num_objects"] for ex in splits["train"]}) == 3  # 1, 2 and 3 objects all occur


def test_withheld_pairs_only_in_test_and_always_as_main_object(built):
  _, splits = built
  for split in ("train", "validation"):
    for ex in splits[split]:
      labels = ex["objects"]["label"][: ex["num_objects"]]
      assert not any(cs.is_withheld(*cs.class_pair(label)) for label in labels)
  assert all(cs.is_withheld(*cs.class_pair(ex["label"])) for ex in splits["test"])
  seen = [cs.class_pair(l) for ex in splits["train"] for l in ex["objects"]["label"][: ex["num_objects"]]]
  assert {c for c, _ in seen} == set(cs.COLOURS) and {s for _, s in seen} == set(cs.SHAPES)


def _centre(box):
  return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_captions_name_every_object_and_their_placement(built):
  _, splits = built
  checked_relations = 0
  for ex in splits["train"] + splits["test"]:
    text = ex["caption"].decode()
    n = ex["num_objects"]
    names = [cs.class_name(l) for l in ex["objects"]["label"][:n]]
    assert text.startswith("a ") and text.split(" ", 2)[2].startswith(names[0])
    for name in names:
      assert name in text
    assert sum(text.count(size) for size in cs.SIZES) == n
    if n >= 2:  # relation recomputed from the rendered boxes
      (y0, x0), (y1, x1) = _centre(ex["objects"]["bbox"][0]), _centre(ex["objects"]["bbox"][1])
      dy, dx = y0 - y1, x0 - x1
      if abs(abs(dx) - abs(dy)) > 0.1:
        if abs(dx) > abs(dy):
          word = "to the left of" if dx < 0 else "to the right of"
        else:
          word = "above" if dy < 0 else "below"
        assert f"{names[0]} {word} a " in text
        checked_relations += 1
  assert checked_relations >= 10


def test_segmentation_and_boxes_agree(built):
  _, splits = built
  for ex in splits["train"]:
    n = ex["num_objects"]
    seg = ex["segmentation"]
    labels, boxes = ex["objects"]["label"][:n], ex["objects"]["bbox"][:n]
    assert set(np.unique(seg)) <= {0} | {int(l) + 1 for l in labels}
    for i, (label, box) in enumerate(zip(labels, boxes)):
      rows, cols = np.nonzero(seg == label + 1)
      pixel_box = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]) / SIZE
      inside = box[:2] - 1e-6 <= pixel_box[:2]
      assert inside.all() and (pixel_box[2:] <= box[2:] + 1e-6).all()
      if i == n - 1:  # drawn last, never occluded: its box is exactly its pixels' box
        np.testing.assert_allclose(pixel_box, box, atol=1e-6)


def test_data_source_reads_by_name_and_rejects_bad_sizes(built):
  import tensorflow_datasets as tfds

  from ldm_jax.data.captioned_shapes.captioned_shapes_dataset_builder import make_config

  builder, splits = built
  source = tfds.data_source(
      "captioned_shapes", split="validation", data_dir=builder.data_dir_root, download=False,
      builder_kwargs={"config": make_config(SIZE, *COUNTS, seed=3)},
  )
  np.testing.assert_array_equal(source[5]["image"], splits["validation"][5]["image"])
  with pytest.raises(ValueError, match="built at image sizes .* not 48"):
    make_config(48)


def test_single_object_variant_has_its_own_folder_and_one_object_per_scene(built, tmp_path):
  from ldm_jax.data.captioned_shapes.captioned_shapes_dataset_builder import make_config

  builder, splits = built
  assert {ex["num_objects"] for ex in splits["train"]} == {1, 2, 3}  # the default mixes 1-3
  single = cs.build_captioned_shapes(builder.data_dir_root, SIZE, *COUNTS, seed=3, max_objects=1)
  assert single.data_path != builder.data_path and "max1objects" in str(single.data_path)
  for split in ("train", "test"):
    examples = _read_split(single, split)
    assert all(ex["num_objects"] == 1 and (ex["objects"]["label"][1:] == -1).all() for ex in examples)
    for ex in examples:
      colour, shape = cs.class_pair(ex["label"])
      assert ex["caption"].decode() in (cs.single_object_prompt(colour, shape, size) for size in cs.SIZES)
  for bad in (0, cs.MAX_OBJECTS + 1):
    with pytest.raises(ValueError, match=f"max_objects must be between 1 and {cs.MAX_OBJECTS}, got {bad}"):
      make_config(SIZE, max_objects=bad)
