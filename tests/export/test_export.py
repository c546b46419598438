"""Export: graphs, manifest, idempotence, staleness, weight compression, the command."""

from __future__ import annotations

import json
from pathlib import Path

import openvino as ov
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from pipeline.cli import CONF_DIR
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.export import quantize
from pipeline.export import store as export
from pipeline.export.quantize import static_decoder_wanted
from tests.helpers import copy_export, run_export_command


def test_export_holds_three_graphs_processor_and_manifest(random_export):
    names = {p.name for p in random_export.iterdir()}
    assert {"image_encoder.xml", "token_embedder.xml", "text_decoder.xml", "manifest.json", "config.json"} <= names
    assert {"tokenizer.json", "processor_config.json"} <= names
    manifest = json.loads((random_export / "manifest.json").read_text())
    assert manifest["key"]["weight_format"] == "fp32"
    assert len(manifest["key"]["config_sha256"]) == 64
    assert set(manifest["versions"]) >= {"transformers", "openvino", "nncf"}
    assert all((random_export / f).stat().st_size == size for f, size in manifest["files"].items())


def test_decoder_is_stateful_with_beam_idx_and_last_position_logits(random_export):
    decoder = ov.Core().read_model(random_export / "text_decoder.xml")
    inputs = {p.get_any_name() for p in decoder.inputs}
    assert inputs == {"inputs_embeds", "attention_mask", "position_ids", "beam_idx"}
    assert [p.get_any_name() for p in decoder.outputs] == ["logits"]
    assert decoder.outputs[0].get_partial_shape().rank.get_length() == 2  # [batch, vocab]: last position only
    assert len(decoder.get_sinks()) == 2 * 2  # key and value of each of the 2 layers
    encoder = ov.Core().read_model(random_export / "image_encoder.xml")
    assert list(encoder.outputs[0].get_partial_shape())[1:] == [64, 64]  # 64 latent queries, embed_dim 64


def test_second_export_does_nothing(random_checkpoint, random_export, monkeypatch):
    monkeypatch.setattr(export, "_export", lambda *a: pytest.fail("re-exported an up-to-date export"))
    cfg = ModelConfig(source=str(random_checkpoint), dir=str(random_export), weight_format="fp32")
    assert export.ensure_export(cfg) == random_export


def test_stale_exports_are_detected(random_checkpoint, random_export, tmp_path):
    cfg = ModelConfig(source=str(random_checkpoint), dir=str(random_export), weight_format="fp32")
    assert export.stale_reason(cfg, random_export) is None
    assert "weight_format" in export.stale_reason(ModelConfig(**{**vars(cfg), "weight_format": "int8"}), random_export)
    assert export.stale_reason(cfg, tmp_path / "absent") == "no export"

    half = copy_export(random_export, tmp_path / "half")
    (half / "manifest.json").unlink()
    assert "half-written" in export.stale_reason(cfg, half)

    truncated = copy_export(random_export, tmp_path / "truncated")
    with open(truncated / "text_decoder.bin", "r+b") as f:
        f.truncate(100)
    assert "text_decoder.bin" in export.stale_reason(cfg, truncated)


def test_default_dir_is_a_per_user_cache_keyed_by_source_and_format(monkeypatch, tmp_path):
    monkeypatch.setenv("KOSMOS_ANNOTATE_CACHE", str(tmp_path))
    hub = "microsoft/kosmos-2-patch14-224"
    a = export.export_dir(ModelConfig(source=hub, weight_format="int8", quantize_text_decoder=False))
    b = export.export_dir(ModelConfig(source=hub, weight_format="int4"))
    c = export.export_dir(
        ModelConfig(source="someone/kosmos-2-finetuned", weight_format="int8", quantize_text_decoder=False)
    )
    assert a.parent == tmp_path and len({a, b, c}) == 3
    assert a.name.startswith("microsoft--kosmos-2-patch14-224-") and a.name.endswith("-int8")
    d = export.export_dir(
        ModelConfig(source=hub, weight_format="int8", quantize_image_encoder=False, quantize_text_decoder=False)
    )
    assert d.parent == tmp_path and d.name == a.name + "-encoder-weights"
    e = export.export_dir(ModelConfig(source=hub, weight_format="int8", quantize_text_decoder=True))
    assert e.name == a.name + "-static-decoder"
    fp32 = ModelConfig(source=hub, weight_format="fp32")
    assert export.export_dir(fp32) == export.export_dir(ModelConfig(**{**vars(fp32), "quantize_image_encoder": False}))
    # unset: a static decoder on CPUs with AMX (where it was measured faster), weights only elsewhere
    amx = "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    assert export.export_dir(ModelConfig(source=hub, weight_format="int8")) == (e if amx else a)


def test_quantize_text_decoder_takes_null_true_or_false(monkeypatch):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        assert compose("config", overrides=["model.quantize_text_decoder=true"]).model.quantize_text_decoder is True
        assert compose("config", overrides=["model.quantize_text_decoder=null"]).model.quantize_text_decoder is None
        with pytest.raises(ConfigCompositionException, match="quantize_text_decoder"):
            compose("config", overrides=["model.quantize_text_decoder=maybe"])
    assert static_decoder_wanted(ModelConfig(quantize_text_decoder=True))
    assert not static_decoder_wanted(ModelConfig(quantize_text_decoder=False))
    assert not static_decoder_wanted(ModelConfig(weight_format="int4"))
    for flags, wanted in [({"amx_int8"}, True), (set(), False)]:  # null: on CPUs with AMX
        monkeypatch.setattr(quantize, "cpu_has", lambda flag, flags=flags: flag in flags)
        assert static_decoder_wanted(ModelConfig()) is wanted
    with pytest.raises(ConfigError, match="needs model.weight_format=int8"):
        ModelConfig(weight_format="int4", quantize_text_decoder=True).validate()


def test_export_command_rejects_a_bad_weight_format(tmp_path):
    proc = run_export_command("model.weight_format=int3", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "model.weight_format" in proc.stderr
        and "Invalid value 'int3', expected one of [fp32, fp16, int8, int4]" in proc.stderr
    )


def test_a_checkpoint_in_the_hub_cache_is_taken_without_asking_the_hub(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE set, a first run refused a checkpoint its cache held (the hub
    did not answer), though transformers loads it from there."""
    import huggingface_hub
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--kosmos" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--kosmos" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--kosmos" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    cfg = ModelConfig(source="someone/kosmos", dir=str(tmp_path / "m"))
    export.check_source(cfg)
    with pytest.raises(ConfigError, match="the hub did not answer for it"):
        export.check_source(ModelConfig(source="someone/other", dir=str(tmp_path / "m")))
