import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, nms

from retinanet_xla.config import load_config
from retinanet_xla.data import load_coco
from retinanet_xla.data.synthetic import write_synthetic_dataset
from retinanet_xla.device.choice import create_runtime
from retinanet_xla.device.native.runtime import CpuRuntime
from retinanet_xla.inference.coco_metrics import evaluate_detections, ground_truth, ground_truth_as_detections
from retinanet_xla.inference.evaluator import ShardDetections
from retinanet_xla.ops import BoxCoder
from retinanet_xla.ops.postprocess import Detections, PostprocessConfig, filter_detections, per_class_nms, select_candidates


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=4, num_val=20, seed=9)


def test_ground_truth_fed_back_gives_ap_1(synthetic):
    gt = ground_truth(synthetic["val"]["annotations"])
    result = evaluate_detections(gt, ground_truth_as_detections(gt))
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert result["metrics"][name] == pytest.approx(1.0)
    assert len(result["summary"]) == 12 and result["summary"][0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95")
    assert all(v == pytest.approx(1.0) for v in result["metrics"]["per_category_AP"].values())


def test_duplicate_and_malformed_ground_truth_is_scored_as_the_loader_reads_it(synthetic, tmp_path):
    """Every annotation id the same, and one box a string: the perfect detections still score 1."""
    data = json.loads(Path(synthetic["val"]["annotations"]).read_text())
    for annotation in data["annotations"]:
        annotation["id"] = 1
    data["annotations"].append({"id": 2, "image_id": data["images"][0]["id"], "category_id": 1, "bbox": "10 10 5 5"})
    broken = tmp_path / "instances.json"
    broken.write_text(json.dumps(data))
    detections = ground_truth_as_detections(ground_truth(synthetic["val"]["annotations"]))
    gt = ground_truth(broken)
    assert len(gt.anns) == len(data["annotations"]) - 1
    assert evaluate_detections(gt, detections)["metrics"]["AP"] == pytest.approx(1.0)


def test_empty_and_shifted_detections(synthetic):
    gt = ground_truth(synthetic["val"]["annotations"])
    assert evaluate_detections(gt, [])["metrics"]["AP"] == 0.0
    shifted = ground_truth_as_detections(gt)
    for detection in shifted:
        x, y, w, h = detection["bbox"]
        detection["bbox"] = [x + w * 0.6, y, w, h]  # IoU 0.25 with its box: a miss at 0.5
    assert evaluate_detections(gt, shifted)["metrics"]["AP50"] < 0.05


def reference_postprocess(cls_logits, bbox_regression, anchors, weights, image_size, config):
    """torchvision's RetinaNet post-processing, over all anchors at once (no per-level split)."""
    coder = TorchvisionBoxCoder(weights)
    results = []
    for logits, regression in zip(cls_logits, bbox_regression):
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits).flatten()
        keep = scores > config.score_threshold
        scores, indices = scores[keep], torch.nonzero(keep).flatten()
        scores, order = scores.topk(min(config.pre_nms_top_k, scores.numel()))
        indices = indices[order]
        anchor_index, labels = indices // num_classes, indices % num_classes
        boxes = coder.decode_single(regression[anchor_index], anchors[anchor_index])
        boxes = clip_boxes_to_image(boxes, image_size)
        keep = batched_nms(boxes, scores, labels, config.nms_iou)[: config.max_detections]
        results.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return results


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_equals_torchvision_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    num_anchors, num_classes = 300, 5
    xy = torch.rand(num_anchors, 2, generator=generator) * 80
    anchors = torch.cat([xy, xy + 8 + torch.rand(num_anchors, 2, generator=generator) * 40], dim=1)
    cls_logits = torch.randn(2, num_anchors, num_classes, generator=generator) * 2 - 2
    bbox_regression = torch.randn(2, num_anchors, 4, generator=generator) * 0.5
    weights = (10.0, 10.0, 5.0, 5.0)
    config = PostprocessConfig(
        pre_nms_top_k=num_anchors * num_classes,
        score_threshold=0.05,
        nms_iou=0.5,
        max_detections_per_class=1000,
        max_detections=50,
    )
    content = torch.tensor([[100, 100], [100, 100]])
    ours = filter_detections(
        select_candidates(cls_logits, bbox_regression, anchors, BoxCoder(weights), config.pre_nms_top_k, content), config
    )
    expected = reference_postprocess(cls_logits, bbox_regression, anchors, weights, (100, 100), config)
    for a, b in zip(ours, expected):
        assert len(a.boxes) == len(b.boxes) > 0
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-4)


def test_per_class_cap_and_content_clipping():
    anchors = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 110, 10], [0, 100, 10, 110]])
    cls_logits = torch.full((1, 4, 2), -10.0)
    cls_logits[0, :, 0] = torch.tensor([3.0, 2.0, 1.0, 0.5])  # four class-0 boxes, no overlaps
    config = PostprocessConfig(pre_nms_top_k=8, score_threshold=0.05, nms_iou=0.5, max_detections_per_class=2, max_detections=10)
    content = torch.tensor([[80, 105]])  # height 80, width 105: the content stops before some anchors
    candidates = select_candidates(cls_logits, torch.zeros(1, 4, 4), anchors, BoxCoder(), 8, content)
    assert candidates.boxes.shape == (1, 8, 4)
    assert candidates.boxes[..., 2].max() <= 105 and candidates.boxes[..., 3].max() <= 80
    (found,) = filter_detections(candidates, config)
    assert found.labels.tolist() == [0, 0]
    torch.testing.assert_close(found.boxes, anchors[:2])


def test_detections_map_back_to_original_pixels_and_category_ids(synthetic):
    from retinanet_xla.inference.evaluator import Evaluator

    config = load_config(None, ["data.image_size=[64,64]", "data.num_workers=0", "eval.batch_size=2", "runtime.device=cpu"])
    coco = load_coco(synthetic["val"]["annotations"], synthetic["val"]["images"])

    evaluator = Evaluator(config, coco, create_runtime(config.runtime), show_progress=False)
    record = coco.records[0]
    scale = min(64 / record.height, 64 / record.width)
    original = np.array([[10.0, 20.0, 50.0, 60.0]])
    batch = {
        "valid": torch.tensor([True, False]),
        "original_size": torch.tensor([[record.height, record.width], [0, 0]]),
        "scale": torch.tensor([scale, 0.0]),
        "to_annotation": torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 2),
        "image_id": torch.tensor([record.image_id, -1]),
    }
    found = Detections(torch.tensor(original * scale, dtype=torch.float32), torch.tensor([0.9]), torch.tensor([3]))
    shard = ShardDetections(evaluator.capacity)
    evaluator._collect(shard, [found, found], batch)  # the padding entry is dropped
    (detection,) = evaluator._to_coco(shard.rows)
    assert detection["image_id"] == record.image_id and detection["category_id"] == 4  # label 3 -> id 4
    np.testing.assert_allclose(detection["bbox"], [10, 20, 40, 40], atol=0.02)


def test_gathered_shards_come_back_in_split_order(synthetic):
    """Replica shards are interleaved by batch (``EvalSampler``); the master's list is in split
    order, each image's detections in their own order, whatever the number of replicas."""
    from retinanet_xla.inference.evaluator import Evaluator

    overrides = [
        "data.image_size=[64,64]",
        "data.num_workers=0",
        "eval.batch_size=2",
        "eval.max_detections=3",
        "runtime.device=cpu",
    ]
    config = load_config(None, overrides)
    coco = load_coco(synthetic["val"]["annotations"], synthetic["val"]["images"])

    evaluator = Evaluator(config, coco, create_runtime(config.runtime), show_progress=False)
    assert evaluator.capacity == -(-len(coco.records) // 2) * 2 * 3  # every slot of every batch, padding too

    def detections(index: int, count: int):
        boxes = torch.tensor([[index, k, index + 10.0, k + 10.0] for k in range(count)], dtype=torch.float32).reshape(count, 4)
        return index, boxes, torch.linspace(0.9, 0.5, count), torch.arange(count) % 4

    counts = {0: 3, 1: 3, 4: 3, 5: 3, 2: 2, 3: 0, 6: 1}  # image 3 has no detection
    replica_0, replica_1 = ShardDetections(12), ShardDetections(12)
    for index in (0, 1, 4, 5):
        replica_0.add(*detections(index, counts[index]))
    for index in (2, 3, 6):
        replica_1.add(*detections(index, counts[index]))
    found = evaluator._to_coco(torch.cat([replica_0.rows, replica_1.rows]))
    expected = [coco.records[index].image_id for index in sorted(counts) for _ in range(counts[index])]
    assert [d["image_id"] for d in found] == expected
    assert [d["score"] for d in found[:3]] == [0.9, 0.7, 0.5]  # within an image, the order kept
    assert [d["bbox"][1] for d in found[6:8]] == [0.0, 1.0]  # image 2's boxes, in order


def test_evaluation_batches_come_through_the_runtimes_device_feed(synthetic):
    """Train, eval, predict and bench take their batches from ``Runtime.device_batches`` (on
    torch-xla the background copy); evaluation keeps on the host only what maps detections
    back to their images."""
    from retinanet_xla.inference.evaluator import HOST_KEYS, Evaluator
    from retinanet_xla.models import build_model
    from tests.cli_helpers import ROOT, TINY

    class RecordingRuntime(CpuRuntime):
        def device_batches(self, batches, host_keys=()):
            self.feeds.append({"host_keys": tuple(host_keys), "batches": 0})

            def counted():
                for batch in batches:
                    self.feeds[-1]["batches"] += 1
                    yield batch

            return super().device_batches(counted(), host_keys)

    config = load_config(ROOT / "configs" / "smoke.yaml", [*TINY, "runtime.device=cpu", "eval.score_threshold=0.0"])
    coco = load_coco(synthetic["val"]["annotations"], synthetic["val"]["images"])
    runtime = RecordingRuntime(config.runtime)
    runtime.feeds = []
    model = runtime.place_model(build_model(config))
    evaluator = Evaluator(config, coco, runtime, show_progress=False)
    detections = evaluator.predict(model)
    assert runtime.feeds == [{"host_keys": HOST_KEYS, "batches": evaluator.num_batches}]
    assert {d["image_id"] for d in detections} == {record.image_id for record in coco.records}


def test_per_class_nms_equals_nms_class_by_class_on_the_reference_candidate_count():
    """5,000 candidates over 91 classes: where torchvision's batched_nms switches to its
    per-class loop (not traceable by torch.export); the result must be that loop's."""
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(5000, 2, generator=generator) * 600
    boxes = torch.cat([xy, xy + 4 + torch.rand(5000, 2, generator=generator) * 60], dim=1)
    scores = torch.rand(5000, generator=generator)
    labels = torch.randint(0, 91, (5000,), generator=generator)
    expected = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        expected.append(members[nms(boxes[members], scores[members], 0.5)])
    expected = torch.cat(expected)
    expected = expected[scores[expected].argsort(descending=True)]
    kept = per_class_nms(boxes, scores, labels, 0.5)
    assert 1000 < len(kept) < 5000  # some suppressed, most kept
    assert torch.equal(kept, expected)
    assert per_class_nms(boxes[:0], scores[:0], labels[:0], 0.5).shape == (0,)


def test_faster_coco_eval_gives_pycocotools_numbers(tmp_path):
    """eval.backend: the same 12 numbers (to 1e-6), AP per category and printed summary."""
    paths = write_synthetic_dataset(tmp_path, num_train=2, num_val=40, seed=3)
    gt = ground_truth(paths["val"]["annotations"])
    rng = np.random.default_rng(0)
    detections = []
    for truth in ground_truth_as_detections(gt):
        x, y, w, h = truth["bbox"]
        for k in range(3):  # near misses, a wrong class, random scores
            jitter = rng.normal(0, 0.1 * max(w, h), 4)
            category = truth["category_id"] if k else int(rng.integers(1, 5))
            box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
            detections.append({**truth, "bbox": box, "score": float(rng.random()), "category_id": category})
    image_ids = sorted(gt.getImgIds())[:-3]  # and a restriction to the images that were run
    reference = evaluate_detections(gt, detections, image_ids)
    faster = evaluate_detections(gt, detections, image_ids, backend="faster-coco-eval")
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert 0.1 < reference["metrics"]["AP"] < 0.9
    for name in names:
        assert faster["metrics"][name] == pytest.approx(reference["metrics"][name], abs=1e-6), name
    assert faster["metrics"]["per_category_AP"] == pytest.approx(reference["metrics"]["per_category_AP"], abs=1e-6)
    assert faster["summary"] == reference["summary"] and len(reference["summary"]) == 12
