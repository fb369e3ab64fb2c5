"""The toy world (being split into modules: for now everything still lives in ``render.py``)."""

from ibllm.train.toyworld.render import *  # noqa: F403
