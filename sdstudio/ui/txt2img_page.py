"""A minimal txt2img page (the full A1111-style UI is its own piece of work).

It queues the same :class:`Txt2ImgRequest` the CLI and API use, as a job of this browser window,
and shows the infotext under the gallery, so what a user sees is what gets written into the PNG.
"""

from __future__ import annotations

import gradio as gr

from ..core.names import sampler_labels, schedule_labels
from ..core.params import Txt2ImgRequest
from ..service.jobs import JobError, JobService, Txt2ImgJob
from ..service.queue import FAILED, FINISHED


def client_of(request: gr.Request | None) -> str:
    """Each browser window (gradio session) is its own queue client: its Interrupt stops its own job."""
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"ui:{session or 'anonymous'}"


def generate(service: JobService, client: str, req: Txt2ImgRequest, progress=None) -> tuple[list[str], str]:
    """Queue one txt2img job for the page and wait for it, reporting the queue place and the steps.
    Images are saved as A1111 names them; paths and the first infotext are returned. Bad input becomes
    a ``gr.Error`` (a message in the page), never a traceback."""
    try:
        job = service.submit(client, Txt2ImgJob(req))
    except JobError as exc:
        raise gr.Error(str(exc)) from None
    version = -1
    while True:
        version = service.wait_for_change(version, 0.5)
        current = service.queue.get(job.id)
        if current.status in FINISHED:
            break
        if progress is not None:
            p = service.progress(client, job.id)
            state = p["state"]
            if state["sampling_steps"]:
                progress(p["progress"], desc=f"step {state['sampling_step']}/{state['sampling_steps']}")
            else:
                progress(0.0, desc=f"in queue: {max(p['queue_position'], 0)} job(s) ahead")
    if current.status == FAILED:
        raise gr.Error(current.error or "the job failed")
    images = current.result.get("images", [])
    return [im["path"] for im in images], images[0]["infotext"] if images else ""


def build(service: JobService) -> gr.Blocks:
    engine = service.engine
    checkpoints = [m.title for m in engine.registry.checkpoints]

    def on_generate(model, prompt, negative, sampler, scheduler, steps, cfg, seed, width, height, n_iter, batch_size,
                    clip_skip, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - gradio's way
        req = Txt2ImgRequest(prompt=prompt, negative_prompt=negative, sampler_name=sampler, scheduler=scheduler,
                             steps=int(steps), cfg_scale=float(cfg), seed=int(seed), width=int(width),
                             height=int(height), n_iter=int(n_iter), batch_size=int(batch_size),
                             clip_skip=int(clip_skip), model=model or None)
        return generate(service, client_of(request), req, progress)

    def on_interrupt(request: gr.Request):
        service.interrupt(client_of(request))

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
        stop.click(on_interrupt, None, None)
    return page
