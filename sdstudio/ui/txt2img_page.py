"""A minimal txt2img page (the full A1111-style UI is its own piece of work).

It submits the same :class:`Txt2ImgRequest` the CLI and API use and shows the infotext under the
gallery, so what a user sees is what gets written into the PNG.
"""

from __future__ import annotations

import gradio as gr

from ..core import outputs
from ..core.names import sampler_labels, schedule_labels
from ..core.params import RequestError, Txt2ImgRequest
from ..models.errors import ModelFileError, ModelNotFoundError
from ..service.state import JobState


def generate(engine, state: JobState, req: Txt2ImgRequest, progress=None) -> tuple[list[str], str]:
    """Run one txt2img job for the page: images saved as A1111 names them, paths and infotext returned.
    Bad input becomes a ``gr.Error`` (a message in the page), never a traceback."""
    folder = outputs.dated_dir(engine.paths.outputs_dir, "txt2img-images")
    saved = []

    def on_progress(p):
        state.update(p.job_no, p.step, p.steps)
        if progress is not None:
            progress((p.job_no * p.steps + p.step) / (p.job_count * p.steps), desc=f"step {p.step}/{p.steps}")

    try:
        req.validate()
        state.begin("txt2img", req.n_iter, req.steps)
        result = engine.txt2img(req, on_progress=on_progress, should_stop=lambda: state.interrupted,
                                on_image=lambda g: saved.append(
                                    outputs.save_image(g.image, folder, infotext=g.infotext, suffix=str(g.seed))))
    except (RequestError, ModelNotFoundError, ModelFileError) as exc:
        raise gr.Error(str(exc)) from None
    finally:
        state.end()
    text = result.images[0].infotext if result.images else ""
    return [str(p) for p in saved], text


def build(engine, state: JobState) -> gr.Blocks:
    checkpoints = [m.title for m in engine.registry.checkpoints]

    def on_generate(model, prompt, negative, sampler, scheduler, steps, cfg, seed, width, height, n_iter, batch_size,
                    clip_skip, progress=gr.Progress()):  # noqa: B008 - gradio's way to ask for progress
        req = Txt2ImgRequest(prompt=prompt, negative_prompt=negative, sampler_name=sampler, scheduler=scheduler,
                             steps=int(steps), cfg_scale=float(cfg), seed=int(seed), width=int(width),
                             height=int(height), n_iter=int(n_iter), batch_size=int(batch_size),
                             clip_skip=int(clip_skip), model=model or None)
        return generate(engine, state, req, progress)

    with gr.Blocks(title="sdstudio") as page:
        gr.Markdown("## sdstudio — txt2img")
        model = gr.Dropdown(checkpoints, value=checkpoints[0] if checkpoints else None, label="Stable Diffusion checkpoint")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
            with gr.Column(scale=1):
                go = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
                stop = gr.Button("Interrupt", elem_id="txt2img_interrupt")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    sampler = gr.Dropdown(sampler_labels(), value="DPM++ 2M", label="Sampling method")
                    scheduler = gr.Dropdown(schedule_labels(), value="Automatic", label="Schedule type")
                    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height")
                with gr.Row():
                    n_iter = gr.Slider(1, 100, value=1, step=1, label="Batch count")
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale")
                with gr.Row():
                    seed = gr.Number(-1, label="Seed", precision=0)
                    clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            with gr.Column():
                gallery = gr.Gallery(label="Output", columns=2, elem_id="txt2img_gallery")
                info = gr.Textbox(label="Generation parameters", lines=4, elem_id="txt2img_infotext")
        go.click(on_generate, [model, prompt, negative, sampler, scheduler, steps, cfg, seed, width, height, n_iter,
                            batch_size, clip_skip], [gallery, info])
        stop.click(lambda: setattr(state, "interrupted", True), None, None)
    return page
