"""The Hugging Face checkpoint -> OpenVINO: tracing (graphs), NNCF (quantize), the export folder and
its manifest (store), the check against transformers (verify), and `kosmos-export` (command). Only
this package imports torch, transformers and nncf, and only inside the functions that need them."""
