"""Thin alias kept for the documented entry point ``python -m dpq.stage_cache list | prune``: the stage
cache lives in :mod:`dpq.run.stage_cache`."""

from dpq.run.stage_cache import StageCache, main

__all__ = ["StageCache", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
