"""Reading a job spec: YAML files with `extend` inheritance, --set overrides and ${NAME} references.

The schema is charnn.config's.  Every problem raises SpecError with a one-line message naming
the file, the dotted key and the fix, so a bad spec fails before any Ray worker starts.  Spec text
is read with bounds (size, nesting, aliases) and pydantic's errors are translated into those
messages.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
import reprlib
import stat
import textwrap
import typing
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from charnn.config import ROLES, Spec, role_of, spec_fields
from charnn.errors import UserError
from charnn.redact import redact


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


class SpecError(UserError):
    """A spec problem; the message is always a single line, with credentials masked."""

    def __init__(self, message: str):

        # Values and paths can carry newlines, NULs and terminal escapes; log lines and CLI
        # errors must stay one printable line.
        Exception.__init__(self, redact(_CONTROL.sub(lambda m: repr(m.group())[1:-1], message)))


_SECTIONS: dict[str, type] = typing.get_type_hints(Spec)
_SPEC = TypeAdapter(Spec)


# A section's fields and their plain types (Strict and constraints stripped): int, float, bool, str,
# Optional[str], list[str] or a Literal of choices.
_fields = functools.cache(typing.get_type_hints)


class _BriefRepr(reprlib.Repr):
    """repr for error messages: short however large, deep or aliased the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 60

    def repr_int(self, x: int, level: int) -> str:
        # repr() of a huge int is slow, and past 4300 digits an error.
        return super().repr_int(x, level) if x.bit_length() <= 1000 else f"<{x.bit_length()}-bit int>"


_brief = _BriefRepr()


def _masked(v: Any) -> Any:
    """A value for an error message: credentials masked before repr cuts it short (a URL cut
    inside its password would no longer be recognisable as one)."""

    if isinstance(v, str):
        return redact(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return [redact(x) for x in v]
    return v


def _show(v: Any) -> str:
    r = _brief.repr(_masked(v))
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a str",
               Optional[str]: "a str or null", Optional[int]: "an int or null",
               list[str]: "a str or a list of str"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _unknown(origin: str, what: str, name: str, prefix: str, valid: Sequence[str]) -> SpecError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid: {', '.join(valid)}"
    return SpecError(f"{origin}: unknown {what} '{prefix}{name}' ({hint})")


def _need(error: dict, hint: Any) -> Optional[str]:
    """What a failed constraint asks of a value ("be > 0"), or None for a wrong type."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _BOUNDS:
        bound = ctx[_BOUNDS[kind][0]]  # pydantic gives a float field's bounds as floats: 0 reads better
        return f"be {_BOUNDS[kind][1]} {int(bound) if float(bound).is_integer() else bound}"
    if kind == "literal_error":
        return f"be one of {', '.join(typing.get_args(hint))}"
    if kind == "string_pattern_mismatch":  # pydantic searches, so the pattern is anchored
        return f"match {ctx['pattern'].removeprefix('^').removesuffix('$')}"
    return {"too_short": "be non-empty", "spec_rule": ctx.get("need")}.get(kind)


def _position(tree: dict, loc: tuple) -> tuple[int, int]:
    return list(tree).index(loc[0]), list(tree[loc[0]]).index(loc[1]) if len(loc) > 1 else -1


def _translate(e: ValidationError, tree: dict, origin: str) -> SpecError:
    """The one-line SpecError for the first error in the tree's order."""
    error = min(e.errors(include_url=False, include_input=False),  # input: str() of a huge int fails
                key=lambda err: _position(tree, err["loc"]))
    loc, kind, section = error["loc"], error["type"], error["loc"][0]
    if kind == "unexpected_keyword_argument":  # extra="forbid"
        if len(loc) == 1:
            return _unknown(origin, "section", section, "", list(_SECTIONS))
        return _unknown(origin, "key", loc[1], f"{section}.", list(_fields(_SECTIONS[section])))
    if len(loc) == 1:
        return SpecError(f"{origin}: {section} must be a mapping of keys, got {_show(tree[section])}")
    dotted, hint, v = f"{section}.{loc[1]}", _fields(_SECTIONS[section])[loc[1]], tree[section][loc[1]]
    if isinstance(v, SpecError):  # a ${NAME} that _expand_value could not expand
        return v
    need = _need(error, hint) if isinstance(v, str) or kind != "literal_error" else None
    if need is None:
        need = _TYPE_NAMES.get(hint, "a str")  # a Literal of choices is a str
        if hint is float and type(v) in (int, float):  # inf, nan, or an int too big
            need += " (finite)"
        return SpecError(f"{origin}: {dotted} must be {need}, got {_show(v)}")
    got = error.get("ctx", {}).get("got", float(v) if hint is float else v)  # an int given for a float
    return SpecError(f"{dotted} must {need}, got {_brief.repr(_masked(got))} (in {origin})")


def _validate(tree: dict, origin: str) -> Spec:
    try:
        return _SPEC.validate_python(tree)
    except ValidationError as e:
        raise _translate(e, tree, origin) from None


# ${NAME} in a spec's string values is the environment variable NAME, so that a secret need not be
# typed on a command line (which `ray job submit` logs and `ps` shows): $$ is a literal $, and any
# other $ stands for itself.  Expanded once, where a spec is read (files, --set); spec_from_dict,
# which rebuilds a spec that was read already (Ray's workers), leaves values as they are.
_ENV_REFERENCE = re.compile(r"\$(\$|\{(?:[A-Za-z_][A-Za-z0-9_]*\})?)")
_STRING_HINTS = (str, Optional[str], list[str])


def _expand_env(value: str, dotted: str, origin: str) -> str:
    def substitute(m: "re.Match[str]") -> str:
        ref = m.group(1)
        if ref == "$":
            return "$"
        if ref == "{":
            bad = value[m.start():m.start() + 24]
            raise SpecError(f"{origin}: {dotted} holds {bad!r}, not a ${{NAME}} reference; write ${{NAME}} "
                            f"(NAME: letters, digits and _, not starting with a digit) or $$ for a literal $")
        name = ref[1:-1]
        if name not in os.environ:
            raise SpecError(f"{origin}: {dotted} names environment variable {name}, which is not set; "
                            f"export it (or write $$ for a literal $)")
        return os.environ[name]

    return _ENV_REFERENCE.sub(substitute, value)


# YAML's flow collections take braces as syntax: [https://u:${TOKEN}@host/x] would not parse.
# References are hidden from the YAML reader behind two private-use characters and put back after.
_HIDE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_OPEN, _CLOSE = "\ue000", "\ue001"


def _load_hiding_references(text: str) -> Any:
    if _OPEN in text or _CLOSE in text or "${" not in text:
        return _load(text)
    return _unhide(_load(_HIDE.sub(lambda m: f"${_OPEN}{m.group(1)}{_CLOSE}", text)))


def _unhide(v: Any) -> Any:
    if isinstance(v, str):
        return v.replace(_OPEN, "{").replace(_CLOSE, "}")
    if isinstance(v, list):
        return [_unhide(x) for x in v]
    if isinstance(v, dict):
        return {_unhide(k): _unhide(x) for k, x in v.items()}
    return v


def _text(key: Any) -> str:
    """A key as pydantic is to see it: YAML's `on:`, `1:` or `~:` are not strings (and not valid keys)."""
    return key if isinstance(key, str) else _brief.repr(key) if isinstance(key, int) else str(key)


def _prepare(d: Any, origin: str, expand: bool) -> dict:
    """The tree as pydantic is to see it: `train:` with nothing under it is {}, keys are strings, and
    with ``expand`` the ${NAME} references in string keys' values are the environment's values."""
    if not isinstance(d, dict):
        raise SpecError(f"{origin}: top level must be a mapping of sections, got {_show(d)}")
    tree = {}
    for section, body in d.items():
        body = {} if body is None else body
        if section in _SECTIONS and isinstance(body, dict):
            hints = _fields(_SECTIONS[section])
            body = {_text(key): _expand_value(v, hints.get(key), f"{section}.{key}", origin) if expand else v
                    for key, v in body.items()}
        tree[_text(section)] = body
    return tree


def _expand_value(v: Any, hint: Any, dotted: str, origin: str) -> Any:
    """``v`` with its ${NAME} references expanded if it is a string key's value of the right type;
    anything else is left for pydantic to refuse, and so is the SpecError of a reference that cannot
    be expanded: the first problem in the tree's order is the one reported."""
    if hint not in _STRING_HINTS and typing.get_origin(hint) is not Literal:
        return v
    try:
        if isinstance(v, str):
            return _expand_env(v, dotted, origin)
        if hint == list[str] and isinstance(v, list) and all(isinstance(x, str) for x in v):
            return [_expand_env(x, dotted, origin) for x in v]
    except SpecError as e:
        return e
    return v


def _convert_tree(d: Any, origin: str, expand: bool = False) -> dict[str, dict[str, Any]]:
    """Type-check and coerce a partial {section: {key: value}} tree; absent keys stay absent.
    ``expand``: string values' ${NAME} references are replaced by the environment's values."""
    tree = _prepare(d, origin, expand)
    spec = _validate(tree, origin)  # absent keys take defaults, which pydantic does not check
    return {section: {key: getattr(getattr(spec, section), key) for key in body} for section, body in tree.items()}


def spec_from_dict(d: dict, origin: str = "<dict>") -> Spec:
    """Build and validate a Spec from a plain, possibly partial dict; absent keys take defaults."""
    tree = _convert_tree(d, origin)
    # Defaults are checked too, given as values: data.sources has no valid default.
    spec = _validate(_merge(spec_to_dict(Spec()), tree), origin)
    if spec.cluster.min_workers and spec.cluster.min_workers > spec.cluster.num_workers:
        raise SpecError(f"cluster.min_workers must be <= cluster.num_workers ({spec.cluster.num_workers}), got "
                        f"{spec.cluster.min_workers} (in {origin})")
    return spec


def check_value(dotted: str, value: Any, origin: str) -> Any:
    """`value` coerced and checked as spec key `dotted` is: for a command-line flag that stands
    for a spec key, such as jobs/generate.py --model for retrain.model."""
    section, key = dotted.split(".")
    return _convert_tree({section: {key: value}}, origin)[section][key]


def spec_to_dict(spec: Spec) -> dict:
    return dataclasses.asdict(spec)


def _map_strings(d: Any, fn: Any) -> Any:
    if isinstance(d, str):
        return fn(d)
    if isinstance(d, list):
        return [_map_strings(x, fn) for x in d]
    if isinstance(d, dict):
        return {k: _map_strings(v, fn) for k, v in d.items()}
    return d


def redacted_dict(spec: Spec) -> dict:
    """``spec_to_dict`` with the credentials in its values masked: what may leave the driver
    (Ray records train_loop_config and serves it on its dashboard).  It is still a valid spec, and
    its dump is the spec's own; workers never need data.sources, the only key that may hold any."""

    return _map_strings(spec_to_dict(spec), redact)


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML, for the records: credentials masked, each `$` written `$$` so that
    load_spec reads the file back as the spec that ran."""

    tree = _map_strings(redacted_dict(spec), lambda v: v.replace("$", "$$"))
    return redact(yaml.dump(tree, Dumper=_Dumper, sort_keys=False))


# Spec text is read with bounds, so that a few hundred hostile bytes cannot cost gigabytes, minutes
# or a traceback: on size, on nesting (PyYAML composes recursively) and on what aliases expand to.
_MAX_BYTES = 1 << 20  # a spec holds settings, not data
_MAX_DEPTH = 50  # real specs nest 4 levels: the document, a section, a list, its items
_MAX_ALIAS_NODES = 10_000  # nodes that aliases may add; a 400-byte "billion laughs" adds 10**9
_TOO_BIG = "too large (over 1 MiB); a spec holds settings, not data"
_TOO_MANY = f"YAML aliases expand too much (over {_MAX_ALIAS_NODES} nodes); write the values out"

# YAML 1.2 numbers: 1e-3 is a float, 010 is ten and 1:30 a string (YAML 1.1 says: a string, eight
# and ninety). Digits may be grouped with "_" as before.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_DIGITS = r"[0-9](?:_?[0-9])*"
_INT = re.compile(rf"[-+]?{_DIGITS}\Z|0o[0-7]+\Z|0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(rf"[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?\Z"
                    r"|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z")


class _Refused(Exception):
    """A bound or rule of the spec reader; `mark` locates it in the text when known."""

    def __init__(self, problem: str, mark: Any = None):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _Loader(yaml.SafeLoader):
    """SafeLoader (specs must never run code) with YAML 1.2 numbers, no duplicate keys and the
    bounds above. Aliases are never expanded to measure them: each node's size, aliases
    expanded, is summed up as the document is composed."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its node count, aliases expanded
        self._open: list[int] = []  # the same so far, for the nodes being composed
        self._composed = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))  # None: its anchor is still open, the alias holds itself
            if size is None:
                raise _Refused(_TOO_MANY, mark)
            self._open[-1] += size
            return node
        if len(self._open) == _MAX_DEPTH:
            raise _Refused(f"nested too deeply (over {_MAX_DEPTH} levels); spec values are at most lists",
                           mark)
        self._open.append(1)
        node = super().compose_node(parent, index)
        size = self._open.pop()
        self._composed += 1
        if size > self._composed + _MAX_ALIAS_NODES:  # all its own nodes are composed: the rest is aliases
            raise _Refused(_TOO_MANY, mark)
        self._sizes[id(node)] = size
        if self._open:
            self._open[-1] += size
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise _Refused(f"duplicate key {_brief.repr(key.value)}; keep only one",
                                   key.start_mark)
                seen.add((key.tag, key.value))
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError):
            # Explicit tags and odd dates reach constructors that trust their input:
            # `!!bool maybe`, `2020-13-45`, an int past Python's 4300 digits.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(f"cannot read {_brief.repr(node.value)} as {tag}", node.start_mark) from None

    def construct_yaml_int(self, node: Any) -> int:
        text = self.construct_scalar(node).replace("_", "")
        return int(text, {"0o": 8, "0x": 16}.get(text[:2], 10))


_Loader.add_constructor(_INT_TAG, _Loader.construct_yaml_int)
_Loader.yaml_implicit_resolvers = {  # without YAML 1.1's numbers; the 1.2 ones are added below
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


class _Dumper(yaml.SafeDumper):
    """Quotes strings that YAML 1.1 or the spec loader would read as numbers, so that a dump
    loads back as itself with either."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+.0123456789"))


def _load(text: str) -> Any:
    """One YAML document, read with the spec loader; raises yaml.YAMLError or _Refused."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _read(path: str, missing: str) -> Any:
    try:
        if not stat.S_ISREG(os.stat(os.path.expanduser(path)).st_mode):  # a FIFO would block open()
            raise _Refused("not a regular file; give the path of a YAML spec file")
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            text = fh.read(_MAX_BYTES + 1)
        if len(text) > _MAX_BYTES:
            raise _Refused(f"spec file {_TOO_BIG}")
        return _load_hiding_references(text)
    except FileNotFoundError:
        raise SpecError(missing) from None
    except _Refused as e:
        where = f"{path}:{e.mark.line + 1}" if e.mark else path
        raise SpecError(f"{where}: {_unhide(e.problem)}") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise SpecError(f"{path}:{line}: invalid YAML: {e.problem or e.context}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read spec file: {e}") from None


def _resolve(path: str, chain: tuple[tuple[str, str], ...], missing: str, done: dict[str, dict]) -> dict:
    """Merge a file over its parents; `chain` holds (realpath, shown path) of the files above,
    `done` the merged trees of files already read."""
    if "\0" in path:  # no OS call takes it
        raise SpecError(f"{path}: cannot read spec file: the path holds a NUL character")
    real = os.path.realpath(os.path.expanduser(path))
    reals = [r for r, _ in chain]
    if real in reals:
        start = chain[reals.index(real)][1]
        loop = [shown for _, shown in chain[reals.index(real):]] + [path]
        names = " -> ".join(os.path.relpath(p, os.path.dirname(start) or ".") for p in loop)
        raise SpecError(f"{start}: extend cycle {names}")
    if real in done:  # read each file once, however often it is extended: no fan-out blow-up
        return done[real]
    raw = _read(path, missing)
    if raw is None:  # an empty or comment-only file
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: top level of a spec file must be a mapping, got {_show(raw)}")
    own = dict(raw)
    parents = own.pop("extend", None)
    parents = [] if parents is None else [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        got = _show(raw["extend"])
        raise SpecError(f"{path}: extend must be a path or a list of paths, got {got}")
    merged: dict = {}
    for parent in parents:  # later parents win
        ppath = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(parent)))
        merged = _merge(merged, _resolve(ppath, chain + ((real, path),),
                                         f"{path}: extends missing file '{parent}'", done))
    done[real] = _merge(merged, _convert_tree(own, path, expand=True))
    return done[real]


def _set_origin(text: str) -> str:

    text = redact(text)  # before it is cut short, which could leave half a password unrecognisable
    return f"--set {text if len(text) <= 80 else text[:77] + '...'}"


def _parse_override(text: str) -> tuple[list[str], Any]:
    origin = _set_origin(text)
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError(f"{origin}: expected dotted.key=value")
    if not raw.strip():
        return parts, ""  # `--set run.name=` means empty string, not null
    if len(raw) > _MAX_BYTES:
        raise SpecError(f"{origin}: value {_TOO_BIG}")
    try:
        return parts, _load_hiding_references(raw)  # the spec files' loader: same numbers, same bounds
    except _Refused as e:
        raise SpecError(f"{origin}: {_unhide(e.problem)}") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise SpecError(f"{origin}: value is not valid YAML ({problem}); quote it") from None


def load_spec(path: str, overrides: Sequence[str] = ()) -> Spec:
    """Load a spec file, resolve `extend`, apply `dotted.key=value` overrides in order, validate."""
    tree = _resolve(path, (), f"spec file not found: {path}", {})
    for text in overrides:
        parts, value = _parse_override(text)
        for part in reversed(parts):
            value = {part: value}
        tree = _merge(tree, _convert_tree(value, _set_origin(text), expand=True))
    return spec_from_dict(tree, origin=path)


def add_spec_arguments(parser: argparse.ArgumentParser, default_spec: str | None = None) -> None:
    default = f" (default: {default_spec})" if default_spec else ""
    parser.add_argument("--spec", metavar="PATH", default=default_spec,
                        required=default_spec is None, help="job spec YAML file" + default)
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", dest="overrides", default=[],
                        help="override a spec key, value parsed as YAML (repeatable), "
                             "e.g. --set train.lr=0.002 --set data.sources=[a,b]")
    parser.add_argument("--help-spec", action=_HelpSpec,
                        help="show every spec key with its default, meaning and role, and exit")


class _HelpSpec(argparse.Action):
    """--help-spec: like --help, it prints and exits before the required arguments are checked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        print(spec_help(), end="")
        parser.exit()


_KEY_WIDTH, _DEFAULT_WIDTH, _HELP_WIDTH = 27, 26, 120


def _default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    return value if isinstance(value, str) and value else json.dumps(value)


def spec_help() -> str:
    """Every spec key as `key  default  meaning [role]`, by section, from the schema (charnn.config)."""
    indent = " " * (_KEY_WIDTH + _DEFAULT_WIDTH + 4)
    lines = ["A spec's keys: section.key  default  meaning [role]; roles:"]
    lines += [f"  [{role}] {meaning}" for role, meaning in ROLES.items()]
    section = None
    for dotted, info in spec_fields():
        if dotted.split(".")[0] != section:
            section = dotted.split(".")[0]
            lines += ["", f"{section}: {' '.join((_SECTIONS[section].__doc__ or '').split())}"]
        role = role_of(info)
        meaning = " ".join((info.description or "").split()) + (f" [{role}]" if role else "")
        first = f"  {dotted:<{_KEY_WIDTH}} {_default_text(info):<{_DEFAULT_WIDTH}} "
        lines += textwrap.wrap(meaning, _HELP_WIDTH, initial_indent=first, subsequent_indent=indent)
    return "\n".join(lines) + "\n"


def spec_from_args(args: argparse.Namespace) -> Spec:
    return load_spec(args.spec, getattr(args, "overrides", None) or ())


def expand_path(url: str) -> str:
    """Expand `~` and absolutize local paths; URLs (anything with "://") pass through."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))
