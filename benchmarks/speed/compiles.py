"""What a benchmark process spent compiling, from jax's own monitoring events.

Every XLA compilation jax runs (or serves from the persistent compilation cache) reports
its duration as a monitoring event; the cache reports each hit. A `CompileRecord`
listens to both from its creation on, so a part's JSON can say how long the part compiled,
which program was slowest, and whether the cache the parts share served it.
"""

from __future__ import annotations

import threading
from typing import Any

# jax's monitoring event names (the same in jax 0.10 and 0.11): the duration of one
# backend compilation or cache retrieval, a lookup in the persistent cache, and a hit.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_LOOKUP_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileRecord:
    """Counts this process's compilations from now on (listeners stay for its life)."""

    def __init__(self):
        # jax is imported where it is used in benchmarks/speed: train_step.py's torch child
        # process re-imports these modules and must not load jax's CUDA libraries.
        import jax

        self._lock = threading.Lock()
        self._durations: list[tuple[str, float]] = []
        self._lookups = 0
        self._hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self._durations.append((str(kwargs.get("fun_name", "?")), duration))

    def _on_event(self, event: str, **kwargs: Any) -> None:
        del kwargs
        with self._lock:
            if event == CACHE_LOOKUP_EVENT:
                self._lookups += 1
            elif event == CACHE_HIT_EVENT:
                self._hits += 1

    def summary(self) -> dict[str, Any]:
        """The compilations so far.

        Returns:
          {"programs": how many, "compile_s": their seconds in all (a cache hit counts
          its retrieval), "slowest": {"name", "s"} or None, "cache_lookups": programs
          looked up in the persistent cache (0: it is off), "cache_hits": found there}.
        """
        with self._lock:
            durations = list(self._durations)
            lookups, hits = self._lookups, self._hits
        slowest = max(durations, key=lambda item: item[1], default=None)
        return {
            "programs": len(durations), "compile_s": sum(s for _, s in durations),
            "slowest": None if slowest is None else {"name": slowest[0], "s": slowest[1]},
            "cache_lookups": lookups, "cache_hits": hits,
        }
