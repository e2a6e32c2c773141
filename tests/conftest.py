import os

# The XLA tests run on the CPU PJRT client; set before torch_xla is first imported.
os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch_xla  # noqa: E402

from retinanet_xla.xla.runtime import prefer_nonblocking_cpu_client  # noqa: E402

prefer_nonblocking_cpu_client()  # as every Runtime does; before the client below exists

# The XLA device must exist before the autograd engine starts (the first eager backward in any
# test); otherwise a later XLA backward fails with "device_ready_queues_ ... INTERNAL ASSERT".
torch_xla.device()
