import os

# The XLA tests run on the CPU PJRT client; set before torch_xla is first imported.
os.environ.setdefault("PJRT_DEVICE", "CPU")
