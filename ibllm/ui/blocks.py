"""The whole page: chat on the left; inputs, cache, generation and model tabs on the right."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import gradio as gr

from ibllm.config import PictureConfig
from ibllm.engine import ChatEngine
from ibllm.imagine import PictureStatus
from ibllm.kinds import ALL_EXTENSIONS
from ibllm.media import accepted_table
from ibllm.media.limits import DEFAULT_LIMITS
from ibllm.types import ModelInfo
from ibllm.ui.camera import camera_fold
from ibllm.ui.chat import NEIGHBOUR_HEADERS, ChatHandler
from ibllm.ui.gallery import REPO, Example, gallery_for, load_gallery
from ibllm.ui.history import mark_stopped, message_parts
from ibllm.ui.inputs import render_panel
from ibllm.ui.session import ChatSession
from ibllm.ui.settings import Controls, cache_controls, generation_controls, picture_controls

TITLE = "ImageBind-LLM"
# Every event that runs the model joins this concurrency group, so the UI chat, the API, example clicks and the
# cache-off comparison share the engine's decode slots (as many run at once as the engine decodes together; the
# rest wait in Gradio's queue and then in the engine's, which says where they are in line).
MODEL_GROUP = "model"
# Pickle-based files are let through the upload filter only so the media loader can say why they are refused
# (Gradio's own filter would just answer "invalid file type").
REFUSED_WITH_A_REASON = [".pt", ".pth", ".pkl", ".pickle", ".ckpt"]


def _max_upload() -> int:
    """Uploads larger than the media loaders accept are refused by Gradio before they are even stored."""

    return DEFAULT_LIMITS.max_file_bytes


MAX_UPLOAD = _max_upload()

CSS = """
#ibllm-banner {border-left: 4px solid var(--color-accent); padding-left: .75em;}
"""


def accepted_extensions() -> list[str]:
    """The upload filter: every extension the media loaders accept, plus the ones they refuse with a reason."""

    return sorted(set(ALL_EXTENSIONS) | set(REFUSED_WITH_A_REASON))


def accepted_markdown() -> str:

    return (accepted_table() + "\n\nA file that could be read several ways (a PNG as a photo, depth or thermal map) "
            "gets a *read as* choice in its panel. Thermal images are never guessed: pick *thermal* yourself.")


def model_slots(engine: ChatEngine) -> int:
    """How many answers the engine decodes together (its scheduler's slots; 1 for an engine without one)."""
    scheduler = getattr(engine, "scheduler", None)
    return int(getattr(scheduler, "slots", 1))


def model_markdown(info: ModelInfo) -> str:
    state = "trained" if info.trained else "**untrained (random weights): answers are noise**"
    lines = [
        f"### {info.name}",
        f"- weights: {info.weights} ({state})",
        f"- device: `{info.device}` · dtype: `{info.dtype}`" + (f" ({info.memory})" if info.memory else ""),
        f"- visual cache: {info.cache_entries:,} entries",
    ]
    if info.decode:
        lines.insert(3, f"- decode: {info.decode}")
    if info.compute:
        lines.insert(3, f"- compute: {info.compute}")
    if info.is_default:
        lines.append("\nThis is the small model shipped with the app, not the paper's ImageBind-LLM.")
    if info.how_to_load_real:
        lines.append(f"\n#### Loading the real ImageBind-LLM weights\n{info.how_to_load_real}")
    return "\n".join(lines)


def banner_markdown(info: ModelInfo) -> str:
    if not info.trained:
        return (f"⚠️ **{info.name}** runs with random weights, so its answers are noise. "
                "The *Model* tab says how to load the real ImageBind-LLM weights.")
    if info.is_default:
        return (f"Running **{info.name}**, a small model trained on a toy world of shapes, sounds and motions; "
                "try the examples. The *Model* tab says how to load the real ImageBind-LLM weights.")
    return f"Running **{info.name}** on `{info.device}` ({info.dtype})."


def picture_status(engine: ChatEngine) -> PictureStatus:
    """Whether this engine can draw pictures (an engine without the method cannot)."""
    status = getattr(engine, "picture_status", None)
    return status() if status is not None else PictureStatus(False, "this engine does not draw pictures")


def picture_markdown(status: PictureStatus, info: ModelInfo) -> str:
    if not status.available:
        return f"#### Picture answers\nNot available here: {status.note}."
    return (f"#### Picture answers\nThe inputs' fused feature (after the visual cache) is drawn by Stable unCLIP "
            f"with the question as its prompt, on `{info.device}` ({info.dtype}). {status.note}. The first picture "
            "loads the pipeline; while a picture is drawn the chat shows its s/step and the time left, and the "
            "line under the chat what it took (README: about 5 GB of disk; 2.6 GB of weights in float16, 5.2 GB in "
            "float32).")


API_HELP = """#### API
The chat is also an API endpoint, `/chat` (files are sent with `handle_file`):
```python
from gradio_client import Client, handle_file
client = Client("BASE")
answer, timings, neighbours, thumbnails, picture = client.predict(
    {"text": "What is in this picture?", "files": [handle_file("photo.png")]},
    weights='{"image": 1.0}',  # optional; 0 leaves an input out
    api_name="/chat")
```
`weights` is keyed by file name, modality or position; `modalities='{"scan.png": "depth"}'` says how to read a
file. Files stay part of the conversation: each client keeps its own (`client.reset_session()` starts a new one).
`client.submit(...)` streams: iterate the job for the growing answer, `job.cancel()` stops it.
`answer_with="text + picture"` (or `"picture"`, with `picture_steps`, `picture_guidance`, `picture_seed`,
`picture_noise_level`) also draws the answer: `picture` is then its PNG file.

`python app.py` also answers OpenAI's chat API at `BASEv1` (model `MODEL`; files as base64 data URLs, any kind
as a `file` part with its `filename`; the README has the `ibllm` extension field):
```python
import base64
from openai import OpenAI
client = OpenAI(base_url="BASEv1", api_key="unused")  # the server's IBLLM_API_KEY when it sets one
photo = base64.b64encode(open("photo.png", "rb").read()).decode()
reply = client.chat.completions.create(model="MODEL", messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + photo}},
    {"type": "text", "text": "What is in this picture?"}]}])
print(reply.choices[0].message.content)
```"""
DEFAULT_BASE = "http://127.0.0.1:7860/"
# Run in the page on load: the examples (shown while the chat is empty) are kept at their start for the first
# seconds, while their thumbnails load and the chat's own autoscroll follows them down; a person scrolling or
# typing meanwhile takes over at once.
GALLERY_FROM_THE_TOP = """() => {
  let left = 50, taken = false;
  const take = () => { taken = true; };
  ['wheel', 'touchstart', 'keydown', 'mousedown'].forEach((e) => document.addEventListener(e, take, {once: true}));
  const timer = setInterval(() => {
    const wrap = document.querySelector('#ibllm-chat .bubble-wrap');
    if (taken || --left < 0 || (wrap && wrap.querySelector('.message-row'))) return clearInterval(timer);
    if (wrap) wrap.scrollTop = 0;
  }, 200);
}"""


def api_help(info: ModelInfo, base: str = DEFAULT_BASE) -> str:
    """The Model tab's API examples for the server at ``base`` (as the page was reached) serving ``info``."""
    return API_HELP.replace("BASE", base).replace("MODEL", info.api_id)


def page_base(request: gr.Request | None) -> str:
    """The address the page was reached at ("http://host:port/"), behind a proxy too (Spaces sets the headers)."""
    headers = request.headers if request is not None else {}
    host = headers.get("x-forwarded-host") or headers.get("host")
    if not host:
        return DEFAULT_BASE
    scheme = headers.get("x-forwarded-proto") or "http"
    return f"{scheme.split(',')[0].strip()}://{host.split(',')[0].strip()}/"


def _examples(examples: Sequence[Example]) -> dict[str, Any]:
    if not examples:
        return {}
    # With additional inputs ChatInterface wants one list per example; a one-element list leaves those inputs (the
    # sliders) as the person set them.
    return {"examples": [[e.message()] for e in examples], "example_labels": [e.label for e in examples]}


def _join_model_group(demo: gr.Blocks, fns: Sequence[Any]) -> int:
    """Put every event running one of ``fns`` (or ChatInterface's wrappers of them) in the model's group.

    Bound methods are compared with ``==``: each attribute access makes a new method object.
    """
    joined = 0
    for block_fn in demo.fns.values():
        fn = block_fn.fn
        if fn is not None and any(fn == f or getattr(fn, "__wrapped__", None) == f for f in fns):
            block_fn.concurrency_id = MODEL_GROUP
            joined += 1
    return joined


class _Choose(Enum):
    BY_MODEL = "by model"


# build_demo's default gallery: picked from the loaded weights (a sentinel, since ``gallery=None`` means none).
BY_MODEL = _Choose.BY_MODEL


def build_demo(engine: ChatEngine, *, gallery: str | Path | None | _Choose = BY_MODEL) -> gr.Blocks:
    """The Gradio app for ``engine``: chat, inputs panel with weights and previews, cache/generation controls,
    cache inspector, model panel and example gallery. The ``/chat`` endpoint is the API (see README).

    ``gallery``: a gallery.json path, None for no examples, or by default the gallery that fits the weights
    (``gallery.gallery_for``: toy examples for the embedded model, real-world ones for real weights)."""
    handler = ChatHandler(engine)
    info = engine.info
    if gallery is BY_MODEL:
        gallery = gallery_for(info)
    examples = load_gallery(gallery) if gallery else []
    for example in examples:  # the gallery says what its files are (detection cannot tell a thermal PNG)
        for path, modality in zip(example.files, example.modalities, strict=True):
            if modality:
                handler.detect.add_hint(path, modality)

    with gr.Blocks(title=TITLE, fill_height=True, analytics_enabled=False) as demo:
        session = gr.State(ChatSession())  # the conversation's inputs, the person's choices, removed files, turns
        # What the inputs panel shows (``ChatSession.layout()``), written beside the session: the panel re-draws
        # when it changes, not when a weight slider moves. Derived, never read back as state.
        layout = gr.State(())

        gr.Markdown(f"## {TITLE}\nAsk about any mix of images, videos, sounds, 3D point clouds, depth and thermal "
                    "maps, IMU traces and text.")
        gr.Markdown(banner_markdown(info), elem_id="ibllm-banner")

        with gr.Row(equal_height=False):
            chat_column = gr.Column(scale=3)
            with gr.Column(scale=2, min_width=320):
                with gr.Tab("Inputs"):
                    render_panel(demo, session, layout)
                    with gr.Accordion("Accepted files", open=False):
                        gr.Markdown(accepted_markdown())
                with gr.Tab("Cache"):
                    cache = cache_controls(engine.cfg.visual_cache)
                    gr.Markdown("#### Inspector: neighbours retrieved for the last answer")
                    neighbours = gr.Dataframe(headers=NEIGHBOUR_HEADERS, datatype=["number", "number", "number",
                                                                                  "str"],
                                              interactive=False, label="neighbours", max_height=300)
                    # Always shown and only ever given values: an update that changes a prop (visible=...) makes
                    # Gradio rebuild the Gallery's JSON schema for the session, ~30 ms of the server's GIL per
                    # chat turn (py-spy, 8 concurrent sessions).
                    thumbnails = gr.Gallery(label="neighbour thumbnails", columns=5, height=160)
                    lookup_note = gr.Markdown(label="note")
                    lookup = gr.Button("Look up neighbours of the current inputs", size="sm")
                    compare = gr.Button("Answer the last question again with the cache off", size="sm")
                    compare_out = gr.Textbox(label="answer with the cache off", lines=4, interactive=False)
                with gr.Tab("Generation"):
                    generation = generation_controls(engine.cfg.generation)
                    pictures = picture_status(engine)
                    gr.Markdown(picture_markdown(pictures, info), elem_id="ibllm-pictures")
                    picture = picture_controls(PictureConfig(), visible=pictures.available)
                with gr.Tab("Model"):
                    gr.Markdown(model_markdown(info))
                    api_md = gr.Markdown(api_help(info), elem_id="ibllm-api-help")

        # The handlers as Gradio calls them: their own inputs, then the settings controls they ask for.
        controls = Controls(cache, generation, picture)
        respond, respond_controls = controls.bind(handler.respond)
        lookup_neighbours, lookup_controls = controls.bind(handler.lookup_neighbours, leave_out=["cache"])
        compare_without_cache, compare_controls = controls.bind(handler.compare_without_cache)

        with chat_column:
            timings = gr.Markdown(render=False, elem_id="ibllm-timings", label="timings")
            # The picture answer as a file, for API callers (the chat shows it as a message of its own).
            picture_file = gr.Image(None, type="filepath", visible=False, label="picture", format="png")
            # Hidden, for API callers: JSON weights per file name, modality or position, and modalities per file
            # name or position (the panel's sliders and "read as" choices are the browser's way to set them).
            weights_text = gr.Textbox("", visible=False, label="weights")
            modalities_text = gr.Textbox("", visible=False, label="modalities")
            textbox = gr.MultimodalTextbox(
                sources=["upload", "microphone"], file_count="multiple", file_types=accepted_extensions(),
                placeholder="Ask about your files… (attach with the paper clip, or record)", stop_btn=True,
                autofocus=True,
            )
            chatbot = gr.Chatbot(label="chat", height="62vh", editable="user", buttons=["copy", "copy_all"],
                                 elem_id="ibllm-chat",
                                 placeholder="Attach a file, ask a question — or pick an example.")
            chat = gr.ChatInterface(
                respond,
                multimodal=True,
                textbox=textbox,
                chatbot=chatbot,
                additional_inputs=[session, weights_text, modalities_text, *respond_controls],
                additional_outputs=[timings, neighbours, thumbnails, session, layout, picture_file],
                editable=True,
                cache_examples=False,  # caching file examples breaks multimodal chat (NOTES.md)
                run_examples_on_click=True,
                api_name="chat",
                analytics_enabled=False,
                api_description="Ask about files; streams the answer. See the README for a gradio_client example.",
                fill_height=False,
                **_examples(examples),
            )
            followup_button = gr.Button("", visible=False, size="sm", variant="secondary", elem_id="ibllm-followup")
            captured = camera_fold(textbox)  # the webcam, right under the chat box's paper clip and microphone
            timings.render()

        # The session follows the conversation (after each answer, undo, retry, edit, clear) and the textbox.
        def refresh(history: list[Any], pending: Any, sent: Any, current: ChatSession) -> tuple[Any, Any]:
            # ``sent`` is the message being answered: between the textbox clearing and the answer reaching the
            # history its files are in neither, and the panel would drop (and re-create) their previews.
            files = [*message_parts(pending)[1], *message_parts(sent)[1]]
            updated = handler.follow(current, history, files)
            if updated == current:  # typing in the textbox changes nothing here: write nothing
                return gr.skip(), gr.skip()
            return updated, updated.layout()

        # Queued (not queue=False): a State changed by an unqueued event does not fire its .change, and the inputs
        # panel re-draws on layout.change.
        internal = {"show_progress": "hidden", "api_visibility": "undocumented"}
        refresh_inputs = [chat.chatbot_state, textbox, chat.saved_input, session]
        chat.chatbot_state.change(refresh, refresh_inputs, [session, layout], **internal)
        textbox.change(refresh, refresh_inputs, [session, layout], **internal)
        for event in captured:
            event.then(refresh, refresh_inputs, [session, layout], **internal)
        # Stop before the first word left an empty bubble (and an empty answer in the history the model read next).
        def stopped(shown: list[Any], state: list[Any]) -> tuple[Any, Any]:
            return tuple(gr.skip() if fixed is None else fixed for fixed in (mark_stopped(shown), mark_stopped(state)))

        textbox.stop(stopped, [chatbot, chat.chatbot_state], [chatbot, chat.chatbot_state], queue=False, **internal)
        def shown_api_help(request: gr.Request) -> str:  # the examples name the address the page came from
            return api_help(info, page_base(request))

        demo.load(shown_api_help, None, api_md, queue=False, **internal)

        # A two-turn example ("(then ask: And its shape?)") offers its follow-up as a button under the chat: a click
        # puts it in the textbox, to send or edit.
        followups = [e.followup for e in examples]

        def offer_followup(evt: gr.SelectData) -> Any:
            question = followups[evt.index] if isinstance(evt.index, int) and evt.index < len(followups) else ""
            return gr.Button(f"Then ask: {question}", visible=True) if question else gr.Button(visible=False)

        def take_followup(label: str, typed: Any) -> tuple[Any, Any]:  # files waiting in the textbox stay
            question = label.removeprefix("Then ask: ")
            return {"text": question, "files": message_parts(typed)[1]}, gr.Button(visible=False)

        chatbot.example_select(offer_followup, None, followup_button, queue=False, **internal)
        followup_button.click(take_followup, [followup_button, textbox], [textbox, followup_button], queue=False,
                              **internal)
        # The chat scrolls itself to its end as its contents grow, which on load is the gallery's last row: a new
        # visitor saw the end of the examples, not their start. Back to the top while no message is shown.
        demo.load(None, None, None, js=GALLERY_FROM_THE_TOP)
        chatbot.clear(lambda: (ChatSession(), (), [], "", "", gr.Button(visible=False)), None,
                      [session, layout, neighbours, timings, compare_out, followup_button], **internal)

        lookup.click(lookup_neighbours, [chat.chatbot_state, textbox, session, *lookup_controls],
                     [neighbours, thumbnails, lookup_note], api_name="neighbours")
        compare.click(compare_without_cache, [chat.chatbot_state, session, *compare_controls], [compare_out],
                      api_name="compare_without_cache")

    # UI submit, retry, edit, example click and the /chat API are separate events around the same function.
    joined = _join_model_group(demo, [respond, lookup_neighbours, compare_without_cache])
    if joined < 4:
        raise RuntimeError(f"only {joined} model events found: gradio's ChatInterface wiring changed")
    demo.queue(default_concurrency_limit=model_slots(engine))
    return demo


def launch_options() -> dict[str, Any]:
    """``launch()`` arguments shared by ``app.py`` and the tests: no share link, no SSR, nothing from the internet.

    The theme names system fonts only, so the page loads no web fonts; the examples folder is served for the
    gallery and the assets folder for the visual cache's thumbnails, even when the app starts elsewhere.
    """
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )
    return {"share": False, "ssr_mode": False, "theme": theme, "css": CSS, "max_file_size": MAX_UPLOAD,
            "allowed_paths": [str(REPO / "examples"), str(REPO / "assets")], "footer_links": ["api", "settings"]}
