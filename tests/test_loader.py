"""The data loader and its samplers: fixed shapes, workers, sharding, and the RNG it leaves alone."""

import subprocess
import sys

import pytest
import torch

from retinanet_xla.data import (
    Augmentation,
    DetectionDataset,
    EvalSampler,
    TrainSampler,
    build_loader,
    load_coco,
)
from retinanet_xla.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=40, num_val=7, seed=5)


def test_batches_have_fixed_shapes_whatever_the_data(synthetic):
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    box_counts = {len(r.boxes) for r in coco.records}
    assert 0 in box_counts and max(box_counts) >= 3  # empty images and crowded ones
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 96), max_boxes=3, augmentation=Augmentation())
    loader = build_loader(dataset, TrainSampler(len(dataset), batch_size=4, seed=1), batch_size=4, num_workers=0)
    shapes = set()
    truncated = 0
    for _, batch in zip(range(12), loader):
        shapes.add(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())))
        truncated += int(batch["truncated"].sum())
        labels = batch["labels"]
        assert ((labels >= -1) & (labels < coco.mapping.num_labels)).all()
        assert (batch["boxes"][labels < 0] == 0).all()
    assert len(shapes) == 1
    shape = dict((k, (s, d)) for k, s, d in next(iter(shapes)))
    assert shape["images"] == ((4, 3, 64, 96), torch.uint8)
    assert shape["boxes"] == ((4, 3, 4), torch.float32)
    assert shape["labels"] == ((4, 3), torch.int64)
    assert shape["crowd"] == ((4, 3), torch.bool)
    assert truncated > 0  # images with more than 3 boxes were cut and counted


def test_worker_processes_give_the_same_batches(synthetic):
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())

    def first_batches(workers):
        loader = build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=workers)
        return [b for _, b in zip(range(3), loader)]

    for a, b in zip(first_batches(0), first_batches(2)):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_starting_a_loader_leaves_the_global_rng_alone(synthetic):
    """Replica threads share torch's global RNG; a loader drawing from it while another replica
    initialises its model under the seed would give that replica different weights."""
    coco = load_coco(synthetic["train"]["annotations"], synthetic["train"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())
    loader = build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=1)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    next(iter(loader))
    assert torch.equal(torch.rand(4), expected)


SIGNALLED_LOADER = """
import multiprocessing, sys
from retinanet_xla.data import Augmentation, DetectionDataset, TrainSampler, build_loader, load_coco
coco = load_coco(sys.argv[1], sys.argv[2])
dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 8, Augmentation())
batches = iter(build_loader(dataset, TrainSampler(len(dataset), 2, seed=3), 2, num_workers=1))
next(batches)
(worker,) = multiprocessing.active_children()
print(worker.pid, flush=True)
sys.stdin.readline()  # the test signals the worker now
print("alive", worker.is_alive(), flush=True)
print("batches", sum(next(batches)["images"].shape == (2, 3, 64, 64) for _ in range(20)), flush=True)
# The persistent iterator is still referenced: the interpreter's exit must end the worker.
"""


def test_loader_workers_outlive_stop_signals_from_other_processes(synthetic):
    """A TPU VM preemption or a Ctrl-C signals every process. The workers must keep feeding
    their replica until it has agreed to stop and saved; the process must still exit."""
    import os
    import signal

    train = synthetic["train"]
    script = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_LOADER, str(train["annotations"]), str(train["images"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(script.stdout.readline())
        os.kill(worker, signal.SIGTERM)
        os.kill(worker, signal.SIGINT)
        out, err = script.communicate("go\n", timeout=60)  # more than the prefetched batches, then exit
    finally:
        script.kill()
    assert script.returncode == 0, err[-2000:]
    assert out.split("\n")[:2] == ["alive True", "batches 20"], err[-2000:]


def test_train_sharding_is_disjoint_and_resumable():
    replicas = [TrainSampler(50, batch_size=4, num_replicas=3, rank=r, seed=7) for r in range(3)]
    per_epoch = replicas[0].batches_per_epoch * 4
    assert replicas[0].batches_per_epoch == 4  # 50 // 12; the remainder of 2 is dropped
    epoch0 = [[k[0] for _, k in zip(range(per_epoch), iter(s))] for s in replicas]
    flat = sum(epoch0, [])
    assert len(flat) == len(set(flat)) == 48
    # Next epoch: a different order (different images dropped).
    stream = iter(replicas[0])
    keys = [next(stream) for _ in range(2 * per_epoch)]
    assert [k[0] for k in keys[:per_epoch]] != [k[0] for k in keys[per_epoch:]]
    # Resuming at batch 5 continues the same stream, augmentation seeds included.
    resumed = iter(TrainSampler(50, batch_size=4, num_replicas=3, rank=0, seed=7, start_batch=5))
    assert [next(resumed) for _ in range(8)] == keys[20:28]
    # Different replicas draw different augmentation seeds.
    assert next(iter(replicas[0]))[1] != next(iter(replicas[1]))[1]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainSampler(5, batch_size=4, num_replicas=2)


def test_eval_sharding_covers_every_image_once_and_pads(synthetic):
    samplers = [EvalSampler(7, batch_size=2, num_replicas=2, rank=r) for r in range(2)]
    keys = [[k for k, _ in s] for s in samplers]
    assert len(keys[0]) == len(keys[1]) == 4  # two global batches of 4 for 7 images
    real = [k for k in keys[0] + keys[1] if k >= 0]
    assert sorted(real) == list(range(7))
    coco = load_coco(synthetic["val"]["annotations"], synthetic["val"]["images"])
    dataset = DetectionDataset(coco.records, coco.mapping, (64, 64), 5)
    batches = list(build_loader(dataset, samplers[1], 2, num_workers=0))
    assert batches[-1]["valid"].tolist() == [True, False]
    assert batches[-1]["image_id"][1].item() == -1 and batches[-1]["images"][1].sum().item() == 0
    # Eval samples record how to map predictions back to original pixels.
    record = coco.records[keys[1][0]]
    first = batches[0]
    assert first["image_id"][0].item() == record.image_id
    assert first["original_size"][0].tolist() == [record.height, record.width]
    assert first["scale"][0].item() == pytest.approx(min(64 / record.height, 64 / record.width))


def test_more_workers_than_usable_cores_are_capped_with_one_info_line(monkeypatch, caplog):
    from retinanet_xla.data import loader

    monkeypatch.setattr(loader, "usable_cores", lambda: 2)
    monkeypatch.setattr(loader, "_CAPPED_LOGGED", set())
    with caplog.at_level("INFO", logger="retinanet_xla.data.loader"):
        assert [loader.usable_workers(n) for n in (0, 1, 2, 8, 8)] == [0, 1, 2, 2, 2]
    assert caplog.messages == ["data.num_workers 8 capped at this machine's 2 usable core(s)"]  # once
