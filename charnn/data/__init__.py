"""Corpora into row shards: alphabets, listing, the document cache, the row layout, the Ray Data
build, the reader, and ``open_dataset`` (a built dataset's rows as a ``ray.data.Dataset``)."""


def __getattr__(name: str):
    # open_dataset needs ray.data, half a second to import: only when asked for
    if name == "open_dataset":
        from charnn.data.operators import open_dataset

        return open_dataset
    raise AttributeError(f"module 'charnn.data' has no attribute {name!r}")
