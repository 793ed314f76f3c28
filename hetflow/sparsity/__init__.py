"""Activation sparsity: statistics, predictors, neuron-bundle store, segmented cache."""
