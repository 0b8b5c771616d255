"""The schema's roles (charnn.config) decide what names a dataset, what its stream digest covers and
what a resume checks, so that a new setting is one edit.  No Ray cluster: the names are hashes."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

import pytest

from charnn.checkpoint import RESUME_SETTINGS, resume_settings
from charnn.config import ROLES, Spec, fields_with_role, role_of, spec_fields
from charnn.data.build import STORAGE_ONLY, DatasetRequest, dataset_directory, dataset_settings, segment_id
from charnn.data.dataset import FORMAT, Manifest, SegmentRef, Split, stream_digest
from charnn.data.sources import SPLIT_RULE
from charnn.spec_loader import SpecError, add_spec_arguments, spec_from_dict, spec_to_dict

FIELDS = dict(spec_fields())
BASE = {"data": {"sources": ["corpus:tiny"]}}
# Another valid value where the type alone does not give one.
OTHER = {"data.sources": ["corpus:other"], "data.dataset_root": "/elsewhere", "run.storage": "/elsewhere",
         "storage.endpoint_url": "http://127.0.0.1:9000", "retrain.replay": 0.5}


def other_value(dotted: str):
    """A valid value of ``dotted`` other than its default."""
    if dotted in OTHER:
        return OTHER[dotted]
    info = FIELDS[dotted]
    default = info.get_default(call_default_factory=True)
    hint = typing.get_type_hints(type(getattr(Spec(), dotted.split(".")[0])))[dotted.split(".")[1]]
    if typing.get_origin(hint) is typing.Literal:
        return next(choice for choice in typing.get_args(hint) if choice != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if isinstance(default, int):
        return default + 1
    return "other" if isinstance(default, str) or str in typing.get_args(hint) else 1  # a name, an optional one or int


def spec_with(dotted: str | None = None, value=None) -> Spec:
    tree = spec_to_dict(spec_from_dict(BASE))
    if dotted:
        section, key = dotted.split(".")
        tree[section][key] = other_value(dotted) if value is None else value
    return spec_from_dict(tree)


def name_of(spec: Spec) -> str:
    """The dataset directory's name (where it lies, data.dataset_root, aside)."""
    return dataset_directory(DatasetRequest.from_spec(spec)).rsplit("/", 1)[1]


def test_the_roles_are_the_known_ones():
    assert {role_of(info) for info in FIELDS.values()} - {None} <= set(ROLES)


def test_every_field_and_section_is_described():
    undescribed = [dotted for dotted, info in FIELDS.items() if not (info.description or "").strip()]
    assert not undescribed
    sections = [name for name, cls in typing.get_type_hints(Spec).items() if not (cls.__doc__ or "").strip()]
    assert not sections


@pytest.mark.parametrize("dotted", fields_with_role("dataset"))
def test_every_dataset_field_names_another_dataset(dotted):
    assert name_of(spec_with(dotted)) != name_of(spec_with())


@pytest.mark.parametrize("dotted", [d for d in FIELDS if d not in fields_with_role("dataset")])
def test_no_other_field_names_another_dataset(dotted):
    assert name_of(spec_with(dotted)) == name_of(spec_with())


def test_the_dataset_names_are_those_of_before_the_roles():
    """Datasets on users' disks keep their directories: the name is the hash it always was."""
    import hashlib
    import json

    for spec in (spec_with(), spec_with("data.alphabet"), spec_with("cluster.num_workers", 4)):
        request = DatasetRequest.from_spec(spec)
        old = hashlib.sha256(json.dumps({
            "format": FORMAT, "alphabet": request.alphabet, "seq_len": request.seq_len, "rows": request.rows,
            "workers": request.workers, "val_fraction": request.val_fraction, "shard_mb": request.shard_mb,
            "split_rule": SPLIT_RULE}, sort_keys=True).encode()).hexdigest()[:16]
        assert name_of(spec) == old


def test_a_dataset_setting_at_its_default_leaves_the_name_as_it_was():
    """A setting added to DatasetRequest later (with a default) names only the datasets that change it."""
    @dataclasses.dataclass(frozen=True)
    class Grown(DatasetRequest):
        lowercase: bool = False

    request = DatasetRequest.from_spec(spec_with())
    grown = Grown(**{f.name: getattr(request, f.name) for f in dataclasses.fields(request)})
    assert dataset_settings(grown) == dataset_settings(request)


def manifest_of(request: DatasetRequest) -> Manifest:
    """A manifest as a build of ``request`` records it: its fields of the request's names, and R."""
    def split(rows: int) -> Split:
        return Split(rows, 10 * request.seq_len, 10, 10 * rows * request.seq_len, ())

    recorded = {f.name: getattr(request, f.name) for f in dataclasses.fields(Manifest) if hasattr(request, f.name)}
    return Manifest(**{"alphabet_size": 98, "split_rule": SPLIT_RULE, "documents": 2, **recorded},
                    splits={"train": split(request.rows), "val": split(2)},
                    segments=(SegmentRef("s", 2, 10, 1, "content"),))


@pytest.mark.parametrize("dotted", fields_with_role("dataset"))
def test_the_stream_digest_covers_the_dataset_settings_that_decide_the_rows(dotted):
    """stream_digest reads the manifest; it changes exactly when a setting that names a segment does."""
    before, after = DatasetRequest.from_spec(spec_with()), DatasetRequest.from_spec(spec_with(dotted))

    def rows(request):
        return {k: v for k, v in dataset_settings(request).items() if k not in STORAGE_ONLY}

    changes = rows(before) != rows(after)
    assert (stream_digest(manifest_of(before), None) != stream_digest(manifest_of(after), None)) == changes
    documents = __import__("pyarrow").table({"url_key": ["u"], "identity": ["i"], "split": ["train"]})
    assert (segment_id(before, 2, documents) != segment_id(after, 2, documents)) == changes


def test_the_same_rows_on_other_workers_are_another_dataset_of_the_same_stream():
    one = DatasetRequest.from_spec(spec_with("train.batch_per_worker", 200))
    two = DatasetRequest.from_spec(spec_from_dict({**BASE, "train": {"batch_per_worker": 100},
                                                   "cluster": {"num_workers": 2}}))
    assert dataset_directory(one) != dataset_directory(two)
    assert stream_digest(manifest_of(one), None) == stream_digest(manifest_of(two), None)


def test_the_resume_settings_are_the_resume_fields_under_the_keys_checkpoints_hold():
    assert tuple(resume_settings(Spec())) == RESUME_SETTINGS == fields_with_role("resume")
    assert set(RESUME_SETTINGS) == {"model.dropout", "train.lr", "train.warmup_steps", "train.schedule",
                                    "train.min_lr_ratio", "train.grad_clip", "train.epoch_state", "train.seed",
                                    "train.first_step"}
    spec = spec_with("train.lr", 0.5)
    assert resume_settings(spec)["train.lr"] == 0.5


@pytest.mark.parametrize("dotted", fields_with_role("workers"))
def test_a_workers_field_carries_no_credentials(dotted):
    section, key = dotted.split(".")
    with pytest.raises(SpecError, match=f"^{dotted} must not carry credentials"):
        spec_from_dict({**BASE, section: {**BASE.get(section, {}), key: "https://u:FAKEsecret@host/x"}})


def test_help_spec_prints_every_field_with_its_default_meaning_and_role(capsys):
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)  # --spec is required: --help-spec exits before that is checked
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--help-spec"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for dotted, info in FIELDS.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {dotted} "))
        end = next(i for i in range(at + 1, len(lines) + 1) if i == len(lines) or not lines[i].startswith(" " * 8))
        text = " ".join(" ".join(lines[at:end]).split())
        default = info.get_default(call_default_factory=True)
        assert text.split()[1] == (default if isinstance(default, str) else __import__("json").dumps(default))
        assert " ".join(info.description.split())[:40] in text
        assert (f"[{role_of(info)}]" in text) == bool(role_of(info))


def test_the_commands_take_help_spec(monkeypatch, capsys):
    from charnn.cli.runtime import job_spec

    monkeypatch.setattr(sys, "argv", ["charnn-train", "--help-spec"])
    with pytest.raises(SystemExit) as info:
        job_spec("train")
    assert info.value.code == 0 and "train.lr " in capsys.readouterr().out
