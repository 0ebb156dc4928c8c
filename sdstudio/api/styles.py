"""sdstudio's own style editing routes (A1111 only lists styles): ``/sdstudio/v1/styles``."""

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from ..core import styles
from ..core.params import RequestError


class StyleBody(BaseModel):
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    description: str = ""


def make_router(paths) -> APIRouter:
    r = APIRouter(prefix="/sdstudio/v1/styles")

    @r.get("")
    def list_styles():
        return [vars(s) for s in styles.load(paths.styles_file).values()]

    @r.post("")
    def save_style(body: StyleBody):
        if not body.name.strip():
            raise HTTPException(422, "a style needs a name")
        styles.upsert(paths.styles_file, styles.Style(body.name.strip(), body.prompt, body.negative_prompt,
                                                      body.description))
        return {"saved": body.name.strip()}

    @r.delete("/{name}")
    def delete_style(name: str):
        try:
            styles.delete(paths.styles_file, name)
        except RequestError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"deleted": name}

    return r
