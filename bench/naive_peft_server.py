"""The baseline: a FastAPI + PEFT server as a user would hand-write it.

The base model and every adapter are loaded once (`PeftModel.from_pretrained`, then `load_adapter`); a
global lock serialises requests, and each one does `set_adapter(name)` then `generate(...)`, so requests
run one at a time with no batching. Same `POST /generate` body as our server; returns `{"text", "token_ids"}`.

    python -m bench.naive_peft_server --model DIR --adapter NAME=PATH [--adapter ...] --port 0
"""

from __future__ import annotations

import argparse
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from peft import PeftModel
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE_ID = "base"


class GenerateRequest(BaseModel):
    prompt: str
    adapter_id: str | None = None
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0)


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]


def create_app(model_dir: Path, adapters: dict[str, Path], device: str, dtype: str = "auto") -> FastAPI:
    """The app; the model and adapters load in the lifespan, before uvicorn reports it is running."""
    state: dict = {}
    lock = threading.Lock()  # one request at a time: set_adapter mutates the shared model

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The same dtype rule as our server's `--dtype auto`.
        auto = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=auto if dtype == "auto" else getattr(torch, dtype))
        (first, first_path), *rest = adapters.items()
        model = PeftModel.from_pretrained(base, first_path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
        state.update(tokenizer=tokenizer, model=model.to(device).eval())
        yield
        state.clear()

    app = FastAPI(title="naive PEFT server", lifespan=lifespan)

    @app.post("/generate", response_model=GenerateResponse)
    def generate(body: GenerateRequest) -> GenerateResponse:  # sync: runs in uvicorn's thread pool
        """Generate with one adapter (or the base model), one request at a time."""
        model, tokenizer = state["model"], state["tokenizer"]
        name = body.adapter_id or next(iter(adapters))
        if name != BASE_ID and name not in adapters:
            raise HTTPException(404, f"adapter '{name}' not found")
        inputs = tokenizer(body.prompt, return_tensors="pt").to(device)
        sampling = {"do_sample": True, "temperature": body.temperature} if body.temperature > 0 else {
            "do_sample": False}
        with lock, torch.inference_mode():
            if name == BASE_ID:
                with model.disable_adapter():
                    out = model.generate(**inputs, max_new_tokens=body.max_new_tokens, **sampling)
            else:
                model.set_adapter(name)
                out = model.generate(**inputs, max_new_tokens=body.max_new_tokens, **sampling)
        token_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return GenerateResponse(text=tokenizer.decode(token_ids, skip_special_tokens=True), token_ids=token_ids)

    return app


def _adapter_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_peft_server", description=__doc__)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--adapter", dest="adapters", action="append", type=_adapter_arg, required=True,
                        help="NAME=PATH of a PEFT adapter directory; repeat for each adapter")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    app = create_app(args.model, dict(args.adapters), device, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
