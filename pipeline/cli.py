"""The Hydra wrapper every command shares: the typed config composed from `conf/`, and a
`UserError` reported as one log line and its exit status (pipeline/errors.py), never a traceback.
Logs go to stderr (conf/hydra/job_logging/stderr.yaml)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.config_store import ConfigStore

from pipeline import __version__
from pipeline.config import AppConfig, ExportConfig, GalleryConfig, LabelsConfig, StatusConfig
from pipeline.errors import BAD_INVOCATION, BUG, Stopped, UserError

# The commands' config as an absolute path (Hydra resolves a relative config_path against a package,
# not a folder, when the app starts from a console script): inside the package when installed from a
# wheel (pipeline/conf), else conf/ at the top of the repository (a checkout, an editable install).
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(_PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "conf")
SCHEMAS = {
    "config": AppConfig,
    "export": ExportConfig,
    "labels": LabelsConfig,
    "gallery": GalleryConfig,
    "status": StatusConfig,
}
PROGRAMS = {name: "kosmos-annotate" if name == "config" else f"kosmos-{name}" for name in SCHEMAS}


def register() -> None:
    """Each command's schema in Hydra's ConfigStore, as its YAML's defaults name it (`<name>_schema`)."""
    for name, schema in SCHEMAS.items():
        ConfigStore.instance().store(name="schema" if name == "config" else f"{name}_schema", node=schema)


def command(config_name: str, work: Callable, log: logging.Logger) -> None:
    """Run `work(cfg)` as a Hydra app over `conf/<config_name>.yaml`; `--version` says the project's."""
    import hydra
    from omegaconf import OmegaConf

    if "--version" in sys.argv[1:]:
        print(f"{PROGRAMS[config_name]} {__version__}")
        sys.exit(0)

    register()
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
        except Stopped as e:  # SIGTERM or SIGINT: what was finished is committed
            log.warning("Stopped by %s; a rerun resumes where it stopped", signal.Signals(e.signum).name)
            sys.exit(e.exit_code)

    try:
        app()
    except SystemExit as e:
        # Hydra exits 1 for a config it cannot compose (a misspelt key, a bad override): an invocation error.
        sys.exit(BAD_INVOCATION if e.code == BUG and not composed else e.code)
