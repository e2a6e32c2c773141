"""torchvision's RetinaNet and ours, same backbone / FPN width / head depth / input / batch, on
the same device, timed over the same number of steps including compilation.

On XLA, torchvision's matcher, loss and post-processing produce data-dependent shapes, so it
compiles a new graph nearly every step; ours compiles once. On a native device (``--device
cpu`` or ``cuda``, in the native environment) torchvision runs eagerly, as a CPU or GPU user
would run it. Usage (see `make bench`):

    PJRT_DEVICE=CPU python benchmarks/torchvision_retinanet.py --config configs/smoke.yaml --steps 3
    .venv-native/bin/python benchmarks/torchvision_retinanet.py --device cpu --torchvision-only --steps 10 --json tv.json
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torchvision.models import resnet
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet_xla.commands.bench import benchmark, synthetic_batches
from retinanet_xla.config import load_config
from retinanet_xla.models.bodies import ClassifierBody

TORCHVISION_HEAD_CONVS = 4  # fixed in torchvision's RetinaNetHead


def torchvision_model(config):
    body = getattr(resnet, config.model.backbone.name)(weights=None)
    channels = config.model.fpn_channels
    in_channels = ClassifierBody(config.model.backbone.name).out_channels
    backbone = BackboneWithFPN(
        body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, channels, LastLevelP6P7(channels, channels)
    )
    size = max(config.data.image_size)
    return TorchvisionRetinaNet(backbone, config.model.num_classes, min_size=size, max_size=size)


def _device(name: str):
    """The device, how to wait for it, and a count of XLA compilations (None off XLA)."""
    if name == "xla":
        import torch_xla
        import torch_xla.debug.metrics as metrics

        def wait() -> None:
            torch_xla.sync()
            torch_xla.core.xla_model.wait_device_ops()

        return torch_xla.device(), wait, lambda: (metrics.metric_data("CompileTime") or [0])[0]
    device = torch.device(name)
    return device, (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None), lambda: None


def time_torchvision(config, steps, device_name="xla", amp=False):
    """``amp``: mixed precision as torchvision's references train (``--amp``): autocast to fp16
    with a ``GradScaler`` on CUDA; on a CPU, autocast to bf16 (no scaler needed)."""
    device, wait, compilations = _device(device_name)
    torch.manual_seed(0)
    model = torchvision_model(config).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cuda = device_name == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp and cuda else None
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batches = synthetic_batches(config, config.train.batch_size)
    start_count = compilations()
    times = []
    start = time.perf_counter()
    for step in range(steps):
        batch = batches[step % len(batches)]
        images = [(img.float() / 255).to(device) for img in batch["images"]]
        targets = []
        for boxes, labels in zip(batch["boxes"], batch["labels"]):
            real = labels >= 0
            targets.append({"boxes": boxes[real].to(device), "labels": labels[real].to(device)})
        tick = time.perf_counter()
        with autocast() if amp else contextlib.nullcontext():
            losses = model(images, targets)
        optimizer.zero_grad()
        loss = sum(losses.values())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        wait()
        times.append(time.perf_counter() - tick)
        print(f"torchvision step {step + 1}: {times[-1]:.2f} s", flush=True)
    after_first = times[1:] or times
    return {
        "device": device_name,
        "steps": steps,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "step_seconds": [round(t, 3) for t in times],
        "median_step_seconds_after_first": round(statistics.median(after_first), 4),
        "images_per_second": round(config.train.batch_size / statistics.median(after_first), 3),
        "compilations": None if start_count is None else compilations() - start_count,
        "amp": amp,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smoke.yaml"))
    parser.add_argument("--device", default="xla", help="xla (PJRT_DEVICE set), cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="torchvision steps (on XLA each ~1-2 min on a 2-core CPU)")
    parser.add_argument("--ours-steps", type=int, default=20)
    parser.add_argument("--torchvision-only", action="store_true", help="time torchvision's model alone")
    parser.add_argument("--amp", action="store_true", help="torchvision's model in mixed precision, as its references train it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override, as for bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = load_config(
        args.config,
        [*args.overrides, f"model.head.convs={TORCHVISION_HEAD_CONVS}", f"runtime.device={args.device}", "train.precision=fp32"],
    )
    theirs = time_torchvision(config, args.steps, args.device, args.amp)
    result = {"config": str(args.config), "image_size": list(config.data.image_size), "batch_size": config.train.batch_size}
    result.update(head_convs=TORCHVISION_HEAD_CONVS, torchvision=theirs)
    if not args.torchvision_only:
        ours = benchmark(config, args.ours_steps)
        ours_wall = ours["first_step_seconds"] + ours["step_seconds"] * (args.ours_steps - 1)
        theirs_per_step = theirs["wall_seconds"] / args.steps
        result["ours"] = {**ours, "wall_seconds_for_steps": round(ours_wall, 2)}
        result["ratio_at_equal_steps"] = round(theirs_per_step * args.ours_steps / ours_wall, 1)
        print(
            f"ours: {args.ours_steps} steps in {ours_wall:.1f} s ({ours['compilations_total']} compilations); "
            f"torchvision: {theirs_per_step:.1f} s per step ({theirs['compilations']} compilations in {args.steps} steps); "
            f"{args.ours_steps} torchvision steps would take {result['ratio_at_equal_steps']}x longer"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
