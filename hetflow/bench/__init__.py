"""Measurement drivers, the top layer of the library: it may import everything below
it (docs/architecture.md); nothing below imports it.

  probes           disk / memory / host->device / matvec / matmul rates; `measure()`
  machine          this machine's HardwareProfile (measured once, cached); the planner on it
  calibration      a model's own decode costs on this machine, kept in its profile
  config           the benchmark config schema (bench_config, SystemSpec)
  process          facts one measured process reads about itself; the cache drop
  runner           the benchmark: each system in a fresh process, limits from the probes
  report           the benchmark's table and plots
  peers            HF transformers and Accelerate rows of the table
  plan_run         `experiments.plan`: rank plans, run the top ones, compare
  reproduce        a paper's figure, predicted from shapes
  alpha            HeteGen's alpha benchmark (one split matvec against alpha)
  train_predictor  activation statistics and predictors for neuron_cluster
  audit            neuron_cluster against dense, by counts
"""
