"""What the three trainers share: command line, runtime and DDP, the two training loops, groups,
the metrics schema and seed summaries, checkpoints and figures."""
