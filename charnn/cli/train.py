"""Train a charnn model end to end: python -m charnn.cli.train --spec PATH [--set dotted.key=value ...]

Tokenises the spec's corpus (reusing a dataset built before), trains on Ray Train, prints
the validation figures and a generated sample, and ends with one JSON line.  With
RAY_ADDRESS unset it runs on an embedded local Ray; under ``ray job submit`` or with
RAY_ADDRESS set, on that cluster.  Running it again with the same run.name resumes; while one
job trains a run, another job of the same run exits with status 75 and writes nothing.
"""


import yaml

from charnn.cli.runtime import init_ray, job_spec, execute, require_cluster
from charnn.spec_loader import dump_spec
from charnn.data.build import DatasetRequest, build_dataset, dataset_directory
from charnn.data.dataset import VERSIONS, DatasetError, Manifest, load_manifest
from charnn.log import say
from charnn.storage import StorageError, describe_error
from charnn.train.launch import RunPlan, RunResult, check_resume_data, fit, prepare_run, run_lease


def run() -> dict:
    spec = job_spec(__doc__)
    plan = prepare_run(spec)  # a resume of another model or other settings is refused before Ray starts
    require_cluster(spec, init_ray(spec.cluster.connect_timeout_s))
    with run_lease(plan) as lease:  # from here on this job alone reads, resumes and writes the run
        plan = plan.again_if_written()  # another job wrote checkpoints meanwhile
        manifest = _dataset(plan)
        if plan.resumed:
            check_resume_data(plan, manifest)
        _write_spec(plan)
        result = fit(plan, manifest, lease=lease)
    return _report(plan, manifest, result)


def _dataset(plan: RunPlan) -> Manifest:
    """The dataset version to train on: a resumed run's own, if the spec names the same sources and
    layout and that version is still there (a corpus that grew meanwhile is for the next run);
    else the newest, built with what is new (which ``check_resume_data`` compares with the run's)."""
    request = DatasetRequest.from_spec(plan.spec)
    started_on = plan.resumed and plan.resumed.dataset and plan.resumed.dataset.url
    if (started_on and started_on.rsplit(f"/{VERSIONS}/", 1)[0] == dataset_directory(request)
            and _sources_of(plan.resumed.spec) == _sources_of(dump_spec(plan.spec))):
        try:
            manifest = load_manifest(started_on, request.store)
            say(f"charnn: resuming {plan.spec.run.name} on the dataset version it started with, {started_on}")
            return manifest
        except DatasetError:
            pass  # removed since: the newest version, which check_resume_data compares with the run's
    return build_dataset(request)


def _sources_of(spec_text: str | None) -> list | None:
    """data.sources of a spec as ``dump_spec`` wrote it (URLs masked alike), or None."""
    try:
        return yaml.safe_load(spec_text)["data"]["sources"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


def _write_spec(plan: RunPlan) -> None:
    try:
        plan.storage.store.write(plan.storage.spec_yaml, dump_spec(plan.spec).encode())
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise StorageError(f"cannot write the run's spec {describe_error(plan.storage.run_url, exc)}") from None


def _report(plan: RunPlan, manifest: Manifest, result: RunResult) -> dict:
    """Print the final checkpoint's validation figures and a sample; the job's result line."""
    figures, val = result.figures, result.figures.val
    print(f"charnn: val_loss {val.loss:.4f} val_accuracy {val.accuracy:.3f} val_bpc {val.bpc:.3f}\n"
          f"charnn: sample:\n{result.sample}", flush=True)
    return {
        "run": plan.spec.run.name, "run_url": plan.storage.run_url, "dataset": manifest.url,
        "checkpoint": result.checkpoint, "steps": figures.step, "epoch": figures.epoch,
        "first_loss": figures.first_loss, "train_loss": figures.train and figures.train.loss, "val_loss": val.loss,
        "val_accuracy": val.accuracy, "tokens_per_s": figures.tokens_per_s,
        "workers": result.workers,  # [[first step, workers], ...]: each stretch's group
    }


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
