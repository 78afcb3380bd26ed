"""Semantic segmentation trainer (`disalign-train segment`)."""
