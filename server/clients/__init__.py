"""Client tools: they talk to a server over HTTP and import nothing of it.

- loadtest.py   `deltaserve loadtest`
- evaluate.py   `deltaserve eval`
"""
