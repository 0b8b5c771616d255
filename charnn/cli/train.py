"""Train a charnn model end to end: python -m charnn.cli.train --spec PATH [--set dotted.key=value ...]

Tokenises the spec's corpus (reusing a dataset built before), trains on Ray Train, prints
the validation figures and a generated sample, and ends with one JSON line.  With
RAY_ADDRESS unset it runs on an embedded local Ray; under ``ray job submit`` or with
RAY_ADDRESS set, on that cluster.  Running it again with the same run.name resumes.
"""


from charnn.cli.runtime import init_ray, job_spec, execute, require_workers
from charnn.config import dump_spec
from charnn.data.build import DatasetRequest, build_dataset
from charnn.data.dataset import load_manifest
from charnn.storage import StorageError, Store, describe_error, join
from charnn.sample import GenerateOptions, sample_text
from charnn.checkpoint import check_compatible, latest_checkpoint, load_model, load_payload
from charnn.train.trainer import model_shape
from charnn.train.launch import check_resume, fit


def run() -> dict:
    spec = job_spec(__doc__)
    run_url, store = join(spec.run.storage, spec.run.name), Store.of(spec.storage)
    resume_from = latest_checkpoint(run_url, store)
    saved = load_payload(resume_from, store) if resume_from else None
    if saved:  # fail before any work if the run's checkpoints are of another model or other settings
        check_compatible(saved, model_shape(spec, spec.data.alphabet), spec.data.alphabet)
        check_resume(spec, saved)
    require_workers(spec.cluster, init_ray())
    dataset = build_dataset(DatasetRequest.from_spec(spec))
    if saved:
        check_resume(spec, saved, load_manifest(dataset, store))
    try:
        store.write(join(run_url, "spec.yaml"), dump_spec(spec).encode())
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise StorageError(f"cannot write the run's spec {describe_error(run_url, exc)}") from None

    checkpoint = fit(spec, dataset)
    model, payload = load_model(checkpoint, store)
    metrics = payload["metrics"]
    sample = "".join(sample_text(model, payload["alphabet"], GenerateOptions(length=spec.train.sample_length, top_k=2)))
    print(f"charnn: val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.3f} "
          f"val_bpc {metrics['val_bpc']:.3f}\ncharnn: sample:\n{sample}", flush=True)
    return {
        "run": spec.run.name, "run_url": run_url, "dataset": dataset, "checkpoint": checkpoint,
        "steps": metrics["step"], "epoch": metrics["epoch"], "first_loss": metrics["first_loss"],
        "train_loss": metrics["train_loss"], "val_loss": metrics["val_loss"],
        "val_accuracy": metrics["val_accuracy"], "tokens_per_s": metrics["tokens_per_s"],
    }


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
