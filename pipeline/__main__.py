"""`python -m pipeline` / `kosmos-annotate`: the Hydra entry point of the annotation run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR, AppConfig, ConfigError
from pipeline.sources import InputError

log = logging.getLogger("kosmos-annotate")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def annotate(dict_cfg: DictConfig) -> None:
    from pipeline.run import RunAborted, copy_hydra_record, prepare, run
    from pipeline.sink import OutputError

    cfg: AppConfig = OmegaConf.to_object(dict_cfg)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir = Path(cfg.output.dir).expanduser() if cfg.output.dir else hydra_dir
    try:
        prepare(cfg)
        summary = run(cfg, output_dir)
    except (ConfigError, InputError, OutputError) as e:
        log.error("%s", e)
        sys.exit(2)
    except RunAborted as e:
        log.error("Aborted: %s", e)
        sys.exit(3)
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
    annotate()


if __name__ == "__main__":
    main()
