"""`kosmos-export`: export the configured checkpoint ahead of a run (kosmos-annotate does it on first
use), or check an existing export against transformers again.

    kosmos-export                       # export the configured model unless model.dir already holds it
    kosmos-export verify=true           # and check an existing export again (exit 4 if it disagrees)
"""

from __future__ import annotations

import logging

from pipeline.cli import command
from pipeline.config import ExportConfig
from pipeline.errors import VerificationFailed
from pipeline.export.store import (
    check_export_libraries,
    check_source,
    ensure_export,
    export_dir,
    stale_reason,
    verify_existing,
)
from pipeline.model.export_folder import MANIFEST, read_manifest

log = logging.getLogger("kosmos-export")


def export(cfg: ExportConfig) -> None:
    cfg.model.validate()
    check_source(cfg.model)  # in seconds: the libraries, the checkpoint's folder or the hub
    if cfg.verify:
        check_export_libraries(cfg.model)
    fresh = stale_reason(cfg.model, export_dir(cfg.model)) is not None  # a new export checks itself
    path = ensure_export(cfg.model, cfg.engine)
    record = (
        verify_existing(cfg.model, cfg.engine, path)
        if cfg.verify and not fresh
        else read_manifest(path).get("verification")
    )
    print(f"Export ready: {path}")
    if record:
        print(f"Verification: {record.get('summary') or record.get('error')}")
    if cfg.verify and not (record or {}).get("passed"):
        raise VerificationFailed(f"see {path / MANIFEST} (verification)")


def main() -> None:
    command("export", export, log)


if __name__ == "__main__":
    main()
