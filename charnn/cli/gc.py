"""Remove what retraining no longer needs: python -m charnn.cli.gc --spec PATH [--set k=v ...] [--apply]

Old model versions (retrain.keep_versions kept, the published one among them), candidate runs and
rejected records of old rounds (retrain.keep_rounds kept), dataset versions, segments and rows/1-2
datasets that nothing kept names, and document-cache blobs that no kept dataset and no listed
document needs (the rules are in charnn/retention.py).  A dry run by default: it prints what it would
remove, per kind; --apply removes it, holding the registry's lease (another writer holding it: exit
75).  Anything unreferenced that is younger than --min-age-minutes stays: a build may be writing it.
The last stdout line is JSON: {"action": "dry-run" | "applied", "removed": {...}, "bytes": N, ...}.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from charnn.cli.runtime import execute
from charnn.spec_loader import add_spec_arguments, expand_path, spec_from_args
from charnn.registry import ModelRegistry
from charnn.retention import DEFAULT_MIN_AGE_S, KINDS, GcReport, collect
from charnn.storage import Store, join, redact

SHOWN = 10  # items listed per kind; the counts and bytes cover them all


def run(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_arguments(parser)
    parser.add_argument("--apply", action="store_true", help="remove (default: only say what would go)")
    parser.add_argument("--min-age-minutes", type=float, default=DEFAULT_MIN_AGE_S / 60, metavar="N",
                        help="keep anything unreferenced younger than this (default: %(default)g)")
    args = parser.parse_args(argv)
    if args.min_age_minutes < 0:
        parser.error("--min-age-minutes must be 0 or more")
    spec = spec_from_args(args)
    spec.data.dataset_root = expand_path(spec.data.dataset_root)
    spec.run.storage = expand_path(spec.run.storage)
    registry = ModelRegistry(join(spec.run.storage, "models", spec.retrain.model), Store.of(spec.storage))
    report = collect(spec, registry, args.apply, args.min_age_minutes * 60)
    for line in summary(report):
        print(line, flush=True)
    return report.to_json()


def summary(report: GcReport) -> list[str]:
    """What went (or would go), kind by kind, with a few examples, then any warnings."""
    verb = "removed" if report.action == "applied" else "would remove"
    removed, sizes, kept = report.removed, report.bytes_by_kind, report.kept
    lines = []
    for kind in KINDS:
        count = getattr(removed, kind)
        lines.append(f"charnn.gc: {verb} {count} {kind} ({_size(getattr(sizes, kind))}); keeps {getattr(kept, kind)}")
        examples = [r.url for r in report.removals if r.kind == kind]
        lines += [f"charnn.gc:   {redact(url)}" for url in examples[:SHOWN]]
        if len(examples) > SHOWN:
            lines.append(f"charnn.gc:   ... and {len(examples) - SHOWN} more")
    lines.append(f"charnn.gc: {verb} {_size(report.bytes)} in all")
    return lines + [f"charnn.gc: warning: {warning}" for warning in report.warnings]


def _size(count: float) -> str:
    units, power = ("B", "kB", "MB", "GB", "TB"), 0
    while count >= 1000 and power < len(units) - 1:
        count, power = count / 1000, power + 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
