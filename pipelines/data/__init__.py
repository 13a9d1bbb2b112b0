"""The data plane: sources -> validated images -> Parquet shards + manifest -> Ray Data stream.

- :mod:`.sources`  Fashion-MNIST idx files and ImageFolder trees (local or S3), split assignment.
- :mod:`.validate` the guarded decode: bad files become reasons, modes are converted on purpose.
- :mod:`.shards`   the on-storage layout, manifest, :class:`~.shards.DatasetVersion`, verify/read.
- :mod:`.stream`   Ray Data datasets for Ray Train workers, and a Ray-free iterator.

See docs/data.md for the layout, the manifest schema and what resume reproduces.
"""

from .shards import DatasetVersion, find_version, load_version

__all__ = ["DatasetVersion", "find_version", "load_version"]
