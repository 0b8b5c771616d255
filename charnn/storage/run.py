"""Where one run keeps its files, named once: built on the driver from the spec and handed to the
workers (it pickles), so no module computes a run's URL or a named path from the spec again.

Layout under ``run.storage``::

    <name>/                    the run: checkpoints, metrics.jsonl, spec.yaml, loss.png
    models/<model>/            a model's registry (retrain.model)

and under ``data.dataset_root``: ``documents/v2/<alphabet>/``, the document cache.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from charnn.storage import Store, join

CACHE_VERSION = "v2"  # the document cache's layout; retention recognises its files by it


def expand(url: str) -> str:
    """A local path with ``~`` expanded, made absolute (a worker on another directory, or a job
    submitted from elsewhere, must find the same files); a URL as it is."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def document_cache_url(dataset_root: str, alphabet: str) -> str:
    return join(dataset_root, "documents", CACHE_VERSION, alphabet)


@dataclass(frozen=True)
class RunStorage:
    store: Store
    root: str
    name: str
    dataset_root: str

    @classmethod
    def from_spec(cls, spec: Any) -> "RunStorage":
        return cls(Store.of(spec.storage), expand(spec.run.storage), spec.run.name, expand(spec.data.dataset_root))

    def to_dict(self) -> dict:
        """As JSON takes it: Ray records a trainer's ``train_loop_config`` as JSON."""
        return {"store": dataclasses.asdict(self.store), "root": self.root, "name": self.name,
                "dataset_root": self.dataset_root}

    @classmethod
    def from_dict(cls, values: dict) -> "RunStorage":
        return cls(Store(**values["store"]), values["root"], values["name"], values["dataset_root"])

    @property
    def run_url(self) -> str:
        return join(self.root, self.name)

    def checkpoint(self, name: str) -> str:
        return join(self.run_url, name)

    @property
    def metrics(self) -> str:
        return join(self.run_url, "metrics.jsonl")

    @property
    def spec_yaml(self) -> str:
        return join(self.run_url, "spec.yaml")

    @property
    def loss_png(self) -> str:
        return join(self.run_url, "loss.png")

    def models(self, model: str) -> str:
        return join(self.root, "models", model)

    def document_cache(self, alphabet: str) -> str:
        return document_cache_url(self.dataset_root, alphabet)
