"""What an export folder holds, read without torch: three OpenVINO graphs, the processor's files,
the checkpoint's `config.json`, and `manifest.json`, written last (pipeline/export/store.py), so
a folder with a complete manifest is a complete export."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
GRAPHS = ("image_encoder", "token_embedder", "text_decoder")


def read_manifest(export: Path) -> dict | None:
    try:
        return json.loads((Path(export) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _config(export: Path) -> dict:
    return json.loads((Path(export) / "config.json").read_text())


def weight_format(export: Path) -> str:
    return read_manifest(export)["key"]["weight_format"]


def holds_static_decoder(export: Path) -> bool:
    """Whether the export's text decoder was quantised statically and kept after its check (one that
    failed it was exported again with int8 weights only)."""
    return bool((read_manifest(export) or {}).get("static_text_decoder"))


def max_positions(export: Path) -> int:
    """Entries of the decoder's position table: what a prompt and its generated tokens share."""
    return int(_config(export).get("text_config", {}).get("max_position_embeddings", 2048))


def layer_widths(export: Path) -> set[int]:
    """The input widths of the exported model's fully connected layers (text, vision, projection)."""
    config = _config(export)
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    return {text["embed_dim"], text["ffn_dim"], vision["hidden_size"], vision["intermediate_size"]}


def special_ids(export: Path) -> tuple[int, int]:
    """The text model's padding and end-of-sequence token ids."""
    text = _config(export).get("text_config", {})
    return int(text.get("pad_token_id", 1)), int(text.get("eos_token_id", 2))
