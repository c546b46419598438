"""Input and output in object storage, against a real S3 server (moto's) started on 127.0.0.1: the same
rows as local files, parts that appear whole, kill and resume, leases, kosmos-status on a bucket."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotation.resume import exclusive
from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import InputError, OutputError
from pipeline.storage import files
from pipeline.storage.files import Folder
from pipeline.storage.locks import Lease, LeaseHeld
from tests.helpers import EXAMPLES, REPO, annotate, config, example_images, model_overrides

SECRET = "kosmos-test-secret-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; credentials and endpoint only in the environment, as users give them."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "kosmos-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    files._filesystem.cache_clear()
    yield
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    files._filesystem.cache_clear()


@pytest.fixture
def bucket(s3) -> str:
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(uri: str, data: bytes) -> None:
    Folder(uri.rsplit("/", 1)[0]).write(uri.rsplit("/", 1)[1], data)


def keys(prefix: str) -> list[str]:
    import boto3

    bucket, _, path = prefix.removeprefix("s3://").partition("/")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=path)
    return sorted(o["Key"][len(path) :].lstrip("/") for o in listed.get("Contents", []))


def bucket_rows(uri: str) -> list[dict]:
    folder = Folder(uri)
    return [
        r
        for name in folder.names()
        if name.startswith("part-")
        for r in pq.read_table(folder.path(name), filesystem=folder.fs).to_pylist()
    ]


def tokens(rows: list[dict]) -> dict[str, list]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r["token_ids"] for r in rows}


@pytest.fixture(scope="module")
def local_reference(trained_checkpoint, trained_export, tmp_path_factory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("reference") / "labels"
    photos = example_images()
    folder = out.parent / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).write_bytes(photo.read_bytes())
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(folder)), out), out)
    return {r["id"]: r["token_ids"] for r in pq.read_table(out).to_pylist()}


def test_folder_manifest_and_tars_in_a_bucket_give_the_local_rows(
    trained_checkpoint, trained_export, bucket, local_reference, tmp_path
):
    """The six example photos as loose objects, as a manifest of bytes and as two tars, all in the
    bucket, annotated into the bucket: the same tokens as the local folder, previews and summaries
    beside the parts, and the secret key nowhere in what was written."""
    photos = example_images()
    for photo in photos:
        upload(f"{bucket}/photos/{photo.name}", photo.read_bytes())
    table = pa.table({"image": [p.read_bytes() for p in photos], "key": [p.name for p in photos]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=2)
    upload(f"{bucket}/manifest/m.parquet", buffer.getvalue().to_pybytes())
    for t in range(2):
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            for photo in photos[3 * t : 3 * t + 3]:
                info = tarfile.TarInfo(photo.name)  # key = the file name up to its first dot
                info.size = photo.stat().st_size
                tar.addfile(info, io.BytesIO(photo.read_bytes()))
        upload(f"{bucket}/tars/{t:05d}.tar", data.getvalue())
    by_stem = {name.split(".")[0]: t for name, t in local_reference.items()}

    inputs = {
        "folder": InputConfig(path=f"{bucket}/photos/"),
        "manifest": InputConfig(kind="parquet", path=f"{bucket}/manifest", id_column="key"),
        "tars": InputConfig(kind="webdataset", path=f"{bucket}/tars/{{00000..00001}}.tar"),
    }
    for kind, input_cfg in inputs.items():
        out = f"{bucket}/out-{kind}"
        summary = run(config(trained_checkpoint, trained_export, input_cfg, out, preview={"enabled": True}), out)
        assert summary.items == 6 and summary.errors == 0, kind
        got = tokens(bucket_rows(out))
        want = by_stem if kind == "tars" else local_reference
        assert got == want, kind
        written = keys(out)
        assert {"_settings.json", "_summary.json"} <= set(written) and sum(
            k.startswith("_previews/") for k in written
        ) == 6
        assert not any(k.startswith(".lease") for k in written)  # released at the end
        assert all(SECRET not in Folder(out).read_text(k) for k in written if k.endswith((".json", ".yaml")))
        assert (
            run(config(trained_checkpoint, trained_export, input_cfg, out), out).skipped == 6
        )  # resume from the bucket


def test_missing_objects_are_error_rows_and_a_missing_prefix_is_refused(trained_checkpoint, trained_export, bucket):
    photo = example_images()[0]
    upload(f"{bucket}/m/{photo.name}", photo.read_bytes())
    table = pa.table({"image": [f"{bucket}/m/{photo.name}", f"{bucket}/m/gone.jpg"]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    upload(f"{bucket}/m/list.parquet", buffer.getvalue().to_pybytes())
    out = f"{bucket}/out"
    run(
        config(trained_checkpoint, trained_export, InputConfig(kind="parquet", path=f"{bucket}/m/list.parquet"), out),
        out,
    )
    errors = {r["id"]: r["error"] for r in bucket_rows(out)}
    assert errors[f"{bucket}/m/{photo.name}"] is None
    assert errors[f"{bucket}/m/gone.jpg"].startswith("file not found:")
    with pytest.raises(InputError, match="does not exist"):
        run(
            config(trained_checkpoint, trained_export, InputConfig(kind="parquet", path=f"{bucket}/nothing-here"), out),
            out,
        )


def test_kill_9_then_resume_in_a_bucket(trained_checkpoint, trained_export, bucket, many_images, tmp_path):
    """Killed after committing some parts: no half part appears, the killed run's lease blocks a
    rerun until it expires (output.lease_seconds: whatever the host names and pids, no other run can
    take a live lease), and the rerun ends with every row once."""
    out = f"{bucket}/killed"
    args = [
        sys.executable,
        "-m",
        "pipeline",
        f"input.path={many_images}",
        f"output.dir={out}",
        "output.rows_per_file=2",
        "engine.batch_size=2",
        "engine.num_requests=1",
        "output.lease_seconds=6",
        *model_overrides(trained_checkpoint, trained_export),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while child.poll() is None and sum(k.startswith("part-") for k in keys(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    committed = bucket_rows(out)
    assert 6 <= len(committed) < 24 and ".lease-00000.json" in keys(out)
    refused = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "is being written by run" in refused.stderr  # its lease is live
    time.sleep(max(0.0, json.loads(Folder(out).read_text(".lease-00000.json"))["expires"] - time.time()) + 0.5)

    child = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.wait(timeout=300) == 0, child.stderr.read()[-2000:]
    got = tokens(bucket_rows(out))
    assert len(got) == 24 and set(r["id"] for r in committed) <= set(got)
    assert json.loads(Folder(out).read_text("_summary.json"))["skipped"] == len(committed)


def test_a_live_lease_refuses_a_second_run_and_an_expired_one_is_taken_over(bucket):
    folder = Folder(f"{bucket}/leased")
    with exclusive(folder, 0) as lease:
        assert lease is not None and json.loads(folder.read_text(".lease-00000.json"))["pid"] == os.getpid()
        with pytest.raises(OutputError, match=f"being written by run {lease.run} \\(pid {os.getpid()}"):
            with exclusive(folder, 0):
                pass
        with exclusive(folder, 1):  # another shard is free
            pass
    assert ".lease-00000.json" not in folder.names()  # released

    other = {"run": "elsewhere", "host": "another-host", "pid": 1, "expires": time.time() + 60}
    folder.write(".lease-00000.json", json.dumps(other))
    with pytest.raises(LeaseHeld):
        Lease(folder, ".lease-00000.json", settle=0.1).acquire()
    folder.write(".lease-00000.json", json.dumps({**other, "expires": time.time() - 1}))
    taken = Lease(folder, ".lease-00000.json", ttl=3, settle=0.1)
    taken.acquire()
    time.sleep(2.5)  # renewed by its thread (every ttl / 3): still held past the first expiry
    assert taken.holder()["run"] == taken.run
    folder.write(".lease-00000.json", json.dumps({**other, "expires": time.time() + 60}))  # someone took it over
    time.sleep(1.5)
    assert taken.failure == "another run took it over"
    taken.release()
    assert json.loads(folder.read_text(".lease-00000.json"))["run"] == "elsewhere"  # not ours to remove


def test_status_reads_a_bucket(trained_checkpoint, trained_export, bucket, tmp_path):
    out = f"{bucket}/status"
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in example_images()[:3]:
        (photos / photo.name).write_bytes(photo.read_bytes())
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.outputs.status", f"output.dir={out}", "json=true"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["done"] == 3 and report["total"] == 3 and report["shards"][0]["state"] == "finished"


def test_a_lease_belongs_to_a_run_not_to_a_host_and_pid(bucket):
    """Containers share host names and reuse pids: a lease whose pid does not exist here was taken
    as a dead run's, so two containers could both hold a shard."""
    folder = Folder(f"{bucket}/hosts")
    record = {"run": "0123456789ab", "host": socket.gethostname(), "pid": 2**22 - 7, "expires": time.time() + 60}
    folder.write(".lease-00000.json", json.dumps(record))
    with pytest.raises(OutputError, match="being written by run 0123456789ab"):
        with exclusive(folder, 0):
            pass


def test_a_run_that_lost_its_lease_commits_nothing_more(trained_checkpoint, trained_export, bucket, tmp_path):
    """The holder reads its lease back before every commit (before, only at the renewal interval),
    and its parts carry its run id, so two holders never overwrite each other's parts."""
    out = f"{bucket}/lost"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out, output={"rows_per_file": 2})
    write = Folder.write

    def taken_over(self, name, data, sync=False):
        if name.startswith("part-") and any(n.startswith("part-") for n in self.names()):
            other = {"run": "fedcba987654", "host": "elsewhere", "pid": 1, "expires": time.time() + 60}
            write(self, ".lease-00000.json", json.dumps(other))
        return write(self, name, data, sync)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Folder, "write", taken_over)
        with pytest.raises(OutputError, match="no longer holds the shard: another run took it over"):
            run(cfg, out)
    parts = [k for k in keys(out) if k.startswith("part-")]
    summary = json.loads(Folder(out).read_text("_summary.json"))
    assert len(parts) == 2 and all(re.fullmatch(rf"part-00000-0000\d-{summary['run']}\.parquet", p) for p in parts)


def test_a_renewal_that_fails_for_good_ends_the_run(bucket):
    folder = Folder(f"{bucket}/renewal")
    lease = Lease(folder, ".lease-00000.json", ttl=3, settle=0.1)
    lease.acquire()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lease, "_write", lambda: (_ for _ in ()).throw(ValueError("credentials expired for good")))
        time.sleep(1.5)
    with pytest.raises(OutputError, match="renewing it failed \\(ValueError: credentials expired for good\\)"):
        lease.check("12 rows were not committed")
    lease.release()


def test_a_read_back_that_fails_in_passing_trusts_the_lease_until_it_expires(bucket):
    """One timed-out read of the lease before a commit ended a healthy run."""
    lease = Lease(Folder(f"{bucket}/readback"), ".lease-00000.json", ttl=3, settle=0.1)
    lease.acquire()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lease, "holder", lambda: (_ for _ in ()).throw(OSError("AWS Error NETWORK_CONNECTION: timeout")))
        lease.check("2 rows were not committed")  # our own renewal has not expired
        lease.record["expires"] = time.time() - 1
        with pytest.raises(OutputError, match="could not be read back .* and has expired"):
            lease.check("2 rows were not committed")
    lease.release()


def test_credentials_in_a_uri_and_unknown_options_are_refused(trained_checkpoint, trained_export, bucket, tmp_path):
    """They were accepted and copied into `source`, the summaries and the logs; an unknown query
    parameter was dropped without a word."""
    name = bucket.removeprefix("s3://")
    model = model_overrides(trained_checkpoint, trained_export)
    for output, message in [
        (f"s3://AKIAEXAMPLE:{SECRET}@{name}/out", "holds credentials"),
        (f"{bucket}/out?endpoint=nowhere", "Unexpected query parameter in S3 URI: 'endpoint'"),
    ]:
        proc, _ = annotate(f"input.path={EXAMPLES}", f"output.dir='{output}'", *model, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and SECRET not in proc.stderr, proc.stderr[-2000:]
    assert keys(bucket) == []


def test_the_store_options_of_a_uri_are_used(trained_checkpoint, trained_export, bucket, tmp_path):
    """`?endpoint_override=` and `scheme=` reach the S3 client (before, the query string was dropped)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    photo = example_images()[0]
    upload(f"{bucket}/q/{photo.name}", photo.read_bytes())
    manifest = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": [photo.name]}), manifest)
    upload(f"{bucket}/q/list.parquet", manifest.getvalue().to_pybytes())
    with pytest.MonkeyPatch.context() as m:
        m.delenv("AWS_ENDPOINT_URL")
        files._filesystem.cache_clear()
        query = f"?endpoint_override={endpoint}&scheme=http"
        out = f"{bucket}/q-out{query}"
        run(config(trained_checkpoint, trained_export, InputConfig(path=f"{bucket}/q{query}"), out), out)
        rows = bucket_rows(out)
        found = []
        for path in (f"{bucket}/q/list.parquet{query}", f"{bucket}/q{query}"):  # a manifest file, its folder
            out = f"{bucket}/q-manifest-{len(found)}{query}"
            run(config(trained_checkpoint, trained_export, InputConfig(kind="parquet", path=path), out), out)
            found += [(r["id"], r["error"]) for r in bucket_rows(out)]
    files._filesystem.cache_clear()
    assert [(r["id"], r["error"]) for r in rows] == [(photo.name, None)]
    assert found == [(photo.name, None)] * 2
