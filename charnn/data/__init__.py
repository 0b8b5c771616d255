"""Corpora into row shards: alphabets, listing, the document cache, the row layout, the Ray build, the reader."""
