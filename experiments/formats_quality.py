"""Quality of each weight format against float32 (hetflow.bench.quality): top-1 agreement, mean KL.

  python -m experiments.formats_quality --model=llama-tiny
  python -m experiments.formats_quality --checkpoint=/path/to/hf_dir --formats=int8,int4
"""

from absl import app, flags

import hetflow
from hetflow.bench import quality
from hetflow.models.formats import WeightFormat

_MODEL = flags.DEFINE_string("model", "llama-tiny", "synthetic model name")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "HF directory or GGUF file (over --model)")
_FORMATS = flags.DEFINE_list(
    "formats", ["bfloat16", "int8", "int8-g32", "int8-g128", "int4", "int4-g64", "int4-asym"],
    "weight formats to compare with float32")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "prompts in the fixed set")
_LENGTH = flags.DEFINE_integer("length", 32, "tokens per prompt")


def main(argv):
  del argv
  model = (hetflow.load_model(_CHECKPOINT.value, weights="float32") if _CHECKPOINT.value
           else hetflow.synthetic_model(_MODEL.value))
  prompts = quality.prompt_set(model.config.vocab_size, _PROMPTS.value, _LENGTH.value)
  print(f"{model.description}: {_PROMPTS.value} prompts x {_LENGTH.value} tokens")
  print("| format | bits/weight | top-1 agreement | mean KL (nats) | max KL |")
  print("|---|---|---|---|---|")
  for q in quality.measure(model, _FORMATS.value, prompts):
    bits = WeightFormat.parse(q.weights).bits_per_weight
    print(f"| {q.weights} | {bits:g} | {q.top1:.3f} | {q.mean_kl:.2e} | {q.max_kl:.2e} |")


if __name__ == "__main__":
  app.run(main)
