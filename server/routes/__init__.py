"""One router per resource: openai (completions, models), admin (deltas, cache), health."""
