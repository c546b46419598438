"""`python -m pipeline` / `kosmos-annotate`: compose the config and run the annotation."""

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
    run(cfg, output_dir)
    copy_hydra_record(hydra_dir, output_dir, cfg)


def main() -> None:
    command("config", annotate, log)


if __name__ == "__main__":
    main()
