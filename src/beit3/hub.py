"""The Hugging Face Hub: resolving ``"org/name"`` to a local folder, model cards, ``push_to_hub``.

``huggingface_hub`` is optional: nothing here imports it until a repository name is used. With
``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the local cache is read, never the network.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

MODEL_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "*.json", "*.model", "*.spm", "*.txt",
               "README.md"]
"""What a model folder needs (weights, configs, tokenizer, label names, the card); other files of a
repository (optimizer states, logs) are not fetched."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str | os.PathLike) -> bool:
    """``"org/name"`` that is not an existing local path."""
    text = str(name)
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub "
                          "(or pass a local folder)") from None
    return huggingface_hub


def resolve(path_or_repo: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool | None = None, token: str | bool | None = None) -> Path:
    """A local path for ``path_or_repo``: the path itself when it exists, else the Hub snapshot of the
    repository (downloaded, or read from the cache offline)."""
    if not is_repo_id(path_or_repo):
        path = Path(path_or_repo)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}: pass a model folder, a checkpoint file or a Hub "
                                    "repository name such as 'org/name'")
        return path
    hub = _hub()
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = hub.snapshot_download(str(path_or_repo), revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, allow_patterns=MODEL_FILES, token=token,
                                       library_name="beit3")
    except Exception as err:  # the hub raises many kinds; one line names the repository
        hint = " (offline: the repository is not in the local cache)" if local_files_only else ""
        raise FileNotFoundError(f"cannot get {path_or_repo} from the Hugging Face Hub{hint}: "
                                f"{type(err).__name__}: {err}") from None
    return Path(folder)


def model_card(model: Any, *, tags: list[str] | None = None) -> str:
    """A README.md the Hub reads: YAML front matter (library, tags, pipeline) and how to load the model."""
    from beit3.catalogue import spec_for_model

    try:
        spec = spec_for_model(type(model))
        task, pipeline_tag = spec.name, spec.hub_pipeline_tag
    except (KeyError, ValueError):
        task, pipeline_tag = "backbone", "feature-extraction"
    c = model.config
    header = ["---", "library_name: beit3", "license: mit", "tags:", "- beit3", f"- {task}",
              *[f"- {t}" for t in tags or []]]
    if pipeline_tag:
        header.append(f"pipeline_tag: {pipeline_tag}")
    header.append("---")
    body = [
        f"# {type(model).__name__}",
        "",
        f"A BEiT-3 model ({c.num_layers} layers x {c.hidden_size}, {c.image_size} px images, "
        f"vocabulary {c.vocab_size}) for `{task}`, saved by the `beit3` library.",
        "",
        "```python",
        "import beit3",
        "",
        'model = beit3.load_model("<this folder or repository>")',
        "```",
        "",
    ]
    return "\n".join(header + [""] + body)



def push_to_hub(model: Any, repo_id: str, *, processor: Any = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str = "Upload BEiT-3 model",
                revision: str | None = None) -> Any:
    """Save ``model`` (and its processor or tokenizer) into a temporary folder and upload it as
    ``repo_id`` (created when missing). Returns the hub's commit information."""
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="beit3-push-") as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, repo_type="model")
