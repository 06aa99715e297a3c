"""Throughput and memory benchmarks (GPU numbers come from `lolcats bench` / scripts/gpu/)."""
