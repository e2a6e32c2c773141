"""The eager implementation of ``Runtime``: plain PyTorch on the CPU or one CUDA device, every
step run as it is called, one replica."""

from typing import Dict, Iterable, Iterator, Sequence

import torch

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.feed import TimedBatches
from retinanet_xla.device.runtime import ReplicaGroup, Runtime
from retinanet_xla.errors import ConfigError


class EagerRuntime(Runtime):
    def __init__(self, settings: RuntimeConfig, kind: str):
        super().__init__()
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device is cuda but no CUDA device is available; use runtime.device=cpu or auto")
        self.kind, self.device, self.replicas = kind, torch.device(kind), ReplicaGroup()

    @staticmethod
    def local_replica_count(num_devices) -> int:
        return 1

    def device_batches(self, batches: Iterable[Dict[str, torch.Tensor]], host_keys: Sequence[str] = ()) -> TimedBatches:
        return TimedBatches(_on_device(batches, self.device, frozenset(host_keys)))

    def wait(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()


def _on_device(batches: Iterable[Dict[str, torch.Tensor]], device: torch.device, host_keys) -> Iterator[Dict[str, torch.Tensor]]:
    stream = iter(batches)
    try:
        for batch in stream:
            yield {key: value if key in host_keys else value.to(device, non_blocking=True) for key, value in batch.items()}
    finally:
        if hasattr(stream, "close"):
            stream.close()  # a data loader's workers end with the loop
