"""Rank 0's record of a run: TensorBoard scalars and samples, and a PNG of the loss curves.

Everything lands under the run's directory in ``run.storage``.  TensorBoard writes local
files, so for a cloud ``run.storage`` it writes to a staging folder that is copied up at
every report.  The loss history travels in the checkpoint, so a resumed run plots it whole.
"""
from __future__ import annotations

import io
import math
import tempfile

from charnn.storage import Store, is_local, join, write_bytes_atomic


class RunLog:
    def __init__(self, run_url: str, store: Store, start_step: int, history: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_url, self.store = run_url, store
        self.fs, path = store.fs(join(run_url, "tensorboard"))
        self.remote = None if is_local(self.fs) else path
        local = path if self.remote is None else tempfile.mkdtemp(prefix="charnn-tb-")
        # purge_step drops events a crashed attempt wrote after the checkpoint we resume from (the
        # checkpoint step's own were logged before it was saved)
        self.writer = SummaryWriter(local, purge_step=start_step + 1 if start_step else None)
        self.local = local
        self.history = history or {"train": [], "val": []}

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{split}/{name}", value, step)
        if "loss" in values:
            self.history[split].append([step, values["loss"]])

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # a code block keeps layout

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            self.fs.put(self.local.rstrip("/") + "/", self.remote, recursive=True)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        fs, path = self.store.fs(join(self.run_url, "loss.png"))
        write_bytes_atomic(fs, path, plot_losses(self.history, self.run_url.rstrip("/").rsplit("/", 1)[-1]))


def plot_losses(history: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for split, style in (("train", "-"), ("val", "o-")):
        if history.get(split):
            steps, losses = zip(*history[split])
            axes.plot(steps, losses, style, label=f"{split} loss", markersize=4)
    axes.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


