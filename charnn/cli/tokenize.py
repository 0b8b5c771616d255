"""Tokenise a spec's corpus into row shards: python -m charnn.cli.tokenize --spec PATH [--set k=v ...]"""


from charnn.cli.runtime import init_ray, job_spec, execute, require_shared_storage
from charnn.data.build import DatasetRequest, build_dataset


def run() -> dict:
    spec = job_spec(__doc__)
    require_shared_storage(spec, init_ray())
    manifest = build_dataset(DatasetRequest.from_spec(spec))
    return {"dataset": manifest.url, "version": manifest.version, "segments": len(manifest.segments),
            "documents": manifest.documents, "waiting_documents": manifest.waiting,
            **{f"{s}_{k}": getattr(manifest.splits[s], k) for s in ("train", "val")
               for k in ("rows", "row_length", "tokens")}}


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
