"""Tests for charnn.spec_loader (the schema is charnn.config's): real YAML files in tmp_path, no mocks, no Ray."""
import argparse
import ast
import dataclasses
import glob
import os
import resource
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from charnn.config import Spec
from charnn.spec_loader import (
    SpecError, add_spec_arguments, dump_spec, expand_path, load_spec, spec_from_args, spec_from_dict, spec_to_dict,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def error_of(fn, *args, **kwargs):
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def minimal(tmp_path, extra="", name="x.yaml"):
    return write(tmp_path, name, "data:\n  sources: [corpus:tiny]\n" + extra)


# --- loading and defaults -------------------------------------------------------------------

def test_defaults(tmp_path):
    spec = load_spec(minimal(tmp_path))
    assert spec.data.sources == ["corpus:tiny"]
    assert spec.data.alphabet == "gorner98" and spec.data.seq_len == 30
    assert spec.model.cell_size == 512 and spec.model.layers == 3 and spec.model.dropout == 0.2
    assert spec.train.batch_per_worker == 200 and spec.train.lr == 0.001
    assert spec.train.schedule == "constant" and spec.train.epoch_state == "roll"
    assert spec.cluster.num_workers == 1 and spec.cluster.use_gpu is False
    assert spec.run.name == "charnn" and spec.run.storage == "~/charnn/runs"
    assert spec.storage.endpoint_url is None and spec.storage.anon is False
    rest = Spec()
    rest.data.sources = ["corpus:tiny"]
    assert spec == rest


def test_single_source_string_is_wrapped(tmp_path):
    path = write(tmp_path, "x.yaml", "data:\n  sources: https://example.com/a.txt\n")
    assert load_spec(path).data.sources == ["https://example.com/a.txt"]


def test_int_given_for_float_becomes_float(tmp_path):
    spec = load_spec(minimal(tmp_path, "train:\n  lr: 1\n"))
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)


def test_empty_section_and_empty_file(tmp_path):
    assert load_spec(minimal(tmp_path, "train:\n")).train == Spec().train
    write(tmp_path, "empty.yaml", "# nothing here\n")
    path = write(tmp_path, "child.yaml", "extend: empty.yaml\ndata: {sources: [a]}\n")
    assert load_spec(path).data.sources == ["a"]


# --- extend ---------------------------------------------------------------------------------

def test_single_extend_and_deep_merge(tmp_path):
    write(tmp_path, "base.yaml",
          "data:\n  sources: [a, b]\n  seq_len: 50\ntrain:\n  lr: 0.01\n  steps: 7\n")
    path = write(tmp_path, "child.yaml",
                 "extend: base.yaml\ndata:\n  seq_len: 60\ntrain:\n  lr: 0.5\n")
    spec = load_spec(path)
    assert spec.data.seq_len == 60 and spec.data.sources == ["a", "b"]
    assert spec.train.lr == 0.5 and spec.train.steps == 7


def test_lists_are_replaced_not_merged(tmp_path):
    write(tmp_path, "base.yaml", "data:\n  sources: [a, b]\n")
    path = write(tmp_path, "child.yaml", "extend: base.yaml\ndata:\n  sources: [c]\n")
    assert load_spec(path).data.sources == ["c"]


def test_extend_list_later_parent_wins(tmp_path):
    write(tmp_path, "p1.yaml", "data: {sources: [one]}\ntrain: {lr: 0.1, steps: 1}\n")
    write(tmp_path, "p2.yaml", "train: {lr: 0.2}\nmodel: {layers: 5}\n")
    spec = load_spec(write(tmp_path, "c.yaml", "extend: [p1.yaml, p2.yaml]\n"))
    assert spec.train.lr == 0.2 and spec.train.steps == 1 and spec.model.layers == 5
    spec = load_spec(write(tmp_path, "d.yaml", "extend: [p2.yaml, p1.yaml]\n"))
    assert spec.train.lr == 0.1 and spec.model.layers == 5
    spec = load_spec(write(tmp_path, "e.yaml", "extend: [p2.yaml, p1.yaml]\ntrain: {lr: 0.3}\n"))
    assert spec.train.lr == 0.3


def test_extend_is_relative_to_extending_file(tmp_path):
    write(tmp_path, "specs/base/common.yaml", "data: {sources: [x]}\nmodel: {layers: 2}\n")
    write(tmp_path, "specs/mid.yaml", "extend: base/common.yaml\nmodel: {cell_size: 64}\n")
    path = write(tmp_path, "specs/runs/leaf.yaml", "extend: ../mid.yaml\n")
    spec = load_spec(path)
    assert (spec.model.layers, spec.model.cell_size) == (2, 64)


def test_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path, "base.yaml", "data: {sources: [x]}\ntrain: {steps: 1}\n")
    write(tmp_path, "b.yaml", "extend: base.yaml\ntrain: {lr: 0.2}\n")
    write(tmp_path, "c.yaml", "extend: base.yaml\ntrain: {seed: 3}\n")
    spec = load_spec(write(tmp_path, "a.yaml", "extend: [b.yaml, c.yaml]\n"))
    assert (spec.train.steps, spec.train.lr, spec.train.seed) == (1, 0.2, 3)


# --- overrides ------------------------------------------------------------------------------

def test_overrides(tmp_path):
    spec = load_spec(minimal(tmp_path), [
        "train.steps=3", "train.lr=0.5", "cluster.use_gpu=true", "data.sources=[a, b]",
        "storage.endpoint_url=http://localhost:9000", "run.name=exp-1.2_b",
    ])
    assert spec.train.steps == 3 and spec.train.lr == 0.5 and spec.cluster.use_gpu is True
    assert spec.data.sources == ["a", "b"] and spec.storage.endpoint_url == "http://localhost:9000"
    assert spec.run.name == "exp-1.2_b"


def test_override_null_optional_and_order(tmp_path):
    path = minimal(tmp_path, "storage:\n  region: eu-west-1\n")
    assert load_spec(path).storage.region == "eu-west-1"
    assert load_spec(path, ["storage.region=null"]).storage.region is None
    assert load_spec(path, ["train.seed=1", "train.seed=2"]).train.seed == 2


def test_override_empty_value_is_empty_string(tmp_path):
    assert load_spec(minimal(tmp_path), ["run.storage="]).run.storage == ""


def test_override_whole_section_mapping(tmp_path):
    spec = load_spec(minimal(tmp_path, "train: {steps: 9}\n"), ["train={lr: 0.3}"])
    assert spec.train.lr == 0.3 and spec.train.steps == 9


def test_override_supplies_missing_sources(tmp_path):
    path = write(tmp_path, "x.yaml", "train: {steps: 1}\n")
    assert load_spec(path, ["data.sources=corpus:tiny"]).data.sources == ["corpus:tiny"]


def test_argparse_integration(tmp_path):
    path = minimal(tmp_path)
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    args = parser.parse_args(["--spec", path, "--set", "train.steps=4", "--set", "model.layers=1"])
    assert args.overrides == ["train.steps=4", "model.layers=1"]
    spec = spec_from_args(args)
    assert spec.train.steps == 4 and spec.model.layers == 1
    with pytest.raises(SystemExit):
        parser.parse_args([])
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser, default_spec=path)
    args = parser.parse_args([])
    assert args.spec == path and args.overrides == []
    assert spec_from_args(args).data.sources == ["corpus:tiny"]


# --- errors ---------------------------------------------------------------------------------

def test_unknown_key_did_you_mean(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path, "train:\n  stpes: 10\n"))
    assert "x.yaml" in msg
    assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path, "cluster:\n  zzzzzz: 1\n"))
    assert "unknown key 'cluster.zzzzzz'" in msg and "num_workers" in msg


def test_unknown_section(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path, "trian:\n  steps: 10\n"))
    assert "x.yaml" in msg and "unknown section 'trian'" in msg and "did you mean 'train'?" in msg


def test_unknown_key_in_parent_names_parent(tmp_path):
    write(tmp_path, "base.yaml", "model: {layerz: 2}\n")
    msg = error_of(load_spec, minimal(tmp_path, "extend: base.yaml\n"))
    assert "base.yaml: unknown key 'model.layerz' (did you mean 'model.layers'?)" in msg


def test_unknown_override_key(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["train.stpes=3"])
    assert msg.startswith("--set train.stpes=3: unknown key 'train.stpes'")
    assert "did you mean 'train.steps'?" in msg


@pytest.mark.parametrize("value, got", [
    ("ten", "got str 'ten'"), ("true", "got bool True"),
    ("2.5", "got float 2.5"), ("2.0", "got float 2.0"),
])
def test_wrong_type_for_int(tmp_path, value, got):
    msg = error_of(load_spec, minimal(tmp_path, f"train:\n  steps: {value}\n"))
    assert "x.yaml" in msg and "train.steps must be an int" in msg and got in msg


@pytest.mark.parametrize("section, key, value, need", [
    ("cluster", "use_gpu", "1", "a bool"), ("cluster", "use_gpu", "'yes'", "a bool"),
    ("run", "name", "42", "a str"), ("storage", "region", "[a]", "a str or null"),
    ("data", "sources", "[a, 1]", "a str or a list of str"),
    ("model", "dropout", "true", "a float"),
    ("train", "lr", ".inf", "a float"), ("train", "lr", ".nan", "a float"),
])
def test_wrong_types(tmp_path, section, key, value, need):
    base = "" if section == "data" else "data: {sources: [a]}\n"
    path = write(tmp_path, "x.yaml", f"{base}{section}:\n  {key}: {value}\n")
    msg = error_of(load_spec, path)
    assert f"x.yaml: {section}.{key} must be {need}" in msg


def test_override_wrong_type(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["train.lr=abc"])
    assert msg == "--set train.lr=abc: train.lr must be a float, got str 'abc'"


def test_section_not_a_mapping(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path, "train: 3\n"))
    assert "x.yaml" in msg and "train must be a mapping" in msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of(load_spec, path) == f"spec file not found: {path}"


def test_missing_extended_file(tmp_path):
    path = write(tmp_path, "a.yaml", "extend: nope.yaml\n")
    assert error_of(load_spec, path) == f"{path}: extends missing file 'nope.yaml'"


def test_extend_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "extend: b.yaml\n")
    write(tmp_path, "b.yaml", "extend: a.yaml\ndata: {sources: [x]}\n")
    assert error_of(load_spec, a) == f"{a}: extend cycle a.yaml -> b.yaml -> a.yaml"


def test_self_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "extend: [a.yaml]\n")
    assert error_of(load_spec, a) == f"{a}: extend cycle a.yaml -> a.yaml"


def test_extend_must_be_paths(tmp_path):
    msg = error_of(load_spec, write(tmp_path, "a.yaml", "extend: [1]\n"))
    assert "a.yaml: extend must be a path or a list of paths" in msg


@pytest.mark.parametrize("text", ["foo", "=3", "train..lr=3", ".lr=1"])
def test_bad_override_syntax(tmp_path, text):
    msg = error_of(load_spec, minimal(tmp_path), [text])
    assert msg == f"--set {text}: expected dotted.key=value"


def test_override_value_not_yaml(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["data.sources=[a,"])
    assert msg.startswith("--set data.sources=[a,: value is not valid YAML")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "x.yaml", "data:\n  sources: [a]\ntrain:\n  steps: [1\n  lr: 2\n")
    msg = error_of(load_spec, path)
    assert msg.startswith(f"{path}:") and "invalid YAML" in msg
    assert msg.split(":")[1].isdigit()


def test_top_level_not_mapping(tmp_path):
    msg = error_of(load_spec, write(tmp_path, "x.yaml", "- a\n- b\n"))
    assert "x.yaml" in msg and "top level of a spec file must be a mapping" in msg


def test_unsafe_yaml_tag_is_rejected_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "x.yaml",
                 f'data:\n  sources: !!python/object/apply:os.system ["touch {marker}"]\n')
    msg = error_of(load_spec, path)
    assert "x.yaml" in msg and not marker.exists()


@pytest.mark.parametrize("extra, expect", [
    ("train: {batch_per_worker: 0}", "train.batch_per_worker must be > 0, got 0"),
    ("data: {sources: [a], alphabet: foo}", "data.alphabet must be one of gorner98, bytes, got 'foo'"),
    ("model: {dropout: 1.0}", "model.dropout must be < 1, got 1.0"),
    ("model: {dropout: -0.1}", "model.dropout must be >= 0, got -0.1"),
    ("data: {sources: [a], val_fraction: 0}", "data.val_fraction must be > 0, got 0.0"),
    ("train: {schedule: linear}", "train.schedule must be one of constant, cosine, step"),
    ("train: {min_lr_ratio: 1.5}", "train.min_lr_ratio must be <= 1, got 1.5"),
    ("run: {name: 'my run'}", "run.name must match [A-Za-z0-9._-]+, got 'my run'"),
    ("run: {name: ''}", "run.name must match [A-Za-z0-9._-]+"),
    ("cluster: {num_workers: 2, min_workers: 3}", "cluster.min_workers must be <= cluster.num_workers (2), got 3"),
    ("cluster: {min_workers: 0}", "cluster.min_workers must be > 0, got 0"),
])
def test_constraint_violations(tmp_path, extra, expect):
    # A second `data:` key would be a duplicate key, so data's cases bring their own sources.
    path = (write(tmp_path, "x.yaml", extra + "\n") if extra.startswith("data:")
            else minimal(tmp_path, extra + "\n"))
    msg = error_of(load_spec, path)
    assert expect in msg and "x.yaml" in msg


def test_constraint_from_override_names_override(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["train.batch_per_worker=0"])
    assert msg == "train.batch_per_worker must be > 0, got 0 (in --set train.batch_per_worker=0)"


def test_sources_must_be_non_empty(tmp_path):
    msg = error_of(load_spec, write(tmp_path, "x.yaml", "train: {steps: 1}\n"))
    assert "data.sources must be non-empty" in msg and "x.yaml" in msg


def test_newlines_in_values_stay_on_one_line(tmp_path):
    error_of(load_spec, minimal(tmp_path), ["run.name=\"a\\nb\""])
    error_of(spec_from_dict, {"train": {"x\ny": 1}})


# --- hostile and odd input: one line, quickly, never a traceback or a hang -----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def isolated(code, timeout=30):
    """Run `code` in a child Python with 1 GiB of address space and a time limit, so that a spec
    which blows up fails its test instead of taking the test run (or the machine) with it."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def isolated_error(call, timeout=30):
    """The SpecError message of `call` (Python source using charnn.spec_loader), run in isolation."""
    code = ("from charnn.spec_loader import *\ntry:\n    " + call + "\nexcept SpecError as e:\n"
            "    print(repr(str(e)))\nelse:\n    print(repr('no error'))")
    return ast.literal_eval(isolated(code, timeout))


def alias_bomb(levels=9):
    """Flow YAML of `levels` lists, each holding ten aliases of the one before: 10**levels leaves
    in about 40 bytes a level."""
    items = ["&l0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("call", [
    "load_spec({path!r})",
    "load_spec({clean!r}, ['data.sources=' + {bomb!r}])",
])
def test_yaml_alias_bomb_is_refused(tmp_path, call):
    bomb = alias_bomb()
    path = write(tmp_path, "x.yaml", f"data:\n  sources: {bomb}\n")
    clean = minimal(tmp_path, name="clean.yaml")
    msg = isolated_error(call.format(path=path, clean=clean, bomb=bomb))
    assert "YAML aliases expand too much" in msg and "write the values out" in msg, msg
    assert msg.startswith((f"{path}:2: ", "--set data.sources=[&l0")) and len(msg) < 300, msg


def test_small_aliases_still_work(tmp_path):
    path = minimal(tmp_path, "run: {name: &n exp1}\nretrain: {model: *n}\n")
    assert load_spec(path).retrain.model == "exp1"
    assert load_spec(minimal(tmp_path), ["data.sources=[&a x, *a]"]).data.sources == ["x", "x"]


def test_error_message_of_a_huge_shared_value_is_bounded():
    # A Python tree (spec_from_dict: checkpoints, tests) can share sub-lists just like aliases.
    msg = isolated_error("x = ['x'] * 10\n    for _ in range(8): x = [x] * 10\n"
                         "    spec_from_dict({'data': {'sources': x}})")
    assert msg.startswith("<dict>: data.sources must be a str or a list of str, got list [[")
    assert len(msg) < 200, msg


def nested(depth, leaf="a"):
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("how", ["file", "set", "set-key", "dict"])
def test_deep_nesting_is_one_line(tmp_path, how):
    if how == "file":
        path = write(tmp_path, "x.yaml", f"data:\n  sources: {nested(5000)}\n")
        msg = error_of(load_spec, path)
        assert msg.startswith(f"{path}:2: nested too deeply (over 50 levels)"), msg
    elif how == "set":
        msg = error_of(load_spec, minimal(tmp_path), ["data.sources=" + nested(5000)])
        assert msg.startswith("--set data.sources=[[[") and "nested too deeply (over 50 levels)" in msg
    elif how == "set-key":
        msg = error_of(load_spec, minimal(tmp_path), ["data.sources" + ".a" * 5000 + "=1"])
        assert "data.sources must be a str or a list of str, got dict {'a': {" in msg
    else:
        tree = "a"
        for _ in range(5000):
            tree = [tree]
        msg = error_of(spec_from_dict, {"data": {"sources": tree}})
        assert msg.startswith("<dict>: data.sources must be a str or a list of str, got list [[")
    assert len(msg) < 300, msg


@pytest.mark.parametrize("depth, ok", [(47, True), (48, False)])
def test_nesting_limit_boundary(tmp_path, depth, ok):
    # Levels: the top mapping, `data`'s mapping, `sources`' lists, the leaf: 50 at most.
    path = write(tmp_path, "x.yaml", f"data: {{sources: {nested(depth)}}}\n")
    msg = error_of(load_spec, path)
    assert ("nested too deeply" not in msg) == ok, msg


def test_spec_file_size_is_limited(tmp_path):
    path = minimal(tmp_path, "#" * (1 << 20) + "\n")
    assert error_of(load_spec, path) == (f"{path}: spec file too large (over 1 MiB); "
                                         "a spec holds settings, not data")


def test_override_size_is_limited(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["run.name=" + "a" * ((1 << 20) + 1)])
    assert msg.startswith("--set run.name=aaa") and msg.endswith(
        "...: value too large (over 1 MiB); a spec holds settings, not data")
    assert len(msg) < 200


@pytest.mark.parametrize("override, key, expect", [
    ("train.lr=1e-3", "lr", 0.001), ("train.lr=1E5", "lr", 1e5), ("train.lr=.5", "lr", 0.5),
    ("train.lr=+2.5e-1", "lr", 0.25), ("train.lr=5.", "lr", 5.0), ("train.lr=1_000.5", "lr", 1000.5),
    ("train.steps=010", "steps", 10), ("train.steps=1_000", "steps", 1000),
    ("train.steps=0x10", "steps", 16), ("train.steps=0o17", "steps", 15), ("train.seed=-7", "seed", -7),
])
def test_yaml_1_2_numbers(tmp_path, override, key, expect):
    value = getattr(load_spec(minimal(tmp_path), [override]).train, key)
    assert value == expect and type(value) is type(expect)
    text = override.split("=", 1)[1]
    spec = load_spec(minimal(tmp_path, f"train:\n  {key}: {text}\n"))
    assert getattr(spec.train, key) == expect


@pytest.mark.parametrize("text, got", [("1:30", "str '1:30'"), ("0b11", "str '0b11'"),
                                       ("1e400", "float inf")])
def test_no_yaml_1_1_sexagesimal_or_binary_ints(tmp_path, text, got):
    msg = error_of(load_spec, minimal(tmp_path), [f"train.steps={text}"])
    assert msg == f"--set train.steps={text}: train.steps must be an int, got {got}"


def test_number_like_strings_survive_dump_and_load(tmp_path):
    spec = load_spec(minimal(tmp_path), ["run.name='1e3'", "run.storage='010'", "data.sources=['.5']"])
    assert (spec.run.name, spec.run.storage, spec.data.sources) == ("1e3", "010", [".5"])
    assert load_spec(write(tmp_path, "dumped.yaml", dump_spec(spec))) == spec
    assert spec_from_dict(yaml.safe_load(dump_spec(spec))) == spec


@pytest.mark.parametrize("text, where, key", [
    ("data: {sources: [a]}\ntrain:\n  lr: 0.1\n  steps: 2\n  lr: 0.2\n", ":5: ", "lr"),
    ("data: {sources: [a]}\ntrain: {}\ntrain: {}\n", ":3: ", "train"),
    ("data: {sources: [a]}\nextend: a.yaml\nextend: b.yaml\n", ":3: ", "extend"),
])
def test_duplicate_keys_are_refused(tmp_path, text, where, key):
    path = write(tmp_path, "x.yaml", text)
    assert error_of(load_spec, path) == f"{path}{where}duplicate key '{key}'; keep only one"


def test_duplicate_key_in_override(tmp_path):
    msg = error_of(load_spec, minimal(tmp_path), ["train={lr: 1, lr: 2}"])
    assert msg == "--set train={lr: 1, lr: 2}: duplicate key 'lr'; keep only one"


def test_merge_key_override_is_not_a_duplicate(tmp_path):
    spec = load_spec(minimal(tmp_path, "train: {<<: {steps: 5, lr: 0.1}, steps: 7}\n"))
    assert (spec.train.steps, spec.train.lr) == (7, 0.1)


@pytest.mark.parametrize("where", ["spec", "extend"])
def test_fifo_is_refused_not_waited_on(tmp_path, where):
    fifo = str(tmp_path / "p.yaml")
    os.mkfifo(fifo)
    path = fifo if where == "spec" else write(tmp_path, "x.yaml", "extend: p.yaml\n")
    msg = isolated_error(f"load_spec({path!r})", timeout=20)
    assert msg == f"{fifo}: not a regular file; give the path of a YAML spec file"


def test_directory_is_refused(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    path = str(tmp_path / "d.yaml")
    assert error_of(load_spec, path) == f"{path}: not a regular file; give the path of a YAML spec file"


def test_nul_in_extend_path(tmp_path):
    path = write(tmp_path, "x.yaml", 'extend: "a\\0b"\n')
    msg = error_of(load_spec, path)
    assert msg.startswith(f"{tmp_path}/a\\x00b: cannot read spec file"), msg


@pytest.mark.parametrize("value, problem", [
    ("1" * 5000, "cannot read '1111"), ("!!int abc", "cannot read 'abc' as !!int"),
    ("!!bool maybe", "cannot read 'maybe' as !!bool"),
    ("2020-13-45", "cannot read '2020-13-45' as !!timestamp"),
])
def test_unreadable_scalars(tmp_path, value, problem):
    path = minimal(tmp_path, f"train:\n  steps: {value}\n")
    msg = error_of(load_spec, path)
    assert msg.startswith(f"{path}:4: {problem}") and len(msg) < 300, msg
    msg = error_of(load_spec, minimal(tmp_path), [f"train.steps={value}"])
    assert msg.startswith("--set train.steps=") and problem in msg and len(msg) < 300, msg


def test_huge_python_int_in_error_message():
    msg = error_of(spec_from_dict, {"train": {"lr": 10 ** 5000}})
    assert msg == "<dict>: train.lr must be a float (finite), got int <16610-bit int>"


def test_extend_fan_out_reads_each_file_once(tmp_path):
    # Each file extends the next one 1000 times: a million reads of the last if none were shared.
    write(tmp_path, "c.yaml", "data: {sources: [c]}\n")
    write(tmp_path, "b.yaml", "extend: [" + ", ".join(["c.yaml"] * 1000) + "]\n")
    path = write(tmp_path, "a.yaml", "extend: [" + ", ".join(["b.yaml"] * 1000) + "]\n")
    code = f"from charnn.spec_loader import load_spec\nprint(load_spec({path!r}).data.sources)"
    assert isolated(code) == "['c']"


@pytest.mark.parametrize("override", ["data.sources=", "data.sources=['']", "data.sources=[a, ' ']",
                                      "data.sources=\"\\t\""])
def test_blank_sources_are_refused(tmp_path, override):
    # An empty source would list the current directory: an unset $CORPUS must not train on it.
    msg = error_of(load_spec, minimal(tmp_path), [override])
    assert msg.startswith("data.sources must have no blank entries, got [") and override in msg


def test_blank_source_in_file(tmp_path):
    path = write(tmp_path, "x.yaml", "data: {sources: [a, '']}\n")
    assert error_of(load_spec, path) == f"data.sources must have no blank entries, got ['a', ''] (in {path})"


@pytest.mark.parametrize("key", ["run.name", "retrain.model"])
@pytest.mark.parametrize("name", [".", "..", ".hidden", "'..'"])
def test_names_that_are_not_path_segments(tmp_path, key, name):
    msg = error_of(load_spec, minimal(tmp_path), [f"{key}={name}"])
    assert msg.startswith(f"{key} must not start with '.', got '{name.strip(chr(39))}'"), msg


@pytest.mark.parametrize("name", ["a.b", "a..b", "v1.", "-x", "_"])
def test_names_with_inner_dots_are_fine(tmp_path, name):
    spec = load_spec(minimal(tmp_path), [f"run.name={name}", f"retrain.model={name}"])
    assert spec.run.name == spec.retrain.model == name


@pytest.mark.ray  # a job in a process of its own (seconds of imports): not for `make check`
def test_generate_refuses_dot_model_names(tmp_path):
    command = [sys.executable, "jobs/generate.py", "--model", "..", "--storage", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == \
        "charnn: error: retrain.model must not start with '.', got '..' (in --model)"


# --- dict round trip and dumping ------------------------------------------------------------

def test_round_trip(tmp_path):
    spec = load_spec(minimal(tmp_path), ["train.steps=5", "storage.endpoint_url=http://m:9000"])
    d = spec_to_dict(spec)
    assert isinstance(d, dict) and d["train"]["steps"] == 5
    assert spec_from_dict(d) == spec
    assert spec_from_dict(yaml.safe_load(dump_spec(spec))) == spec


def test_dump_is_loadable_spec_file(tmp_path):
    spec = load_spec(minimal(tmp_path), ["model.layers=2"])
    text = dump_spec(spec)
    assert text.index("data:") < text.index("model:") < text.index("train:")
    assert load_spec(write(tmp_path, "dumped.yaml", text)) == spec


def test_spec_from_dict_origin(tmp_path):
    tree = {"data": {"sources": ["a"]}, "train": {"steps": "x"}}
    msg = error_of(spec_from_dict, tree, origin="ckpt")
    assert msg == "ckpt: train.steps must be an int, got str 'x'"
    assert error_of(spec_from_dict, [1]).startswith("<dict>: top level must be a mapping")


def test_expand_path():
    assert expand_path("s3://bucket/runs") == "s3://bucket/runs"
    assert expand_path("~/runs") == os.path.join(os.path.expanduser("~"), "runs")
    assert expand_path("rel/dir") == os.path.join(os.getcwd(), "rel/dir")


# --- fuzz -----------------------------------------------------------------------------------

_SECTION_NAMES = ["data", "model", "train", "cluster", "run", "retrain", "storage"]
_KEYS = ["sources", "alphabet", "seq_len", "dropout", "lr", "steps", "use_gpu", "name",
         "endpoint_url", "anon", "schedule", "val_fraction"]
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
            | st.sampled_from(["gorner98", "cosine", "x"]))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(_KEYS) | st.integers(), inner,
                      max_size=4),
    max_leaves=20,
)
_sections = st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), _values, max_size=5)
_trees = st.dictionaries(st.sampled_from(_SECTION_NAMES) | st.text(max_size=6) | st.integers(),
                         _sections | _values, max_size=6)

# Trees with real section and key names, so the fuzz also reaches the success path.
_SECTION_KEYS = {name: [f.name for f in dataclasses.fields(cls)]
                 for name, cls in typing.get_type_hints(Spec).items()}
_near_valid = st.fixed_dictionaries(
    {"data": st.fixed_dictionaries({"sources": st.lists(st.text(max_size=4), min_size=1)})},
    optional={name: st.dictionaries(st.sampled_from(keys), _scalars | st.lists(st.text(max_size=3)),
                                    max_size=4)
              for name, keys in _SECTION_KEYS.items() if name != "data"},
)


@settings(max_examples=600, deadline=None)
@given(_trees | _near_valid)
def test_fuzz_spec_from_dict_only_raises_spec_error(tree):
    try:
        spec = spec_from_dict(tree)
    except SpecError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(spec, Spec) and spec.data.sources
        assert spec_from_dict(spec_to_dict(spec)) == spec


SHIPPED_SPECS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "jobs", "specs", "*.yaml")))


@pytest.mark.parametrize("path", [p for p in SHIPPED_SPECS if not p.endswith("base.yaml")])  # base: no sources
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.data.sources and spec.run.name


# --- ${NAME}: values from the environment ---------------------------------------------------

def test_env_references_expand_in_set_values(tmp_path, monkeypatch):
    # The brief's form: braces inside a YAML flow list, which YAML alone would refuse.
    monkeypatch.setenv("CORPUS_TOKEN", "s3cr/t:x@y")
    spec = load_spec(minimal(tmp_path), ["data.sources=[https://u:${CORPUS_TOKEN}@host/x, /local/${CORPUS_TOKEN}]"])
    assert spec.data.sources == ["https://u:s3cr/t:x@y@host/x", "/local/s3cr/t:x@y"]
    assert load_spec(minimal(tmp_path), ['data.sources="${CORPUS_TOKEN}"']).data.sources == ["s3cr/t:x@y"]


def test_env_references_expand_in_spec_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_BUCKET", "my-bucket")
    monkeypatch.setenv("CHARNN_NAME", "nightly")
    path = write(tmp_path, "x.yaml", "data:\n  sources: [s3://${CHARNN_BUCKET}/corpus/]\n"
                                     "run:\n  name: ${CHARNN_NAME}\n  storage: s3://${CHARNN_BUCKET}/runs\n")
    spec = load_spec(path)
    assert spec.data.sources == ["s3://my-bucket/corpus/"]
    assert (spec.run.name, spec.run.storage) == ("nightly", "s3://my-bucket/runs")


@pytest.mark.parametrize("text, expect", [
    ("a$$b", "a$b"), ("$$${CHARNN_X}", "$v$"), ("$${CHARNN_X}", "${CHARNN_X}"), ("p$ss", "p$ss"),
    ("$HOME", "$HOME"), ("x$", "x$"), ("${CHARNN_X}${CHARNN_X}", "v$v$"),
])
def test_env_reference_escapes(tmp_path, monkeypatch, text, expect):
    monkeypatch.setenv("CHARNN_X", "v$")  # an expanded value is not expanded again
    assert load_spec(minimal(tmp_path), [f"run.storage='{text}'"]).run.storage == expect


def test_unset_env_reference_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CHARNN_UNSET_TOKEN", raising=False)
    msg = error_of(load_spec, minimal(tmp_path), ["data.sources=[https://u:${CHARNN_UNSET_TOKEN}@h/x]"])
    assert msg.startswith("--set data.sources=[https://***@h/x]: data.sources names "  # a password's place: masked
                          "environment variable CHARNN_UNSET_TOKEN, which is not set"), msg
    path = write(tmp_path, "y.yaml", "data:\n  sources: [a]\nrun:\n  storage: ${CHARNN_UNSET_TOKEN}/runs\n")
    assert error_of(load_spec, path).startswith(f"{path}: run.storage names environment variable CHARNN_UNSET_TOKEN")


@pytest.mark.parametrize("text", ["${1X}", "${A-B}", "${}", "${A", "a${ A }"])
def test_bad_env_references_are_refused(tmp_path, text):
    msg = error_of(load_spec, minimal(tmp_path), [f"run.storage='{text}'"])
    assert "run.storage" in msg and "${NAME}" in msg and "$$" in msg, msg


def test_env_references_only_in_string_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_STEPS", "5")
    msg = error_of(load_spec, minimal(tmp_path), ["train.steps=${CHARNN_STEPS}"])
    assert msg == "--set train.steps=${CHARNN_STEPS}: train.steps must be an int, got str '${CHARNN_STEPS}'"


def test_set_origin_is_masked_before_it_is_cut_short(tmp_path):
    override = "data.sourcez=[https://" + "u" * 50 + ":FAKEpw1234567890@h/x]"  # the cut falls in the password
    msg = error_of(load_spec, minimal(tmp_path), [override])
    assert "unknown key 'data.sourcez'" in msg and "FAKE" not in msg, msg


def test_spec_from_dict_does_not_expand(monkeypatch):
    # Workers rebuild the driver's spec from a dict: its values were expanded once already.
    monkeypatch.setenv("CHARNN_X", "v")
    spec = spec_from_dict({"data": {"sources": ["a${CHARNN_X}$$"]}})
    assert spec.data.sources == ["a${CHARNN_X}$$"]


def test_dump_masks_expanded_secrets_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARNN_PW", "FAKEpw4471")
    monkeypatch.setenv("CHARNN_TOK", "FAKEtok4471")
    spec = load_spec(minimal(tmp_path), [
        "data.sources=[https://u:${CHARNN_PW}@h/x, 'https://h/y?access_token=${CHARNN_TOK}', 'gs://b/z?key=${CHARNN_TOK}']",
        "run.storage='/runs/pa$$$$word'", "run.name=" + "n" * 120])
    text = dump_spec(spec)
    assert "FAKE" not in text and "https://***@h/x" in text and "access_token=***" in text and "key=***" in text
    again = load_spec(write(tmp_path, "dumped.yaml", text))  # `$` is written `$$`: the file reloads as it ran
    assert again.run == spec.run and again.run.storage == "/runs/pa$$word"
    assert dump_spec(again) == text


@pytest.mark.parametrize("override", [
    "run.storage=s3://AKIAIOSFODNN7EXAMPLE:FAKEsecret@bucket/runs",
    "run.storage=https://h/runs?token=FAKEsecret",
    "data.dataset_root=https://u:FAKEsecret@host/datasets",
    "storage.endpoint_url=http://minio:FAKEsecret@127.0.0.1:9000",
])
def test_credentials_where_workers_need_the_value_are_refused(tmp_path, override):
    msg = error_of(load_spec, minimal(tmp_path), [override])
    key = override.split("=")[0]
    assert msg.startswith(f"{key} must not carry credentials") and f"(in --set {key}=" in msg, msg
    assert "FAKEsecret" not in msg and "environment" in msg
    section, name = key.split(".")
    tree = {"data": {"sources": ["a"]}}
    tree.setdefault(section, {})[name] = override.split("=", 1)[1]
    assert "must not carry credentials" in error_of(load_spec, write(tmp_path, "y.yaml", yaml.safe_dump(tree)))
    assert "must not carry credentials" in error_of(spec_from_dict, tree)
