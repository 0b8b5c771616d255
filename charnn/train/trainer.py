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
from charnn.config import Spec, dump_spec, spec_from_dict
from charnn.data.alphabet import alphabet_size
from charnn.data.dataset import Manifest, load_manifest
from charnn.data.layout import loss_weight
from charnn.data.reader import SplitReader
from charnn.model import CharGRU, ModelShape
from charnn.sample import GenerateOptions, sample_text
from charnn.storage import Store, join
from charnn.train.batches import Batches
from charnn.train.checkpointer import Checkpointer
from charnn.train.context import RayContext, WorkerContext
from charnn.train.faults import inject
from charnn.train.metrics import MetricsLogger, RunLog, TrainClock, say
from charnn.train.optim import TimeBudget, make_optimizer, pace
from charnn.train.state import TrainState
from charnn.train.step import Parts, all_sum, check_figures, check_weights_and_loss, evaluate, train_step

SAMPLE_TOP_K = 5  # samples written to TensorBoard while training


def model_shape(spec: Spec, alphabet: str) -> ModelShape:
    return ModelShape(alphabet_size(alphabet), spec.model.cell_size, spec.model.layers, spec.model.embedding)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker."""
    spec = spec_from_dict(config["spec"])
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    Trainer(spec, config["dataset"], RayContext(), config.get("init_from"), config.get("run_lease")).train()


class Validator:
    """Validation loss, accuracy and bits per character over every validation row, at its cadence."""

    def __init__(self, reader: SplitReader, every: int):
        self.reader, self.every = reader, every

    def should_validate(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def run(self, model: CharGRU, device: torch.device) -> dict:
        return evaluate(model, self.reader, device)


class Trainer:
    def __init__(self, spec: Spec, dataset_url: str, context: WorkerContext, init_from: str | None = None,
                 run_lease: int | None = None):
        """``init_from``: a checkpoint whose weights a new run starts from; ``run_lease``: the lease of the
        run directory that this job's driver holds (checkpoints are saved only while it is the newest)."""
        self.spec, self.context, self.store = spec, context, Store.of(spec.storage)
        self.run_url = join(spec.run.storage, spec.run.name)
        manifest = load_manifest(dataset_url, self.store)
        self.train_rows = self._reader(dataset_url, manifest, "train")
        self.validator = Validator(self._reader(dataset_url, manifest, "val"), spec.train.validate_every)
        # a time budget (train.minutes) ends the run and paces the schedule; else the step count does
        self.budget = TimeBudget(spec.train.minutes * 60) if spec.train.minutes else None
        self.total_steps = None if self.budget else spec.train.steps or spec.train.epochs * self.train_rows.steps
        self.clock = TrainClock()
        self.alphabet = manifest.alphabet
        self.model = self._model(init_from)
        progress = self.budget.progress if self.budget else None
        optimizer, scheduler = make_optimizer(self.model, spec.train, self.total_steps, spec.cluster.use_gpu, progress)
        self.parts = Parts(context.wrap(self.model), optimizer, scheduler, spec.train.grad_clip, context.device,
                           loss_weight(manifest.splits["train"].rows, context.world, context.rank))
        torch.manual_seed(spec.train.seed * 1000 + context.rank + 1)  # per-rank dropout streams
        self.checkpointer = Checkpointer(self.run_url, self.store, context, spec.train.checkpoint_every, run_lease)
        self.last_train: dict = {}  # the figures of the newest progress line
        self.meta = {"alphabet": manifest.alphabet, "spec": dump_spec(spec), "stream": manifest.stream,
                     "settings": ckpt.resume_settings(spec),
                     "dataset": {"url": dataset_url, "documents": manifest.documents}}

    def _reader(self, url: str, manifest: Manifest, split: str) -> SplitReader:
        return SplitReader(url, manifest, split, self.context.rank, self.context.world, self.store)

    def _model(self, init_from: str | None) -> CharGRU:
        torch.manual_seed(self.spec.train.seed)  # the same initial weights on every rank
        shape = model_shape(self.spec, self.alphabet)
        model = CharGRU(shape, self.spec.model.dropout).to(self.context.device)
        if init_from:  # warm start (retraining): the weights only, a fresh optimiser
            init = ckpt.load_payload(init_from, self.store)
            ckpt.check_compatible(init, shape, self.alphabet)
            model.load_state_dict(init["model"])
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
        speed, last = (state.step, time.perf_counter()), False
        while not last:
            x, y, state.epoch = batches.at(state.step)
            loss, logits, grad_norm = self.train_step(batches, x, y)
            state.step += 1
            inject("kill", state.step, self.context.rank)
            inject("raise", state.step, self.context.rank)
            logger.interval.add(loss, logits, y)
            if state.first_loss is None:
                state.first_loss = all_sum([loss.item()], self.context.device)[0] / self.context.world
            last = self._is_last(state)
            self._after_step(state, logger, (grad_norm, speed, last), batches)
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
        spent = self.budget.agree(self.clock.seconds(), self.context.device)
        pace(self.parts.scheduler)
        return spent

    def _finish(self, state: TrainState, batches: Batches) -> None:
        """Report the final figures of a run submitted again at its end.  If the checkpoint it
        resumed has none (it stopped after a checkpoint that was not its last, and then its
        train.steps or train.minutes came down to where it stopped), validate and save first: a run's
        result is its newest checkpoint, and that must hold its validation figures."""
        if "val_loss" in state.metrics:
            self.context.report(state.metrics)
            return
        check_weights_and_loss(self.model, 0.0, state.step, self.context.device)  # saved before they were checked
        logger = self._logger(state)
        with logger.clock.paused():
            state.metrics = {**state.metrics, "step": state.step, "epoch": state.epoch,
                             "train_seconds": state.train_seconds, "train_loss": self._last_train_loss(state)}
            self._validate(state, logger)
            logger.flush()
            self._report(state, True, batches)
        logger.close()

    @staticmethod
    def _last_train_loss(state: TrainState) -> float | None:
        """The checkpoint's train loss; an attempt that saved before its first progress line has
        none, and then the run's last logged one stands in."""
        logged = state.history.get("train") or [[None, None]]
        return state.metrics.get("train_loss", logged[-1][1])

    def train_step(self, batches: Batches, x: torch.Tensor, y: torch.Tensor):
        """One optimiser step on the rows' carried states: (loss, logits, gradient norm)."""
        loss, logits, batches.states, grad_norm = train_step(self.parts, x, y, batches.states)
        return loss, logits, grad_norm

    def _start(self) -> tuple[TrainState, Batches]:
        rows = self.train_rows.rows
        resumed = self.checkpointer.resume(self.parts, (model_shape(self.spec, self.alphabet), self.alphabet), rows)
        state, states = resumed or (TrainState(), self.model.zero_state(len(rows), self.context.device))
        self.clock.before, self.clock.since = state.train_seconds, time.perf_counter()
        if self.budget:  # every rank resumes on the same clock: the checkpoint's
            self.budget.agreed = state.train_seconds
        if resumed and self.context.rank == 0:
            say(f"charnn: resumed {self.spec.run.name} at step {state.step}/{self.total_steps or '-'}")
        self._count_workers(state)
        return state, Batches(self.train_rows, states, self.spec.train.epoch_state, self.context.device,
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
        grad_norm, (first_step, started), last = step_figures
        log = logger.should_log(state.step, last)
        if log:
            lr = float(self.parts.optimizer.param_groups[0]["lr"])  # the next step's, paced by the agreed clock
            self.last_train = logger.log_train(state.step, state.epoch, {"lr": lr, "grad_norm": float(grad_norm)},
                                               self.context.device)
        sample = bool(self.spec.train.sample_every and state.step % self.spec.train.sample_every == 0)
        validate, save = self.validator.should_validate(state.step, last), self.checkpointer.should_save(state.step, last)
        if log or sample or validate or save:  # steps that sync anyway: the check adds one small all-reduce
            check_figures({"the train loss": self.last_train.get("loss")}, state.step)
            check_weights_and_loss(self.model, logger.interval.loss, state.step, self.context.device)
        if sample and self.context.rank == 0:
            self._sample(state.step, logger)
        if validate or save:
            state.interval = logger.interval.carried(self.context.device) if save else None
            with logger.clock.paused():
                state.train_seconds = logger.clock.before
                tokens = self.train_rows.manifest.splits["train"].rows * self.train_rows.seq_len  # every rank's, a step
                speed = (state.step - first_step) * tokens / (time.perf_counter() - started)
                state.metrics = self._figures(state, speed)
                if validate:
                    self._validate(state, logger)
                logger.flush()
                self._report(state, save, batches)

    def _sample(self, step: int, logger: MetricsLogger) -> None:
        with logger.clock.paused():
            options = GenerateOptions(length=self.spec.train.sample_length, top_k=SAMPLE_TOP_K)
            logger.run_log.sample(step, "".join(sample_text(self.model, self.alphabet, options)))

    def _validate(self, state: TrainState, logger: MetricsLogger) -> None:
        state.metrics.update(self.validator.run(self.model, self.context.device))
        check_figures({"the validation loss": state.metrics["val_loss"]}, state.step)  # all-reduced: every rank
        logger.log_val(state.step, state.metrics)

    def _figures(self, state: TrainState, tokens_per_s: float) -> dict:
        return {"step": state.step, "epoch": state.epoch, "first_loss": state.first_loss,
                "train_seconds": state.train_seconds, **{f"train_{k}": v for k, v in self.last_train.items()},
                "tokens_per_s": tokens_per_s}

    def _report(self, state: TrainState, save: bool, batches: Batches) -> None:
        if save:
            self.checkpointer.save(state, self.parts, (self.train_rows.rows, batches.states), self.meta)
        else:
            self.context.report(state.metrics)
