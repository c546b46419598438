"""The export folder: where it lives, whether it matches the config, and how it is written.

An export is written to a temporary folder, checked against transformers on the weights just loaded
(export/verify.py), and renamed into place, with `manifest.json` (holding that check) written last, so
a folder with a complete manifest is a complete export (model/export_folder.py reads it).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import EngineConfig, ModelConfig, WeightFormat
from pipeline.errors import ConfigError
from pipeline.export.graphs import convert, convert_text_decoder, make_stateful
from pipeline.export.quantize import compress, static_decoder_wanted
from pipeline.export.verify import as_record, report, verify
from pipeline.model.export_folder import GRAPHS, MANIFEST, read_manifest
from pipeline.model.prompt import IMAGE_TOKENS
from pipeline.storage.files import atomic_folder, write_text
from pipeline.storage.locks import flock

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_export_dir(cfg: ModelConfig) -> Path:
    """Per-user cache folder keyed by source, revision, weight format and how the graphs are quantised."""
    root = Path(
        os.environ.get("KOSMOS_ANNOTATE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kosmos-annotate"
    )
    source = cfg.source
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-80:]
    key = hashlib.sha256(f"{source}@{cfg.revision}".encode()).hexdigest()[:8]
    # An image encoder with int8 weights only, or a static int8 decoder, gets a folder of its own:
    # switching does not replace the other export (auto differs between CPUs sharing a cache).
    encoder = "-encoder-weights" if cfg.compressed and not cfg.quantize_image_encoder else ""
    decoder = "-static-decoder" if static_decoder_wanted(cfg) else ""
    return root / f"{slug}-{key}-{str(cfg.weight_format)}{encoder}{decoder}"


def export_dir(cfg: ModelConfig) -> Path:
    return Path(cfg.dir).expanduser() if cfg.dir else default_export_dir(cfg)


def _source_fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the checkpoint: for a local folder, the config's hash and the weight files' stats."""
    source = Path(cfg.source).expanduser()
    if not source.is_dir():
        return {"source": cfg.source, "revision": cfg.revision}
    config = source / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"model.source={cfg.source!r} is a folder without config.json: not a save_pretrained checkpoint"
        )
    weights = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "source": str(source.resolve()),
        "revision": cfg.revision,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "weights": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in weights},
    }


def _wanted(cfg: ModelConfig) -> dict:
    key = {"format_version": FORMAT_VERSION, "weight_format": str(cfg.weight_format)}
    if cfg.compressed:
        key["quantize_image_encoder"] = cfg.quantize_image_encoder
    if static_decoder_wanted(cfg):  # only then, so that exports made before it existed still match
        key["quantize_text_decoder"] = True
    return {**key, **_source_fingerprint(cfg)}


def stale_reason(cfg: ModelConfig, path: Path) -> str | None:
    """None if `path` holds a complete export matching `cfg`; otherwise why not."""
    manifest = read_manifest(path)
    if manifest is None:
        return "no export" if not path.exists() else "no complete manifest (a half-written export?)"
    wanted, have = _wanted(cfg), manifest.get("key", {})
    for key in [*wanted, *(k for k in have if k not in wanted)]:
        if have.get(key) != wanted.get(key):
            return f"{key} changed ({have.get(key)!r} -> {wanted.get(key)!r})"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def ensure_export(cfg: ModelConfig, engine: EngineConfig | None = None) -> Path:
    """Export unless `model.dir` already holds a matching export; returns the folder. `engine` gives
    the device and threads that the check after exporting runs with.

    Shards started together (a cluster job, `-m cluster=local`) would each export the checkpoint:
    an flock beside the folder lets exactly one export while the others wait and then load it.
    """
    cfg.validate()
    path = export_dir(cfg)
    if stale_reason(cfg, path) is None:
        log.info("Using the export in %s", path)
        return path

    def waiting() -> None:
        log.info("Another process is exporting to %s; waiting for it", path)

    with flock(_lock(path), on_wait=waiting):
        reason = stale_reason(cfg, path)
        if reason is None:
            log.info("Using the export in %s", path)
            return path
        check_export_libraries(cfg)
        download = "" if Path(cfg.source).expanduser().is_dir() else "downloads the checkpoint (about 6.7 GB), "
        log.info(
            "No usable export in %s (%s): exporting %s to OpenVINO (%s) first, once: it %sneeds torch, about "
            "13 GB of memory and 3 to 6 minutes on 2 cores (the full-size model); runs then load it in seconds. "
            "kosmos-export does this ahead of time.",
            path,
            reason,
            cfg.source,
            str(cfg.weight_format),
            download,
        )
        _export(cfg, path, engine or EngineConfig())
    return path


def _lock(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def load_checkpoint(cfg: ModelConfig):
    """The transformers model (fp32, eval) and processor, from the hub or a local folder."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    try:
        processor = AutoProcessor.from_pretrained(cfg.source, **kwargs)
        model = Kosmos2ForConditionalGeneration.from_pretrained(
            cfg.source, dtype="float32", use_safetensors=True, attn_implementation="eager", **kwargs
        )
    except OSError as e:
        raise _unloadable(cfg, str(e).splitlines()[0]) from None
    return model.eval(), processor


def _unloadable(cfg: ModelConfig, reason: str) -> ConfigError:
    local = Path(cfg.source).expanduser().is_dir()
    hint = (
        "check that the folder holds a save_pretrained checkpoint (config.json, model.safetensors, processor files)"
        if local
        else "if this machine is offline, download the checkpoint elsewhere (save_pretrained) and set "
        "model.source=/path/to/that/folder"
    )
    return ConfigError(f"cannot load model.source={cfg.source!r}: {reason}; {hint}")


EXPORT_LIBRARIES = ("torch", "transformers", "nncf")


def check_export_libraries(cfg: ModelConfig) -> None:
    """An export needs torch, transformers and nncf, which a run does not: say how to get them."""
    missing = []
    for name in EXPORT_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"model.source={cfg.source!r} must be exported to OpenVINO first (once), which needs "
            f'{", ".join(missing)}: pip install "kosmos-annotate[export]" (with torch\'s CPU build first, '
            "see the README), or set model.dir to an export made elsewhere with kosmos-export"
        )


def check_source(cfg: ModelConfig) -> None:
    """Before anything is written: where an export must be made, the libraries are installed and its
    checkpoint can be had, or the run fails now, in seconds (a local folder without config.json; a
    hub id not cached on a machine that is offline, or that the hub does not answer for)."""
    if stale_reason(cfg, export_dir(cfg)) is None:
        return
    check_export_libraries(cfg)
    source = Path(cfg.source).expanduser()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise _unloadable(cfg, "the folder has no config.json")
        return
    import huggingface_hub
    from huggingface_hub import constants

    if isinstance(huggingface_hub.try_to_load_from_cache(cfg.source, "config.json", revision=cfg.revision), str):
        return  # in the cache: loading falls back on it where the hub cannot be reached
    if constants.HF_HUB_OFFLINE:
        raise _unloadable(cfg, "HF_HUB_OFFLINE is set and the checkpoint is not in the Hugging Face cache")
    try:
        huggingface_hub.model_info(cfg.source, revision=cfg.revision, timeout=10)
    except Exception as e:  # noqa: BLE001 - no route, no such repository, refused: all say the same to the user
        raise _unloadable(
            cfg, f"the hub did not answer for it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("transformers", "openvino", "nncf", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _export(cfg: ModelConfig, path: Path, engine: EngineConfig) -> None:
    started = time.perf_counter()
    model, processor = load_checkpoint(cfg)
    if model.config.latent_query_num != IMAGE_TOKENS:
        raise ConfigError(
            f"model.source={cfg.source!r} has latent_query_num={model.config.latent_query_num}; "
            f"Kosmos-2 uses {IMAGE_TOKENS}"
        )
    models = compress(convert(model), cfg, model, processor)
    make_stateful(models["text_decoder"])

    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_folder(path)
    with atomic_folder(path) as tmp:
        _save(models, tmp, cfg)
        processor.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        manifest = {
            "key": _wanted(cfg),
            "static_text_decoder": static_decoder_wanted(cfg),
            "resolved_commit": getattr(model.config, "_commit_hash", None),
            "versions": _versions(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_manifest(tmp, manifest, started)  # the check loads the export as a run does
        if cfg.verify_after_export:
            record = _verify(tmp, model, processor, cfg, engine)
            if static_decoder_wanted(cfg) and record.get("identical") != len(record.get("images", [])):
                record = _weights_only_decoder(tmp, manifest, record, model, processor, cfg, engine, started)
            manifest["verification"] = record
            _write_manifest(tmp, manifest, started)
    log.info("Exported to %s in %.1f s", path, time.perf_counter() - started)


def _save(models: dict, folder: Path, cfg: ModelConfig) -> None:
    import openvino as ov

    for name, ov_model in models.items():
        ov.save_model(ov_model, folder / f"{name}.xml", compress_to_fp16=cfg.weight_format == WeightFormat.fp16)


def _write_manifest(folder: Path, manifest: dict, started: float) -> None:
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    manifest["files"] = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def _weights_only_decoder(
    folder: Path, manifest: dict, record: dict, model, processor, cfg: ModelConfig, engine: EngineConfig, started: float
) -> dict:
    """A static int8 decoder is kept only if every sample caption is transformers' own: where it is
    not, the decoder is exported again with int8 weights only (as `model.quantize_text_decoder=false`)
    and checked again; the manifest keeps what the static one scored."""
    log.warning(
        "The text decoder quantised statically (model.quantize_text_decoder) gave %s of %s sample captions identical "
        "to transformers: exporting it with int8 weights only instead",
        record.get("identical"),
        len(record.get("images", [])),
    )
    weights = replace(cfg, quantize_text_decoder=False)
    decoder = compress({"text_decoder": convert_text_decoder(model)}, weights, model, processor)["text_decoder"]
    make_stateful(decoder)
    _save({"text_decoder": decoder}, folder, cfg)
    shutil.rmtree(folder / "_cache", ignore_errors=True)  # compiled from the static decoder
    manifest["static_text_decoder"] = False
    manifest["static_text_decoder_rejected"] = record.get("summary") or record.get("error")
    _write_manifest(folder, manifest, started)
    return _verify(folder, model, processor, weights, engine)


def _verify(path: Path, model, processor, cfg: ModelConfig, engine: EngineConfig) -> dict:
    """The check of pipeline/verify.py as a manifest record. A check that crashes is reported and
    recorded, never allowed to throw away the export it checks."""
    try:
        result = verify(path, model, processor, str(cfg.weight_format), engine, cfg.min_identical)
    except Exception as e:  # noqa: BLE001 - the export stays usable; the record says what went wrong
        log.exception("The check of the export against transformers failed to run")
        return {"error": f"{type(e).__name__}: {e}", "passed": False}
    report(result)
    return as_record(result)


def verify_existing(cfg: ModelConfig, engine: EngineConfig, path: Path) -> dict:
    """Check an existing export again (the checkpoint is loaded) and record it in its manifest."""
    model, processor = load_checkpoint(cfg)
    with flock(_lock(path)):
        record = _verify(path, model, processor, cfg, engine)
        manifest = read_manifest(path)
        manifest["verification"] = record
        write_text(path / MANIFEST, json.dumps(manifest, indent=2))
    return record


def _refuse_foreign_folder(path: Path) -> None:
    """Never replace a folder that is not ours: it must be absent, empty, or hold our files."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    ours = (path / MANIFEST).exists() or any((path / f"{g}.xml").exists() for g in GRAPHS)
    if not ours:
        raise ConfigError(
            f"model.dir={str(path)!r} holds other files and is not a kosmos-annotate export; "
            "choose an empty or new folder"
        )
