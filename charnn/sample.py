"""Sampling text from a checkpoint, reproducibly, one character at a time."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from charnn.storage import Store
from charnn.errors import UserError
from charnn.data.alphabet import alphabet_size, decode, encode_text
from charnn.checkpoint import load_model
from charnn.model import OutputsNotFinite

log = logging.getLogger("charnn.generate")
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


def sample_text(model, alphabet: str, options: GenerateOptions) -> Iterator[str]:
    vocab = alphabet_size(alphabet)
    options.check(vocab)
    prime = encode_text(options.prime, alphabet)
    if alphabet == "gorner98" and (prime == 0).any():
        log.warning("--prime has %d characters outside the alphabet; they are read as 'unknown'", int((prime == 0).sum()))
    generator = torch.Generator().manual_seed(options.seed)
    codes = model.generate(torch.tensor(prime, dtype=torch.long), options.length, options.temperature, options.top_k, generator)
    for code in codes:
        yield decode([code], alphabet)


def stream_text(url: str, options: GenerateOptions, store: Store = Store()) -> Iterator[str]:
    model, payload = load_model(url, store)
    try:
        yield from sample_text(model, payload["alphabet"], options)
    except OutputsNotFinite as exc:
        raise OutputsNotFinite(f"{url}: {exc}") from None
