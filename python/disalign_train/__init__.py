"""Two-stage DisAlign trainers (classification, segmentation, detection) built on disalign_ops."""
