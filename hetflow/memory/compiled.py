"""Builds hetflow's C++ sources into shared libraries in the cache, once per key.

Two libraries use it: the disk reader's batched `preadv` loop (`hetflow.memory.reader`)
and the native matrix-vector kernels (`hetflow.models.native`). A library is compiled
with the system's C++ compiler (`$HETFLOW_CXX`, else `g++` or `c++` on the PATH) into
`<directory>/<key>/`, where the key hashes everything the binary depends on, under a file
lock so that concurrent processes build it once, and renamed into place so that no
process loads half a library. Callers fall back to pure Python or XLA when it fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence


class BuildError(RuntimeError):
  """A native library could not be compiled or loaded."""


def switched_off() -> bool:
  """Whether HETFLOW_NATIVE=0 (or off, false, no) asks for the pure Python / XLA paths."""
  return os.environ.get("HETFLOW_NATIVE", "1").strip().lower() in ("0", "off", "false", "no")


def compiler() -> str | None:
  """The C++ compiler to build with: $HETFLOW_CXX, else g++ or c++ on the PATH (None: none)."""
  return os.environ.get("HETFLOW_CXX") or shutil.which("g++") or shutil.which("c++")


def compiler_version(cxx: str) -> str:
  """`cxx --version`'s output (part of every build key), or BuildError if it does not run."""
  try:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                          timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise BuildError(f"the C++ compiler {cxx!r} does not run ({e}); install g++ or set"
                     " HETFLOW_CXX to a C++17 compiler (HETFLOW_NATIVE=0 silences"
                     " this).") from None


def build_key(parts: Sequence[str]) -> str:
  """A short hash of what a library depends on (sources' text, compiler, flags, ...)."""
  h = hashlib.sha256()
  for part in parts:
    h.update(part.encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def build(cxx: str, sources: Sequence[str], flags: Sequence[str], folder: str,
          library: str) -> str:
  """Compiles `sources` into `folder`/`library` unless it is there already.

  Args:
    cxx: the C++ compiler.
    sources: the source files.
    flags: compiler flags (with -shared -fPIC for a library).
    folder: the library's folder, named by its build key (`build_key`).
    library: the library's file name.

  Returns:
    The path of the shared library.

  Raises:
    BuildError: the compiler is missing or failed (its output in the message).
  """
  path = os.path.join(folder, library)
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
    if os.path.exists(path):
      return path
    # Written beside its final name and renamed: a reader never sees half a library.
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
      cmd = [cxx, *flags, *sources, "-o", tmp]
      try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
      except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{' '.join(cmd)} did not run: {e}") from None
      if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path
