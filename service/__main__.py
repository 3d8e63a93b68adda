"""`python -m service`: see service/cli.py."""

from .cli import main

main()
