"""The Hydra wrapper the four commands share: the typed config composed from `conf/`, and a
`UserError` reported as one log line and an exit status, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.config import CONF_DIR, UserError


def command(config_name: str, work: Callable, log: logging.Logger, schema: type | None = None) -> None:
    """Run `work(cfg)` as a Hydra app over `conf/<config_name>.yaml` (with `<config_name>_schema`
    registered from `schema` when the app has its own)."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if schema is not None:
        ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def app(dict_cfg) -> None:
        try:
            work(OmegaConf.to_object(dict_cfg))
        except UserError as e:
            log.error("%s%s", e.label, e)
            sys.exit(e.exit_code)

    app()
