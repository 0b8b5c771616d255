"""Sampling text from a checkpoint, reproducibly, one character at a time: one stream
(``sample_text``), or many streams of one model stepped together (``start_stream`` and
``step_streams``: one forward for all of them, what a server batches)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

from charnn.storage import Store
from charnn.errors import UserError
from charnn.data.alphabet import alphabet_size, decode, encode_text
from charnn.checkpoint import load_checkpoint
from charnn.model import CharGRU, OutputsNotFinite, pick_codes

log = logging.getLogger("charnn.generate")
RESULT_TOP_K = 2  # the sample a training job's result prints, as the seed sampled
SEED_LIMIT = 2 ** 64  # torch's generators take seeds below this (negative ones only as aliases of large ones)


class GenerateError(UserError):
    """A generation option out of range."""


@dataclass(frozen=True)
class GenerateOptions:
    prime: str = "K"
    length: int = 500
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self, vocab: int) -> None:
        if self.length <= 0:
            raise GenerateError(f"--length must be > 0, got {self.length}")
        if not self.temperature > 0:
            raise GenerateError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.top_k <= vocab:
            raise GenerateError(f"--top-k must lie in 0..{vocab} (0: no limit), got {self.top_k}")
        if not self.prime:
            raise GenerateError("--prime must hold at least one character")
        if not 0 <= self.seed < SEED_LIMIT:
            raise GenerateError(f"--seed must lie in 0..{SEED_LIMIT - 1} (2**64 - 1), got {self.seed}")


def prime_codes(alphabet: str, options: GenerateOptions) -> torch.Tensor:
    """The checked options' prime as codes; characters outside the alphabet are read as 'unknown'."""
    options.check(alphabet_size(alphabet))
    prime = encode_text(options.prime, alphabet)
    if alphabet == "gorner98" and (prime == 0).any():
        log.warning("--prime has %d characters outside the alphabet; they are read as 'unknown'",
                    int((prime == 0).sum()))
    return torch.tensor(prime, dtype=torch.long)


def never_drawn(alphabet: str) -> int | None:
    """gorner98's "unknown" code stands for no character: a sample of ``length`` codes would be shorter."""
    return 0 if alphabet == "gorner98" else None


def sample_text(model, alphabet: str, options: GenerateOptions) -> Iterator[str]:
    prime = prime_codes(alphabet, options)
    generator = torch.Generator().manual_seed(options.seed)
    codes = model.generate(prime, options.length, options.temperature, options.top_k, generator, never_drawn(alphabet))
    for code in codes:
        yield decode([code], alphabet)


def result_sample(model, alphabet: str, length: int) -> str:
    """The sample of a trained model that a training job prints with its result."""
    return "".join(sample_text(model, alphabet, GenerateOptions(length=length, top_k=RESULT_TOP_K)))


@dataclass
class Stream:
    """One request's sampling: its options and random generator, the scores of its next code and
    the hidden state that produced them, and how many codes are still to come."""

    options: GenerateOptions
    scores: torch.Tensor  # [vocab]
    state: torch.Tensor  # [layers, 1, cell]
    left: int
    generator: torch.Generator = field(default_factory=torch.Generator)
    never: int | None = None  # never_drawn of its alphabet


@torch.no_grad()
def start_stream(model: CharGRU, alphabet: str, options: GenerateOptions) -> Stream:
    """A stream warmed on its prime (alone: primes differ in length)."""
    logits, h = model.eval()(prime_codes(alphabet, options).view(1, -1))
    return Stream(options, logits[0, -1], h, options.length, torch.Generator().manual_seed(options.seed),
                  never_drawn(alphabet))


@torch.no_grad()
def step_streams(model: CharGRU, streams: list[Stream]) -> list[int]:
    """The next code of every stream (streams of one model and alphabet), drawn as ``CharGRU.generate``
    draws it, then one forward of all of them together for the codes after. A stream's codes do not
    depend on the others: each has its own generator, and a batch row is computed as it is alone (up
    to float rounding)."""
    codes = pick_codes(torch.stack([s.scores for s in streams]), [s.options.temperature for s in streams],
                       [s.options.top_k for s in streams], [s.generator for s in streams], streams[0].never)
    logits, h = model.eval()(torch.tensor(codes).view(-1, 1), torch.cat([s.state for s in streams], dim=1))
    for i, stream in enumerate(streams):
        stream.scores, stream.state, stream.left = logits[i, -1], h[:, i : i + 1], stream.left - 1
    return codes


def stream_text(url: str, options: GenerateOptions, store: Store = Store()) -> Iterator[str]:
    model, meta = load_checkpoint(url, store)
    try:
        yield from sample_text(model, meta.alphabet, options)
    except OutputsNotFinite as exc:
        raise OutputsNotFinite(f"{url}: {exc}") from None
