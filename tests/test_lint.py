"""The ruff configuration in pyproject.toml holds for the whole repository."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)]
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
