"""The Hydra wrapper the commands share: the typed config composed from `conf/`, and a
`UserError` reported as one log line and an exit status, never a traceback.

Exit statuses: 0 done; 2 a bad invocation (a config Hydra cannot compose, a bad value, an unusable
input or output folder), nothing written; 3 an aborted run (run.max_error_rate), committed work kept;
4 an export that disagrees with transformers (kosmos-export verify=true); 5 a stalled shard
(kosmos-status); 1 an unexpected error (a bug: the traceback is on stderr). Logs go to stderr (see conf/)."""

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

    composed = False

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def app(dict_cfg) -> None:
        nonlocal composed
        composed = True
        try:
            work(OmegaConf.to_object(dict_cfg))
        except UserError as e:
            log.error("%s%s", e.label, e)
            sys.exit(e.exit_code)

    try:
        app()
    except SystemExit as e:
        # Hydra exits 1 for a config it cannot compose (a misspelt key, a bad override): an invocation error.
        sys.exit(2 if e.code == 1 and not composed else e.code)
