"""recstream: a self-hostable real-time recommendation pipeline.

Shared plumbing lives here (settings, errors, AWS and Redis clients, the local stack and
the CLI); the data flow lives in `streams`, `agents`, `training` and `serving`.
"""

__version__ = "0.1.0"
