"""Sharded runs: a stable partition by id, launched by Hydra multirun on one machine or a cluster."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.annotation.resume import id_hashes
from pipeline.annotation.run import run
from pipeline.cli import CONF_DIR
from pipeline.config import EngineConfig, InputConfig
from pipeline.hardware import threads
from tests.helpers import config, example_images, multirun, rows_by_id


def test_partition_is_disjoint_covering_and_order_free():
    ids = [f"folder/{i}.jpg" for i in range(5000)]
    shards = [set(i for i, h in zip(ids, id_hashes(ids)) if int(h) % 7 == k) for k in range(7)]
    assert sum(len(s) for s in shards) == len(ids) and set().union(*shards) == set(ids)
    assert all(600 < len(s) < 830 for s in shards)  # roughly even
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert dict(zip(shuffled, id_hashes(shuffled).tolist())) == dict(zip(ids, id_hashes(ids).tolist()))
    assert int(id_hashes(["a.jpg"])[0]) == 0x89A7126E02F047FE  # blake2b, not Python's salted hash()


@pytest.mark.parametrize(
    "cluster, shards, extra", [("local", 3, ["hydra.launcher.n_jobs=3"]), ("submitit_local", 2, [])]
)
def test_multirun_shards_equal_a_single_run(
    trained_checkpoint, trained_export, many_images, tmp_path, cluster, shards, extra
):
    single = tmp_path / "single"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(many_images)), single), single)
    want = {i: r["token_ids"] for i, r in rows_by_id(single).items()}

    out = tmp_path / "sharded"
    multirun(cluster, shards, many_images, out, trained_checkpoint, trained_export, *extra)
    got = rows_by_id(out)
    assert {i: r["token_ids"] for i, r in got.items()} == want
    parts = {p.name.split("-")[1] for p in out.glob("part-*.parquet")}
    assert parts == {f"{i:05d}" for i in range(shards)}  # every shard wrote its own parts
    assert sorted(p.name for p in out.glob("_summary-*.json")) == [f"_summary-{i:05d}.json" for i in range(shards)]

    # Resume works per shard: a second multirun finds everything done.
    multirun(cluster, shards, many_images, out, trained_checkpoint, trained_export, *extra)
    assert rows_by_id(out).keys() == want.keys()


def test_local_cluster_splits_the_cores_between_shards():
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=["cluster=local", "hydra.launcher.n_jobs=2"], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.launcher.n_jobs") == 2
    engine = OmegaConf.to_container(cfg.engine, resolve=False)
    assert engine["shards_per_machine"] == "${hydra:launcher.n_jobs}"  # resolved inside each job
    cores = len(os.sched_getaffinity(0))
    assert threads(EngineConfig(shards_per_machine=2)) == max(1, cores // 2)
    assert threads(EngineConfig(threads=3, shards_per_machine=2)) == 3


@pytest.mark.parametrize("cluster", ["local", "slurm", "submitit_local"])
def test_cluster_configs_compose(cluster):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"cluster={cluster}"], return_hydra_config=True)
    assert "launcher" in cfg.hydra


def test_manifest_shards_equal_a_single_run_repeated_ids_included(trained_checkpoint, trained_export, tmp_path):
    """Manifest shards split by row position: a repeated id in a later shard's range is still the
    error row a single run makes of it, and the shards together write exactly the single run's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = example_images()
    images = [photos[i % len(photos)].read_bytes() for i in range(12)]
    keys = [f"k{i}" for i in range(12)]
    keys[9] = "k1"  # shard 0's id again, in shard 2's range
    pq.write_table(pa.table({"image": images, "key": keys}), tmp_path / "m.parquet", row_group_size=5)

    def rows(out: Path) -> list:
        return sorted((r["id"], r["error"] or "", r["token_ids"] or []) for r in pq.read_table(out).to_pylist())

    def cfg(out: Path, **shard) -> object:
        return config(
            trained_checkpoint,
            trained_export,
            InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), id_column="key", **shard),
            out,
        )

    single = tmp_path / "single"
    run(cfg(single), single)
    sharded = tmp_path / "sharded"
    for k in range(3):
        run(cfg(sharded, num_shards=3, shard_index=k), sharded)
    assert rows(sharded) == rows(single)
    assert [e for _, e, _ in rows(single) if e] == ["duplicate id: 'k1' was already used by an earlier item"]
    assert [run(cfg(sharded, num_shards=3, shard_index=k), sharded).skipped for k in range(3)] == [4, 4, 4]
    assert rows(sharded) == rows(single)  # the repeated id's error row is not written again
