"""Sampling (train/model.py's CharGRU.generate, train/generate.py) at the edges of its options:
tiny and huge temperatures, top_k equal to the vocabulary.  A tiny CharGRU, no Ray."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charnn.checkpoint import load_model
from charnn.errors import UserError
from charnn.sample import GenerateError, GenerateOptions, sample_text, stream_text
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


def save_checkpoint(directory: Path, model: CharGRU) -> Path:
    """``model`` as a checkpoint directory that jobs/generate.py reads (its model.pt alone)."""
    directory.mkdir()
    torch.save({"format": "charnn.checkpoint/1", "model": model.state_dict(), "shape": model.shape.to_dict(),
                "alphabet": "gorner98"}, directory / "model.pt")
    return directory


def generate_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ})


@pytest.mark.ray  # a job in a process of its own (seconds of imports): not for `make check`
def test_generate_py_at_a_tiny_temperature_exits_cleanly(tmp_path):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_model())
    proc = generate_py("--checkpoint", str(directory), "--temperature", "1e-40", "--length", "50", "--top-k", str(VOCAB))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(proc.stdout.rstrip("\n")) >= 50


def nan_model() -> CharGRU:
    """A model with one NaN weight, as a diverged training leaves it: every output is NaN."""
    model = tiny_model()
    with torch.no_grad():
        model.gru.weight_hh_l0[0, 0] = float("nan")
    return model


def test_a_checkpoint_of_nan_weights_loads_but_sampling_it_is_one_line(tmp_path):
    directory = save_checkpoint(tmp_path / "nan", nan_model())
    model, _ = load_model(str(directory))  # loading it works: retrain evaluates such a checkpoint
    assert torch.isnan(model.gru.weight_hh_l0[0, 0])
    with pytest.raises(UserError) as raised:
        "".join(stream_text(str(directory), GenerateOptions(length=20)))
    message = str(raised.value)
    assert raised.value.exit_status == 2 and "\n" not in message
    assert "not finite" in message and "use another checkpoint" in message and str(directory) in message


@pytest.mark.parametrize("seed", [2 ** 64, -1, -2 ** 63 - 1])
def test_a_seed_out_of_range_is_one_line(seed):
    with pytest.raises(GenerateError, match=r"^--seed must lie in 0\.\.18446744073709551615 \(2\*\*64 - 1\), got "):
        list(sample_text(tiny_model(), "gorner98", GenerateOptions(length=5, seed=seed)))


def test_the_whole_seed_range_samples():
    for seed in (0, 2 ** 64 - 1):
        assert len("".join(sample_text(tiny_model(), "gorner98", GenerateOptions(length=5, seed=seed)))) == 5


@pytest.mark.ray  # a job in a process of its own (seconds of imports): not for `make check`
@pytest.mark.parametrize("case", ["nan-weights", "huge-seed"])
def test_generate_py_on_nan_weights_or_a_huge_seed_exits_2_with_one_line(tmp_path, case):
    directory = save_checkpoint(tmp_path / "ckpt", nan_model() if case == "nan-weights" else tiny_model())
    seed = "18446744073709551616" if case == "huge-seed" else "0"
    proc = generate_py("--checkpoint", str(directory), "--length", "20", "--seed", seed)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert ("not finite" if case == "nan-weights" else "--seed must lie in") in line


def test_streams_stepped_together_give_each_the_text_it_gets_alone():
    """What a server's batch does (charnn.serve.Batcher): 33 requests of mixed options, stepped in
    one forward each step, some finishing early, each as ``sample_text`` samples it alone."""
    from charnn.data.alphabet import decode
    from charnn.sample import start_stream, step_streams

    model = tiny_model()
    kinds = [("ROMEO.", 40, 1.0, 1), ("K", 25, 0.8, 5), ("Hi yo", 60, 1.3, 0)]
    options = [GenerateOptions(*kinds[i % 3], seed=i) for i in range(33)]
    alone = ["".join(sample_text(model, "gorner98", o)) for o in options]
    streams, codes = [start_stream(model, "gorner98", o) for o in options], [[] for _ in options]
    while live := [i for i, stream in enumerate(streams) if stream.left]:
        for i, code in zip(live, step_streams(model, [streams[i] for i in live])):
            codes[i].append(code)
    assert [decode(c, "gorner98") for c in codes] == alone
    # gorner98's "unknown" code (no character) is never drawn: a stream has the length it asked for
    assert [len(text) for text in alone] == [o.length for o in options]
    assert len(set(alone)) > 20  # the seeds differ, and so do the texts (greedy ones alike)


def test_a_good_generate_request_takes_generate_py_defaults_and_draws_a_seed():
    from charnn.serve import parse_request

    options = parse_request(b'{"prime": "ROMEO.", "temperature": 1, "seed": null}', 2000)
    assert (options.prime, options.length, options.temperature, options.top_k) == ("ROMEO.", 500, 1, 0)
    assert 0 <= options.seed < 2 ** 64 and parse_request(b"{}", 2000).seed != options.seed
