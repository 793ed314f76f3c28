"""Measurement drivers: this machine's profile, calibration, the benchmark
harness, peers, paper reproductions. The top layer of the library: it may
import everything below it (docs/architecture.md); nothing below imports it."""
