"""Client-side models: what the client decides and prepares before any task runs.

- :mod:`.clip`: the CLIP spec, its compatibility with the heads, its weights' cache and download.

The workers get plain specs from here; they load and run the models in :mod:`aesthetic_dask.pipeline`.
"""
