"""Throughput benchmarks: sidecrypt against nginx and a bare aiohttp proxy (``python -m bench``)."""
