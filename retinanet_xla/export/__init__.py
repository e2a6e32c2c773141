"""``retinanet-xla export``: the trained detector as a self-contained graph for serving."""
