"""Training: the compiled step (forward, loss, backward, update), the optimizers (SGD, AdamW)
and the schedule as device tensors, the weight average, the loop and its periodic work. The
model knows nothing of it."""
