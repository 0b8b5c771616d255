"""The published model as a Ray Serve application: streaming generation, batched sampling, hot reload.

    serve run charnn.serve:app model=NAME storage=ROOT [endpoint_url=URL] [poll_s=10] [max_length=2000]
    python -m charnn.cli.serve --model NAME [--storage ROOT] [--port 8000] [--replicas N]

``POST /generate`` takes ``{"prime", "length", "temperature", "top_k", "seed"}`` (the meaning and
defaults of jobs/generate.py; ``seed`` null draws one) and streams the text as ``text/plain`` while
it is sampled.  ``GET /model`` names the version served, ``GET /healthz`` answers once a model is
loaded.  Each replica steps all its requests together (``Batcher``: one forward for every active
stream; a request joins and leaves between steps), and each request draws from its own generator,
so its text does not depend on what it was batched with.  A replica looks for a newly published
version every ``poll_s`` seconds and serves it to new requests; a request finishes on the version it
started on; a version that cannot be loaded is refused with a log line, and the old one goes on.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import threading
from dataclasses import dataclass

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from charnn.checkpoint import load_checkpoint
from charnn.config import ServeConfig
from charnn.spec_loader import expand_path
from charnn.data.alphabet import decode
from charnn.errors import UserError
from charnn.model import CharGRU
from charnn.registry import ModelRegistry, Version
from charnn.sample import SEED_LIMIT, GenerateOptions, Stream, start_stream, step_streams
from charnn.storage import Store, join

log = logging.getLogger("charnn.serve")
FIELDS = {"prime": str, "length": int, "temperature": float, "top_k": int, "seed": int}
FLUSH_S = 0.05  # the text sampled meanwhile goes out in one chunk at most this often
TYPE_NAMES = {"prime": "a string", "length": "an int", "temperature": "a number", "top_k": "an int",
              "seed": "an int or null"}


class BadRequest(UserError):
    """A request the server answers with 400."""


@dataclass(frozen=True)
class Served:
    """A loaded version of the model."""

    version: Version
    model: CharGRU
    alphabet: str

    def describe(self, name: str) -> dict:
        return {"model": name, "version": self.version.name, "val_loss": self.version.info.val_loss,
                "published_at": self.version.info.published_at}


def one_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_served(version: Version, store: Store) -> Served:
    model, meta = load_checkpoint(version.url, store)
    return Served(version, model, meta.alphabet)


def parse_request(body: bytes, max_length: int) -> GenerateOptions:
    """The options of a /generate body; BadRequest (one line) for anything else."""
    try:
        given = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest("the body is not JSON; send an object such as {\"prime\": \"ROMEO.\", \"length\": 200}")
    if not isinstance(given, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown key {unknown[0]!r}; the keys are {', '.join(FIELDS)}")
    for key, value in given.items():
        kind = FIELDS[key]
        if isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))
                                           or (key == "seed" and value is None)):
            raise BadRequest(f"{key} must be {TYPE_NAMES[key]}, got {json.dumps(value)[:40]}")
    if given.get("seed") is None:
        given["seed"] = secrets.randbelow(SEED_LIMIT)
    options = GenerateOptions(**given)
    if options.length > max_length:
        raise BadRequest(f"length must be <= {max_length} (serve.max_length), got {options.length}")
    if len(options.prime) > max_length:  # one forward over all of it, on the replica
        raise BadRequest(f"prime must be at most {max_length} characters (serve.max_length), got {len(options.prime)}")
    return options


class Batcher:
    """Steps every active stream of a replica together, one forward per model version a step."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.active: list[tuple[Served, Stream, asyncio.Queue]] = []
        self.task: asyncio.Task | None = None

    def add(self, served: Served, stream: Stream) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.active.append((served, stream, queue))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return queue

    def drop(self, stream: Stream) -> None:
        self.active = [entry for entry in self.active if entry[1] is not stream]

    async def _run(self) -> None:
        while self.active:
            batch = self.active[: self.max_batch]
            self.active = self.active[self.max_batch :] + batch  # the rest go first next step
            for served in {id(s): s for s, _, _ in batch}.values():
                group = [(stream, queue) for s, stream, queue in batch if s is served]
                try:
                    codes = await asyncio.to_thread(step_streams, served.model, [stream for stream, _ in group])
                except Exception as exc:  # noqa: BLE001 - a model whose outputs are not finite: those requests end
                    codes = [exc] * len(group)
                for (stream, queue), code in zip(group, codes):
                    queue.put_nowait(code)
                    if isinstance(code, Exception) or stream.left == 0:
                        queue.put_nowait(None)
                        self.drop(stream)


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=5)
class ModelServer:
    def __init__(self, model: str, storage: str, settings: ServeConfig, endpoint_url: str | None = None):
        torch.set_num_threads(1)  # the replica's one CPU
        self.name, self.settings, self.store = model, settings, Store(endpoint_url=endpoint_url)
        self.registry = ModelRegistry(join(expand_path(storage), "models", model), self.store)
        self.served, self.refused = self._first_version(), None
        self.batcher = Batcher(settings.max_batch)
        threading.Thread(target=self._poll, name="charnn-poll", daemon=True).start()
        log.info("charnn.serve: serving %s %s", model, self.served.version.name)

    def _first_version(self) -> Served:
        """The published version; if it cannot be loaded (a replica that restarts after a broken one
        was published), the newest version that can, so that the service stays up."""
        published = self.registry.published()
        if published is None:
            raise UserError(f"model {self.name!r} has no published version in {self.registry.url}")
        for name in [published.name, *sorted(self.registry.versions(), reverse=True)]:
            try:
                return load_served(self.registry.version(name), self.store)
            except Exception as exc:  # noqa: BLE001 - any failure to read or load: one line, try an older one
                log.warning("charnn.serve: cannot load %s %s: %s", self.name, name, one_line(exc))
        raise UserError(f"no version of model {self.name!r} in {self.registry.url} can be loaded")

    def _poll(self) -> None:
        """Serve a newly published version to new requests; keep the old one if it cannot be loaded
        (and do not try that one again until the pointer moves)."""
        while not threading.Event().wait(self.settings.poll_s):
            published = None
            try:
                published = self.registry.published()
                if published is None or published.name in (self.served.version.name, self.refused):
                    continue
                self.served = load_served(published, self.store)
                log.warning("charnn.serve: now serving %s %s", self.name, published.name)
            except Exception as exc:  # noqa: BLE001 - any failure to read or load: one line, keep serving
                self.refused = published and published.name
                log.warning("charnn.serve: keeping %s: cannot load the published version: %s",
                            self.served.version.name, one_line(exc))

    async def __call__(self, request: Request) -> Response:
        route = (request.method, request.url.path.rstrip("/") or "/")
        if route == ("GET", "/healthz"):
            return JSONResponse({"ok": True, "version": self.served.version.name})
        if route == ("GET", "/model"):
            return JSONResponse(self.served.describe(self.name))
        if route == ("POST", "/generate"):
            return await self._generate(request)
        return JSONResponse({"error": f"no {route[0]} {route[1]}: POST /generate, GET /model, GET /healthz"}, 404)

    async def _generate(self, request: Request) -> Response:
        served = self.served  # the version this request finishes on
        try:
            options = parse_request(await request.body(), self.settings.max_length)
            stream = await asyncio.to_thread(start_stream, served.model, served.alphabet, options)
        except UserError as exc:  # generate.py's messages name its flags: here they are the body's keys
            message = str(exc).replace("--top-k", "top_k").replace("--", "")
            return JSONResponse({"error": message}, 400)
        queue = self.batcher.add(served, stream)
        return StreamingResponse(self._text(queue, stream, served.alphabet), media_type="text/plain; charset=utf-8",
                                 headers={"X-Charnn-Version": served.version.name})

    async def _text(self, queue: asyncio.Queue, stream: Stream, alphabet: str):
        """The stream's text, in chunks of what was sampled in ``FLUSH_S``; an error ends it
        unfinished (the client sees a broken response, never a hang)."""
        try:
            for chunk in itertools.count():
                items = [await queue.get()]
                if chunk:  # the first character at once, then a chunk per FLUSH_S: one per character costs more
                    await asyncio.sleep(FLUSH_S)
                while not queue.empty():
                    items.append(queue.get_nowait())
                codes = [item for item in items if isinstance(item, int)]
                if codes:
                    yield decode(codes, alphabet)
                failed = [item for item in items if isinstance(item, Exception)]
                if failed:
                    raise failed[0]
                if None in items:
                    return
        finally:
            self.batcher.drop(stream)  # a client that left: its stream leaves the batch


def app(args: dict) -> serve.Application:
    """The application builder of ``serve run charnn.serve:app model=NAME storage=ROOT ...``."""
    settings = ServeConfig(**{k: type(getattr(ServeConfig(), k))(v) for k, v in args.items()
                              if k in ("poll_s", "max_length", "replicas", "max_batch")})
    # a replica takes as many requests at once as it batches (Serve's default is 5: the rest would queue)
    return ModelServer.options(num_replicas=settings.replicas, max_ongoing_requests=settings.max_batch).bind(
        args["model"], args.get("storage", "~/charnn/runs"), settings, args.get("endpoint_url"))
