"""Train a charnn model end to end: python -m charnn.cli.train --spec PATH [--set dotted.key=value ...]

Tokenises the spec's corpus (reusing a dataset built before), trains on Ray Train, prints
the validation figures and a generated sample, and ends with one JSON line.  With
RAY_ADDRESS unset it runs on an embedded local Ray; under ``ray job submit`` or with
RAY_ADDRESS set, on that cluster.  Running it again with the same run.name resumes; while one
job trains a run, another job of the same run exits with status 75 and writes nothing.
"""


import yaml

from charnn.cli.runtime import init_ray, job_spec, execute, require_cluster
from charnn.config import Spec, dump_spec
from charnn.data.build import DatasetRequest, build_dataset, dataset_directory
from charnn.data.dataset import VERSIONS, DatasetError, load_manifest
from charnn.train.metrics import say
from charnn.storage import StorageError, Store, describe_error, join
from charnn.sample import GenerateOptions, sample_text
from charnn.checkpoint import check_compatible, checkpoint_names, latest_checkpoint, load_model, load_payload
from charnn.train.trainer import model_shape
from charnn.train.launch import check_resume, fit, run_lease


def run() -> dict:
    spec = job_spec(__doc__)
    checked = _checked_resume(spec)  # a resume of another model or other settings is refused before Ray starts
    require_cluster(spec, init_ray(spec.cluster.connect_timeout_s))
    with run_lease(spec) as lease:  # from here on this job alone reads, resumes and writes the run
        if checkpoint_names(_run_url(spec), Store.of(spec.storage)) != checked[0]:
            checked = _checked_resume(spec)  # another job wrote checkpoints meanwhile
        dataset = _dataset(spec, checked[1])
        if checked[1]:
            check_resume(spec, checked[1], load_manifest(dataset, Store.of(spec.storage)))
        _write_spec(spec)
        checkpoint = fit(spec, dataset, lease=lease)
    return _report(spec, dataset, checkpoint)


def _dataset(spec: Spec, saved: dict | None) -> str:
    """The dataset version to train on: a resumed run's own, if the spec names the same sources and
    layout and that version is still there (a corpus that grew meanwhile is for the next run);
    else the newest, built with what is new (which ``check_resume`` compares with the run's)."""
    request = DatasetRequest.from_spec(spec)
    started_on = (saved or {}).get("dataset", {}).get("url")
    if (started_on and started_on.rsplit(f"/{VERSIONS}/", 1)[0] == dataset_directory(request)
            and _sources_of(saved.get("spec")) == _sources_of(dump_spec(spec))):
        try:
            load_manifest(started_on, request.store)
            say(f"charnn: resuming {spec.run.name} on the dataset version it started with, {started_on}")
            return started_on
        except DatasetError:
            pass  # removed since: the newest version, which check_resume compares with the run's
    return build_dataset(request)


def _sources_of(spec_text: str | None) -> list | None:
    """data.sources of a spec as ``dump_spec`` wrote it (URLs masked alike), or None."""
    try:
        return yaml.safe_load(spec_text)["data"]["sources"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


def _run_url(spec: Spec) -> str:
    return join(spec.run.storage, spec.run.name)


def _checked_resume(spec: Spec) -> tuple[list[str], dict | None]:
    """(the run's checkpoint names, the model.pt of its newest good one, checked against the spec:
    of another model or other settings, it is refused here)."""
    store = Store.of(spec.storage)
    names = checkpoint_names(_run_url(spec), store)
    resume_from = latest_checkpoint(_run_url(spec), store) if names else None
    saved = load_payload(resume_from, store) if resume_from else None
    if saved:
        check_compatible(saved, model_shape(spec, spec.data.alphabet), spec.data.alphabet)
        check_resume(spec, saved)
    return names, saved


def _write_spec(spec: Spec) -> None:
    run_url = _run_url(spec)
    try:
        Store.of(spec.storage).write(join(run_url, "spec.yaml"), dump_spec(spec).encode())
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise StorageError(f"cannot write the run's spec {describe_error(run_url, exc)}") from None


def _report(spec: Spec, dataset: str, checkpoint: str) -> dict:
    """Print the final checkpoint's validation figures and a sample; the job's result line."""
    model, payload = load_model(checkpoint, Store.of(spec.storage))
    metrics = payload["metrics"]
    sample = "".join(sample_text(model, payload["alphabet"], GenerateOptions(length=spec.train.sample_length, top_k=2)))
    print(f"charnn: val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.3f} "
          f"val_bpc {metrics['val_bpc']:.3f}\ncharnn: sample:\n{sample}", flush=True)
    return {
        "run": spec.run.name, "run_url": _run_url(spec), "dataset": dataset,
        "checkpoint": checkpoint, "steps": metrics["step"], "epoch": metrics["epoch"],
        "first_loss": metrics["first_loss"], "train_loss": metrics["train_loss"], "val_loss": metrics["val_loss"],
        "val_accuracy": metrics["val_accuracy"], "tokens_per_s": metrics["tokens_per_s"],
        "workers": payload.get("history", {}).get("workers"),  # [[first step, workers], ...]: each stretch's group
    }


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
