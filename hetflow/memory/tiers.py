"""Memory kinds and shardings for the device and host tiers, made in one place.

Placement is expressed as a ``jax.sharding.SingleDeviceSharding`` carrying a
memory kind, so that every transfer is an explicit ``jax.device_put`` and tests
can run under ``jax.transfer_guard("disallow")``.

On CPU (checked on jax 0.10.2): a CPU device lists three memories,
``device``, ``pinned_host`` and ``unpinned_host``, all usable. They are the same
RAM, so a "host -> device" transfer is a memcpy (or nothing: ``device_put`` of
a suitably aligned numpy array aliases it, see ``buffers.py``). Two quirks
seen there: the outputs of a computation on ``pinned_host`` arrays stay in
``pinned_host``, but the outputs of a computation on ``unpinned_host`` arrays
land in ``device``.
"""

from __future__ import annotations

import jax

DEVICE_KIND = "device"
_HOST_KINDS = ("pinned_host", "unpinned_host")  # in order of preference


def _default_device(device: jax.Device | None) -> jax.Device:
  return jax.devices()[0] if device is None else device


def memory_kinds(device: jax.Device | None = None) -> tuple[str, ...]:
  """The memory kinds ``device`` can address, e.g. ``("device", "pinned_host", ...)``."""
  device = _default_device(device)
  try:
    return tuple(m.kind for m in device.addressable_memories())
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    # Backends without the memories API only have their default memory.
    return (DEVICE_KIND,)


def host_memory_kind(device: jax.Device | None = None) -> str | None:
  """The memory kind to use for the host tier.

  Pinned memory is preferred: on a GPU it is what DMA engines read at full
  link speed and what lets transfers overlap compute. On CPU both host kinds
  are the same RAM as ``device``.

  Args:
    device: defaults to the first jax device.

  Returns:
    ``"pinned_host"`` if the device lists it, else ``"unpinned_host"`` if it
    lists that, else None (the backend cannot express host placement).
  """
  kinds = memory_kinds(device)
  for kind in _HOST_KINDS:
    if kind in kinds:
      return kind
  return None


def device_sharding(device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
  """Sharding that places an array in ``device``'s own memory (the device tier)."""
  device = _default_device(device)
  return jax.sharding.SingleDeviceSharding(device, memory_kind=DEVICE_KIND)


def host_sharding(device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
  """Sharding that places an array in host memory attached to ``device`` (the host tier).

  Raises:
    ValueError: if the backend has no host memory kind.
  """
  device = _default_device(device)
  kind = host_memory_kind(device)
  if kind is None:
    raise ValueError(
      f"{device} lists no host memory kind (memories: {memory_kinds(device)}); "
      "the host tier cannot be expressed on this backend"
    )
  return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def sharding_for_tier(
  tier: str, device: jax.Device | None = None
) -> jax.sharding.SingleDeviceSharding:
  """The sharding for ``"device"`` or ``"host"``; the disk tier has none (it is files)."""
  if tier == "device":
    return device_sharding(device)
  if tier == "host":
    return host_sharding(device)
  raise ValueError(f"tier {tier!r} has no jax sharding; expected 'device' or 'host'")
