"""Retrain when the corpus grows; publish only a better model: python -m charnn.cli.retrain --spec PATH [--set k=v ...]

Meant to run on a schedule (a RayCronJob, a CronJob running ``ray job submit``, or cron with
infra/local-schedule.sh).  It connects to Ray first, then, holding the registry's lease:
  1. detect: list data.sources and compare (URL, content identity) with the dataset of the
     published model in <run.storage>/models/<retrain.model>/; nothing new or changed: "skipped";
  2. rebuild the dataset: only new or changed documents are tokenised, the rest come from the
     document cache, and every document the published model knows keeps its split;
  3. fine-tune from the published weights with a fresh optimiser for retrain.steps, new text
     first: the run starts at the dataset's new segments (those holding a new or changed
     document), reads them once, then wraps round to the oldest text for the rest, at least the
     replay share (retrain.replay) of the steps; if those allow less than all the new text, it
     reads its last steps (nothing published yet: the spec's full schedule from scratch);
  4. evaluate candidate and incumbent on the same, new validation split;
  5. publish the candidate only if its validation loss is finite, below ln |alphabet| (what a
     model that knows nothing scores) and beats the incumbent's by retrain.min_improvement (an
     incumbent whose loss is not finite is beaten by any such candidate), and only in place of
     the incumbent it was compared with; else record it as rejected.
  6. remove what retention no longer keeps (``charnn.retention``, as ``charnn-gc --apply`` does).
The last stdout line is JSON with "action": skipped | promoted | rejected, and new_tokens (the
train tokens that the new segments lay out) beside new_tokens_seen (those the fine-tune read).
A second job started while one runs exits with status 75 and writes nothing.
"""

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from charnn.cli.runtime import init_ray, job_spec, execute, require_cluster
from charnn.config import Spec
from charnn.spec_loader import dump_spec
from charnn.errors import CharnnError
from charnn.data.alphabet import alphabet_size
from charnn.data.build import DatasetRequest, build_dataset, listed_documents
from charnn.data.dataset import Manifest, load_manifest
from charnn.storage import Store, join
from charnn.checkpoint import check_compatible, load_meta
from charnn.log import say
from charnn.model import ModelShape
from charnn.train.figures import ValFigures
from charnn.registry import SOURCES_FILE, DatasetInfo, Lease, ModelRegistry, Version, VersionInfo
from charnn.retention import collect
from charnn.evaluate import evaluate_checkpoints
from charnn.train.launch import fit, prepare_run


def changed_documents(current: dict[str, str | None], published: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new or changed, removed) documents, given {url_key: content identity} now and at publication;
    a document whose identity is not known yet (None: not in the document cache) counts as changed."""
    new = sorted(key for key, identity in current.items() if identity is None or published.get(key) != identity)
    return new, sorted(set(published) - set(current))


def worse_than_uniform(alphabet: str) -> float:
    """The validation loss of a model that knows nothing (ln |alphabet|, 4.58 nats for gorner98): a
    candidate no better than that has diverged or learnt nothing."""
    return math.log(alphabet_size(alphabet))


def rejection(candidate_loss: float, incumbent_loss: float | None, min_improvement: float,
              floor: float = math.inf) -> str | None:
    """Why a candidate with ``candidate_loss`` must not replace the incumbent, or None if it should:
    it must be finite, below ``floor`` and better than the incumbent by ``min_improvement``; an
    incumbent whose loss is not finite (published before these checks) is beaten by any such one."""
    if not math.isfinite(candidate_loss):
        return "its validation loss is not finite: it diverged"
    if candidate_loss >= floor:
        return f"it is no better than a model that knows nothing ({floor:.2f} nats)"
    if incumbent_loss is None or not math.isfinite(incumbent_loss) or candidate_loss < incumbent_loss - min_improvement:
        return None
    return f"it must gain {min_improvement} on the incumbent"


def is_better(candidate_loss: float, incumbent_loss: float | None, min_improvement: float,
              floor: float = math.inf) -> bool:
    return rejection(candidate_loss, incumbent_loss, min_improvement, floor) is None


@dataclass(frozen=True)
class Candidate:
    """A trained candidate: its run's spec, its final checkpoint, the dataset it was evaluated on,
    and what its version.json (or rejected record) says about it."""

    spec: Spec
    url: str
    dataset: str
    info: VersionInfo


@dataclass(frozen=True)
class FineTune:
    """A candidate's reading plan: ``steps`` from the train split's step ``first_step`` on, of which
    the first ``new_steps_read`` are new text (of ``new_steps``) and the rest, after the wrap to
    step 0, older text."""

    steps: int
    first_step: int
    new_steps: int
    new_steps_read: int


def plan_fine_tune(segment_steps: list[int], is_new: list[bool], steps: int, replay: float) -> FineTune:
    """``steps`` from the first new segment on: the new segments once (their last steps, if the
    steps less the ``replay`` share allow no more), then round to step 0 for older text."""
    total = sum(segment_steps)
    first_new = sum(segment_steps[:is_new.index(True)]) if any(is_new) else total
    new_steps = total - first_new
    read = min(new_steps, steps - round(replay * steps))
    return FineTune(steps, (first_new + new_steps - read) % max(total, 1), new_steps, read)


def _segments_of(version: Version, store: Store) -> set[str]:
    """The segments of the dataset a published version was trained on; none if it cannot tell."""
    url = version.info.dataset and version.info.dataset.url
    try:
        return {s.id for s in load_manifest(url, store).segments} if url else set()
    except CharnnError:
        return set()


def candidate_spec(spec: Spec, registry: ModelRegistry, plan: FineTune | None) -> Spec:
    """The candidate's own run, beside the registry; a warm start reads as ``plan`` says."""
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    train = dataclasses.replace(spec.train, steps=plan.steps, first_step=plan.first_step) if plan else spec.train
    run = dataclasses.replace(spec.run, name=name, storage=join(registry.url, "candidates"))
    return dataclasses.replace(spec, train=train, run=run)


def fine_tune_plan(spec: Spec, manifest: Manifest, new: list[str], incumbent: Version) -> FineTune:
    """``plan_fine_tune`` for the dataset version ``manifest``: a segment is new if it holds one
    of the ``new`` documents (their url_keys), or if the incumbent's dataset did not have it (it
    holds the documents of a segment that a removed document left)."""
    store = Store.of(spec.storage)
    keys = manifest.sources(store).column("url_key")
    holds_new = pc.is_in(keys, value_set=pa.array(new, pa.string())).to_numpy(zero_copy_only=False)
    bounds = np.cumsum([0, *(s.documents for s in manifest.segments)])
    known = _segments_of(incumbent, store)
    is_new = [bool(holds_new[a:b].any()) or s.id not in known
              for s, a, b in zip(manifest.segments, bounds, bounds[1:])]
    return plan_fine_tune([s.train_steps for s in manifest.segments], is_new, spec.retrain.steps, spec.retrain.replay)


def retrain(spec: Spec, registry: ModelRegistry, lease: Lease) -> dict:
    incumbent: Version | None = registry.published()
    # a document the incumbent trained on keeps its split: the comparison is never on text it has seen
    request = dataclasses.replace(DatasetRequest.from_spec(spec), keep_splits=incumbent and incumbent.sources_url)
    listed = listed_documents(request)  # identities from the cache: nothing is read
    current = dict(zip(listed.column("url_key").to_pylist(), listed.column("identity").to_pylist()))
    new, removed = changed_documents(current, incumbent.sources() if incumbent else {})
    result = {"model": spec.retrain.model, "registry": registry.url, "model_version": incumbent and incumbent.name,
              "new_documents": len(new), "reused_documents": len(current) - len(new),
              "removed_documents": len(removed), "new_tokens": None, "new_tokens_seen": None,
              "candidate_val_loss": None, "incumbent_val_loss": None}
    if incumbent and not new and not removed:
        say(f"charnn.retrain: {len(current)} documents, none new or changed since {incumbent.name}; nothing to do")
        return {**result, "action": "skipped"}
    say(f"charnn.retrain: {len(new)} new or changed and {len(removed)} removed documents since "
        f"{incumbent.name if incumbent else 'the start (nothing published)'}")
    if incumbent:  # fail before any work if the spec no longer fits the published model
        check_compatible(load_meta(incumbent.url, Store.of(spec.storage)),
                         ModelShape.from_spec(spec, spec.data.alphabet), spec.data.alphabet)
    manifest = build_dataset(request)
    dataset = manifest.url
    plan = fine_tune_plan(spec, manifest, new, incumbent) if incumbent else None
    if plan:
        step_tokens = spec.cluster.num_workers * spec.train.batch_per_worker * spec.data.seq_len
        result.update(new_tokens=plan.new_steps * step_tokens, new_tokens_seen=plan.new_steps_read * step_tokens)
    if plan and not plan.new_steps:
        say(f"charnn.retrain: nothing new to train on in {dataset}: the new documents are validation text, or "
            f"too few to fill a step of training (they wait for more text)")
        return {**result, "action": "skipped", "dataset": dataset}
    candidate_run = candidate_spec(spec, registry, plan)
    candidate_url = fit(prepare_run(candidate_run), manifest,
                        init_from=incumbent.url if incumbent else None).checkpoint
    ours, theirs = _evaluate(spec, candidate_url, incumbent, dataset)
    result.update(candidate_val_loss=ours.loss, incumbent_val_loss=theirs and theirs.loss,
                  candidate=candidate_url, dataset=dataset)
    candidate = Candidate(candidate_run, candidate_url, dataset, VersionInfo(
        ours.metrics(), incumbent and {"version": incumbent.name, **theirs.metrics()}, candidate_url,
        dump_spec(candidate_run), DatasetInfo(dataset, len(current))))
    versus = f"incumbent {incumbent.name} {theirs.loss:.4f}" if incumbent else "nothing published"
    why = rejection(ours.loss, theirs and theirs.loss, spec.retrain.min_improvement,
                    worse_than_uniform(spec.data.alphabet))
    if why is None:
        version = _promote(registry, lease, incumbent, candidate)
        say(f"charnn.retrain: promoted {version}: val_loss {ours.loss:.4f} against {versus}")
        return {**result, "action": "promoted", "model_version": version}
    record = registry.reject(candidate_run.run.name, dataclasses.replace(candidate.info, reason=why), lease)
    say(f"charnn.retrain: rejected the candidate: val_loss {ours.loss:.4f} against {versus}: {why}; "
        f"recorded in {record}")
    return {**result, "action": "rejected", "rejected": record}


def _evaluate(spec: Spec, candidate_url: str, incumbent: Version | None,
              dataset: str) -> tuple[ValFigures, ValFigures | None]:
    """Validation figures of the candidate and the incumbent on the new dataset, in one Ray task."""
    import ray

    evaluate = ray.remote(num_cpus=spec.cluster.cpus_per_worker)(evaluate_checkpoints)
    urls = [candidate_url] + ([incumbent.url] if incumbent else [])
    figures = ray.get(evaluate.remote(urls, dataset, Store.of(spec.storage)))
    return figures[0], (figures[1] if incumbent else None)


def _promote(registry: ModelRegistry, lease: Lease, incumbent: Version | None, candidate: Candidate) -> str:
    """Publish the candidate in place of the incumbent it was compared with (and only that one), with
    the documents it was trained on and their splits; the new version's name."""
    store = Store.of(candidate.spec.storage)
    sources = pa.BufferOutputStream()
    documents = load_manifest(candidate.dataset, store).sources(store)
    pq.write_table(documents.select(["url", "url_key", "identity", "split"]), sources)
    return registry.publish(candidate.url, candidate.info, lease, replaces=incumbent,
                            files={SOURCES_FILE: sources.getvalue().to_pybytes()}).name


def run() -> dict:
    spec = job_spec(__doc__)
    registry = ModelRegistry(join(spec.run.storage, "models", spec.retrain.model), Store.of(spec.storage))
    # Ray first: a cluster that is slow to answer or short of workers keeps no other retrain out
    require_cluster(spec, init_ray(spec.cluster.connect_timeout_s))
    with registry.lease(spec.retrain.lease_minutes * 60) as lease:
        result = retrain(spec, registry, lease)
        return {**result, "gc": _collect(spec, registry, lease)}


def _collect(spec: Spec, registry: ModelRegistry, lease: Lease) -> dict:
    """Retention at the round's end, as ``charnn-gc --apply``; its failure is reported, not raised:
    the round's own result stands."""
    try:
        report = collect(spec, registry, apply=True, lease=lease)
    except CharnnError as exc:
        say(f"charnn.retrain: retention failed: {exc}; run charnn-gc --spec ... --apply later")
        return {"action": "failed", "error": str(exc)}
    say(f"charnn.retrain: retention removed {report.bytes / 1e6:.1f} MB "
        f"({', '.join(f'{n} {k}' for k, n in dataclasses.asdict(report.removed).items() if n) or 'nothing'})")
    return report.to_json()


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
