"""Retrain when the corpus grows; publish only a better model: python -m charnn.cli.retrain --spec PATH [--set k=v ...]

Meant to run on a schedule (a RayCronJob, a CronJob running ``ray job submit``, or cron with
infra/local-schedule.sh).  In order, holding the registry's lease throughout:
  1. detect: list data.sources and compare (URL, content identity) with the dataset of the
     published model in <run.storage>/models/<retrain.model>/; nothing new or changed: "skipped";
  2. rebuild the dataset: only new or changed documents are tokenised, the rest come from the
     document cache, and every document keeps its validation split;
  3. fine-tune from the published weights for retrain.steps with a fresh optimiser (nothing
     published yet: the spec's full schedule from scratch);
  4. evaluate candidate and incumbent on the same, new validation split;
  5. publish the candidate only if its validation loss beats the incumbent's by
     retrain.min_improvement, else record it as rejected.
The last stdout line is JSON with "action": skipped | promoted | rejected.  A second job started
while one runs exits with status 75 and writes nothing.
"""

import dataclasses
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from charnn.cli.runtime import init_ray, job_spec, execute, require_workers
from charnn.config import Spec, dump_spec
from charnn.data.build import DatasetRequest, build_dataset, listed_documents
from charnn.data.dataset import load_manifest
from charnn.storage import Store, join, redact
from charnn.checkpoint import check_compatible, load_payload
from charnn.train.metrics import say
from charnn.train.trainer import model_shape
from charnn.registry import SOURCES_FILE, Lease, ModelRegistry, Version
from charnn.evaluate import evaluate_checkpoints
from charnn.train.launch import fit


def changed_documents(current: dict[str, str | None], published: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new or changed, removed) document URLs, given {URL: content identity} now and at publication;
    a document whose identity is not known yet (None: not in the document cache) counts as changed."""
    new = sorted(url for url, identity in current.items() if identity is None or published.get(url) != identity)
    return new, sorted(set(published) - set(current))


def is_better(candidate_loss: float, incumbent_loss: float | None, min_improvement: float) -> bool:
    return incumbent_loss is None or candidate_loss < incumbent_loss - min_improvement


def candidate_spec(spec: Spec, registry: ModelRegistry, warm: bool) -> Spec:
    """The candidate's own run, beside the registry; a warm start trains retrain.steps."""
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    train = dataclasses.replace(spec.train, steps=spec.retrain.steps) if warm else spec.train
    run = dataclasses.replace(spec.run, name=name, storage=join(registry.url, "candidates"))
    return dataclasses.replace(spec, train=train, run=run)


def retrain(spec: Spec, registry: ModelRegistry, lease: Lease) -> dict:
    incumbent: Version | None = registry.published()
    listed = listed_documents(DatasetRequest.from_spec(spec))  # identities from the cache: nothing is read
    current = dict(zip(map(redact, listed.column("url").to_pylist()), listed.column("identity").to_pylist()))
    new, removed = changed_documents(current, incumbent.sources() if incumbent else {})
    result = {"model": spec.retrain.model, "registry": registry.url, "model_version": incumbent and incumbent.name,
              "new_documents": len(new), "reused_documents": len(current) - len(new),
              "removed_documents": len(removed), "candidate_val_loss": None, "incumbent_val_loss": None}
    if incumbent and not new and not removed:
        say(f"charnn.retrain: {len(current)} documents, none new or changed since {incumbent.name}; nothing to do")
        return {**result, "action": "skipped"}
    say(f"charnn.retrain: {len(new)} new or changed and {len(removed)} removed documents since "
        f"{incumbent.name if incumbent else 'the start (nothing published)'}")
    if incumbent:  # fail before any work if the spec no longer fits the published model
        check_compatible(load_payload(incumbent.url, Store.of(spec.storage)), model_shape(spec, spec.data.alphabet),
                         spec.data.alphabet)

    require_workers(spec.cluster, init_ray())
    import ray

    dataset = build_dataset(DatasetRequest.from_spec(spec))
    candidate = candidate_spec(spec, registry, warm=incumbent is not None)
    candidate_url = fit(candidate, dataset, init_from=incumbent.url if incumbent else None)

    evaluate = ray.remote(num_cpus=spec.cluster.cpus_per_worker)(evaluate_checkpoints)
    urls = [candidate_url] + ([incumbent.url] if incumbent else [])
    figures = ray.get(evaluate.remote(urls, dataset, Store.of(spec.storage)))
    ours, theirs = figures[0], (figures[1] if incumbent else None)
    result.update(candidate_val_loss=ours["val_loss"], incumbent_val_loss=theirs and theirs["val_loss"],
                  candidate=candidate_url, dataset=dataset)
    info = {"metrics": ours, "incumbent": incumbent and {"version": incumbent.name, **theirs},
            "candidate": candidate_url, "spec": dump_spec(candidate),
            "dataset": {"url": dataset, "documents": len(current)}}
    versus = f"incumbent {incumbent.name} {theirs['val_loss']:.4f}" if incumbent else "nothing published"
    if is_better(ours["val_loss"], theirs and theirs["val_loss"], spec.retrain.min_improvement):
        sources = pa.BufferOutputStream()
        pq.write_table(load_manifest(dataset, Store.of(spec.storage)).sources(Store.of(spec.storage)).select(["url", "identity"]), sources)
        version = registry.publish(candidate_url, info, lease, files={SOURCES_FILE: sources.getvalue().to_pybytes()})
        say(f"charnn.retrain: promoted {version.name}: val_loss {ours['val_loss']:.4f} against {versus}")
        return {**result, "action": "promoted", "model_version": version.name}
    record = registry.reject(candidate.run.name, info)
    say(f"charnn.retrain: rejected the candidate: val_loss {ours['val_loss']:.4f} against {versus} "
        f"(must gain {spec.retrain.min_improvement}); recorded in {record}")
    return {**result, "action": "rejected", "rejected": record}


def run() -> dict:
    spec = job_spec(__doc__)
    registry = ModelRegistry(join(spec.run.storage, "models", spec.retrain.model), Store.of(spec.storage))
    with registry.lease(spec.retrain.lease_minutes * 60) as lease:
        return retrain(spec, registry, lease)


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
