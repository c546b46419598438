"""A Hugging Face `datasets` dataset, saved as `datasets.load_from_disk` opens it and `push_to_hub`
uploads it: the layout of the hub's detection datasets (cppe-5), with each box's score and phrase."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.errors import ConfigError, InputError
from pipeline.outputs.labels.coco import coco_bbox
from pipeline.outputs.labels.common import Labeller, export_folder, split_of
from pipeline.outputs.labels.images import SourceImages
from pipeline.storage.files import Folder

WRITER_BATCH = 64  # rows datasets holds before writing them: images, so few


def write_hf(
    folder: Folder, dest: Path, names: list[str], labeller: Labeller, split: float | None, images: SourceImages
) -> dict:
    """`image` (the image's bytes), `image_id`, `id`, `width`, `height`, `caption` and `objects`
    (`bbox` as COCO's x, y, w, h in pixels, `category` a ClassLabel of the classes, `score`,
    `phrase`); a DatasetDict of `train` and `validation` with `split`. Written by
    `Dataset.from_generator`, a few rows at a time, then saved; the folder appears whole or not at all."""
    try:
        import datasets
    except ImportError:
        raise ConfigError('format=hf needs the datasets library: pip install "kosmos-annotate[hf]"') from None
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "id": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "caption": datasets.Value("string"),
            "split": datasets.Value("string"),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=names),
                    "score": datasets.Value("float32"),
                    "phrase": datasets.Value("string"),
                }
            ),
        }
    )
    ids = {name: i for i, name in enumerate(names)}
    counts = {"images": 0, "boxes": 0}

    def examples():
        for image_id, (row, boxes) in enumerate(labeller.labelled(folder), start=1):
            counts["images"] += 1
            counts["boxes"] += len(boxes)
            yield {
                "split": split_of(row["id"], split),
                "image": {"bytes": images.data(row["source"]), "path": row["id"].rsplit("/", 1)[-1]},
                "image_id": image_id,
                "id": row["id"],
                "width": row["width"],
                "height": row["height"],
                "caption": row["caption"],
                "objects": {
                    "bbox": [coco_bbox(b) for b in boxes],
                    "category": [ids[b.label] for b in boxes],
                    "score": [b.score for b in boxes],
                    "phrase": [b.phrase for b in boxes],
                },
            }

    with export_folder(dest, "hf") as out, tempfile.TemporaryDirectory(dir=out, prefix=".cache-") as cache:
        # A fresh cache: from_generator would reuse an older export's rows under the same fingerprint.
        try:
            built = datasets.Dataset.from_generator(
                examples, features=features, cache_dir=cache, writer_batch_size=WRITER_BATCH, keep_in_memory=False
            )
        except datasets.exceptions.DatasetGenerationError as e:  # our own error, wrapped
            raise e.__cause__ if isinstance(e.__cause__, (InputError, ConfigError, OSError)) else e from None
        except ValueError:  # "corresponds to no data": datasets makes no dataset of no rows
            if counts["images"]:
                raise
            raise InputError(
                f"output.dir={str(folder.root)!r} holds no annotated image (every row is an error): "
                "a Hugging Face dataset needs one"
            ) from None
        if split is None:
            saved = built.remove_columns("split")
        else:
            saved = datasets.DatasetDict(
                {
                    name: built.filter(
                        lambda s, part=part: [v == part for v in s], input_columns="split", batched=True
                    ).remove_columns("split")
                    for name, part in (("train", "train"), ("validation", "val"))
                }
            )
        saved.save_to_disk(str(out / "data"))
        for path in (out / "data").iterdir():
            path.rename(out / path.name)
        (out / "data").rmdir()
    return counts
