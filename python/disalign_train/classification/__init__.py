"""The pieces of `disalign-train classify`: data, models, classifier-level methods, metrics, report."""
