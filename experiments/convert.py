"""Convert a checkpoint (or a synthetic model) into a hetflow disk store.

  python -m experiments.convert --model=llama-1b --out=/tmp/stores/llama-1b
  python -m experiments.convert --checkpoint=/path/to/hf_dir --out=/tmp/stores/mine
  python -m experiments.convert --model=llama-1b          # into the default cache dir

The store holds one raw, 4 KiB-aligned file per placement group (embed,
layers/<i>/attn, layers/<i>/mlp, head) in the compute dtype (--dtype), so the
layer-wise strategy reads blocks with O_DIRECT and computes on them with no
conversion. Writing is atomic: an interrupted conversion leaves no store that
looks complete. Peak memory is one group. llama-1b (4.4 GB in float32) takes
about a minute here, most of it generating the synthetic weights.
"""

from absl import app, flags

from hetflow import config as config_lib
from hetflow.memory.budget import format_bytes
from hetflow.memory.store import default_store_dir, write_store

_MODEL = flags.DEFINE_string("model", "llama-tiny", "Synthetic model shape (hetflow SHAPES).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Local HF checkpoint dir (overrides --model).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of synthetic weights.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(config_lib.DTYPES), "Compute/store dtype.")
_OUT = flags.DEFINE_string("out", "", "Store directory (default: the cache dir the strategy uses).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing store at --out.")


def main(argv):
  del argv
  section = config_lib.model_section(_MODEL.value, _CHECKPOINT.value, _SEED.value, _DTYPE.value)
  model = config_lib.build_model(section)
  out = _OUT.value or default_store_dir(model)
  try:
    store = write_store(model, out, progress=True, overwrite=_OVERWRITE.value)
  except FileExistsError as e:
    raise app.UsageError(f"{e}; pass --overwrite to replace it.") from None
  print(f"wrote {store.path}: {len(store.groups)} groups, {format_bytes(store.total_nbytes)}"
        f" ({model.description}, {_DTYPE.value})")
  print("use it with: --config.strategy.name=layerwise"
        f" --config.strategy.options.store_dir={store.path}")


if __name__ == "__main__":
  app.run(main)
