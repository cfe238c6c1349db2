"""Sources: the input kinds, one module each, behind one interface (:class:`kind.InputKind`).

- :mod:`.listing`: INPUT arguments (files, directories, globs; local or fsspec URLs) -> files;
- :mod:`.kind`: what a kind offers the jobs and the notebook (what it claims, how it plans parts,
  the pipeline's reader of a part, whose image kinds hand the decode pool their source, and the
  notebook's lazy frame) and what a plan gives back;
- :mod:`.shards` (WebDataset tars), :mod:`.image_parquet` (Parquet of images),
  :mod:`.parquet_embeddings` (Parquet of embeddings), :mod:`.arrow_embeddings` (Arrow IPC files
  of embeddings), :mod:`.clip_retrieval` (clip-retrieval folders): the kinds;
- :mod:`.registry`: the kinds registered once, and planning a job's inputs over them;
- :mod:`.readers`: the notebook's ``read_*`` through the same kinds.

A new input format is one module here and one entry in :data:`registry.KINDS`.
"""
