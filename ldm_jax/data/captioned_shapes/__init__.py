"""The built-in captioned-shapes dataset (a TFDS builder, generated locally).

1-3 coloured geometric shapes per image, with an English caption naming
every shape and how they are placed, the main object's class label, boxes,
and a per-pixel segmentation map. The test split holds colour-shape pairs
never seen in training (``WITHHELD_PAIRS``).
"""

from ldm_jax.data.captioned_shapes.captioned_shapes_dataset_builder import (
    IMAGE_SIZES,
    CaptionedShapes,
    build_captioned_shapes,
    make_example,
)
from ldm_jax.data.captioned_shapes.render import RenderedScene, render_scene
from ldm_jax.data.captioned_shapes.scene import (
    MAX_OBJECTS,
    Background,
    SceneObject,
    caption,
    sample_scene,
    sample_single_object,
)
from ldm_jax.data.captioned_shapes.vocabulary import (
    BACKGROUND_TONES,
    COLOURS,
    NUM_CLASSES,
    SHAPES,
    SIZES,
    WITHHELD_PAIRS,
    caption_words,
    class_label,
    class_name,
    class_pair,
    held_out_prompts,
    is_withheld,
    single_object_prompt,
)

__all__ = [
    "BACKGROUND_TONES",
    "COLOURS",
    "IMAGE_SIZES",
    "MAX_OBJECTS",
    "NUM_CLASSES",
    "SHAPES",
    "SIZES",
    "WITHHELD_PAIRS",
    "Background",
    "CaptionedShapes",
    "RenderedScene",
    "SceneObject",
    "build_captioned_shapes",
    "caption",
    "caption_words",
    "class_label",
    "class_name",
    "class_pair",
    "held_out_prompts",
    "is_withheld",
    "make_example",
    "render_scene",
    "sample_scene",
    "sample_single_object",
    "single_object_prompt",
]
