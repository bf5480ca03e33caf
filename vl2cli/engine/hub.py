"""Which checkpoint a --model value names (and which model family: model_kind), and getting it from the Hugging Face
hub (or its local cache).

No torch here: `vl2 models` and every usage error stay fast. A failed download says what happened in words
(no network, not in the cache, no such repository) and where the cache is, never an exception's class name.
"""

from __future__ import annotations

import os
from pathlib import Path

from vl2cli.engine.family import read_family_config
from vl2cli.engine.vl2.config import PRESETS
from vl2cli.errors import CheckpointError, UsageError

ALIASES = {name: preset["hub_id"] for name, preset in PRESETS.items()} | {"ocr": "deepseek-ai/DeepSeek-OCR",
                                                                          "ocr2": "deepseek-ai/DeepSeek-OCR-2"}
HUB_PREFIX = "hf:"  # `--model hf:ORG/NAME`: the user asks for a download of a repository that is not an alias
KNOWN_HUB_IDS = {ALIASES[kind]: kind for kind in ("ocr", "ocr2")}  # repositories whose family is known undownloaded


def hub_repo_for(spec: str, explicit: bool = False) -> str:
    """The hub repository a --model value names, or a UsageError/CheckpointError saying why it names none.

    vl2 sends nothing anywhere unasked: it downloads only the aliases, the official ids, `hf:ORG/NAME`, or
    any id given to `vl2 models download` (explicit). A mistyped folder is never sent to the hub.
    """
    if spec.startswith(HUB_PREFIX):
        return spec[len(HUB_PREFIX):]
    if spec in ALIASES:
        return ALIASES[spec]
    if spec in ALIASES.values() or (explicit and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        return spec
    if spec.startswith((".", "/", "~")) or os.sep in spec or (os.altsep and os.altsep in spec):
        raise CheckpointError(f"{spec}: no such checkpoint folder")
    raise UsageError(f"--model {spec!r}: not a checkpoint folder nor one of {', '.join(ALIASES)} "
                     f"(another hub repository: --model {HUB_PREFIX}ORG/NAME)")


def resolve_model(spec: str, revision: str | None = None, offline: bool | None = None,
                  explicit: bool = False) -> Path:
    """A local folder as is; an alias (tiny/small/base), official id or hf:ID through huggingface_hub's cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    repo_id = hub_repo_for(spec, explicit)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                   allow_patterns=["*.json", "*.safetensors"])  # never code, never pickles
    except Exception as exc:  # network, auth, missing repo: said in words, with what to do
        raise CheckpointError(f"model {repo_id}: {_what_happened(exc, offline, revision)}; "
                              f"{_how_to_get(spec)}") from None
    return Path(folder)


def cached_model_path(spec: str) -> Path | None:
    """The local snapshot of an alias or hub id, if already downloaded (never touches the network). Read from the
    cache's documented layout (models--ORG--NAME/refs/main names the snapshot) rather than through
    huggingface_hub's download code, whose import alone costs `vl2 models` a second."""
    try:
        repo_id = hub_repo_for(spec)
    except (CheckpointError, UsageError):
        return None
    repo = Path(hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def hub_cache() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _what_happened(exc: Exception, offline: bool, revision: str | None) -> str:
    from huggingface_hub import errors
    cache = hub_cache()
    if offline:
        return f"not in the local cache ({cache}) and --offline / HF_HUB_OFFLINE forbids downloading"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of it"
    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository on the hub (or it is private: log in with `hf auth login`)"
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled | OSError):
        # huggingface_hub falls back to the cache when the hub cannot be reached and says LocalEntryNotFound
        return f"cannot reach huggingface.co (no network?) and it is not in the local cache ({cache})"
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"download failed ({first_line or type(exc).__name__})"


def _how_to_get(spec: str) -> str:
    return (f"on a connected machine run `vl2 models download {spec}`, then copy the folder it prints here "
            "(`cp -rL`: it holds links) and pass --model /path/to/that/folder")


def model_kind(spec: str) -> str:
    """Which family a --model value names ("vl2", "ocr" or "ocr2") without loading weights or touching the network:
    an alias or hub id known to be a family's, else the config.json of the local folder (or of the hub cache's
    snapshot) it names; a config that does not validate raises its ConfigError here. "vl2" when nothing says
    otherwise (a hub repository not yet downloaded)."""
    repo = ALIASES.get(spec, spec.removeprefix(HUB_PREFIX))
    if repo in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[repo]
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        folder = cached_model_path(spec) or folder
    if (folder / "config.json").is_file():
        return read_family_config(folder)[0].kind
    return "vl2"
