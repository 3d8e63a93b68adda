"""Reproducible throughput/latency benchmark: our adapter server against a hand-written PEFT server.

Run it with `.venv/bin/python -m bench.run` (see `bench/run.py` for the flags).
"""
