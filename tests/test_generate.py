"""Sampling (train/model.py's CharGRU.generate, train/generate.py) at the edges of its options:
tiny and huge temperatures, top_k equal to the vocabulary.  A tiny CharGRU, no Ray."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charnn.sample import GenerateOptions, sample_text
from charnn.model import CharGRU, ModelShape

REPO = Path(__file__).resolve().parent.parent
VOCAB = 98  # gorner98
TINY = [1e-40, 1e-300, 5e-324]  # 1e-40 is a float32 subnormal, 5e-324 the smallest positive float64


def tiny_model(seed: int = 3) -> CharGRU:
    torch.manual_seed(seed)
    with torch.no_grad():
        model = CharGRU(ModelShape(VOCAB, 8, 1))
        model.head.weight.mul_(8)  # spread the logits: no near-ties between the likeliest codes
    return model


def codes(model, length=60, temperature=1.0, top_k=0, seed=0, prime=(40, 41, 42)) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return list(model.generate(torch.tensor(prime), length, temperature, top_k, generator))


def greedy(model, length=60, prime=(40, 41, 42)) -> list[int]:
    """The argmax at every step: what sampling at a temperature near 0 must give."""
    out = []
    with torch.no_grad():
        logits, h = model(torch.tensor([prime]))
        for _ in range(length):
            code = int(logits[0, -1].argmax())
            out.append(code)
            logits, h = model(torch.tensor([[code]]), h)
    return out


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize("top_k", [0, 2, VOCAB])
def test_a_tiny_temperature_samples_the_likeliest_code(temperature, top_k):
    model = tiny_model()
    assert codes(model, temperature=temperature, top_k=top_k) == greedy(model)
    assert codes(model, temperature=temperature, top_k=top_k, seed=1) == greedy(model)  # any seed


@pytest.mark.parametrize("temperature", [1e30, 1e300, float("inf")])
def test_a_huge_temperature_samples_all_codes_about_evenly(temperature):
    model = tiny_model()
    sampled = codes(model, length=3000, temperature=temperature)
    counts = torch.bincount(torch.tensor(sampled), minlength=VOCAB)
    assert len(counts) == VOCAB and counts.min() >= 5 and counts.max() <= 80  # about 31 each
    assert codes(model, length=200, temperature=temperature) == sampled[:200]  # the same seed, the same text


@pytest.mark.parametrize("temperature", [1e-40, 0.8, 1.0, 1e300])
def test_top_k_equal_to_the_vocabulary_is_no_limit(temperature):
    model = tiny_model()
    assert codes(model, temperature=temperature, top_k=VOCAB) == codes(model, temperature=temperature, top_k=0)


def test_top_k_keeps_only_the_k_likeliest():
    model = tiny_model()
    generator = torch.Generator()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[40]]))
    allowed = set(torch.topk(logits[0, -1], 2).indices.tolist())
    for seed in range(30):
        generator.manual_seed(seed)
        first = next(model.generate(torch.tensor([40]), 1, 5.0, 2, generator))
        assert first in allowed


def test_sampling_is_reproducible_per_seed():
    model = tiny_model()
    assert codes(model, temperature=0.8, seed=7) == codes(model, temperature=0.8, seed=7)
    assert codes(model, temperature=0.8, seed=7) != codes(model, temperature=0.8, seed=8)
    assert codes(model, temperature=1e-40, seed=7) == codes(model, temperature=1e-40, seed=8)


def test_sample_text_at_a_tiny_temperature():
    model = tiny_model()
    text = "".join(sample_text(model, "gorner98", GenerateOptions(prime="KING", length=40, temperature=1e-40, top_k=VOCAB)))
    assert len(text) == 40
    assert text == "".join(sample_text(model, "gorner98", GenerateOptions(prime="KING", length=40, temperature=1e-300, seed=5)))


def test_generate_py_at_a_tiny_temperature_exits_cleanly(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    model = tiny_model()
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--checkpoint", str(directory),
                           "--temperature", "1e-40", "--length", "50", "--top-k", str(VOCAB)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(proc.stdout.rstrip("\n")) >= 50
