"""Reference endpoints for service_speed.py, in a uvicorn + FastAPI app of their own.

* `POST /empty`: parses the predict request's multipart form, reads the file and answers a
  `PredictResponse` of the same shape, with no work at all: what uvicorn, FastAPI, the
  multipart parser, the loopback and the load client cost on this machine.
* `POST /v1/predict`: the smallest predict endpoint one could write with the same model:
  form → `Predictor.preprocess` → forward → top-k, all inline on the event loop. No
  authentication, middleware, model lookup, thread hand-off or batching; it blocks the
  loop, so it serves one request at a time and is only measured at concurrency 1.
  With `MINIMAL_API_FORWARD_THREAD=1`, decode and forward run instead as one job on a
  thread of their own, as the service runs a lone request (`Batcher.run_alone`): the
  least an endpoint pays that keeps its event loop free during a forward. A process does
  one or the other, never both: forwards from two threads would start a second OpenMP
  team, whose idle threads spin against the first (service/inference/threads.py).

The service's overhead less these endpoints' is what the service's own machinery costs.
service_speed.py runs it as the API is run (`python -m uvicorn minimal_api:app --app-dir
benchmarks`), with `MINIMAL_API_MODEL` (a model directory) and `MINIMAL_API_DEVICE` set.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile

from bit_core.images import ImageSource
from bit_core.predict import Prediction, Predictor
from service.models.schemas import ImagePrediction, LabelProbability, PredictResponse

forward_thread = (
    ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    if os.environ.get("MINIMAL_API_FORWARD_THREAD") == "1"
    else None
)


def _load() -> Predictor:
    return Predictor.load(
        os.environ["MINIMAL_API_MODEL"], device=os.environ.get("MINIMAL_API_DEVICE", "auto")
    )


# Loaded on the thread that runs the forwards: loading runs parallel ops too, and a second
# thread doing so would start the second OpenMP team this process must not have.
predictor = _load() if forward_thread is None else forward_thread.submit(_load).result()
app = FastAPI(title="minimal predict endpoint")


async def _read_form(request: Request) -> tuple[int, int, list[ImageSource], list[str | None]]:
    """model_id, top_k, the files' bytes and names."""
    form = await request.form()
    try:
        sources: list[ImageSource] = []
        names: list[str | None] = []
        for upload in form.getlist("files"):
            if isinstance(upload, UploadFile):
                sources.append(await upload.read())
                names.append(upload.filename)
        return int(str(form["model_id"])), int(str(form.get("top_k", 5))), sources, names
    finally:
        await form.close()


def _answer(
    model_id: int, names: list[str | None], rows: list[list[Prediction]], began: float
) -> PredictResponse:
    return PredictResponse(
        model_id=model_id,
        model_version="0" * 12,
        predictions=[
            ImagePrediction(
                filename=name,
                top_k=[LabelProbability(label=p.label, probability=p.probability) for p in row],
            )
            for name, row in zip(names, rows, strict=True)
        ],
        time_ms=round((time.perf_counter() - began) * 1000, 2),
    )


@app.post("/empty", response_model=PredictResponse)
async def empty(request: Request) -> PredictResponse:
    """The request read, the answer's shape, nothing computed."""
    began = time.perf_counter()
    model_id, _, _, names = await _read_form(request)
    rows = [[Prediction("class0", 1.0)] for _ in names]
    return _answer(model_id, names, rows, began)


def _decode_and_forward(sources: list[ImageSource]) -> tuple[torch.Tensor, float]:
    """Probabilities and the forward's own ms."""
    batch = predictor.preprocess(sources)
    began = time.perf_counter()
    probabilities = predictor.probabilities(batch)
    return probabilities, (time.perf_counter() - began) * 1000


@app.post("/v1/predict", response_model=PredictResponse)
async def predict(request: Request, response: Response) -> PredictResponse:
    """Decode, forward (inline or on the forward thread) and top-k; `Server-Timing` gives
    the forward's share."""
    began = time.perf_counter()
    model_id, top_k, sources, names = await _read_form(request)
    if forward_thread is None:
        probabilities, forward_ms = _decode_and_forward(sources)
    else:
        probabilities, forward_ms = await asyncio.get_running_loop().run_in_executor(
            forward_thread, _decode_and_forward, sources
        )
    rows = predictor.top_k(probabilities, top_k)
    response.headers["Server-Timing"] = f"forward;dur={forward_ms:.2f}"
    return _answer(model_id, names, rows, began)
