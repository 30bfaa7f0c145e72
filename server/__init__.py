"""deltaserve's serving side (the delta library is deltastore/, which imports nothing of
this package).

- cli.py         the `deltaserve` command (delta subcommands come from deltastore.cli)
- config.py      Settings (env DELTASERVE_*, one CLI flag per field)
- app.py         create_app and its lifespan; ThreadedServer for tests and benchmarks
- state.py       what the app holds while it runs; deps.py its FastAPI dependencies
- routes/        openai (completions, chat, models, tokenizer: the routes of one pipeline,
                 resolve -> plan -> submit -> render, a module per stage), admin,
                 adapters (vLLM's load/unload_lora_adapter), health (+ metrics)
- schemas.py     the HTTP bodies (pydantic)
- middleware.py  request ids, the body limit, the last-resort 500
- errors.py      OpenAI-shaped error bodies
- compose.py     compositions ("a+b", registered recipes): parsing, recipes on disk
- metrics.py     Prometheus metrics with bounded labels
- ray_serve.py   scale-out on Ray Serve multiplexing, over asgi.py (the app in-process)
- engine/        the hot path: request -> engine -> step (see its __init__.py)
- clients/       client tools that talk HTTP and import nothing of the server:
                 loadtest.py (`deltaserve loadtest`), evaluate.py (`deltaserve eval`)
"""
