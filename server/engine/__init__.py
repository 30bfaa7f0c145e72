"""The hot path: a request's job -> the scheduler -> the engine -> a step's forward.

- job.py           a request as the engine sees it (its resolved Target, parameters,
                   events, results)
- sampling.py      the batched sampler on the device: logits processors, logprobs
- core.py          the Engine: resident weights, delta tiers, transactional swaps
- cache.py         byte-budgeted LRU tiers
- llm_engine.py    the interface the HTTP side uses, and the worker's step loop
- scheduler.py     iteration-level batching over mixed variants (policy only)
- batch.py         one step packed into a StepInput on the device (one copy)
- transfer.py      host -> device: a step's inputs in one copy
- sequence.py      per-choice state (prompt progress, text, stops, logprobs)
- detokenizer.py   incremental detokenization per sequence; single tokens' texts (logprobs)
- model_runner.py  one step's forward over packed tokens of many variants; the family table
- loader.py        variants read, verified and laid out on a thread off the step loop
- grammar.py       structured output's token masks, packed into the step's one copy
- threads.py       helper threads run torch on themselves alone: the step's OpenMP team
                   is the only one
- sparse.py        deltas laid out for mixed steps, a step's delta work items
- kernels/         the sparse ops (torch.library): C on CPU, Triton on CUDA, torch reference
- kv_cache.py      static KV slots
- policy.py        merged or unmerged: the cost model
"""
