"""Object detection trainer (`disalign-train detect`)."""
