"""Process-level services of a run: stop signals, child processes, memory, job resources,
log format."""
