"""The extra networks panel: cards for checkpoints, LoRA, embeddings and hypernetworks.

A card shows the network's preview picture (``NAME.png`` / ``NAME.preview.png`` beside the file, as A1111
finds them), its name and trigger words; a click adds its prompt text (``<lora:name:w>`` with the preferred
weight and trigger words, the embedding's name, ``<hypernet:name:1>``) to the tab's prompt. Search filters
in the page; sort and refresh re-read the folders. A checkpoint card switches the checkpoint. "Edit metadata"
writes a LoRA's trigger words, preferred weight and notes to ``NAME.json`` beside it, as A1111 does.
"""

from __future__ import annotations

import html
import urllib.parse

import gradio as gr

from ..models.network_info import network_info, preview_of, save_user_metadata

KINDS = ("Checkpoints", "Textual Inversion", "Hypernetworks", "Lora")


def cards(ui, kind: str, tab: str, sort: str = "Name") -> str:
    entries = []
    registry = ui.service.engine.registry
    if kind == "Lora":
        for m in registry.loras:
            info = network_info(m.path)
            weight = info.preferred_weight if info.preferred_weight else 1.0
            text = f"<lora:{m.name}:{weight:g}>" + (f", {', '.join(info.trigger_words)}" if info.trigger_words else "")
            entries.append((m.name, m.path, text, info.preview, ", ".join(info.trigger_words)))
    elif kind == "Hypernetworks":
        entries = [(m.name, m.path, f"<hypernet:{m.name}:1>", preview_of(m.path), "") for m in registry.hypernetworks]
    elif kind == "Textual Inversion":
        library = ui.service.engine.embeddings
        for name in library.names():
            path = library.get(name).path
            entries.append((name, path, name, preview_of(path), ""))
    else:
        entries = [(m.name, m.path, "", preview_of(m.path), m.title) for m in registry.checkpoints]
    if sort == "Date":
        entries.sort(key=lambda e: -_mtime(e[1]))
    else:
        entries.sort(key=lambda e: e[0].lower())
    if not entries:
        return '<div class="sd-cards sd-cards-empty"><span>No items</span></div>'
    out = []
    for name, _path, text, preview, note in entries:
        image = (f'<img loading="lazy" src="/sdstudio/preview?kind={urllib.parse.quote(kind)}&amp;'
                 f'name={urllib.parse.quote(name)}" alt="">' if preview else '<div class="sd-card-blank"></div>')
        data_prompt = f' data-prompt="{html.escape(text, quote=True)}"' if text else ""
        data_model = f' data-model="{html.escape(note, quote=True)}"' if kind == "Checkpoints" else ""
        out.append(f'<div class="sd-card sd-notranslate" data-tab="{tab}" data-kind="{html.escape(kind)}"'
                   f'{data_prompt}{data_model} data-search="{html.escape((name + " " + note).lower(), quote=True)}" '
                   f'title="{html.escape(text or note, quote=True)}">{image}<div class="sd-card-name">'
                   f'{html.escape(name)}</div></div>')
    return f'<div class="sd-cards">{"".join(out)}</div>'


def _mtime(path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def preview_file(ui, kind: str, name: str):
    """The preview picture of a listed network (looked up by name, never by a path from the request)."""
    if kind == "Textual Inversion":
        library = ui.service.engine.embeddings
        return preview_of(library.get(name).path) if name in library.names() else None
    registry = ui.service.engine.registry
    listed = {"Lora": registry.loras, "Hypernetworks": registry.hypernetworks, "Checkpoints": registry.checkpoints}
    found = next((m for m in listed[kind] if m.name == name), None)
    return preview_of(found.path) if found else None


def build(ui, tab: str):
    """The panel for one tab; returns its refresh function's outputs for the app's refresh button."""
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="Search...", elem_id=f"{tab}_extra_search", scale=3,
                            max_lines=1)
        sort = gr.Dropdown(["Name", "Date"], value="Name", label="Sort by", elem_id=f"{tab}_extra_sort", scale=1,
                           elem_classes=["translate-choices"])
        refresh = gr.Button("🔄", elem_id=f"{tab}_extra_refresh", size="sm", min_width=40, scale=0)
    panels = []
    with gr.Tabs(elem_id=f"{tab}_extra_networks"):
        for kind in KINDS:
            with gr.Tab(kind, elem_id=f"{tab}_{kind.lower().replace(' ', '_')}_cards_tab"):
                panels.append(gr.HTML(cards(ui, kind, tab), elem_id=f"{tab}_{kind.lower().replace(' ', '_')}_cards"))

    with gr.Accordion("Edit metadata", open=False, elem_id=f"{tab}_lora_edit"):
        with gr.Row():
            chosen = gr.Dropdown([m.name for m in ui.service.engine.registry.loras], label="Lora",
                                 elem_id=f"{tab}_lora_edit_name", scale=2)
            words = gr.Textbox(label="Activation text", elem_id=f"{tab}_lora_edit_words", scale=3)
            weight = gr.Number(0, label="Preferred weight", elem_id=f"{tab}_lora_edit_weight", scale=1)
        notes = gr.Textbox(label="Notes", lines=2, elem_id=f"{tab}_lora_edit_notes")
        save = gr.Button("Save", elem_id=f"{tab}_lora_edit_save", size="sm")

    def lora_file(name):
        found = next((m for m in ui.service.engine.registry.loras if m.name == name), None)
        if found is None:
            raise gr.Error(f"no LoRA named {name!r}")
        return found.path

    def load_meta(name):
        if not name:
            return "", 0, ""
        info = network_info(lora_file(name))
        return ", ".join(info.trigger_words), info.preferred_weight or 0, info.notes

    def redraw(order):
        ui.service.engine.registry.refresh()
        return [cards(ui, kind, tab, order) for kind in KINDS]

    def save_meta(name, text, w, note, order):
        if not name:
            raise gr.Error("Choose a LoRA first")
        save_user_metadata(lora_file(name), text or "", w, note or "")
        return redraw(order)

    chosen.change(load_meta, chosen, [words, weight, notes], show_progress="hidden")
    save.click(save_meta, [chosen, words, weight, notes, sort], panels, show_progress="hidden")
    refresh.click(redraw, sort, panels, show_progress="hidden")
    sort.change(redraw, sort, panels, show_progress="hidden")
    search.input(None, search, None, js=f"(text) => sdstudioFilterCards('{tab}', text)")
    return panels
