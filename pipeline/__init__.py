"""kosmos-annotate: Kosmos-2 grounded captions for image datasets, on OpenVINO."""
