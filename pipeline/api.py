"""The Python API: the command's model, settings and rows, for notebooks and scripts.

    from pipeline import Annotator, annotate

    annotator = Annotator()                                  # loads the model once (exports it on first use)
    for row in annotator.annotate(["a.jpg", "b.png"]):       # paths, PIL images, bytes or arrays
        print(row["caption"], row["entities"])
    rows = annotate("a.jpg", task="ground", phrases=["a dog", "a cat"])

The settings are the command's: `task` picks the task group as `task=...` does (its prompt and token
limit), and `overrides` takes the command's keys (`{"model.source": ..., "engine.batch_size": 16}`).
The rows are the dicts the parquet parts hold, in input order; the images of one call share the
engine's steps (continuous batching), as a run's do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from pipeline.annotation import tasks
from pipeline.annotation.run import annotate_items
from pipeline.cli import CONF_DIR, register
from pipeline.config import AppConfig, PreviewConfig, TaskKind, build
from pipeline.engine import Engine
from pipeline.export.store import ensure_export
from pipeline.hardware import check_device
from pipeline.model.runtime import KosmosModel
from pipeline.records import Item

Images = str | Path | bytes | Image.Image | np.ndarray


class Annotator:
    """A loaded model and its settings; `annotate` as often as needed."""

    def __init__(
        self,
        task: str = "caption",
        phrases: Iterable[str] | None = None,
        prompt: str | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        values = {**({"task.phrases": list(phrases)} if phrases else {}), **({"prompt": prompt} if prompt else {})}
        self.cfg = settings(task, {**values, **(overrides or {})})
        check_device(self.cfg.engine)
        model_dir = ensure_export(self.cfg.model, self.cfg.engine)
        self.model = KosmosModel(model_dir, self.cfg.engine)
        self.engine = Engine(self.model, self.cfg.engine)
        self.task = tasks.make_task(self.cfg, self.model)

    def annotate(self, images: Images | Iterable[Images]) -> Iterator[dict]:
        """One row per image, in order: a path (its id), or an image in memory (PIL, bytes, an array;
        its id `#<n>`, its place in the call). An image that cannot be read is a row with `error`."""
        single = isinstance(images, (str, Path, bytes, Image.Image, np.ndarray))
        items = (_item(k, image) for k, image in enumerate([images] if single else images))
        yield from annotate_items(self.task, self.model, self.engine, items, self.cfg.input, PreviewConfig(), None)


def annotate(
    images: Images | Iterable[Images],
    task: str = "caption",
    phrases: Iterable[str] | None = None,
    prompt: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict]:
    """`Annotator(task, phrases, prompt, overrides).annotate(images)`, as a list."""
    return list(Annotator(task, phrases, prompt, overrides).annotate(images))


def settings(task: str, values: dict[str, Any]) -> AppConfig:
    """The command's config for `task` (its group in conf/task/), with `values` by the command's keys."""
    from hydra import compose, initialize_config_dir

    if task not in TaskKind.__members__:
        build(AppConfig, {"task.kind": task})  # the same error as a bad task.kind
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        composed = OmegaConf.to_object(compose("config", overrides=[f"task={task}"]))
    cfg = build(composed, values)
    cfg.validate(items_from_input=False)
    return cfg


def _item(k: int, image: Images) -> Item:
    if isinstance(image, (str, Path)):
        return Item(id=str(image), source=str(image), path=str(image))
    if isinstance(image, bytes):
        return Item(id=f"#{k}", source=f"#{k}", data=image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return Item(id=f"#{k}", source=f"#{k}", image=image)
    return Item(
        id=f"#{k}",
        source=f"#{k}",
        error=f"not an image: a {type(image).__name__} (give a path, PIL image, bytes or array)",
    )
