"""Tables and plots drawn only from results data (metrics.jsonl), never from logs."""
