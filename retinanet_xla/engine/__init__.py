"""Training machinery: device runtime, optimizer and schedule, the compiled step, checkpoints,
logging, and the loop that ties them together. The model knows nothing of any of it."""
