"""Tokenise a spec's corpus into row shards: python jobs/tokenize.py --spec PATH [--set k=v ...]"""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not jobs/


from jobs.runtime import init_ray, job_spec, main  # noqa: E402
from pipeline.build import DatasetRequest, build_dataset  # noqa: E402
from pipeline.reader import load_manifest  # noqa: E402


def run() -> dict:
    spec = job_spec(__doc__)
    init_ray()
    url = build_dataset(DatasetRequest.from_spec(spec))
    manifest = load_manifest(url, spec.storage)
    return {"dataset": url, "documents": manifest.documents,
            **{f"{s}_{k}": getattr(manifest.splits[s], k) for s in ("train", "val") for k in ("rows", "row_length", "tokens")}}


if __name__ == "__main__":
    main(run)
