"""The hot path: a request's job -> the scheduler -> the engine -> a step's forward.

- job.py           a request as the engines see it (parameters, events, results)
- sampling.py      one choice's sampler: logits processors, logprobs
- core.py          the Engine: resident weights, delta tiers, transactional swaps
- cache.py         byte-budgeted LRU tiers
- scheduler.py     engine v2: iteration-level batching over mixed variants
- sequence.py      per-choice state (prompt progress, detokenization, stops)
- model_runner.py  one step's forward over packed tokens of many variants
- sparse.py        deltas laid out for mixed steps, sparse products (+ delta_kernels.c)
- kv_cache.py      static KV slots
- policy.py        merged or unmerged: the cost model
- v1.py            engine v1: one variant per batch (generate.py runs a batch)
"""
