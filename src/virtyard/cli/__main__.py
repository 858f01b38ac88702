"""``python -m virtyard.cli``: the same as the ``virtyard`` console script."""

from virtyard.cli.main import main

main()
