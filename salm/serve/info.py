"""The routes that describe the server: the playground page, ``/health`` and ``/v1/models``."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from salm.serve.state import ServerState, get_state

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> str:
    return resources.files("salm.serve").joinpath("playground.html").read_text(encoding="utf-8")


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> dict:
    return {"status": "ok", "model": state.model_name, "members": state.model.model_ids, **state.engine.stats()}


@router.get("/v1/models")
async def models(state: ServerState = Depends(get_state)) -> dict:
    entry = {"object": "model", "created": state.created, "owned_by": "salm"}
    data = [dict(entry, id=state.model_name, members=state.model.model_ids)]
    data += [dict(entry, id=name, member=mid) for name, mid in state.member_names.items()]
    return {"object": "list", "data": data}
