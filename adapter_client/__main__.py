"""`python -m adapter_client adapters ...|generate ...`: the client commands alone; see adapter_client/cli.py."""

from .cli import main

main()
