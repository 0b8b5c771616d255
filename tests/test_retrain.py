"""Scheduled retraining end to end: jobs/retrain.py submitted with `ray job submit` to a
`ray start --head` cluster, with the corpus, datasets and model registry in moto's S3."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from support.env import REPO
from support.jobs import last_json, run_job, write_corpus
from charnn.storage import Store
from charnn.registry import ModelRegistry, RegistryBusy

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(ray_cluster, moto_s3, tmp_path_factory):
    """A bucket with a 6-document corpus, and the retrain command line that points at it."""
    bucket = "charnn-retrain"
    moto_s3.client().create_bucket(Bucket=bucket)
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus, documents=6, lines=150, prefix="play")
    moto_s3.upload_dir(bucket, "corpus", corpus)
    args = ["--spec", "jobs/specs/smoke.yaml",
            "--set", f"data.sources=[s3://{bucket}/corpus/]", "--set", f"data.dataset_root=s3://{bucket}/datasets",
            "--set", f"run.storage=s3://{bucket}/runs", "--set", f"storage.endpoint_url={moto_s3.endpoint}",
            "--set", "retrain.model=smoke", "--set", "train.steps=30", "--set", "retrain.steps=30"]
    registry = ModelRegistry(f"s3://{bucket}/runs/models/smoke", Store(endpoint_url=moto_s3.endpoint))
    return {"cluster": ray_cluster, "moto": moto_s3, "bucket": bucket, "args": args, "registry": registry}


def add_documents(world, count: int, seed: int) -> None:
    client = world["moto"].client()
    for i in range(count):
        text = f"New play {seed}-{i}.\n" + "The quality of mercy is not strained.\n" * 40
        client.put_object(Bucket=world["bucket"], Key=f"corpus/new-{seed}-{i}.txt", Body=text.encode())


def retrain(world, *extra: str) -> tuple[int, str, dict | None]:
    return world["cluster"].submit("retrain.py", *world["args"], *extra)


def published(world) -> str | None:
    version = world["registry"].published()
    return version and version.name


# The rounds build on each other, in file order.

def test_round_1_trains_from_scratch_and_publishes(world):
    status, logs, result = retrain(world)
    assert status == 0, logs[-3000:]
    assert result["action"] == "promoted" and result["model_version"] == "v0001"
    assert (result["new_documents"], result["reused_documents"]) == (6, 0)
    assert result["incumbent_val_loss"] is None and result["candidate_val_loss"] > 0
    assert "charnn: step 30/30" in logs  # the spec's full schedule
    version = world["registry"].published()
    assert version.name == "v0001" and len(version.sources()) == 6
    assert version.info.val_loss == pytest.approx(result["candidate_val_loss"])


def test_round_2_without_new_files_skips_without_training(world):
    status, logs, result = retrain(world)
    assert status == 0, logs[-3000:]
    assert result["action"] == "skipped" and result["model_version"] == "v0001"
    assert (result["new_documents"], result["reused_documents"]) == (0, 6)
    assert "charnn: step" not in logs and "charnn.pipeline" not in logs


def objects(world, prefix: str) -> dict[str, str]:
    """{key: ETag} of every object under ``prefix`` in the world's bucket."""
    pages = world["moto"].client().get_paginator("list_objects_v2").paginate(Bucket=world["bucket"], Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_round_3_writes_only_the_new_segment_reads_all_of_it_and_promotes_a_better_model(world):
    before = objects(world, "datasets/")
    add_documents(world, 1, seed=3)  # training text (its key hashes above data.val_fraction)
    status, logs, result = retrain(world)
    assert status == 0, logs[-3000:]
    assert (result["new_documents"], result["reused_documents"]) == (1, 6)
    assert "7 documents (6 reused from cache)" in logs  # only the new one was tokenised
    # the new document's segment, the new version, and the cache entry of the new document: nothing else
    after = objects(world, "datasets/")
    assert {k: after[k] for k in before} == before  # nothing rewritten
    written = sorted(set(after) - set(before))
    segments = {k.split("/segments/")[1].split("/")[0] for k in written if "/segments/" in k}
    assert len(segments) == 1 and [k for k in written if k.endswith("manifest.json")] == \
        [k for k in written if "/versions/v000002/" in k]
    assert all("/segments/" in k or "/versions/v000002/" in k or "/documents/" in k for k in written)
    # the fine-tune read every token the new segment lays out, then replayed older text
    assert 0 < result["new_tokens"] == result["new_tokens_seen"]
    assert result["candidate_val_loss"] < result["incumbent_val_loss"]
    assert result["action"] == "promoted" and result["model_version"] == "v0002" == published(world)
    info = world["registry"].version("v0002").info
    assert info.incumbent["version"] == "v0001" and info.dataset.documents == 7
    assert info.dataset.url.endswith("/versions/v000002")
    assert len(world["registry"].version("v0002").sources()) == 7
    # N-9: every document the incumbent knew kept its split (the comparison is never on text it trained on)
    before, after = (splits_of(world, version) for version in ("v0001", "v0002"))
    assert {key: after[key] for key in before} == before and len(after) == 7


def splits_of(world, version: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    registry = world["registry"]
    with registry.fs.open(f"{registry.path}/versions/{version}/sources.parquet", "rb") as f:
        table = pq.read_table(f, columns=["url_key", "split"])
    return dict(zip(table.column("url_key").to_pylist(), table.column("split").to_pylist()))


def test_gc_keeps_the_published_model_and_generate_uses_it(world):
    status, logs, result = retrain(world)  # nothing new: it skips, and runs retention at its end
    assert status == 0 and result["action"] == "skipped" and result["gc"]["action"] == "applied", logs[-3000:]
    gc = subprocess.run([sys.executable, "-m", "charnn.cli.gc", *world["args"], "--set", "retrain.keep_versions=1",
                         "--set", "retrain.keep_rounds=1", "--apply", "--min-age-minutes", "0"],
                        cwd=REPO, env=world["cluster"].env, capture_output=True, text=True, timeout=300)
    assert gc.returncode == 0, gc.stderr[-3000:]
    report = json.loads(gc.stdout.strip().splitlines()[-1])
    # model v0001 and round 1's candidate go, and with them dataset version v000001, whose one segment
    # v000002 still names
    assert report["action"] == "applied" and world["registry"].versions() == ["v0002"]
    assert (report["removed"]["model_versions"], report["removed"]["candidates"], report["removed"]["dataset_versions"],
            report["removed"]["segments"]) == (1, 1, 1, 0)
    assert world["registry"].published().name == "v0002"
    args = ["--model", "smoke", "--storage", f"s3://{world['bucket']}/runs", "--endpoint-url", world["moto"].endpoint,
            "--length", "60", "--seed", "3"]
    first, _ = run_job("generate.py", *args)
    second, _ = run_job("generate.py", *args)
    # 60 characters and the newline (the text may begin or end with a blank, which strip() would take)
    assert len(first.stdout) == 61 and first.stdout.endswith("\n") and first.stdout == second.stdout
    missing, _ = run_job("generate.py", *args[:1], "nobody", *args[2:], check=False)
    assert missing.returncode == 2 and "has no published version" in missing.stderr


def test_two_jobs_started_together_one_runs_and_rejects_a_candidate_that_does_not_gain_enough(world):
    add_documents(world, 3, seed=5)  # two of them validation text, one training text
    before = world["registry"].versions()
    cluster = world["cluster"]
    ids = [f"charnn-race-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    args = [*world["args"], "--set", "retrain.min_improvement=100"]
    procs = [subprocess.Popen(cluster.job_command(i, "retrain.py", *args), env=cluster.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in ids]
    codes = [p.wait(600) for p in procs]
    logs = [cluster.logs(i) for i in ids]
    results = [last_json(text) for text in logs]
    ran = [r for r in results if r]
    busy = [text for text, r in zip(logs, results) if r is None]
    assert len(ran) == 1 and len(busy) == 1, logs
    # both connect to Ray first, then race for the lease: the loser finds it held, or loses the create
    assert ("another retrain holds the lease" in busy[0] or "took its lease just now" in busy[0]) \
        and "charnn: busy: " in busy[0] and sorted(codes) == [0, 1]
    (result,) = ran
    assert result["action"] == "rejected" and result["model_version"] == "v0002" == published(world)
    assert (result["new_documents"], result["reused_documents"]) == (3, 7)
    assert world["registry"].versions() == before
    record = json.loads(world["registry"].fs.cat_file(result["rejected"].split("://", 1)[1]))
    assert record["metrics"]["val_loss"] == pytest.approx(result["candidate_val_loss"])
    assert record["incumbent"]["val_loss"] == pytest.approx(result["incumbent_val_loss"])


def test_a_retrain_stopped_mid_training_leaves_the_published_model_intact(world):
    add_documents(world, 1, seed=6)
    before = published(world)
    cluster = world["cluster"]
    job = f"charnn-stop-{uuid.uuid4().hex[:8]}"
    # a time budget: the fine-tune would otherwise end once it has read the new text and some older
    subprocess.run(cluster.job_command(job, "retrain.py", *world["args"], "--set", "train.minutes=10",
                                       "--set", "retrain.lease_minutes=0.25", wait=False),
                   env=cluster.env, check=True, capture_output=True, timeout=120)
    deadline = time.time() + 300
    while "charnn: step" not in cluster.logs(job):
        assert time.time() < deadline, cluster.logs(job)[-3000:]
        time.sleep(2)
    subprocess.run([cluster.ray, "job", "stop", "--address", cluster.address, job], env=cluster.env,
                   check=True, capture_output=True, timeout=120)
    assert published(world) == before
    version = world["registry"].published()
    sample = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--checkpoint", version.url,
                             "--endpoint-url", world["moto"].endpoint, "--length", "40"],
                            capture_output=True, text=True, env=cluster.env, timeout=120)
    assert sample.returncode == 0 and len(sample.stdout.strip()) >= 40, sample.stderr[-2000:]
    deadline = time.time() + 30  # the next scheduled job may run: the lease was released or has expired
    while True:
        try:
            with world["registry"].lease(60):
                break
        except RegistryBusy:
            assert time.time() < deadline, "the stopped job's lease neither was released nor expired"
            time.sleep(1)
