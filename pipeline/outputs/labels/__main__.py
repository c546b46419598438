"""`python -m pipeline.outputs.labels`: the same as `kosmos-labels`."""

from pipeline.outputs.labels import main

main()
