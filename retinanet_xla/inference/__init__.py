"""A trained model at work: loading a checkpoint for inference, the detector that eval, predict
and export checks share, the sharded COCO evaluator, and predict's pictures."""
