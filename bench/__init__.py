"""Benchmarks: our key server and sidecar side by side with OpenBao and a bare aiohttp floor.

`python -m bench --help`. Every system runs as its own process pinned to one
core (taskset); the load client runs on the other core.
"""
