"""`python -m pipeline` / `kosmos-annotate`: compose the config and run the annotation."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from pipeline.annotation.run import run
from pipeline.cli import command
from pipeline.config import AppConfig, plain
from pipeline.storage import layout
from pipeline.storage.files import Folder

log = logging.getLogger("kosmos-annotate")


def annotate(cfg: AppConfig) -> None:
    """Without output.dir, the output folder is derived from the input and the task (layout.default_output),
    so the same command run again resumes. The config and the overrides that made the run are kept in
    the folder (`.hydra/`), beside the data they produced."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.input.path and not cfg.output.dir:
        cfg.output.dir = layout.default_output(cfg.input.path, str(cfg.task.kind))
        log.info("Output: %s (output.dir, from the input and the task: the same command resumes there)", cfg.output.dir)
    run(cfg, cfg.output.dir)
    record = Folder(cfg.output.dir).sub(layout.hydra_record(cfg.input.shard_index, cfg.input.num_shards))
    record.write("config.yaml", OmegaConf.to_yaml(plain(cfg)))
    record.write("overrides.yaml", OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))


def main() -> None:
    command("config", annotate, log)


if __name__ == "__main__":
    main()
