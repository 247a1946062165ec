"""What a run leaves behind and reads back: the run directory, checkpoints, resume, durable
writes, sweep summaries."""
