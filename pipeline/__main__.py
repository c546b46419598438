"""`python -m pipeline` / `kosmos-annotate`: compose the config, run the annotation, say how it went."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.annotate.run import copy_hydra_record, run
from pipeline.cli import command
from pipeline.config import AppConfig

log = logging.getLogger("kosmos-annotate")


def annotate(cfg: AppConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir = cfg.output.dir or hydra_dir
    summary = run(cfg, output_dir)
    copy_hydra_record(hydra_dir, output_dir, cfg)
    kinds = ", ".join(f"{k}: {n}" for k, n in summary.errors_by_kind.items())
    log.info(
        "Annotated %d images (%d errors%s) in %.1f s: %.2f images/s, %d entities, %d boxes%s. Output: %s",
        summary.items,
        summary.errors,
        f" - {kinds}" if kinds else "",
        summary.wall_seconds,
        summary.images_per_s,
        summary.entities,
        summary.boxes,
        f"; {summary.skipped} already done, skipped" if summary.skipped else "",
        output_dir,
    )


def main() -> None:
    command("config", annotate, log)


if __name__ == "__main__":
    main()
