"""`kosmos-labels format=labelstudio` imported into a real Label Studio, started on 127.0.0.1.

Label Studio lives in a virtual environment of its own (its pins would fight the project's), made
once under the user's cache folder; the first run installs it from the package index (minutes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.storage.locks import flock
from tests.helpers import EXAMPLES, config, free_port, labels

VERSION = "1.23.2"
# label-studio 1.23.2 asks for sentry-sdk>=2.16 with no bound; sentry-sdk 3.0 refuses the options it
# starts Sentry with ("TypeError: Unknown option 'send_default_pii'"), so the server never came up.
PINS = [f"label-studio=={VERSION}", "sentry-sdk<3"]
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def label_studio_venv() -> Path:
    cache = Path(os.environ.get("KOSMOS_ANNOTATE_CACHE") or Path.home() / ".cache" / "kosmos-annotate")
    pins = hashlib.sha256(" ".join(PINS).encode()).hexdigest()[:8]  # other pins, another venv
    venv = cache / "test-venvs" / f"label-studio-{VERSION}-{pins}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with flock(venv.parent / f".{venv.name}.lock"):
        if not (venv / "bin" / "label-studio").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", *PINS], capture_output=True, text=True, timeout=1200
            )
            if pip.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.skip(f"{' '.join(PINS)} could not be installed from the package index: {pip.stderr[-500:]}")
    return venv


class Server:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body=None, method: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        request.add_header("Authorization", f"Token {TOKEN}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            return response.status, payload


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    venv = label_studio_venv()
    root, data = tmp_path_factory.mktemp("document_root"), tmp_path_factory.mktemp("label_studio_data")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_USERNAME": "tests@example.com",
        "LABEL_STUDIO_PASSWORD": "not-a-secret-123",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    log = open(data / "server.log", "w")
    proc = subprocess.Popen(
        [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data,
    )
    server = Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if server.call("/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not start: {(data / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield server, root
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_label_studio_imports_tasks_with_scores_and_serves_their_images(
    label_studio, trained_checkpoint, trained_export, tmp_path
):
    server, root = label_studio
    photos = root / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "astronaut.png", "coffee.png"):
        shutil.copy(EXAMPLES / name, photos / name)
    out = tmp_path / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out)
    labels(out, "labelstudio", tmp_path / "tasks.json", labelstudio={"document_root": str(root)})
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    classes = sorted({r["value"]["rectanglelabels"][0] for t in tasks for r in t["predictions"][0]["result"]})
    assert len(classes) >= 3

    label_config = (tmp_path / "tasks.json.xml").read_text()  # the config the export wrote: its classes
    assert all(f"<Label value={quoteattr(c)}/>" in label_config for c in classes)
    project = json.loads(
        server.call("/api/projects", {"title": "kosmos-annotate test", "label_config": label_config})[1]
    )["id"]
    server.call(
        "/api/storages/localfiles", {"project": project, "path": str(photos), "title": "photos", "use_blob_urls": False}
    )
    imported = json.loads(server.call(f"/api/projects/{project}/import", tasks)[1])
    assert imported["task_count"] == 3 and imported["prediction_count"] == 3

    stored = json.loads(server.call(f"/api/tasks?project={project}&page_size=100")[1])["tasks"]
    assert sorted(t["data"]["id"] for t in stored) == sorted(t["data"]["id"] for t in tasks)
    for task in stored:
        (prediction,) = json.loads(server.call(f"/api/predictions?task={task['id']}")[1])
        mine = next(t for t in tasks if t["data"]["id"] == task["data"]["id"])["predictions"][0]
        assert prediction["score"] == pytest.approx(mine["score"])
        assert [r["score"] for r in prediction["result"]] == pytest.approx([r["score"] for r in mine["result"]])
        assert all(0 < r["score"] <= 1 for r in prediction["result"])
        status, body = server.call(task["data"]["image"])  # the server itself serves the image
        assert status == 200 and body == (photos / task["data"]["id"]).read_bytes()
