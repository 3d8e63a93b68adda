"""Text generation with any adapter, the base model, or the active adapter."""

from __future__ import annotations

from fastapi import APIRouter

from ..engine import GenerationRequest, SamplingParams
from .deps import State
from .schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, state: State) -> GenerateResponse:
    """Generate a completion; concurrent requests for different adapters share one batch."""
    adapter_id = state.adapters.resolve(body.adapter_id)
    prompt_ids = state.base.tokenizer(body.prompt)["input_ids"]
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=tuple(body.stop),
    )
    async with state.adapters.serving(adapter_id):
        result = await state.engine.generate(GenerationRequest(prompt_ids, adapter_id, params))
    return GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        adapter_id=adapter_id or "base",
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
    )
