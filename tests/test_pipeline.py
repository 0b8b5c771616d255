"""The Ray Data pipeline on a real local Ray, against real files: every stage on Ray Data's tasks,
however small (``data.in_process_mb=0``; tests/test_runners.py builds in this process too)."""
import dataclasses
import json

import numpy as np
import pytest

from support.jobs import write_corpus
from charnn.data.alphabet import encode
from charnn.data.build import DatasetRequest, PipelineError, build_dataset
from charnn.data.reader import SplitReader
from charnn.data.dataset import load_manifest
from charnn.data.operators import StageOptions
from charnn.storage import StorageError, Store

pytestmark = pytest.mark.ray


def request(tmp_path, sources, **overrides):
    fields = dict(sources=[str(s) for s in sources], alphabet="gorner98", seq_len=8, rows=4, workers=2,
                  val_fraction=0.25, shard_mb=1, dataset_root=str(tmp_path / "datasets"),
                  stage=StageOptions(in_process_bytes=0))
    return DatasetRequest(**{**fields, **overrides})


def expected_stream(manifest, split):
    docs = [d for d in manifest.sources().to_pylist() if d["split"] == split]
    return np.concatenate([encode(open(d["url"], "rb").read()) for d in sorted(docs, key=lambda d: d["url"])])


def read_rows(url, manifest, split, world, storage=Store()):
    """Every row of a split, reassembled from the windows each rank reads."""
    rows = []
    for rank in range(world):
        windows = [w for _, w in SplitReader(url, manifest, split, rank, world, storage).windows()]
        rows += list(np.concatenate([w[:, :-1] for w in windows] + [windows[-1][:, -1:]], axis=1))
    return rows


def verify_rows(url, storage=Store(), read=None):
    """Every row of both splits is its slice of the split's stream, as laid out (the README's contract)."""
    manifest = load_manifest(url, storage)
    sources = manifest.sources(storage).to_pylist()
    assert manifest.documents == len(sources)
    assert {d["split"] for d in sources} == {"train", "val"}
    assert all(d["identity"].startswith("sha256:") for d in sources)
    for split in ("train", "val"):
        info = manifest.splits[split]
        stream = expected_stream(manifest, split) if read is None else read(manifest, split)
        assert info.tokens == stream.size
        L = info.row_length
        assert L == ((stream.size - 1) // (info.rows * manifest.seq_len)) * manifest.seq_len
        for r, row in enumerate(read_rows(url, manifest, split, manifest.workers, storage)):
            assert np.array_equal(row, stream[r * L : r * L + L + 1])
    return manifest


def test_dataset_rows_are_the_split_streams_laid_out(ray_local, tmp_path, corpus):
    manifest = verify_rows(build_dataset(request(tmp_path, [corpus], shard_mb=1)).url)
    assert manifest.format == "charnn.rows/3" and manifest.alphabet == "gorner98"
    assert manifest.version == 1 and len(manifest.segments) == 1 and manifest.waiting == 0


def test_thousands_of_tiny_documents_lay_out_as_a_few_do(ray_local, tmp_path):
    corpus = tmp_path / "many"
    for d in range(30):  # nested directories, documents of a few dozen bytes
        write_corpus(corpus / f"part-{d:02d}", documents=100, lines=2, seed=d)
    url = build_dataset(request(tmp_path, [corpus], shard_mb=1)).url
    manifest = verify_rows(url)
    assert manifest.documents == 3000


def test_windows_come_in_order_from_a_start_step(ray_local, tmp_path, corpus):
    url = build_dataset(request(tmp_path, [corpus])).url
    manifest = load_manifest(url)
    reader = SplitReader(url, manifest, "train", 1, 2)
    all_windows = list(reader.windows())
    assert [s for s, _ in all_windows] == list(range(manifest.splits["train"].steps))
    later = list(reader.windows(start_step=3))
    assert later[0][0] == 3 and np.array_equal(later[0][1], all_windows[3][1])
    assert all(w.shape == (2, 9) for _, w in all_windows)


def test_rebuild_reuses_the_dataset_and_cached_documents(ray_local, tmp_path, corpus, capfd):
    first = build_dataset(request(tmp_path, [corpus])).url
    assert build_dataset(request(tmp_path, [corpus])).url == first
    write_corpus(corpus, documents=1, lines=50, seed=9, prefix="added")
    capfd.readouterr()
    second = build_dataset(request(tmp_path, [corpus])).url
    assert second != first and second.rsplit("/", 1)[0] == first.rsplit("/", 1)[0]  # a new version beside it
    assert "9 documents (8 reused from cache)" in capfd.readouterr().err


def test_manifest_is_written_last_and_shards_hold_their_rows(ray_local, tmp_path, corpus):
    url = build_dataset(request(tmp_path, [corpus])).url
    manifest = json.loads(open(f"{url}/manifest.json").read())
    assert manifest["sources"] == {"path": "sources.parquet", "count": 8}
    (segment,) = manifest["segments"]
    directory = url.rsplit("/versions/", 1)[0]
    assert json.loads(open(f"{directory}/segments/{segment['id']}/segment.json").read())["documents"] == 8
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            assert shard["path"].startswith(f"segments/{segment['id']}/{split}")
            assert shard["rows"] == [shard["worker"] * 2, shard["worker"] * 2 + 2]


@pytest.mark.parametrize(
    "case, message",
    [("missing", "matches no files"), ("empty", "corpus is empty"), ("small", "too small for one step"),
     ("uneven", "cannot be split evenly")],
)
def test_bad_input_is_one_clear_error_and_writes_no_dataset(ray_local, tmp_path, case, message):
    corpus = tmp_path / "c"
    corpus.mkdir()
    kwargs = {}
    if case == "empty":
        (corpus / "a.txt").write_text("")
        (corpus / "b.txt").write_text("")
    elif case == "small":
        (corpus / "a.txt").write_text("tiny text\n")
        (corpus / "b.txt").write_text("more tiny text\n")
    elif case == "uneven":
        write_corpus(corpus, 3, 50)
        kwargs = {"rows": 5, "workers": 2}
    source = corpus / "nothing-*.txt" if case == "missing" else corpus
    with pytest.raises((PipelineError, StorageError), match=message) as info:
        build_dataset(request(tmp_path, [source], **kwargs))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "datasets").glob("*/versions/*/manifest.json"))


def test_a_build_killed_mid_write_leaves_no_dataset_and_a_rerun_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from support.env import LOOPBACK_ENV, REPO
    from support.jobs import run_job

    corpus = tmp_path / "big"
    corpus.mkdir()
    block = (tmp_path.parent / "x").name.encode() + b" " + bytes(range(32, 127)) + b"\n"
    for i in range(4):
        (corpus / f"part-{i}.txt").write_bytes(block * (10_000_000 // len(block)))
    args = ["--spec", "jobs/specs/smoke.yaml", "--set", f"data.sources=[{corpus}]",
            "--set", f"data.dataset_root={tmp_path / 'datasets'}", "--set", "data.shard_mb=1",
            "--set", "data.in_process_mb=0"]
    env = {**os.environ, **LOOPBACK_ENV}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "tokenize_corpus.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "datasets").glob("*/segments/*/*.arrow")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before writing shards"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (partial,) = [d for d in (tmp_path / "datasets").glob("*/") if d.name != "documents"]
    assert not list(partial.glob("versions/*/manifest.json")) and not list(partial.glob("segments/*/segment.json"))
    with pytest.raises(Exception, match="no manifest.json"):
        load_manifest(str(partial))

    _, result = run_job("tokenize_corpus.py", *args)
    assert result["dataset"] == str(partial / "versions" / "v000001")
    assert result["train_tokens"] + result["val_tokens"] == 4 * (10_000_000 // len(block)) * len(block)


def test_a_binary_file_gets_a_warning_with_its_unknown_share(ray_local, tmp_path, corpus, caplog):
    import random

    (corpus / "image.bin").write_bytes(random.Random(0).randbytes(20_000))
    with caplog.at_level("WARNING", logger="charnn.pipeline"):
        build_dataset(request(tmp_path, [corpus]))
    (warning,) = [r.getMessage() for r in caplog.records if "binary" in r.getMessage()]
    assert "image.bin" in warning and "% of its characters are outside gorner98" in warning


def test_documents_whose_urls_mask_alike_are_each_their_own_rows_when_rebuilt(ray_local, tmp_path, capfd):
    """N-1 end to end: two files of one size and mtime under auth=public/; the rebuild reuses the
    cache and its rows are still each document's own text."""
    import os

    from charnn.storage import url_key

    corpus = tmp_path / "corpus" / "auth=public"
    corpus.mkdir(parents=True)
    for name, line in (("a.txt", "ROMEO. But soft, what light through yonder window?\n"),
                       ("b.txt", "HAMLET. To be, or not to be, that is the question!\n")):
        (corpus / name).write_text(line * 40)
        os.utime(corpus / name, ns=(1_700_000_000 * 10**9,) * 2)
    build = request(tmp_path, [tmp_path / "corpus"], rows=2, workers=1, val_fraction=0.5)
    build_dataset(build)
    capfd.readouterr()
    url = build_dataset(request(tmp_path, [tmp_path / "corpus"], rows=2, workers=1, val_fraction=0.5, seq_len=4)).url
    assert "2 documents (2 reused from cache)" in capfd.readouterr().err
    sources = load_manifest(url).sources().to_pylist()
    assert [d["url_key"] for d in sources] == [url_key(str(corpus / d["key"].split("/")[-1])) for d in sources]
    verify_rows(url, read=lambda m, split: np.concatenate([
        encode((corpus / d["key"].split("/")[-1]).read_bytes()) for d in m.sources().to_pylist() if d["split"] == split]))


def test_a_charnn_error_in_a_task_is_its_own_one_line(ray_local, tmp_path):
    from support.servers import free_port

    from charnn.data.build import encode_documents
    from charnn.data.sources import list_documents

    write_corpus(tmp_path / "c", 1, 5)
    store = Store(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    wanted = dataclasses.replace(request(tmp_path, [tmp_path / "c"]), dataset_root="s3://nowhere/ds", store=store)
    with pytest.raises(StorageError, match="^data.dataset_root: cannot write the document cache") as info:
        encode_documents(list_documents([str(tmp_path / "c")]), wanted)
    assert "\n" not in str(info.value) and "attempts" not in str(info.value)
