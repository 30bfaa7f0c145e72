"""One router per resource: openai (completions, chat, models, tokenizer), admin
(deltas, compositions, cache), adapters (vLLM's adapter API), health. The completion
pipeline's stages beside them: resolve.py, plan.py, render.py (see openai.py)."""
