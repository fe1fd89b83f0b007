"""`python -m pipeline` is the `patchsweep` command."""
from pipeline.cli import main

main()
