"""One worker's training of a run: the Trainer, its step, and the parts that keep their own cadence.

``Trainer.train()`` is the loop: take the step's batch, run ``train_step``, then let each part
decide whether this step is its turn (the metrics logger, the sampler, the validator, the
checkpointer).  Where it runs is its ``WorkerContext``: a Ray Train worker
(``train_loop_per_worker``) or this process alone (``LocalContext``, for benchmarks and tests).
Hosts sync only at log, sample, validation and checkpoint steps, which are also where every rank
checks, all at the same step, that the run has not diverged (``TrainingDiverged``); reports, which
block for about 1.5 s under Ray Train, happen at validation and checkpoint steps only.
"""
from __future__ import annotations

import time

import torch

from charnn import checkpoint as ckpt
from charnn.config import Spec
from charnn.spec_loader import dump_spec, spec_from_dict
from charnn.data.dataset import Manifest, load_manifest
from charnn.data.layout import loss_weight
from charnn.data.reader import SplitReader
from charnn.model import CharGRU, ModelShape
from charnn.sample import GenerateOptions, result_sample, sample_text
from charnn.storage import RunStorage
from charnn.train.batches import Batches
from charnn.train.checkpointer import Checkpointer
from charnn.train.context import RayContext, WorkerContext
from charnn.train.faults import inject
from charnn.log import print0, say
from charnn.train.figures import RunFigures, TrainFigures, ValFigures, tokens_per_s
from charnn.train.metrics import MetricsLogger, RunLog, TrainClock
from charnn.train.optim import TimeBudget, make_optimizer, pace
from charnn.train.state import TrainState, total_steps
from charnn.train.step import Parts, check_figures, check_weights_and_loss, evaluate, train_step

SAMPLE_TOP_K = 5  # samples written to TensorBoard while training


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker."""
    spec = spec_from_dict(config["spec"])
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    storage = RunStorage.from_dict(config["storage"])  # the driver's, as Ray records the config: JSON
    Trainer(spec, config["dataset"], RayContext(), config.get("init_from"), config.get("run_lease"), storage).train()


class Validator:
    """Validation loss, accuracy and bits per character over every validation row, at its cadence."""

    def __init__(self, reader: SplitReader, every: int):
        self.reader, self.every = reader, every

    def should_validate(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def run(self, model: CharGRU, context: WorkerContext) -> ValFigures:
        return evaluate(model, self.reader, context)


class Trainer:
    def __init__(self, spec: Spec, dataset_url: str, context: WorkerContext, init_from: str | None = None,
                 run_lease: int | None = None, storage: RunStorage | None = None):
        """``init_from``: a checkpoint whose weights a new run starts from; ``run_lease``: the lease of the
        run directory that this job's driver holds (checkpoints are saved only while it is the newest);
        ``storage``: where the run is, as the driver found it (else from the spec)."""
        self.storage = storage or RunStorage.from_spec(spec)
        self.spec, self.context, self.store, self.run_url = spec, context, self.storage.store, self.storage.run_url
        manifest = load_manifest(dataset_url, self.store)
        self.train_rows = self._reader(dataset_url, manifest, "train")
        self.validator = Validator(self._reader(dataset_url, manifest, "val"), spec.train.validate_every)
        # a time budget (train.minutes) ends the run and paces the schedule; else the step count does
        self.budget = TimeBudget(spec.train.minutes * 60) if spec.train.minutes else None
        self.total_steps = total_steps(spec.train, self.train_rows.steps)
        self.clock = TrainClock()
        self.alphabet = manifest.alphabet
        self.meta = ckpt.CheckpointMeta(ModelShape.from_spec(spec, manifest.alphabet), manifest.alphabet,
                                        dump_spec(spec), manifest.stream, ckpt.resume_settings(spec),
                                        ckpt.DatasetRef(dataset_url, manifest.documents))  # what model.pt records
        self.model = self._model(init_from)
        progress = self.budget.progress if self.budget else None
        optimizer, scheduler = make_optimizer(self.model, spec.train, self.total_steps, spec.cluster.use_gpu, progress)
        self.parts = Parts(context.wrap(self.model), optimizer, scheduler, spec.train.grad_clip, context.device,
                           loss_weight(manifest.splits["train"].rows, context.world, context.rank))
        torch.manual_seed(spec.train.seed * 1000 + context.rank + 1)  # per-rank dropout streams
        self.checkpointer = Checkpointer(self.run_url, self.store, context, spec.train.checkpoint_every, run_lease)
        self.last_train: TrainFigures | None = None  # the figures of the newest progress line
        self.since = (0, 0.0)  # this attempt's first step and training clock: its speed is over them

    def _reader(self, url: str, manifest: Manifest, split: str) -> SplitReader:
        return SplitReader(url, manifest, split, self.context.rank, self.context.world, self.store)

    def _model(self, init_from: str | None) -> CharGRU:
        torch.manual_seed(self.spec.train.seed)  # the same initial weights on every rank
        model = CharGRU(self.meta.shape, self.spec.model.dropout).to(self.context.device)
        if init_from:  # warm start (retraining): the weights only, a fresh optimiser
            init, meta = ckpt.load_checkpoint(init_from, self.store)
            ckpt.check_compatible(meta, self.meta.shape, self.alphabet)
            model.load_state_dict(init.state_dict())
        return model

    def train(self) -> TrainState:
        """Train from the run's newest good checkpoint (or from scratch) to the end of its steps or
        its time budget."""
        state, batches = self._start()
        if self._done(state):  # a run submitted again at (or past) its end
            self._finish(state, batches)
            return state
        logger = self._logger(state)
        logger.interval.resume(state.interval, self.context.rank)
        self.since, last = (state.step, self.clock.seconds()), False
        while not last:
            x, y, state.epoch = batches.at(state.step)
            loss, logits, grad_norm = self.train_step(batches, x, y)
            state.step += 1
            inject("kill", state.step, self.context.rank)
            inject("raise", state.step, self.context.rank)
            logger.interval.add(loss, logits, y)
            if state.first_loss is None:
                state.first_loss = self.context.all_sum([loss.item()])[0] / self.context.world
            last = self._is_last(state)
            self._after_step(state, logger, (grad_norm, last), batches)
            inject("pause", state.step, self.context.rank)
        logger.close()
        return state

    def _done(self, state: TrainState) -> bool:
        return self.budget.spent() if self.budget else state.step >= self.total_steps

    def _is_last(self, state: TrainState) -> bool:
        """Whether this step ends the run; under a time budget every rank agrees, at log steps, on
        the clock that decides it (and paces the schedule until the next log step)."""
        if self.budget is None:
            return state.step == self.total_steps
        if state.step % self.spec.train.log_every:
            return False
        spent = self.budget.agree(self.clock.seconds(), self.context)
        pace(self.parts.scheduler)
        return spent

    def _finish(self, state: TrainState, batches: Batches) -> None:
        """Report the final figures of a run submitted again at its end.  If the checkpoint it
        resumed has none (it stopped after a checkpoint that was not its last, and then its
        train.steps or train.minutes came down to where it stopped), validate and save first: a run's
        result is its newest checkpoint, and that must hold its validation figures."""
        if state.val is not None:
            self.context.report(state.figures.to_metrics() | self._final_words(state))
            return
        check_weights_and_loss(self.model, 0.0, state.step, self.context)  # saved before they were checked
        logger = self._logger(state)
        with logger.clock.paused():
            state.train = state.train or self._last_train(state)
            self._validate(state, logger)
            logger.flush()
            self._report(state, True, batches, True)
        logger.close()

    @staticmethod
    def _last_train(state: TrainState) -> TrainFigures | None:
        """When the checkpoint has no train figures (its attempt saved before its first progress
        line), the run's last logged train loss stands in."""
        logged = state.history.get("train") or [[None, None]]
        return TrainFigures.from_items({"loss": logged[-1][1]})

    def train_step(self, batches: Batches, x: torch.Tensor, y: torch.Tensor):
        """One optimiser step on the rows' carried states: (loss, logits, gradient norm)."""
        loss, logits, batches.states, grad_norm = train_step(self.parts, x, y, batches.states)
        return loss, logits, grad_norm

    def _start(self) -> tuple[TrainState, Batches]:
        rows = self.train_rows.rows
        resumed = self.checkpointer.resume(self.parts, (self.meta.shape, self.alphabet), rows)
        state, states = resumed or (TrainState(), self.model.zero_state(len(rows), self.context.device))
        self.clock.before, self.clock.since = state.train_seconds, time.perf_counter()
        if self.budget:  # every rank resumes on the same clock: the checkpoint's
            self.budget.agreed = state.train_seconds
        if resumed:
            print0(f"charnn: resumed {self.spec.run.name} at step {state.step}/{self.total_steps or '-'}",
                   self.context.rank)
        self._count_workers(state)
        return state, Batches(self.train_rows, states, self.spec.train.epoch_state, self.context,
                              self.spec.train.first_step)

    def _count_workers(self, state: TrainState) -> None:
        """Record how many workers train from this step on, when that changes (an elastic group that
        shrank or grew; the run's first start): the ``workers`` history of the run's result."""
        stretches, world = state.history.setdefault("workers", []), self.context.world
        if stretches and stretches[-1][1] == world:
            return
        if stretches and self.context.rank == 0:
            say(f"charnn: {world} worker{'s' * (world > 1)} train{'s' * (world == 1)} {self.spec.run.name} from "
                f"step {state.step} (was {stretches[-1][1]})")
        stretches.append([state.step, world])

    def _logger(self, state: TrainState) -> MetricsLogger:
        run_log = RunLog(self.run_url, self.store, state.step, state.history) if self.context.rank == 0 else None
        return MetricsLogger(run_log, self.spec.train.log_every, self.total_steps, self.clock, self.context.world)

    def _after_step(self, state: TrainState, logger: MetricsLogger, step_figures: tuple, batches: Batches) -> None:
        """What this step is the turn of: a progress line, a sample, a validation, a checkpoint;
        and, at each of these, the check that the run has not diverged, before anything is sampled,
        reported or saved."""
        grad_norm, last = step_figures
        log = logger.should_log(state.step, last)
        if log:
            lr = float(self.parts.optimizer.param_groups[0]["lr"])  # the next step's, paced by the agreed clock
            self.last_train = logger.log_train(state.step, state.epoch, {"lr": lr, "grad_norm": float(grad_norm)},
                                               self.context)
        sample = bool(self.spec.train.sample_every and state.step % self.spec.train.sample_every == 0)
        validate, save = self.validator.should_validate(state.step, last), self.checkpointer.should_save(state.step, last)
        if log or sample or validate or save:  # steps that sync anyway: the check adds one small all-reduce
            check_figures({"the train loss": self.last_train and self.last_train.loss}, state.step)
            check_weights_and_loss(self.model, logger.interval.loss, state.step, self.context)
        if sample and self.context.rank == 0:
            self._sample(state.step, logger)
        if validate or save:
            state.interval = logger.interval.carried(self.context) if save else None
            with logger.clock.paused():
                state.train_seconds = logger.clock.before
                state.reported(self._figures(state))
                if validate:
                    self._validate(state, logger)
                logger.flush()
                self._report(state, save, batches, last)

    def _sample(self, step: int, logger: MetricsLogger) -> None:
        with logger.clock.paused():
            options = GenerateOptions(length=self.spec.train.sample_length, top_k=SAMPLE_TOP_K)
            logger.run_log.sample(step, "".join(sample_text(self.model, self.alphabet, options)))

    def _validate(self, state: TrainState, logger: MetricsLogger) -> None:
        state.val = self.validator.run(self.model, self.context)
        check_figures({"the validation loss": state.val.loss}, state.step)  # all-reduced: every rank
        logger.log_val(state.step, state.val, state.train_seconds)

    def _figures(self, state: TrainState) -> RunFigures:
        """The figures of a report at this step (the clock paused): the newest progress line's, and the
        speed of this attempt so far, measured as a progress line's is."""
        tokens = self.train_rows.manifest.splits["train"].rows * self.train_rows.seq_len  # every rank's, a step
        first_step, started = self.since
        speed = tokens_per_s((state.step - first_step) * tokens, state.train_seconds - started)
        return RunFigures(state.step, state.epoch, state.first_loss, state.train_seconds, self.last_train, speed)

    def _report(self, state: TrainState, save: bool, batches: Batches, last: bool) -> None:
        final = self._final_words(state) if last else {}
        if save:
            self.checkpointer.save(state, self.parts, (self.train_rows.rows, batches.states), self.meta, final)
        else:
            self.context.report(state.figures.to_metrics() | final)

    def _final_words(self, state: TrainState) -> dict:
        """What the run's last report adds to its figures, for the job's result (rank 0's report is
        the one kept): its groups of workers and a sample of its final weights, so that the driver
        need not read the checkpoint back."""
        if self.context.rank != 0:
            return {}
        return {"workers": state.history.get("workers"),
                "sample": result_sample(self.model, self.alphabet, self.spec.train.sample_length)}
