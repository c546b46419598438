"""Every config group composes into the typed schema; typos and bad values fail early, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.config import AppConfig, ConfigError, EngineConfig, InputConfig, ModelConfig, OutputConfig

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def load(*overrides: str) -> AppConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_defaults():
    cfg = load()
    assert isinstance(cfg, AppConfig)
    assert cfg.model == ModelConfig()
    assert cfg.engine == EngineConfig()
    assert cfg.prompt == "<grounding>An image of"
    assert cfg.engine.max_new_tokens == 128 and cfg.engine.num_requests == 0


def test_tasks_set_prompt_and_length():
    assert load("task=describe").prompt == "<grounding>Describe this image in detail:"
    assert load("task=describe").engine.max_new_tokens == 256
    assert load("task=describe", "engine.max_new_tokens=64").engine.max_new_tokens == 64
    assert load("task=caption").prompt == load().prompt == "<grounding>An image of"


def test_every_group_option_composes():
    for group in ("model", "engine", "input", "output", "preview", "task"):
        for option in sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml")):
            load(f"{group}={option}")


def test_overrides_are_typed():
    cfg = load("engine.batch_size=4", "model.weight_format=int4", "prompt='<grounding>A photo of'")
    assert cfg.engine.batch_size == 4 and cfg.model.weight_format == "int4"
    assert cfg.prompt == "<grounding>A photo of"
    with pytest.raises(ConfigCompositionException, match="engine.batch_size"):
        load("engine.batch_size=four")


def test_misspelt_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match="weigth_format"):
        load("model.weigth_format=int8")


@pytest.mark.parametrize(
    "cfg, key",
    [
        (ModelConfig(weight_format="int3"), "model.weight_format"),
        (EngineConfig(precision="fp8"), "engine.precision"),
        (EngineConfig(max_new_tokens=0), "engine.max_new_tokens"),
        (EngineConfig(min_new_tokens=200), "engine.min_new_tokens"),
        (EngineConfig(batch_size=-1), "engine.batch_size"),
        (OutputConfig(compression="zstandard"), "output.compression"),
        (InputConfig(path="photos", phrases_column="classes"), "input.phrases_column"),
        (InputConfig(path="photos", prompt_column="q"), "input.prompt_column"),
    ],
)
def test_bad_values_name_their_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_every_compression_listed_writes(tmp_path):
    """Each accepted output.compression is one pyarrow can write: the check stands in for the first flush."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import COMPRESSIONS

    for codec in COMPRESSIONS:
        pq.write_table(pa.table({"a": [1]}), tmp_path / f"{codec}.parquet", compression=codec)


@pytest.mark.parametrize("device, ok", [("CPU", True), ("AUTO:CPU", True), ("NPU", False), ("GPU.3", False), ("AUTO:CPU,FPGA", False)])
def test_unknown_devices_are_refused_by_name(device, ok):
    from pipeline.model import check_device

    if ok:
        check_device(EngineConfig(device=device))
    else:
        with pytest.raises(ConfigError, match=r"engine\.device=.*it lists CPU"):
            check_device(EngineConfig(device=device))


@pytest.mark.parametrize("capabilities, ok", [(("FP32", "BF16", "INT8"), True), (("FP32", "INT8"), False), (None, True)])
def test_bf16_is_refused_where_the_device_computes_none(monkeypatch, capabilities, ok):
    """On a CPU without AVX-512 BF16 or AMX (an AVX2-only AMD EPYC), OpenVINO's paged attention refused
    the bf16 KV cache at compile time with an internal check; now the config is refused by name. A
    device that reports no capabilities (AUTO:...) is left to OpenVINO."""
    from pipeline import model

    monkeypatch.setattr(model, "_capabilities", lambda device: capabilities)
    for cfg in (EngineConfig(precision="f32"), EngineConfig()):
        model.check_device(cfg)
    if ok:
        model.check_device(EngineConfig(precision="bf16"))
    else:
        with pytest.raises(ConfigError, match=r"engine\.precision=bf16: CPU on this machine computes no bf16 .* use engine\.precision=auto"):
            model.check_device(EngineConfig(precision="bf16"))
        with pytest.raises(ConfigError, match=r"engine\.precision=bf16"):  # what KosmosModel resolves first
            model.precision(EngineConfig(precision="bf16"), Path("no-export-needed"))


def test_max_new_tokens_must_fit_the_position_table(tmp_path):
    import json

    from pipeline.run import check_positions

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 512}}))
    check_positions(EngineConfig(max_new_tokens=445), tmp_path)
    with pytest.raises(ConfigError, match=r"engine\.max_new_tokens=446 does not fit the model's 512 positions"):
        check_positions(EngineConfig(max_new_tokens=446), tmp_path)
