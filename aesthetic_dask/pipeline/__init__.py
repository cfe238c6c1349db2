"""The worker-side pipeline: what each Dask worker runs for the ``run`` job and ``embed_images``.

- :mod:`.preprocess`: the model's input as uint8 crops (open_clip's own transforms, or tensor ops),
  normalised later on the model's device, a whole batch at once;
- :mod:`.decode`: image bytes -> a uint8 crop at the model's resolution (and a thumbnail), or a
  reason; runs in the host processes;
- :mod:`.host`: a host process's loop: it reads shards and Parquet row ranges itself, decodes
  them and hands crops back through shared memory;
- :mod:`.pool`: the persistent pool of host processes a worker owns (one per worker process);
- :mod:`.encoder`: the CLIP image tower, once per worker process, fed batches across partitions;
- :mod:`.stage`: the embed stage of one partition (pool -> encoder -> scores), shared by the job
  and the notebook API, and the worker plugin that starts the model and the pool at worker start.

The client never imports this package's heavy parts: it plans, checks and prepares the models
(:mod:`aesthetic_dask.models`) and hands plain specs to the workers.
"""
