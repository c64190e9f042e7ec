"""Saving and loading trained artefacts together with their config.

Two kinds of file:

* **Weights** (``.safetensors``): tensors plus metadata holding the artefact ``kind`` (``"bpr"``, ``"backbone"``,
  ``"probe"``), its full ``config`` as JSON, the library version and git commit. A file alone says how to rebuild
  and use the model. This is what is shipped in ``Resources/`` and what users share.
* **Training state** (``.pt``): everything needed to resume a run exactly (model, optimiser, LR schedule, RNG
  states, step, config), written with ``torch.save``.

Both are written atomically (temporary file in the same folder, then renamed), so an interrupted write never
destroys the previous file.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from DiffusionSegLib.errors import UserInputError

__all__ = [
    "atomic_write",
    "save_weights",
    "load_weights",
    "save_training_state",
    "load_training_state",
    "library_version",
    "git_commit",
    "file_sha256",
    "append_log",
    "truncate_log",
]


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusionseg")
    except Exception:  # not installed (e.g. inside Slicer from the source tree)
        return "0+unknown"


def git_commit() -> str:
    """The repository's current commit, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)  # fmt: skip
        return out.stdout.strip()
    except Exception:
        return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path`` only once it is complete.

    The temporary file sits beside ``path`` (same file system, so the move is atomic) and ends in ``suffix``
    (writers that pick the format from the extension need the real one). The result gets the permissions of a
    normally created file (``mkstemp`` would leave it readable by its owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def save_weights(path: str | os.PathLike, state_dict: dict, *, kind: str, config: dict,
                 extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write weights and their config as safetensors.

    Args:
        path: destination, conventionally ``*.safetensors``.
        state_dict: tensors to save (a module's ``state_dict()``); non-tensor entries are refused.
        kind: artefact kind, checked when loading (``"bpr"``, ``"backbone"``, ``"probe"``).
        config: JSON-serialisable config that rebuilds the model.
        extra: further JSON-serialisable metadata (training steps, data, measured quality...).
    """
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    metadata = {
        "kind": kind,
        "config": json.dumps(config),
        "extra": json.dumps(extra or {}),
        "version": library_version(),
        "git_commit": git_commit(),
    }
    return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def read_weights_header(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict]:
    """The config and metadata of a weights file from its JSON header alone: no tensors read, no torch imported
    (what listing and matching files needs, also inside Slicer's GUI process).

    Returns:
        ``(config, metadata)``; ``metadata`` holds ``kind``, ``extra`` (decoded), ``version``, ``git_commit``.

    Raises:
        UserInputError: the file is missing, damaged, not a DiffusionSeg weights file, or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError(f"header size {size} is implausible: not a safetensors weights file")
            text = handle.read(size)
            if len(text) < size:
                raise ValueError(f"the file is truncated (its header is {size} bytes, {len(text)} are there)")
            raw = dict(json.loads(text).get("__metadata__") or {})
        config = json.loads(raw["config"]) if "config" in raw else None
        extra = json.loads(raw.get("extra", "{}"))
    except json.JSONDecodeError as error:
        raise UserInputError(f"cannot read weights '{path}': its header is damaged (not valid JSON: {error})") from None
    except (OSError, ValueError, AttributeError) as error:
        raise UserInputError(f"cannot read weights '{path}': {error}") from None
    if "kind" not in raw or config is None:
        raise UserInputError(f"'{path}' is not a DiffusionSeg weights file (no kind/config metadata)")
    if kind is not None and raw["kind"] != kind:
        raise UserInputError(f"'{path}' holds a {raw['kind']} model; expected a {kind} model")
    metadata = {key: value for key, value in raw.items() if key != "config"}
    metadata["extra"] = extra
    return config, metadata


def find_weights(sha256: str, kind: str, candidates: Sequence[str | os.PathLike] = (),
                 folders: Sequence[str | os.PathLike] = ()) -> Path | None:  # fmt: skip
    """The first weights file of ``kind`` whose sha256 is ``sha256``: among ``candidates``, then the
    ``*.safetensors`` files of ``folders`` (sorted). Headers and hashes only; None when there is none."""
    paths = [Path(c) for c in candidates if str(c)]
    paths += [p for folder in map(Path, folders) if folder.is_dir() for p in sorted(folder.glob("*.safetensors"))]
    for path in paths:
        if not path.is_file():
            continue
        try:
            found_kind = read_weights_header(path)[1]["kind"]
        except UserInputError:
            continue
        if found_kind == kind and file_sha256(path) == sha256:
            return path
    return None


def load_weights(path: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict, dict]:
    """Read a weights file written by :func:`save_weights`.

    Returns:
        ``(state_dict, config, metadata)`` where ``metadata`` holds ``kind``, ``extra``, ``version``, ``git_commit``.

    Raises:
        UserInputError: the file is missing, not a DiffusionSeg weights file, or of another kind.
    """
    from safetensors.torch import load_file

    config, metadata = read_weights_header(path, kind)
    try:
        state_dict = load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise UserInputError(f"cannot read weights '{path}': the file is truncated or damaged ({error})") from None
    return state_dict, config, metadata


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a resumable training snapshot atomically (``torch.save``)."""
    import torch

    payload = dict(state, version=library_version(), git_commit=git_commit())
    return atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a snapshot written by :func:`save_training_state` (on the CPU)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"training checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserInputError(f"cannot read training checkpoint '{path}': {error}") from None


def append_log(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record to a training run's JSONL log."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Drop log records past ``step`` (and end-of-run records): a run resumed from a snapshot at ``step``
    logs those steps again."""
    path = Path(path)
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r.get("step", 0) <= step and not r.get("done")]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
