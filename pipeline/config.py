"""Typed config schemas. Registered in Hydra's ConfigStore so that a misspelt key or a bad
value fails at start-up with its name, before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

# The `conf/` tree beside the package, as an absolute path: Hydra resolves a relative config_path
# against a package (not a folder) when the app starts from a console script.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
PRECISIONS = ("auto", "f32", "bf16")


class UserError(ValueError):
    """Something the user can fix: the commands log its message as one line and exit with `exit_code`."""

    exit_code = 2
    label = ""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key and what to do."""


@dataclass
class ModelConfig:
    # Hugging Face hub id, or a local folder written by `save_pretrained`.
    source: str = "microsoft/kosmos-2-patch14-224"
    # Hub revision (branch, tag or commit) to pin; None takes the default branch.
    revision: str | None = None
    # Where the OpenVINO export lives; None = a per-user cache folder keyed by source and format.
    dir: str | None = None
    # fp32 | fp16 | int8 | int4 (int8/int4: NNCF weight compression).
    weight_format: str = "int8"
    # int8/int4: the image encoder computes in int8 too (NNCF static quantisation, calibrated on the
    # photos in pipeline/samples/calibration/); false = its weights only, like the decoder's.
    quantize_image_encoder: bool = True
    # auto | true | false. int8: the text decoder computes in int8 too (NNCF static quantisation,
    # calibrated on transformers' captions of those photos), kept only if the check after exporting
    # finds every sample caption identical; false = its weights only, activations quantised at each call
    # (engine.dynamic_quantization_group_size). auto = true on CPUs with AMX, where its products then
    # run AMX int8 kernels (1.28-1.38x the images/s, README "On an Intel Xeon with AMX"); false
    # elsewhere: no faster on an AMD EPYC with AVX-512 VNNI or with AVX2 only (README "Performance").
    quantize_text_decoder: str = "auto"
    # After exporting, caption the sample photos with transformers and with the export (pipeline/verify.py).
    verify_after_export: bool = True
    # ...and warn (kosmos-export verify=true: exit 4) below this fraction of identical captions.
    min_identical: float = 0.6

    @property
    def compressed(self) -> bool:
        """int8/int4: NNCF compresses the weights, and `quantize_image_encoder` applies."""
        return self.weight_format in ("int8", "int4")

    @property
    def static_text_decoder(self) -> bool:
        """`quantize_text_decoder` resolved on this machine."""
        from pipeline.model import cpu_has

        wanted = str(self.quantize_text_decoder).lower()
        return self.weight_format == "int8" and (wanted == "true" or (wanted == "auto" and cpu_has("amx_int8")))

    def validate(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise ConfigError(
                f"model.weight_format={self.weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}"
            )
        wanted = str(self.quantize_text_decoder).lower()
        if wanted not in ("auto", "true", "false"):
            raise ConfigError(f"model.quantize_text_decoder={self.quantize_text_decoder!r} is not one of auto, true, false")
        if wanted == "true" and self.weight_format != "int8":
            raise ConfigError(
                f"model.quantize_text_decoder=true needs model.weight_format=int8 (not {self.weight_format}): "
                "set model.weight_format=int8 or model.quantize_text_decoder=auto"
            )
        if not self.source:
            raise ConfigError("model.source is empty: give a hub id or a local checkpoint folder")
        if not 0 <= self.min_identical <= 1:
            raise ConfigError(f"model.min_identical={self.min_identical} must be between 0 and 1")


@dataclass
class EngineConfig:
    device: str = "CPU"
    # auto | f32 | bf16: OpenVINO's inference precision and KV-cache precision. auto = bf16 where the
    # CPU has it natively, except int8/int4 weights on AMX CPUs (f32): see pipeline.model.precision.
    precision: str = "auto"
    # Rows each decoder step runs (continuous batching: a row that stops is replaced); 0 = the default:
    # 32, or 16 on a CPU without AVX-512 (pipeline.engine.default_batch_size).
    batch_size: int = 0
    # Decoders side by side, each with its own rows, thread and OpenVINO stream; 0 = one.
    num_requests: int = 0
    max_new_tokens: int = 128
    # Mirrors transformers' min_new_tokens: end-of-sequence is suppressed until this many.
    min_new_tokens: int = 0
    # Compiled-blob cache (OpenVINO CACHE_DIR); None = inside model.dir.
    cache_dir: str | None = None
    # int8/int4 weights: activations quantised to int8 in groups of this many (OpenVINO's
    # DYNAMIC_QUANTIZATION_GROUP_SIZE); 0 = off. Groups must divide a layer's width to cover it.
    dynamic_quantization_group_size: int = 256
    # OpenVINO threads of this process; 0 = the machine's cores / shards_per_machine.
    threads: int = 0
    # How many shards run side by side on this machine (e.g. the joblib launcher's n_jobs).
    shards_per_machine: int = 1

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"engine.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.shards_per_machine < 1:
            raise ConfigError(f"engine.shards_per_machine={self.shards_per_machine} must be >= 1")
        for key in ("batch_size", "num_requests", "min_new_tokens", "threads", "dynamic_quantization_group_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"engine.{key}={getattr(self, key)} must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"engine.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"engine.min_new_tokens={self.min_new_tokens} exceeds engine.max_new_tokens={self.max_new_tokens}"
            )


IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
INPUT_KINDS = ("folder", "parquet", "webdataset")


@dataclass
class InputConfig:
    kind: str = "folder"  # folder | parquet | webdataset (set by the input group)
    # A folder of images; a parquet file / folder of parquet files / glob; or WebDataset tar shards
    # (`shards/{00000..00099}.tar`, brace ranges and globs).
    path: str | None = None
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    # parquet only: a column of paths, of bytes, or of {bytes, path} structs (Hugging Face datasets).
    image_column: str = "image"
    id_column: str | None = None  # default: the path, else the row number
    prompt_column: str | None = None  # a per-row prompt; null or empty cells take `prompt`
    phrases_column: str | None = None  # task=ground: a per-row list of phrases to ground
    # parquet: columns copied to the output; webdataset: members by extension (txt, json, cls) as strings
    keep_columns: list[str] = field(default_factory=list)
    limit: int | None = None  # only the first N items
    # Images larger than this are refused before they are decoded (decompression bombs).
    max_image_pixels: int = 100_000_000
    decode_threads: int = 0  # 0 = derived from the core count
    # Deterministic partition by a stable hash of `id`: shard `shard_index` of `num_shards`.
    num_shards: int = 1
    shard_index: int = 0

    def validate(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"input.shard_index={self.shard_index} must be in [0, input.num_shards={self.num_shards})"
            )
        if self.kind not in INPUT_KINDS:
            raise ConfigError(f"input.kind={self.kind!r} is not one of {', '.join(INPUT_KINDS)}")
        if not self.path:
            example = {"folder": "photos/", "parquet": "manifest.parquet", "webdataset": "'shards/{00000..00009}.tar'"}[self.kind]
            raise ConfigError(f"input.path is not set: say what to annotate, e.g. input.path={example}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"input.limit={self.limit} must be >= 0")
        for key in ("prompt_column", "phrases_column", "id_column"):
            if self.kind != "parquet" and getattr(self, key):
                raise ConfigError(f"input.{key} applies to parquet manifests only (input=parquet)")
        if self.kind == "folder" and self.keep_columns:
            raise ConfigError("input.keep_columns applies to parquet manifests and WebDataset tars (input=parquet, input=webdataset)")


OUTPUT_MODES = ("resume", "overwrite", "error")
COMPRESSIONS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


@dataclass
class OutputConfig:
    dir: str | None = None  # default: the Hydra run folder under outputs/
    # resume: skip items already in committed parts; overwrite: start clean; error: refuse if output exists.
    mode: str = "resume"
    rows_per_file: int = 1000  # a part file is committed after this many rows...
    flush_seconds: float = 300.0  # ...or this long after its first row, whichever comes first
    compression: str = "zstd"

    def validate(self) -> None:
        if self.mode not in OUTPUT_MODES:
            raise ConfigError(f"output.mode={self.mode!r} is not one of {', '.join(OUTPUT_MODES)}")
        if self.rows_per_file < 1:
            raise ConfigError(f"output.rows_per_file={self.rows_per_file} must be >= 1")
        if self.flush_seconds <= 0:
            raise ConfigError(f"output.flush_seconds={self.flush_seconds} must be > 0")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"output.compression={self.compression!r} is not one of {', '.join(COMPRESSIONS)}")


@dataclass
class PreviewConfig:
    enabled: bool = False
    max_side: int = 768  # longest side of a preview, in pixels
    quality: int = 90  # JPEG quality

    def validate(self) -> None:
        if self.max_side < 16:
            raise ConfigError(f"preview.max_side={self.max_side} must be >= 16")


TASKS = ("caption", "describe", "ground")
GROUND_PROMPT = "<grounding><phrase> {phrase}</phrase>"  # Kosmos-2's referring-expression format


@dataclass
class TaskConfig:
    kind: str = "caption"  # caption | describe | ground (set by the task group)
    # task=ground: the phrases to find in every image (a class list), unless input.phrases_column gives them.
    phrases: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.kind not in TASKS:
            raise ConfigError(f"task.kind={self.kind!r} is not one of {', '.join(TASKS)}")


@dataclass
class RunConfig:
    # Abort (keeping committed work) once more than this fraction of items failed; null = never.
    max_error_rate: float | None = None
    # ...judged only after this many items, so a few early failures do not stop a run.
    error_rate_min_items: int = 50

    def validate(self) -> None:
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ConfigError(f"run.max_error_rate={self.max_error_rate} must be between 0 and 1 (or null)")


@dataclass
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: str = "<grounding>An image of"

    def validate(self) -> None:
        for part in (self.model, self.engine, self.input, self.output, self.preview, self.run, self.task):
            part.validate()
        if self.task.kind == "ground" and not (self.task.phrases or self.input.phrases_column):
            raise ConfigError("task=ground needs phrases: task.phrases=[dog,cat] or input.phrases_column=<column>")
        if not self.prompt.strip():
            raise ConfigError("prompt is empty")


def register() -> None:
    ConfigStore.instance().store(name="schema", node=AppConfig)


register()
