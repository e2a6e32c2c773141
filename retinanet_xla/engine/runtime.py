"""The device the loop runs on: an XLA device (TPU, or CPU through PJRT) or, for debugging,
eager CPU/CUDA. Everything XLA-specific the loop needs sits behind this one class."""

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch

logger = logging.getLogger(__name__)


def compile_cache_dir(setting: Optional[str]) -> Optional[Path]:
    """``auto``: on TPU, ``$XDG_CACHE_HOME/retinanet-xla/xla/...`` (``~/.cache/...``), one
    directory per torch_xla version; elsewhere none, because torch_xla 2.9's CPU client cannot
    load the executables it writes (measured: ``PersistentCacheDeserializeFailure`` on every
    reload). ``None``/``none``: no persistent cache. Anything else: that directory."""
    if setting is None or setting.lower() in ("none", "null", ""):
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    device = os.environ.get("PJRT_DEVICE", "").upper()
    if device != "TPU":
        return None
    import torch_xla

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "retinanet-xla" / "xla" / f"torch_xla-{torch_xla.__version__}-tpu"


class Runtime:
    def __init__(self, kind: str = "xla", compile_cache: Optional[str] = None):
        self.kind = kind
        self.compile_cache = None
        if kind == "xla":
            import torch_xla
            import torch_xla.runtime as xr

            cache = compile_cache_dir(compile_cache)
            # Compiled executables are written to disk and reused by the next launch of the same
            # graph (a second run, a resume after preemption): no recompilation across runs.
            # Only possible before the first computation of the process.
            if cache is not None and not torch_xla._XLAC._xla_computation_cache_is_initialized():
                cache.mkdir(parents=True, exist_ok=True)
                xr.initialize_cache(str(cache), readonly=False)
                self.compile_cache = cache
            self.device = torch_xla.device()
        elif kind == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("runtime.device is cuda but no CUDA device is available")
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    def sync(self) -> None:
        """End the traced step: XLA compiles (first time) and launches the graph asynchronously."""
        if self.is_xla:
            import torch_xla

            torch_xla.sync()

    def separate_scalars(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every 0-dim tensor its own device buffer, then sync.

        torch_xla caches host-to-device transfers of scalars by value, so after loading a
        checkpoint the 20 BatchNorm ``num_batches_tracked`` buffers of a ResNet-18 (all equal)
        share one device buffer. The first step's graph then has fewer inputs than every later
        step's, and step 2 compiles again. An in-place ``add_(0)`` gives each its own output.
        """
        if not self.is_xla:
            return
        with torch.no_grad():
            for tensor in tensors:
                if tensor.dim() == 0:
                    tensor.add_(0)
        self.sync()

    def wait(self) -> None:
        """Block until the device has finished all launched work (for honest timings)."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()
        elif self.kind == "cuda":
            torch.cuda.synchronize()

    def on_step_end(self, callback: Callable, tensors: Dict[str, torch.Tensor]) -> None:
        """Call ``callback(values)`` with host copies of ``tensors`` once the step has run,
        without making the host wait for the device (a step closure on XLA)."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            xm.add_step_closure(lambda: callback({k: v.item() for k, v in tensors.items()}))
        else:
            callback({k: v.item() for k, v in tensors.items()})

    def autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type="xla" if self.is_xla else self.device.type, dtype=torch.bfloat16)

    def compilations(self) -> Dict[str, float]:
        """Graphs compiled so far in this process, the seconds spent compiling them, and how the
        persistent cache fared (hits, misses, and executables it could not load)."""
        if not self.is_xla:
            return {"count": 0, "seconds": 0.0}
        import torch_xla.debug.metrics as metrics

        data = metrics.metric_data("CompileTime")
        found = {"count": int(data[0]), "seconds": data[1] / 1e9} if data else {"count": 0, "seconds": 0.0}
        if self.compile_cache is not None:
            for counter, key in (("PersistentCacheHit", "cache_hits"), ("PersistentCacheMiss", "cache_misses"), ("PersistentCacheDeserializeFailure", "cache_load_failures")):
                found[key] = metrics.counter_value(counter) or 0
        return found

    def device_batches(self, batches: Iterable[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches on the device. On XLA a background thread transfers the next batches while
        the device runs the current step (torch_xla's MpDeviceLoader)."""
        if self.is_xla:
            import torch_xla.distributed.parallel_loader as parallel_loader

            return iter(parallel_loader.MpDeviceLoader(batches, self.device))
        return ({k: v.to(self.device, non_blocking=True) for k, v in batch.items()} for batch in batches)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
