"""Data larger than memory: ``mtl prepare`` writes encoded Parquet shards, ``data=shards`` streams them.

* :mod:`~mtl.data.shards.scan` -- the table's rows as lazy polars queries, read and checked;
* :mod:`~mtl.data.shards.split` -- the split column of those rows (files, time or hash);
* :mod:`~mtl.data.shards.encoding` -- the feature encoding fitted on the lazy train rows;
* :mod:`~mtl.data.shards.prepare` -- the shards, the encoding and the manifest (``mtl prepare``);
* :mod:`~mtl.data.shards.record` -- the data record of the written shards (label rates, OOV ids);
* :mod:`~mtl.data.shards.folder` -- the prepared folder: manifest checks, what prepare may delete;
* :mod:`~mtl.data.shards.stream` -- the shards read back as shuffled, sharded batches;
* :mod:`~mtl.data.shards.datamodule` -- :class:`ShardsDataModule`, ``data=shards``.
"""
