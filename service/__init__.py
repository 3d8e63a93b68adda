"""Hot-swappable PEFT adapter serving."""

from .cpu import passive_wait_policy

# Before anything imports torch (OpenMP reads it once, at load): every entry point imports this package first
# (`python -m service`, the Docker image, Ray replicas deserialising their deployment). See service/cpu.py.
passive_wait_policy()
