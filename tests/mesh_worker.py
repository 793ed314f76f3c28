"""Runs the mesh scenarios of tests/test_mesh.py in a fresh process, one JSON line each.

  PYTHONPATH=. python tests/mesh_worker.py DEVICES SETUP_JSON SCENARIO...

DEVICES > 1 gives this process that many CPU devices (set before jax starts,
which is why this runs in its own process); under `python -m hetflow.launch` it
is 1 and the devices are the processes'. SETUP_JSON holds "prompts",
"new_tokens" and "store_root" (the test's). A scenario is
"model[@weights]:shards:strategy[:offload_tier]" (weights: a format such as int4),
or "refuse:strategy[:kv_host]" (a strategy, or one with its KV cache in host
memory, that must refuse a mesh of 2).
Prints "RESULT <json>" per scenario.
"""

import json
import os
import sys

DEVICES = int(sys.argv[1])
if DEVICES > 1:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

from hetflow import distributed  # noqa: E402

distributed.initialize()


import hetflow  # noqa: E402
from hetflow.engine import Engine  # noqa: E402
from hetflow.strategy import NotApplicable  # noqa: E402


def run(spec: str, setup: dict) -> dict:
  parts = spec.split(":")
  if parts[0] == "refuse":
    options = dict(kv_cache_tier="host") if parts[2:] == ["kv_host"] else None
    try:
      Engine(hetflow.synthetic_model("llama-tiny"), parts[1], mesh=2, options=options)
    except NotApplicable as e:
      return {"spec": spec, "refused": str(e)}
    return {"spec": spec, "refused": None}
  name, shards, strategy = parts[0], int(parts[1]), parts[2]
  name, _, weights = name.partition("@")
  options = None
  if strategy == "layerwise":
    tier = parts[3] if len(parts) > 3 else "disk"
    options = dict(offload_tier=tier, prefetch_depth=1,
                   store_dir=os.path.join(setup["store_root"], f"{parts[0]}-{shards}"))
  model = hetflow.synthetic_model(name, weights=weights or "float32")
  with Engine(model, strategy, mesh=shards, options=options) as engine:
    out = engine.generate(setup["prompts"], max_new_tokens=setup["new_tokens"], stop_tokens=())
    logits = engine.forward(setup["prompts"][:1])
    stats = out.stats["strategy"]
    stores = [s.path for s in getattr(engine.strategy, "_stores", ())]
    return {"spec": spec, "tokens": out.tokens.tolist(),
            "logits": logits[0, -1].tolist(),
            "local_shards": out.stats["mesh"]["local_shards"],
            "decode_disk_bytes": stats.decode.disk_bytes,
            "decode_tokens": stats.decode.tokens,
            "store_bytes": [sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
                            for p in stores]}


if __name__ == "__main__":
  for spec in sys.argv[3:]:
    print("RESULT " + json.dumps(run(spec, json.loads(sys.argv[2]))), flush=True)
