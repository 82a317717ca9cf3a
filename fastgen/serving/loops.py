"""Event loops for the serving processes and the synchronous client, from `fastgen.pipeline`.

`fastgen.pipeline` is both a module and the function the package exports under that name.
Importing the module directly would rebind the package attribute to the module (breaking
``fastgen.pipeline(...)`` for the rest of the process), so it is loaded through the lazy export,
which leaves the attribute bound to the function.
"""

from __future__ import annotations

import sys
from types import ModuleType


def _pipeline_module() -> ModuleType:
    import fastgen

    fastgen.pipeline  # noqa: B018 -- the lazy export loads the module and keeps the function bound
    return sys.modules["fastgen.pipeline"]


def new_event_loop():
    """A fresh event loop (uvloop's when installed)."""
    return _pipeline_module().new_event_loop()


def background_loop(name: str):
    """A `BackgroundLoop`: an event loop running in a daemon thread."""
    return _pipeline_module().BackgroundLoop(name=name)
