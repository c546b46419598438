"""Every config group composes into the typed schema; typos and bad values fail early, by name; every
key has a help line, for the generated reference."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import hardware
from pipeline.annotation.run import check_positions
from pipeline.annotation.tasks import task_prompt
from pipeline.cli import CONF_DIR, SCHEMAS
from pipeline.config import AppConfig, Compression, EngineConfig, InputConfig, ModelConfig, help_lines
from pipeline.errors import ConfigError
from pipeline.model.runtime import precision


def load(*overrides: str, name: str = "config"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(name, overrides=list(overrides)))


def test_defaults():
    cfg = load()
    assert isinstance(cfg, AppConfig)
    assert cfg.model == ModelConfig()
    assert cfg.engine == EngineConfig()
    assert task_prompt(cfg) == "<grounding>An image of"
    assert cfg.engine.max_new_tokens == 128 and cfg.engine.num_requests is None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_command_composes_into_its_schema(name):
    assert isinstance(load(name=name), SCHEMAS[name])


def test_tasks_set_prompt_and_length():
    assert task_prompt(load("task=describe")) == "<grounding>Describe this image in detail:"
    assert load("task=describe").engine.max_new_tokens == 256
    assert load("task=describe", "engine.max_new_tokens=64").engine.max_new_tokens == 64
    assert task_prompt(load("task=caption")) == task_prompt(load()) == "<grounding>An image of"
    assert task_prompt(load("task=describe", "prompt='<grounding>A photo of'")) == "<grounding>A photo of"


def test_every_group_option_composes():
    for group in ("model", "engine", "input", "output", "preview", "task"):
        for option in sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")):
            load(f"{group}={option}")


def test_overrides_are_typed():
    cfg = load("engine.batch_size=4", "model.weight_format=int4", "prompt='<grounding>A photo of'", "input=parquet")
    assert cfg.engine.batch_size == 4 and cfg.model.weight_format == "int4" and cfg.input.kind == "parquet"
    assert cfg.prompt == "<grounding>A photo of"
    with pytest.raises(ConfigCompositionException, match="engine.batch_size"):
        load("engine.batch_size=four")


def test_misspelt_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match="weigth_format"):
        load("model.weigth_format=int8")


@pytest.mark.parametrize(
    "override",
    [
        "model.weight_format=int3",
        "engine.precision=fp8",
        "engine.precision=auto",
        "output.compression=zstandard",
        "output.mode=append",
        "task.kind=count",
        "input.kind=csv",
        "model.quantize_text_decoder=maybe",
    ],
)
def test_a_choice_outside_its_list_fails_with_its_key_and_the_choices(override):
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as e:
        load(override)
    cause = str(e.value.__cause__ or e.value)
    assert key.split(".")[-1] in str(e.value) + cause and value in cause


@pytest.mark.parametrize(
    "cfg, key",
    [
        (EngineConfig(max_new_tokens=0), "engine.max_new_tokens"),
        (EngineConfig(min_new_tokens=200), "engine.min_new_tokens"),
        (EngineConfig(batch_size=0), "engine.batch_size"),
        (EngineConfig(batch_size=-1), "engine.batch_size"),
        (EngineConfig(threads=0), "engine.threads"),
        (InputConfig(path="photos", phrases_column="classes"), "input.phrases_column"),
        (InputConfig(path="photos", prompt_column="q"), "input.prompt_column"),
        (InputConfig(path="photos", decode_threads=0), "input.decode_threads"),
        (ModelConfig(weight_format="fp16", quantize_text_decoder=True), "model.quantize_text_decoder"),
    ],
)
def test_bad_values_name_their_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_every_compression_listed_writes(tmp_path):
    """Each accepted output.compression is one pyarrow can write: the check stands in for the first flush."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for codec in Compression:
        pq.write_table(pa.table({"a": [1]}), tmp_path / f"{codec}.parquet", compression=str(codec))


@pytest.mark.parametrize("schema", sorted(SCHEMAS.values(), key=lambda s: s.__name__), ids=lambda s: s.__name__)
def test_every_key_has_a_help_line(schema):
    """The configuration reference is generated from these lines: a key without one would be a hole in it."""

    def missing(schema: type, prefix: str = "") -> list[str]:
        out = []
        for f in fields(schema):
            out += [] if f.metadata.get("help", "").strip() else [prefix + f.name]
            default = f.default_factory() if f.default is MISSING else f.default
            out += missing(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else []
        return out

    assert help_lines(schema) and missing(schema) == []


@pytest.mark.parametrize(
    "device, ok", [("CPU", True), ("AUTO:CPU", True), ("NPU", False), ("GPU.3", False), ("AUTO:CPU,FPGA", False)]
)
def test_unknown_devices_are_refused_by_name(device, ok):
    if ok:
        hardware.check_device(EngineConfig(device=device))
    else:
        with pytest.raises(ConfigError, match=r"engine\.device=.*it lists CPU"):
            hardware.check_device(EngineConfig(device=device))


@pytest.mark.parametrize(
    "capabilities, ok", [(("FP32", "BF16", "INT8"), True), (("FP32", "INT8"), False), (None, True)]
)
def test_bf16_is_refused_where_the_device_computes_none(monkeypatch, capabilities, ok):
    """On a CPU without AVX-512 BF16 or AMX (an AVX2-only AMD EPYC), OpenVINO's paged attention refused
    the bf16 KV cache at compile time with an internal check; now the config is refused by name. A
    device that reports no capabilities (AUTO:...) is left to OpenVINO."""
    monkeypatch.setattr(hardware, "capabilities", lambda device: capabilities)
    for cfg in (EngineConfig(precision="f32"), EngineConfig()):
        hardware.check_device(cfg)
    if ok:
        hardware.check_device(EngineConfig(precision="bf16"))
    else:
        with pytest.raises(
            ConfigError,
            match=r"engine\.precision=bf16: CPU on this machine computes no bf16 .* use engine\.precision=null",
        ):
            hardware.check_device(EngineConfig(precision="bf16"))
        with pytest.raises(ConfigError, match=r"engine\.precision=bf16"):  # what KosmosModel resolves first
            precision(EngineConfig(precision="bf16"), Path("no-export-needed"))


def test_max_new_tokens_must_fit_the_position_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 512}}))
    check_positions(EngineConfig(max_new_tokens=445), tmp_path)
    with pytest.raises(ConfigError, match=r"engine\.max_new_tokens=446 does not fit the model's 512 positions"):
        check_positions(EngineConfig(max_new_tokens=446), tmp_path)
