"""File-system helpers for tests of what hetflow must never touch."""

from __future__ import annotations

import os


def snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` with its bytes: equal snapshots, untouched directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out
