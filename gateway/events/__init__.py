"""Protocol core with no I/O: topic grammar, the event envelope and frame encoding."""
