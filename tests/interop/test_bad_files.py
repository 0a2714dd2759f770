"""Checkpoints that cannot be used are refused with an error that says why
(issue: reliability, loading)."""

import pathlib
import re

import numpy as np
import pytest

from ldm_jax.interop import weights
from ldm_jax.interop.ldm_config import sd_sections_from_state_dict
from ldm_jax.interop.naming import StateDictMismatchError

KEYS_FILE = pathlib.Path(__file__).parents[1] / "fixtures" / "sd_v1_state_dict_keys.txt"


@pytest.fixture(scope="module")
def sd_v1_shapes() -> dict[str, np.ndarray]:
  """SD v1's whole state dict as zero-stride arrays: the right shapes, no memory."""
  text = KEYS_FILE.read_text()
  return {m.group(1): np.broadcast_to(np.float32(0), tuple(int(d) for d in m.group(2).split(",")))
          for m in re.finditer(r"^(\S+) \[([\d, ]+)\]$", text, re.M)}


def test_a_whole_sd_file_gives_its_architecture(sd_v1_shapes):
  sections = sd_sections_from_state_dict(sd_v1_shapes)
  assert sections["unet"]["channel_mult"] == (1, 2, 4, 4) and sections["cond_stage"]["preset"] == "sd_v1"


def test_a_unet_without_its_down_blocks_is_named_not_an_index_error(sd_v1_shapes):
  cut = {k: v for k, v in sd_v1_shapes.items() if not re.match(r"model\.diffusion_model\.input_blocks\.[1-9]", k)}
  with pytest.raises(StateDictMismatchError, match=r"(?s)checkpoint.s UNet does not match.*do not make a whole UNet"):
    sd_sections_from_state_dict(cut)


def test_a_missing_unet_key_is_named(sd_v1_shapes):
  cut = {k: v for k, v in sd_v1_shapes.items() if k != "model.diffusion_model.out.2.weight"}
  with pytest.raises(StateDictMismatchError, match=r"1 missing keys.*\n\s+model\.diffusion_model\.out\.2\.weight"):
    sd_sections_from_state_dict(cut)


class _Payload:
  """Stands for code a pickle would run on load."""


def test_a_pickle_with_code_is_refused_with_our_advice(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "model.ckpt")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": _Payload()}, path)
  with pytest.raises(weights.UnsafeCheckpointError) as error:
    weights.read_state_dict(path)
  message = str(error.value)
  assert "was refused" in message and "safetensors.torch.save_file" in message
  assert "will likely succeed" not in message  # torch's advice to turn the safety off is not passed on
