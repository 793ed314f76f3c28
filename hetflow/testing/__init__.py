"""Helpers for tests: tiny HF reference models built with transformers' own classes."""

from hetflow.testing.hf_reference import HF_TINY_CONFIGS, save_tiny_hf
