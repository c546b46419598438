"""`python -m pipeline.export`: the same as `kosmos-export`."""

from pipeline.export.command import main

main()
