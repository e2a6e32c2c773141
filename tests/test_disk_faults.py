"""Disk faults end a command in one line, and lose nothing that was written before."""

import errno
import os

import pytest
import torch

from retinanet_xla.errors import CheckpointError, ConfigError, RunFailed
from retinanet_xla.rundir import checkpoint as checkpoint_module
from retinanet_xla.rundir.checkpoint import load_checkpoint, save_checkpoint
from retinanet_xla.rundir.lock import RunLock
from tests.cli_helpers import ROOT, run_cli

PAYLOAD = {"step": 1, "model": {"w": torch.ones(3)}, "config": {}, "category_mapping": {}}


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "step_00000002.pt"
    save_checkpoint(target, PAYLOAD)
    real_save = torch.save

    def save_until_the_disk_is_full(obj, handle):
        real_save(obj, handle)
        handle.truncate(100)  # what was written before ENOSPC
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(RunFailed) as failure:
        save_checkpoint(target, {**PAYLOAD, "step": 2})
    assert str(failure.value) == (
        f"{target}: could not write the checkpoint (PytorchStreamWriter failed writing file data/0: file write failed); "
        "the checkpoints before it are intact"
    )
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left
    assert load_checkpoint(target)["step"] == 1
    # Where the disk is in fact (nearly) full, torch's words are translated.
    usage = checkpoint_module.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(RunFailed) as failure:
        save_checkpoint(target, {**PAYLOAD, "step": 2})
    assert str(failure.value) == (
        f"{target}: could not write the checkpoint (no space left on device: 1.0 MiB free); the checkpoints before it are intact"
    )
    assert load_checkpoint(target)["step"] == 1


def test_a_checkpoint_directory_that_cannot_exist_is_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the directory goes")
    with pytest.raises(RunFailed, match=r"step_00000001.pt: could not write the checkpoint \(File exists\)"):
        save_checkpoint(tmp_path / "checkpoints" / "step_00000001.pt", PAYLOAD)


def test_an_output_directory_that_cannot_be_written_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(ConfigError) as error, RunLock(blocker / "run"):
        pass
    assert str(error.value) == f"{blocker / 'run'}: cannot write the run here ({os.strerror(errno.ENOTDIR)})"
    result = run_cli(capsys, monkeypatch, "train", ROOT / "configs" / "smoke.yaml", "--output", blocker / "run")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {error.value}"


def test_a_flipped_byte_inside_a_tensor_is_found(tmp_path):
    """torch's zip reader does not check CRCs; the checkpoint's own checksum does."""
    pattern = torch.arange(256, dtype=torch.uint8).repeat(64)  # bytes easy to find in the file
    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, {**PAYLOAD, "model": {"w": pattern, "scalar": torch.tensor(3.0), "flag": torch.tensor([True])}})
    assert load_checkpoint(path)["step"] == 1
    data = bytearray(path.read_bytes())
    offset = data.find(bytes(range(256))) + 100
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = torch.load(path, weights_only=True)  # what loaded silently before
    assert not torch.equal(damaged["model"]["w"], pattern)
    with pytest.raises(
        CheckpointError, match=r"step_00000001.pt: checksum mismatch \(the file was damaged after it was written\)"
    ):
        load_checkpoint(path)


class Payload:  # a class a weights-only load refuses to rebuild
    pass


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x8a\x0b\x01random bytes" * 10, "not a file written by torch.save"),
        (b"some text, not a checkpoint\n", "not a file written by torch.save"),
        ("object", "it holds objects other than tensors and plain data, which are not loaded"),
        ("truncated", "truncated or damaged"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_what_it_is_not(tmp_path, content, reason):
    path = tmp_path / "step_00000001.pt"
    if content == "object":
        torch.save({"model": Payload()}, path)
    elif content == "truncated":
        save_checkpoint(path, PAYLOAD)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == f"{path}: not a readable checkpoint ({reason})"
