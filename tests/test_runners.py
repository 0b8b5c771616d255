"""Where the pipeline's tasks run (``charnn.data.runners``): in this process for a stage of a small
input (``data.in_process_mb``), on Ray Data for a larger one; and a dataset built in this process is
the one Ray builds."""
from __future__ import annotations

import dataclasses

import pytest

from charnn.data.build import DatasetRequest, build_dataset, encode_documents
from charnn.data.dataset import load_manifest
from charnn.data.operators import StageOptions
from charnn.data.runners import InProcess, RayTasks, default_runner, stage_runner
from charnn.data.sources import list_documents
from charnn.spec_loader import load_spec
from charnn.storage import StorageError, Store
from support.env import REPO
from support.jobs import write_corpus
from support.servers import free_port
from test_pipeline import verify_rows


def request(tmp_path, sources, **overrides) -> DatasetRequest:
    fields = dict(sources=[str(s) for s in sources], alphabet="gorner98", seq_len=8, rows=4, workers=2,
                  val_fraction=0.25, shard_mb=1, dataset_root=str(tmp_path / "datasets"))
    return DatasetRequest(**{**fields, **overrides})


def test_this_process_runs_a_stage_under_the_limit_and_ray_a_larger_one():
    assert isinstance(default_runner(2**20 - 1, 2**20), InProcess)
    assert isinstance(default_runner(2**20, 2**20), RayTasks)
    assert isinstance(default_runner(1, 0), RayTasks)  # data.in_process_mb=0: always Ray's tasks
    assert isinstance(stage_runner(StageOptions(runner=InProcess(), in_process_bytes=0), 10**12), InProcess)


@pytest.mark.parametrize("overrides, limit", [([], 64 * 2**20), (["data.in_process_mb=2"], 2 * 2**20),
                                               (["data.in_process_mb=0"], 0)], ids=["default", "2", "0"])
def test_data_in_process_mb_is_the_input_a_build_stage_runs_in_this_process_under(tmp_path, overrides, limit):
    spec = load_spec(str(REPO / "jobs" / "specs" / "smoke.yaml"), [f"data.sources=[{tmp_path}]", *overrides])
    assert DatasetRequest.from_spec(spec).stage.in_process_bytes == limit


def test_a_dataset_built_without_ray_holds_the_split_streams_laid_out(tmp_path, corpus):
    import ray

    manifest = verify_rows(build_dataset(request(tmp_path, [corpus])).url)  # the default: Ray is not up
    assert manifest.version == 1 and manifest.format == "charnn.rows/3"
    assert not ray.is_initialized()


def test_build_dataset_returns_the_manifest_it_wrote_and_a_rebuild_the_one_it_reuses(tmp_path, corpus):
    built = build_dataset(request(tmp_path, [corpus]), runner=InProcess())
    read = load_manifest(built.url)
    assert built == read and built.url == read.url and built.url.endswith("/versions/v000001")
    again = build_dataset(request(tmp_path, [corpus]), runner=InProcess())  # nothing new: the same version
    assert again == read and again.url == read.url


def test_a_charnn_error_in_a_task_in_this_process_is_its_own_one_line(tmp_path):
    write_corpus(tmp_path / "c", 1, 5)
    store = Store(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    wanted = dataclasses.replace(request(tmp_path, [tmp_path / "c"]), dataset_root="s3://nowhere/ds", store=store)
    with pytest.raises(StorageError, match="^data.dataset_root: cannot write the document cache") as info:
        encode_documents(list_documents([str(tmp_path / "c")]), wanted)
    assert "\n" not in str(info.value)


def test_this_process_and_ray_build_the_same_dataset_byte_for_byte(ray_local, tmp_path, corpus):
    urls = {name: build_dataset(request(tmp_path / name, [corpus]), runner=runner).url
            for name, runner in (("here", InProcess()), ("ray", RayTasks()))}
    here, there = (load_manifest(url) for url in urls.values())
    assert here.splits == there.splits and here.stream == there.stream
    shards = {name: sorted((tmp_path / name / "datasets").glob("*/segments/*/*.arrow")) for name in urls}
    assert [p.relative_to(tmp_path / "here") for p in shards["here"]] == \
        [p.relative_to(tmp_path / "ray") for p in shards["ray"]] and shards["here"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shards["here"], shards["ray"]))
