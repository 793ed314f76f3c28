"""Several processes, one per host, running the same program (docs/distributed.md).

`initialize` joins this process to a group through `jax.distributed.initialize`:
a coordinator address (host:port of process 0), the number of processes and
this process's id, from arguments or else from the environment variables below
(what `python -m hetflow.launch` sets). After it, `jax.devices()` lists every
process's devices and a mesh over them (hetflow.models.sharding.make_mesh)
spans the hosts; XLA's CPU collectives between processes go over TCP (gloo,
jax's default for CPU on jax 0.10.2, set here explicitly).

It must run before anything touches a jax backend (the first jax.devices() or
computation); the launchers call it first thing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

ENV_COORDINATOR = "HETFLOW_COORDINATOR"  # host:port of process 0's coordinator
ENV_NUM_PROCESSES = "HETFLOW_NUM_PROCESSES"
ENV_PROCESS_ID = "HETFLOW_PROCESS_ID"


class DistributedError(RuntimeError):
  """The process group's settings are incomplete or wrong, or jax started too early."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process stands among the processes of one run.

  Attributes:
    coordinator: host:port of process 0's coordinator service.
    num_processes: processes in the run (one per host).
    process_id: this process's index, 0 .. num_processes - 1.
  """

  coordinator: str
  num_processes: int
  process_id: int

  def __post_init__(self):
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"coordinator={self.coordinator!r}; expected host:port of process"
                             " 0 (e.g. 10.0.0.1:12355), reachable from every host.")
    if not _is_int(self.num_processes) or self.num_processes < 1:
      raise DistributedError(f"num_processes={self.num_processes!r}; expected an int >= 1.")
    if not _is_int(self.process_id) or not 0 <= self.process_id < self.num_processes:
      raise DistributedError(f"process_id={self.process_id!r}; expected an int in"
                             f" [0, {self.num_processes}).")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"${name}={value!r}; expected an integer.") from None


def process_group(coordinator: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None,
                  environ: Mapping[str, str] | None = None) -> ProcessGroup | None:
  """The group the arguments, else the environment, describe; None for a single process.

  Raises:
    DistributedError: some settings given but not all, or bad values.
  """
  environ = os.environ if environ is None else environ
  coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(
      environ, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if all(v is None for v in given.values()) or num_processes == 1:
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedError(
        f"several processes need a coordinator, num_processes and process_id; {missing} not"
        f" given (flags --{' --'.join(missing)}, or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES},"
        f" ${ENV_PROCESS_ID}).")
  return ProcessGroup(coordinator, num_processes, process_id)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> ProcessGroup | None:
  """Joins the process group (jax.distributed.initialize); nothing for a single process.

  Args:
    coordinator: host:port of process 0 (default: $HETFLOW_COORDINATOR).
    num_processes: processes in the run (default: $HETFLOW_NUM_PROCESSES).
    process_id: this one's index (default: $HETFLOW_PROCESS_ID).
    timeout_s: how long to wait for every process to join.

  Returns:
    The group, or None when this is a single-process run.

  Raises:
    DistributedError: bad or partial settings, or a jax backend already started.
  """
  group = process_group(coordinator, num_processes, process_id)
  if group is None:
    return None
  # Cross-process collectives on CPU: gloo over TCP (jax 0.10.2's default, stated).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                               initialization_timeout=timeout_s)
  except RuntimeError as e:
    raise DistributedError(
        f"jax.distributed.initialize failed for process {group.process_id} of"
        f" {group.num_processes} (coordinator {group.coordinator}): {e}. It must run before"
        " any jax computation or jax.devices(); every process must reach the coordinator.")\
        from e
  return group
