"""open_clip's registry read as data, without importing open_clip (its package imports torch).

The client decides and checks the CLIP model (names, configs, pretrained tags, downloads) but
never imports torch, torchvision or open_clip: a nightly run with nothing new, ``score``,
``refilter``, ``report`` and the notebook's lazy graph stay seconds. So this module reads the
installed open_clip's own files:

- ``model_configs/*.json``, as open_clip's ``factory._rescan_model_configs`` does;
- ``pretrained.py`` (the pretrained tags, ``get_pretrained_cfg``, ``download_pretrained``) run
  as open_clip's own code in a detached package whose ``__init__`` is not run; it and what it
  imports (``constants``, ``version``) need no torch. Its optional ``safetensors.torch`` import
  is held off (it would import torch); only whether safetensors exists matters to it.

The workers, which load the model, use open_clip itself.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

from ..errors import InputError

# open_clip.factory's schema prefixes.
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_DETACHED = "_aesthetic_dask_open_clip"
_LOCK = threading.Lock()


@functools.cache
def package_dir() -> Path:
    """The installed open_clip's directory, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("open_clip is not installed: pip install 'aesthetic-dask[clip]'")
    return Path(list(spec.submodule_search_locations)[0])


def pretrained() -> types.ModuleType:
    """open_clip's ``pretrained`` module, run detached from its package (no torch)."""
    with _LOCK:
        module = sys.modules.get(f"{_DETACHED}.pretrained")
        if module is not None:
            return module
        package = types.ModuleType(_DETACHED)
        package.__path__ = [str(package_dir())]
        sys.modules[_DETACHED] = package
        held = "safetensors.torch" not in sys.modules
        if held:
            sys.modules["safetensors.torch"] = None  # type: ignore[assignment] - "import safetensors.torch" fails at once
        try:
            module = importlib.import_module(f"{_DETACHED}.pretrained")
        finally:
            if held:
                sys.modules.pop("safetensors.torch", None)
        module._has_safetensors = importlib.util.find_spec("safetensors") is not None
        return module


def parse_model_name(name: str) -> tuple[str | None, str]:
    """open_clip.factory.parse_model_name: (None | ``hf-hub`` | ``local-dir``, identifier)."""
    for schema, prefix in (("local-dir", LOCAL_DIR_PREFIX), ("hf-hub", HF_HUB_PREFIX)):
        if name.startswith(prefix):
            identifier = name[len(prefix):]
            if not identifier:
                raise ValueError(f"Empty identifier specified after '{prefix}' schema.")
            return schema, identifier
    return None, name


def model_config(name: str, extra_config: str | None = None) -> dict[str, Any] | None:
    """The architecture config of a built-in model name (or of ``extra_config``, a JSON file
    named after the model, as ``open_clip.add_model_config`` registers it); ``local-dir:`` reads
    its ``open_clip_config.json``. None where there is none (a hub model's config is not read)."""
    schema, identifier = parse_model_name(name)
    if schema == "local-dir":
        path = Path(identifier) / "open_clip_config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
        return config.get("model_cfg", config)
    if schema == "hf-hub":
        return None
    candidates = [Path(extra_config)] if extra_config and Path(extra_config).stem == name else []
    candidates.append(package_dir() / "model_configs" / f"{name}.json")
    for path in candidates:
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
                return config
    return None
