"""COCO evaluation: running the model over a split and scoring with pycocotools."""
