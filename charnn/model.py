"""The seed's character model: one-hot (or embedded) characters -> stacked GRU -> softmax."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from charnn.data.alphabet import alphabet_size
from charnn.errors import UserError


class OutputsNotFinite(UserError):
    """A model whose outputs are NaN or inf (weights that a diverged training left): there is
    nothing to sample from."""


@dataclass(frozen=True)
class ModelShape:
    """Everything that fixes the parameter tensors' shapes: a checkpoint must match it."""

    vocab: int
    cell_size: int
    layers: int
    embedding: int = 0  # 0: one-hot input, as in the seed

    @classmethod
    def from_spec(cls, spec, alphabet: str) -> "ModelShape":
        """The shape a spec's model settings give a model of ``alphabet``."""
        return cls(alphabet_size(alphabet), spec.model.cell_size, spec.model.layers, spec.model.embedding)

    def to_dict(self) -> dict:
        return asdict(self)


class CharGRU(nn.Module):
    def __init__(self, shape: ModelShape, dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.embedding) if shape.embedding else None
        self.gru = nn.GRU(
            shape.embedding or shape.vocab, shape.cell_size, shape.layers, batch_first=True,
            dropout=dropout if shape.layers > 1 else 0.0,
        )
        self.out_dropout = nn.Dropout(dropout)  # the seed also dropped the top cell's output
        self.head = nn.Linear(shape.cell_size, shape.vocab)

    @staticmethod
    def parameter_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter of a model of ``shape``, without making one."""
        shapes = {"embed.weight": (shape.vocab, shape.embedding)} if shape.embedding else {}
        for layer in range(shape.layers):
            inputs = (shape.embedding or shape.vocab) if layer == 0 else shape.cell_size
            shapes |= {f"gru.weight_ih_l{layer}": (3 * shape.cell_size, inputs),
                       f"gru.weight_hh_l{layer}": (3 * shape.cell_size, shape.cell_size),
                       f"gru.bias_ih_l{layer}": (3 * shape.cell_size,), f"gru.bias_hh_l{layer}": (3 * shape.cell_size,)}
        return shapes | {"head.weight": (shape.vocab, shape.cell_size), "head.bias": (shape.vocab,)}

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.shape.layers, batch, self.shape.cell_size, device=device)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, vocab] and the last hidden state [layers, B, cell] for codes x [B, T]."""
        inputs = self.embed(x) if self.embed is not None else F.one_hot(x, self.shape.vocab).float()
        outputs, h = self.gru(inputs, h)
        return self.head(self.out_dropout(outputs)), h

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per character (forward + backward = 3x the matmuls of forward)."""
        s = self.shape
        gru = 0
        for layer in range(s.layers):
            inputs = (s.embedding or s.vocab) if layer == 0 else s.cell_size
            gru += 2 * 3 * s.cell_size * (inputs + s.cell_size)
        return 3 * (gru + 2 * s.cell_size * s.vocab)

    @torch.no_grad()
    def generate(
        self, prime: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
        generator: torch.Generator | None = None, never: int | None = None,
    ) -> Iterator[int]:
        """Codes that follow ``prime`` (1-D codes, warms the state), one at a time; ``never`` is a
        code never drawn (gorner98's "unknown", which stands for no character)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            logits, h = self(prime.view(1, -1).to(device))
            for _ in range(length):
                code = pick_codes(logits[0, -1:], [temperature], [top_k], [generator], never)[0]
                yield code
                logits, h = self(torch.tensor([[code]], device=device), h)
        finally:
            self.train(was_training)


def pick_codes(logits: torch.Tensor, temperatures: list[float], top_ks: list[int],
               generators: list[torch.Generator | None], never: int | None = None) -> list[int]:
    """The next code of each row of ``logits`` [B, vocab], each drawn with its own temperature, top-k
    (0: all) and generator: one uniform number from its generator, inverted through the row's
    cumulative distribution. Each row is computed as it would be alone, so a stream's codes do not
    depend on the rows it is drawn with; ``never`` is a code no row draws. On the CPU in float64,
    less the row's maximum before dividing: the likeliest code scores 0 at any temperature > 0 and
    the others <= 0 (-inf at a tiny one), so softmax never sees inf - inf (NaN); a tiny temperature
    samples the argmax, a huge one evenly."""
    scores = logits.to("cpu", torch.float64)
    if not torch.isfinite(scores).all():
        raise OutputsNotFinite("the model's outputs are not finite (its weights hold NaN or inf, as a "
                               "diverged training leaves them); use another checkpoint")
    if never is not None:
        scores = scores.clone()  # not the caller's (logits already float64 on the CPU)
        scores[:, never] = float("-inf")
    scores = (scores - scores.max(-1, keepdim=True).values) / torch.tensor(temperatures, dtype=torch.float64)[:, None]
    if any(top_ks):
        kth = torch.topk(scores, max(top_ks), dim=-1).values.gather(1, torch.tensor([[max(k, 1) - 1] for k in top_ks]))
        kth[torch.tensor(top_ks) == 0] = float("-inf")  # no limit
        scores = scores.masked_fill(scores < kth, float("-inf"))
    cumulative = torch.softmax(scores, -1).cumsum(-1)
    draws = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in generators])
    codes = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
    return codes.clamp(max=scores.shape[-1] - 1).flatten().tolist()
