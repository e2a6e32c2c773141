"""Checkpoint files: plain data and tensors only, written atomically, checked on load.

A checkpoint loads with ``torch.load(weights_only=True)``: a file from someone else cannot run
code. It is written whole or not at all (``storage.write_file``: a fsynced temporary file renamed
over the target, or one finalized upload to a bucket), so a crash mid-write never leaves a
truncated checkpoint under the real name; a checksum of its contents catches later damage.
"""

import hashlib
import io
import pickle
import platform
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from retinanet_xla import storage
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.errors import CheckpointError, RunFailed
from retinanet_xla.storage import Location

FORMAT = "retinanet-xla-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "step", "model", "config", "category_mapping")
ZIP_MAGIC = b"PK\x03\x04"
CHECKSUM_KEY = "sha256"  # of everything else in the file (content_digest); required


def content_digest(value: Any) -> str:
    """SHA-256 of a checkpoint payload: every tensor's dtype, shape and bytes, every other
    value's repr, in key order. About 0.3 s for a ResNet-50 checkpoint's 150 MB."""
    digest = hashlib.sha256()

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(item, dict):
            digest.update(f"dict {len(item)};".encode())
            for key in sorted(item, key=str):
                digest.update(f"{key!r}:".encode())
                visit(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"list {len(item)};".encode())
            for element in item:
                visit(element)
        else:
            digest.update(f"{item!r};".encode())

    visit(value)
    return digest.hexdigest()


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists of tensors on the host (device tensors cannot be pickled
    portably, and the file must load on a machine without the device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_cpu(v) for v in value]
    return value


def host_snapshot(value: Any) -> Any:
    """Like ``to_cpu``, but a copy even of host tensors: what the step updates in place after
    this call does not change it (the evaluated weights that train keeps for ``best.pt``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [host_snapshot(v) for v in value]
    return value


def versions() -> Dict[str, str]:
    import torchvision

    from retinanet_xla import __version__

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {
        "retinanet_xla": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: Location, payload: Dict[str, Any]) -> None:
    """Write ``payload`` (plus format tags and versions) to ``path`` whole or not at all
    (``storage.write_file``). A full or read-only disk raises ``RunFailed`` with one line naming
    the file; nothing is left behind and the checkpoints written before are intact."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **to_cpu(payload)}
    payload[CHECKSUM_KEY] = content_digest(payload)
    try:
        storage.write_file(path, lambda handle: torch.save(payload, handle))
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = getattr(error, "strerror", None) or (lines[-1] if lines else type(error).__name__)
        # torch.save's zip writer reports a full disk as "[enforce fail at inline_container.cc]
        # unexpected pos": say what it means where the disk is nearly full.
        free = _free_bytes(path)
        if not getattr(error, "strerror", None) and free is not None and free < FULL_DISK_BYTES:
            reason = f"no space left on device: {free / 2**20:.1f} MiB free"
        raise RunFailed(f"{path}: could not write the checkpoint ({reason}); the checkpoints before it are intact") from None
    except storage.StorageUnavailable as error:  # an outage: exit 75, and the rerun resumes
        raise storage.StorageUnavailable(
            f"could not write the checkpoint: {error}; the checkpoints before it are intact"
        ) from None
    except storage.StorageError as error:
        raise RunFailed(f"could not write the checkpoint: {error}; the checkpoints before it are intact") from None


FULL_DISK_BYTES = 64 * 2**20  # less free than this after a failed write: the disk filled up


def _free_bytes(path: Location) -> Optional[int]:
    if storage.is_url(path):
        return None
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None


def load_checkpoint(path: Location) -> Dict[str, Any]:
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: checkpoint does not exist") from None
    # torch's own messages for these advise weights_only=False or filing an issue: ours say
    # what the file is not.
    if data[:4] != ZIP_MAGIC:  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (it holds objects other than tensors and plain data, which are not loaded)"
        ) from None
    except Exception:  # a zip cut short or damaged
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged)") from None
    return check_payload(path, payload)


def is_checkpoint_payload(payload: Any) -> bool:
    """Whether what ``torch.load`` read from a file claims to be one of our checkpoints."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def check_payload(path: Location, payload: Any) -> Dict[str, Any]:
    """The checks of ``load_checkpoint`` on a payload already read from ``path``."""
    if not is_checkpoint_payload(payload):
        raise CheckpointError(f"{path}: not a retinanet-xla checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    # torch's zip reader does not check its records' CRCs: a flipped bit in a tensor loads. Every
    # checkpoint this program writes has its checksum: a file without one was not written by it.
    stored = payload.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CheckpointError(f"{path}: checkpoint has no {CHECKSUM_KEY} checksum; not a file retinanet-xla wrote")
    if stored != content_digest(payload):
        raise CheckpointError(f"{path}: checksum mismatch (the file was damaged after it was written)")
    return payload


def inference_weights(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict to evaluate, predict and export with: the weight average where the run
    kept one (as the TF reference does), else the model's."""
    return payload["ema"] if "ema" in payload else payload["model"]


# What evaluation, prediction and export read from a checkpoint, and the type each must have.
INFERENCE_FIELDS = {"step": int, "config": dict, "category_mapping": dict, "model": dict}


def check_inference_fields(path, payload: Dict[str, Any]) -> None:
    """A checkpoint whose fields are missing or of another type (written by something else, or
    forged) is one ``CheckpointError`` naming the field, not a traceback further on."""
    for name, kind in INFERENCE_FIELDS.items():
        value = payload.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{path}: field {name!r} is {type(value).__name__}, not a {kind.__name__}; not a retinanet-xla checkpoint"
            )
    weights = inference_weights(payload)
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CheckpointError(f"{path}: its weights are not a mapping of names to tensors; not a retinanet-xla checkpoint")
    try:
        CategoryMapping.from_dict(payload["category_mapping"])
    except ValueError as error:
        raise CheckpointError(f"{path}: field 'category_mapping': {error}; not a retinanet-xla checkpoint") from None
