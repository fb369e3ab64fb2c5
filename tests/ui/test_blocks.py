"""ibllm.ui.blocks: the assembled page, its endpoints and how it is served."""

from __future__ import annotations

import gradio as gr
import pytest

from ibllm.ui.session import ChatSession


@pytest.fixture(scope="module")
def demo() -> gr.Blocks:
    from ibllm import create_engine
    from ibllm.ui import build_demo

    return build_demo(create_engine(max_batch=3), gallery=None)


def test_blocks_are_offline_and_share_one_model_slot(demo):
    from ibllm.ui import launch_options
    from ibllm.ui.blocks import MODEL_GROUP

    assert demo.analytics_enabled is False
    opts = launch_options()
    assert opts["share"] is False and opts["ssr_mode"] is False
    model_events = [f for f in demo.fns.values() if f.concurrency_id == MODEL_GROUP]
    assert {f.api_name for f in model_events} >= {"chat", "neighbours", "compare_without_cache"}
    assert demo._queue.default_concurrency_limit == 3  # as many as the engine decodes together (max_batch)


def test_the_endpoints_take_the_documented_parameters(demo):
    """README "The app": names, order and the controls' defaults, defined once by settings.Controls.bind."""
    api = demo.get_api_info()["named_endpoints"]

    def params(name: str) -> list[str]:
        return [p["parameter_name"] for p in api[name]["parameters"]]

    generation = ["max_new_tokens", "temperature", "top_p", "seed"]
    picture = ["answer_with", "picture_steps", "picture_guidance", "picture_seed", "picture_noise_level"]
    assert params("/chat") == ["message", "weights", "modalities", "cache", "cache_top_k", "cache_temperature",
                               "cache_weight", *generation, *picture]
    assert params("/neighbours") == ["inputs", "cache_top_k", "cache_temperature", "cache_weight"]
    assert params("/compare_without_cache") == generation
    assert all(p["parameter_has_default"] for name in api for p in api[name]["parameters"])
    assert [r["component"] for r in api["/chat"]["returns"]] == ["Json", "Markdown", "Dataframe", "Gallery", "Image"]


def test_the_conversation_is_one_state(demo):
    sessions = [b for b in demo.blocks.values() if isinstance(b, gr.State) and isinstance(b.value, ChatSession)]
    assert len(sessions) == 1 and sessions[0].value == ChatSession()
    # every event that reads the person's choices reads them from that one session
    (session,) = sessions
    chat = next(f for f in demo.fns.values() if f.api_name == "chat")
    assert session in chat.inputs and session in chat.outputs
