"""Typed config schemas, one per command, with a help line for every key.

Hydra composes `conf/` into these dataclasses, so a misspelt key or a value of the wrong type or
outside its Enum fails at start-up, naming the key; `validate()` checks what types cannot (ranges,
keys that need each other). `null` always means "chosen for this machine or input" and each help
line says how. The configuration reference in the docs is generated from the help lines.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:
    """A config field with its help line (a list or dataclass default is copied for each instance)."""
    if isinstance(default, list) or is_dataclass(default):
        value = default
        return field(
            default_factory=lambda: value.copy() if isinstance(value, list) else type(value)(), metadata={"help": help}
        )
    return field(default=default, metadata={"help": help})


class Choice(str, Enum):
    """A choice among names: equal to its name as a string, and printed as it."""

    def __str__(self) -> str:
        return self.value


class WeightFormat(Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"


class Precision(Choice):
    f32 = "f32"
    bf16 = "bf16"


class InputKind(Choice):
    folder = "folder"
    parquet = "parquet"
    webdataset = "webdataset"


class OutputMode(Choice):
    resume = "resume"
    overwrite = "overwrite"
    error = "error"


class Compression(Choice):
    zstd = "zstd"
    snappy = "snappy"
    gzip = "gzip"
    brotli = "brotli"
    lz4 = "lz4"
    none = "none"


class TaskKind(Choice):
    caption = "caption"
    describe = "describe"
    ground = "ground"


class LabelFormat(Choice):
    coco = "coco"
    coco_results = "coco_results"
    labelstudio = "labelstudio"
    yolo = "yolo"
    hf = "hf"
    grit = "grit"
    voc = "voc"


class ImageCopy(Choice):
    link = "link"
    copy = "copy"


@dataclass
class ModelConfig:
    source: str = opt(
        "microsoft/kosmos-2-patch14-224", "Hugging Face hub id, or a local folder written by save_pretrained."
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to pin; null = the default branch.")
    dir: str | None = opt(
        None, "Where the OpenVINO export lives; null = a per-user cache folder keyed by source and format."
    )
    weight_format: WeightFormat = opt(
        WeightFormat.int8, "Weights of the export: fp32, fp16, int8 or int4 (NNCF compression)."
    )
    quantize_image_encoder: bool = opt(
        True,
        "int8/int4: the image encoder computes in int8 too (calibrated on sample photos); false = its weights only.",
    )
    quantize_text_decoder: bool | None = opt(
        None,
        "int8: the text decoder computes in int8 too, kept only if the export's check finds every sample caption "
        "identical; null = on CPUs with AMX only.",
    )
    verify_after_export: bool = opt(
        True, "After exporting, caption the sample photos with transformers and the export, and compare."
    )
    min_identical: float = opt(
        0.6, "Warn (kosmos-export verify=true: exit 4) below this fraction of identical sample captions."
    )

    @property
    def compressed(self) -> bool:
        """int8/int4: NNCF compresses the weights, and `quantize_image_encoder` applies."""
        return self.weight_format in (WeightFormat.int8, WeightFormat.int4)

    def validate(self) -> None:
        if self.quantize_text_decoder and self.weight_format != WeightFormat.int8:
            raise ConfigError(
                f"model.quantize_text_decoder=true needs model.weight_format=int8 (not {self.weight_format}): "
                "set model.weight_format=int8 or model.quantize_text_decoder=null"
            )
        if not self.source:
            raise ConfigError("model.source is empty: give a hub id or a local checkpoint folder")
        if not 0 <= self.min_identical <= 1:
            raise ConfigError(f"model.min_identical={self.min_identical} must be between 0 and 1")


@dataclass
class EngineConfig:
    device: str = opt("CPU", "OpenVINO device (CPU, or AUTO:... of devices OpenVINO lists).")
    precision: Precision | None = opt(
        None,
        "Inference and KV-cache precision, f32 or bf16; null = bf16 where it keeps tokens batch-invariant, else f32.",
    )
    batch_size: int | None = opt(
        None, "Rows each decoder step runs (a row that stops is replaced); null = 32, or 16 on a CPU without AVX-512."
    )
    num_requests: int | None = opt(
        None, "Decoders side by side, each with its own rows, thread and stream; null = one."
    )
    max_new_tokens: int = opt(128, "At most this many generated tokens a row, as in transformers' generate.")
    min_new_tokens: int = opt(0, "End of sequence is suppressed until this many tokens, as in transformers' generate.")
    cache_dir: str | None = opt(None, "OpenVINO's compiled-model cache; null = inside model.dir.")
    dynamic_quantization_group_size: int = opt(
        256, "int8/int4 weights: activations quantised to int8 in groups of this many; 0 = off."
    )
    threads: int | None = opt(
        None, "OpenVINO threads of this process; null = the machine's cores / shards_per_machine."
    )
    shards_per_machine: int = opt(1, "Shards running side by side on this machine (the joblib launcher's n_jobs).")

    def validate(self) -> None:
        if self.shards_per_machine < 1:
            raise ConfigError(f"engine.shards_per_machine={self.shards_per_machine} must be >= 1")
        for key in ("batch_size", "num_requests", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"engine.{key}={getattr(self, key)} must be >= 1, or null (chosen for this machine)")
        for key in ("min_new_tokens", "dynamic_quantization_group_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"engine.{key}={getattr(self, key)} must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"engine.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"engine.min_new_tokens={self.min_new_tokens} exceeds engine.max_new_tokens={self.max_new_tokens}"
            )


IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]


@dataclass
class InputConfig:
    kind: InputKind = opt(InputKind.folder, "folder, parquet or webdataset (set by the input group: input=parquet).")
    path: Any = opt(
        None,
        "What to annotate: a folder, an image, a glob or a list of them; a parquet file, folder or glob; or "
        "WebDataset tars ('shards/{00000..00099}.tar').",
    )
    extensions: list[str] = opt(IMAGE_EXTENSIONS, "folder: the file extensions taken as images.")
    image_column: str = opt("image", "parquet: a column of paths, of bytes, or of {bytes, path} structs.")
    id_column: str | None = opt(None, "parquet: the ids; null = the image path, else <file>#<row>.")
    prompt_column: str | None = opt(None, "parquet: a per-row prompt; null or empty cells take `prompt`.")
    phrases_column: str | None = opt(None, "parquet, task=ground: a per-row list of phrases to ground.")
    keep_columns: list[str] = opt(
        [], "Copied to the output: manifest columns, or WebDataset members by extension (txt, json, cls) as strings."
    )
    limit: int | None = opt(None, "Only the first N items; null = all.")
    max_image_pixels: int = opt(100_000_000, "Images with more pixels are refused from their header, before decoding.")
    max_image_bytes: int = opt(
        128 * 2**20, "Image files, tar members and manifest cells larger than this are refused without being read."
    )
    read_retries: int = opt(3, "A read that fails in passing (a timeout, a refused token) is tried again this often...")
    retry_seconds: float = opt(1.0, "...after this many seconds, doubling each time; then the row is an `io error`.")
    decode_timeout: float = opt(
        300.0, "An image still being read or decoded after this many seconds is a `timeout` row."
    )
    decode_threads: int | None = opt(None, "Threads decoding images ahead of the model; null = the cores, 2 to 8.")
    num_shards: int = opt(1, "Split the input into this many shards (disjoint, covering).")
    shard_index: int = opt(0, "The shard this process annotates, 0 to num_shards - 1.")

    def validate(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"input.shard_index={self.shard_index} must be in [0, input.num_shards={self.num_shards})"
            )
        if not self.path:
            example = {"folder": "photos/", "parquet": "manifest.parquet", "webdataset": "'shards/{00000..00009}.tar'"}
            raise ConfigError(f"input.path is not set: say what to annotate, e.g. input.path={example[self.kind]}")
        listed = isinstance(self.path, list) and all(isinstance(p, str) and p for p in self.path)
        if not isinstance(self.path, str) and not (listed and self.kind == InputKind.folder):
            raise ConfigError(
                f"input.path={self.path!r} must be a path (a list of them for images: input.path=[a.jpg,photos/])"
            )
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"input.limit={self.limit} must be >= 0")
        for key in ("max_image_pixels", "max_image_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"input.{key}={getattr(self, key)} must be >= 1")
        if self.read_retries < 0 or self.retry_seconds < 0 or self.decode_timeout <= 0:
            raise ConfigError(
                f"input.read_retries={self.read_retries} and input.retry_seconds={self.retry_seconds} must be >= 0, "
                f"input.decode_timeout={self.decode_timeout} > 0"
            )
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ConfigError(
                f"input.decode_threads={self.decode_threads} must be >= 1, or null (chosen for this machine)"
            )
        for key in ("prompt_column", "phrases_column", "id_column"):
            if self.kind != InputKind.parquet and getattr(self, key):
                raise ConfigError(f"input.{key} applies to parquet manifests only (input=parquet)")
        if self.kind == InputKind.folder and self.keep_columns:
            raise ConfigError(
                "input.keep_columns applies to parquet manifests and WebDataset tars (input=parquet, input=webdataset)"
            )


@dataclass
class OutputConfig:
    dir: str | None = opt(
        None, "The output folder, local or a URI (s3://bucket/prefix); null = outputs/<input's name>-<task>-<hash>."
    )
    mode: OutputMode = opt(
        OutputMode.resume,
        "resume: skip items already committed; overwrite: start clean; error: refuse if this shard has parts.",
    )
    rows_per_file: int = opt(1000, "A part file is committed after this many rows...")
    flush_seconds: float = opt(300.0, "...or this many seconds after its first row, whichever comes first.")
    compression: Compression = opt(Compression.zstd, "Parquet compression of the parts.")
    retry_errors: list[str] = opt(
        ["io error", "file not found", "timeout"],
        "Error kinds a rerun tries again: their rows are taken out of the committed parts and annotated anew.",
    )
    lease_seconds: float = opt(
        120.0, "Object storage: a shard's lease lasts this long unless renewed (a killed run's blocks a rerun as long)."
    )

    def validate(self) -> None:
        if self.rows_per_file < 1:
            raise ConfigError(f"output.rows_per_file={self.rows_per_file} must be >= 1")
        if self.flush_seconds <= 0:
            raise ConfigError(f"output.flush_seconds={self.flush_seconds} must be > 0")
        if self.lease_seconds < 3:
            raise ConfigError(f"output.lease_seconds={self.lease_seconds} must be >= 3 (it is renewed every third)")


@dataclass
class PreviewConfig:
    enabled: bool = opt(False, "Write a JPEG per image with its boxes and phrases under <output.dir>/_previews/.")
    max_side: int = opt(768, "Longest side of a preview, in pixels.")
    quality: int = opt(90, "JPEG quality of the previews.")

    def validate(self) -> None:
        if self.max_side < 16:
            raise ConfigError(f"preview.max_side={self.max_side} must be >= 16")


@dataclass
class TaskConfig:
    kind: TaskKind = opt(TaskKind.caption, "caption, describe or ground (set by the task group: task=ground).")
    phrases: list[str] = opt(
        [], "task=ground: the phrases to find in every image, unless input.phrases_column gives them."
    )


@dataclass
class RunConfig:
    max_error_rate: float | None = opt(
        None, "Abort (keeping committed work, exit 3) once more than this fraction of items failed; null = never."
    )
    error_rate_min_items: int = opt(
        50, "...judged only after this many items, so a few early failures do not stop a run."
    )

    def validate(self) -> None:
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ConfigError(f"run.max_error_rate={self.max_error_rate} must be between 0 and 1 (or null)")


@dataclass
class AppConfig:
    """kosmos-annotate."""

    model: ModelConfig = opt(ModelConfig(), "The checkpoint and its OpenVINO export.")
    engine: EngineConfig = opt(EngineConfig(), "OpenVINO inference and generation.")
    input: InputConfig = opt(InputConfig(), "What to annotate.")
    output: OutputConfig = opt(OutputConfig(), "Where the parquet parts go.")
    preview: PreviewConfig = opt(PreviewConfig(), "Images with their boxes drawn.")
    run: RunConfig = opt(RunConfig(), "When to give up.")
    task: TaskConfig = opt(TaskConfig(), "What to ask the model.")
    prompt: str | None = opt(
        None, "The prompt of rows that bring none; null = the task's own (pipeline/model/prompt.py)."
    )

    def validate(self, items_from_input: bool = True) -> None:
        """`items_from_input=False`: the items come from elsewhere (the Python API), not input.path."""
        for part in (self.model, self.engine, self.output, self.preview, self.run):
            part.validate()
        if items_from_input:
            self.input.validate()
        if self.task.kind == TaskKind.ground and not (self.task.phrases or self.input.phrases_column):
            raise ConfigError("task=ground needs phrases: task.phrases=[dog,cat] or input.phrases_column=<column>")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("prompt is empty: give one, or prompt=null for the task's own")


@dataclass
class ExportConfig:
    """kosmos-export."""

    model: ModelConfig = opt(ModelConfig(), "The checkpoint and its OpenVINO export.")
    engine: EngineConfig = opt(EngineConfig(), "The device and threads of the export's check.")
    verify: bool = opt(
        False, "Check an existing export against transformers again (loads the checkpoint; exit 4 if it disagrees)."
    )


@dataclass
class LabelStudioOptions:
    document_root: str | None = opt(
        None, "Label Studio's LOCAL_FILES_DOCUMENT_ROOT: images as /data/local-files/?d=<path under it>."
    )
    url_prefix: str | None = opt(None, "Or where the images are served (http(s)://, s3://): <prefix>/<id>.")


@dataclass
class YoloOptions:
    confidence: bool = opt(False, "A sixth column with the box's score (class cx cy w h conf).")
    images: ImageCopy = opt(ImageCopy.link, "Images in images/: link (hard link, else symbolic) or copy.")


@dataclass
class LabelsConfig:
    """kosmos-labels."""

    output: OutputConfig = opt(OutputConfig(), "output.dir: the kosmos-annotate output folder to read.")
    format: LabelFormat = opt(LabelFormat.coco, "coco, coco_results, labelstudio, yolo, hf, grit or voc.")
    dest: str | None = opt(
        None, "Where to write: a file (coco, coco_results, labelstudio; grit: a .parquet) or a folder (yolo, hf, voc)."
    )
    classes: Any = opt(
        None,
        "A list ([dog,person]: phrases whose head noun is one), a mapping of class to synonyms "
        "({person: [a man, people]}) or a YAML file of either; null = each phrase's head noun.",
    )
    split: float | None = opt(None, "yolo, hf: this share of images to train, the rest to val, by a hash of the id.")
    min_score: float = opt(0.0, "Leave out boxes scoring below this.")
    labelstudio: LabelStudioOptions = opt(LabelStudioOptions(), "Where Label Studio fetches each task's image.")
    yolo: YoloOptions = opt(YoloOptions(), "YOLO options.")

    def validate(self) -> None:
        if not 0 <= self.min_score <= 1:
            raise ConfigError(f"min_score={self.min_score} must be between 0 and 1")
        if self.labelstudio.document_root and self.labelstudio.url_prefix:
            raise ConfigError("set labelstudio.document_root or labelstudio.url_prefix, not both")
        if self.split is not None and not 0 < self.split < 1:
            raise ConfigError(f"split={self.split} must be between 0 and 1 (the share of images to train on)")
        if self.split is not None and self.format not in (LabelFormat.yolo, LabelFormat.hf):
            raise ConfigError(f"split is for format=yolo or hf, not {self.format}")


@dataclass
class GalleryOptions:
    page_size: int = opt(100, "Rows per page.")
    thumb_side: int = opt(320, "Longest side of a thumbnail, in pixels.")


@dataclass
class GalleryConfig:
    """kosmos-gallery."""

    output: OutputConfig = opt(OutputConfig(), "output.dir: the (local) kosmos-annotate output folder to show.")
    gallery: GalleryOptions = opt(GalleryOptions(), "The page.")
    classes: Any = opt(None, "The plots' classes, as kosmos-labels takes them: a list, a mapping or a YAML file.")

    def validate(self) -> None:
        if self.gallery.page_size < 1 or self.gallery.thumb_side < 16:
            raise ConfigError("gallery.page_size must be >= 1 and gallery.thumb_side >= 16")


@dataclass
class StatusConfig:
    """kosmos-status."""

    output: OutputConfig = opt(OutputConfig(), "output.dir: the kosmos-annotate output folder to report on.")
    json: bool = opt(False, "Print one JSON object instead of the table.")
    count_input: bool = opt(True, "Count the recorded input's items, for done / total and the time left.")
    stall_seconds: float = opt(1800.0, "A running shard without a commit for this long is stalled (exit 5).")


def plain(cfg: Any) -> Any:
    """A config as JSON-ready values: Enums by their value (as the YAML spells them)."""

    def convert(value):
        if isinstance(value, Enum):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(asdict(cfg))


def build(schema: type[T] | T, values: dict[str, Any] | None = None) -> T:
    """`schema` (a schema, or a config to start from) with `values` (dotted keys, as on the command
    line: {"engine.batch_size": 16}) checked as Hydra checks them: a misspelt key or a value of the
    wrong type is a ConfigError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(schema)
    for key, value in (values or {}).items():
        try:
            OmegaConf.update(cfg, key, value.value if isinstance(value, Enum) else value, merge=True, force_add=False)
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(f"{key}={value!r}: {reason}") from None
    return OmegaConf.to_object(cfg)


def help_lines(schema: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) of every leaf key of `schema`: the configuration reference."""
    out = []
    for f in fields(schema):
        default = f.default_factory() if f.default is MISSING else f.default
        key = f"{prefix}{f.name}"
        if is_dataclass(default):
            out += help_lines(type(default), key + ".")
        else:
            out.append((key, str(f.type), default, f.metadata.get("help", "")))
    return out
