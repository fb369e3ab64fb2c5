"""The OpenAI-compatible HTTP API, served on the app's own server from the same engine (``server.OpenAIApi``)."""

from ibllm.api.server import ApiSettings, OpenAIApi, model_id

__all__ = ["ApiSettings", "OpenAIApi", "model_id"]
