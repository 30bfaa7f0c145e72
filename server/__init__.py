"""deltaserve's serving side.

- cli.py        the `deltaserve` command (delta subcommands come from deltastore.cli)
- config.py     Settings (env DELTASERVE_*, one CLI flag per field)
- app.py        create_app and its lifespan; ThreadedServer for tests and benchmarks
- state.py      what the app holds while it runs
- routes/       openai (completions, chat, models), admin, health (+ metrics)
- engine.py     the resident base, the tiers, activation (rebind or apply in place)
- scheduler.py  per-variant queues, batching, time slice; the one torch thread
- generate.py   batched decode with per-request sampling, stops and streaming
- cache.py      the byte-budgeted LRU every tier uses
- store.py      the delta directory: validated names, atomic commits
- demo.py       the two demo variants; tasks.py their generated data
- metrics.py    Prometheus metrics with bounded labels
- loadtest.py   `deltaserve loadtest`
- ray_serve.py  scale-out on Ray Serve multiplexing (a thin layer over the same app)
"""
