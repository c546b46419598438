"""The hostile-input corpus (tests/data/hostile/ and what is made here) end to end: every case's row,
every case's peak memory when decoded alone, and a time limit that only catches hangs."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import EpsImagePlugin, Image

from pipeline.annotation.decode import decode
from pipeline.config import InputConfig
from pipeline.records import Item, error_kind
from tests.helpers import EXAMPLES, REPO, annotate, model_overrides

CORPUS = REPO / "tests" / "data" / "hostile"
HANG = 300  # seconds: any case, on any machine; only a hang takes longer
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM in /proc/self/status")

# The committed corpus: the error kind of each file's row (None: annotated).
COMMITTED = {
    "postscript.jpg": "not an image",
    "pdf.jpg": "not an image",
    "svg.png": "not an image",
    "html.webp": "not an image",
    "archive.png": "not an image",
    "icon.png": "not an image",
    "netpbm.bmp": "not an image",
    "targa.tif": "not an image",
    "good.png": None,
}


def big_grey(path: Path, bits: int, size: tuple[int, int] = (8000, 6000)) -> None:
    """A 48 Mpx grey PNG of 8 or 16 bits, a gradient (so it compresses to a few MB)."""
    row = np.linspace(0, 2**bits - 1, size[0]).astype(np.uint16 if bits == 16 else np.uint8)
    Image.fromarray(np.broadcast_to(row, (size[1], size[0])).copy()).save(path, compress_level=1)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict]:
    """The corpus in a folder, with the cases made here: (folder, the error kind each id's row has;
    ids absent from it must have no row)."""
    root = tmp_path_factory.mktemp("hostile")
    want: dict[str, str | None] = {}
    for name, kind in COMMITTED.items():
        shutil.copy(CORPUS / name, root / name)
        want[name] = kind
    raw = os.fsencode(root)
    shutil.copy(EXAMPLES / "rocket.jpg", raw + b"/caf\xe9.jpg")  # Latin-1: not UTF-8
    want["caf\\xe9.jpg"] = None
    for name in ("new\nline.png", "tab\there.png", "-dash.png", " space .png", "x" * 240 + ".png", "ünï 猫.png"):
        shutil.copy(CORPUS / "good.png", root / name)
        want[name] = None
    (root / "folder.jpg").mkdir()  # a folder named like an image: walked into, nothing there
    os.mkfifo(root / "fifo.jpg")  # would block its reader for ever: not a regular file, not taken
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "socket.png"))
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "link.png").symlink_to(root / "good.png")  # a link to a regular file is one
    want["link.png"] = None
    big_grey(root / "grey16.png", 16)
    want["grey16.png"] = None
    io_ = io.BytesIO()
    Image.new("1", (12000, 10000)).save(io_, "PNG")  # 120 Mpx in a few kB: refused from its header
    (root / "bomb.png").write_bytes(io_.getvalue())
    want["bomb.png"] = "too many pixels"
    (root / "huge.jpg").write_bytes(b"\xff\xd8" + b"\0" * 1000)
    os.truncate(root / "huge.jpg", 200 * 2**20)  # sparse: 200 MiB declared, over input.max_image_bytes
    want["huge.jpg"] = "too large"
    return root, want


def test_the_corpus_runs_end_to_end(hostile, trained_checkpoint, trained_export, tmp_path):
    root, want = hostile
    out = tmp_path / "labels"
    proc, _ = annotate(
        f"input.path={root}", f"output.dir={out}", *model_overrides(trained_checkpoint, trained_export), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert {i: error_kind(r["error"]) if r["error"] else None for i, r in rows.items()} == want
    assert all(r["caption"] for i, r in rows.items() if want[i] is None)


def test_no_format_beyond_the_listed_ones_is_opened(monkeypatch):
    """PostScript named .jpg is refused before any plugin but the raster ones looks at it: Pillow
    runs Ghostscript on EPS."""
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    decoded = decode(Item(id="p", source="p", data=(CORPUS / "postscript.jpg").read_bytes()), lambda im: None, CFG)
    assert decoded.error.startswith("not an image") and not opened


CFG = InputConfig(path="x")

CHILD = """
import json, sys, time
from pipeline.annotation.decode import decode
from pipeline.config import InputConfig
from pipeline.model.processor import Processor
from pipeline.sources import open_source

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

processor = Processor(sys.argv[3])
base = hwm()
cfg = InputConfig(kind=sys.argv[1], path=sys.argv[2])
started = time.monotonic()
errors = [decode(item, processor.pixel_values, cfg).error for item in open_source(cfg).items()]
print(json.dumps({"errors": errors, "base_mb": base, "peak_mb": hwm(), "seconds": time.monotonic() - started}))
"""


def decoded_alone(kind: str, path: Path, export: Path) -> dict:
    """One case read and decoded in a process of its own: its errors, its peak memory, its time."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path), str(export)],
        capture_output=True, text=True, timeout=HANG, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_only
def test_every_case_decodes_alone_in_bounded_memory_and_time(hostile, random_export, tmp_path):
    """Each case alone, in a folder of its own: at most 400 MB over the process's start (a 48 Mpx
    8-bit RGB image alone takes 144 MB), never a hang."""
    root, want = hostile
    peaks = {}
    for name in sorted(os.listdir(os.fsencode(root))):
        case = tmp_path / os.fsdecode(name).replace("\n", "_")
        case.mkdir()
        src = os.fsencode(root) + b"/" + name
        dst = os.fsencode(case) + b"/" + name
        if os.path.islink(src) or not os.path.isfile(src):
            continue  # the special files: the end-to-end run shows they take no row and block nothing
        shutil.copy(src, dst)
        result = decoded_alone("folder", case, random_export)
        peaks[os.fsdecode(name)] = result["peak_mb"] - result["base_mb"]
        assert result["peak_mb"] - result["base_mb"] < 400, (name, result)
    print({k[:30]: round(v) for k, v in peaks.items()})


@linux_only
def test_sixteen_bits_take_no_more_memory_than_eight(tmp_path, random_export):
    """A 16-bit image was turned into 8 bits through float64 copies of the whole image: 2.5 times the
    memory of the same image in 8 bits (48 Mpx: 1.3 GB), in each decode thread."""
    peaks = {}
    for bits in (8, 16):
        (tmp_path / str(bits)).mkdir()
        big_grey(tmp_path / str(bits) / "grey.png", bits)
        result = decoded_alone("folder", tmp_path / str(bits), random_export)
        assert result["errors"] == [None]
        peaks[bits] = result["peak_mb"] - result["base_mb"]
    assert peaks[16] < 1.5 * peaks[8], peaks


@linux_only
def test_a_tar_member_over_the_limit_is_refused_unread(tmp_path, random_export):
    """A 10 kB sparse tar declaring a 1 GiB member: before, it was read whole (+2 GB)."""
    tar = shutil.which("tar")
    if tar is None or "GNU" not in subprocess.run([tar, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("GNU tar makes the sparse member")
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "big.jpg", "wb") as f:
        f.truncate(2**30)
    (tmp_path / "src" / "big.txt").write_text("caption")
    subprocess.run([tar, "--sparse", "-cf", str(tmp_path / "s.tar"), "-C", str(tmp_path / "src"), "big.jpg", "big.txt"],
                   check=True)  # fmt: skip
    assert (tmp_path / "s.tar").stat().st_size < 100_000
    result = decoded_alone("webdataset", tmp_path / "s.tar", random_export)
    assert [error_kind(e) for e in result["errors"]] == ["too large"]
    assert result["peak_mb"] - result["base_mb"] < 100, result


def test_members_never_used_are_not_read(tmp_path):
    """A sample's members other than its image and the kept columns are skipped in the stream."""
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("a.jpg", (EXAMPLES / "rocket.jpg").read_bytes()), ("a.bin", b"\0" * 10_000_000)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reads = []
    original = tarfile.TarFile.extractfile

    def extract(self, member):
        reads.append(member.name)
        return original(self, member)

    from pipeline.sources import iter_items

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tarfile.TarFile, "extractfile", extract)
        items = list(iter_items(InputConfig(kind="webdataset", path=str(tmp_path / "s.tar"))))
    assert reads == ["a.jpg"] and items[0].data and items[0].error is None
