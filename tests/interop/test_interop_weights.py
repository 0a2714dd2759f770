"""Reading published state dicts and storing converted variables."""

import numpy as np
import pytest

from ldm_jax.interop import weights


def _variables(rng):
  return {"params": {"fc": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)}},
          "batch_stats": {"bn": {"mean": rng.normal(size=(4,)).astype(np.float32)}}}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_variables_round_trip(tmp_path, suffix):
  variables = _variables(np.random.default_rng(0))
  path = str(tmp_path / f"sub/vars{suffix}")
  weights.save_variables(path, variables)
  loaded = weights.load_variables(path)
  assert loaded.keys() == variables.keys()
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])


def test_torch_file_nested_and_bfloat16(tmp_path):
  torch = pytest.importorskip("torch")
  w = torch.randn(5, 3)
  path = str(tmp_path / "ckpt.pth")
  torch.save({"state_dict": {"layer.weight": w.to(torch.bfloat16), "layer.bias": torch.randn(5)}}, path)
  state = weights.read_state_dict(path)
  assert state["layer.weight"].dtype == np.float32
  np.testing.assert_array_equal(state["layer.weight"], w.to(torch.bfloat16).float().numpy())


def test_file_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)my weights file not found: .*absent\.npz\. Run the converter"):
    weights.load_variables(str(tmp_path / "absent.npz"), what="my weights", how_to_get="Run the converter.")
  (tmp_path / "w.onnx").write_bytes(b"0")
  with pytest.raises(ValueError, match="unknown state dict format"):
    weights.read_state_dict(str(tmp_path / "w.onnx"))
  with pytest.raises(ValueError, match="must end in one of"):
    weights.save_variables(str(tmp_path / "w.pkl"), _variables(np.random.default_rng(1)))


def test_safetensors_folder_bfloat16_and_preferred_prefix(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file

  w = torch.randn(4, 3).to(torch.bfloat16)
  save_file({"cond_stage_model.a.weight": w, "model.b.weight": torch.ones(2)}, str(tmp_path / "1.safetensors"))
  save_file({"cond_stage_model.c.bias": torch.zeros(3, dtype=torch.float16)}, str(tmp_path / "2.safetensors"))
  state = weights.read_state_dict(str(tmp_path))  # a folder: every .safetensors in it
  assert sorted(state) == ["cond_stage_model.a.weight", "cond_stage_model.c.bias", "model.b.weight"]
  assert state["cond_stage_model.a.weight"].dtype == np.float32 and state["cond_stage_model.c.bias"].dtype == np.float16
  np.testing.assert_array_equal(state["cond_stage_model.a.weight"], w.float().numpy())
  assert sorted(weights.read_state_dict(str(tmp_path), prefer_prefix="cond_stage_model.")) == [
      "cond_stage_model.a.weight", "cond_stage_model.c.bias"]
  only_b = weights.read_state_dict(str(tmp_path / "1.safetensors"), prefer_prefix="model.")
  assert list(only_b) == ["model.b.weight"]
  # A prefix no key has leaves the state dict whole.
  assert len(weights.read_state_dict(str(tmp_path / "1.safetensors"), prefer_prefix="first_stage_model.")) == 2
  # In-memory state dicts of torch tensors or arrays.
  from_tensors = weights.read_state_dict({"x": w, "y": np.ones(2, np.float32)})
  assert from_tensors["x"].dtype == np.float32 and isinstance(from_tensors["y"], np.ndarray)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors files"):
    weights.read_state_dict(str(tmp_path / "empty"))
