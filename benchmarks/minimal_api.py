"""Two reference endpoints for service_speed.py, in one uvicorn + FastAPI app.

* `POST /empty`: parses the predict request's multipart form, reads the file and answers a
  `PredictResponse` of the same shape, with no work at all: what uvicorn, FastAPI, the
  multipart parser, the loopback and the load client cost on this machine.
* `POST /v1/predict`: the smallest predict endpoint one could write with the same model:
  form → `Predictor.preprocess` → forward → top-k, all inline on the event loop. No
  authentication, middleware, model lookup, thread hand-off or batching; it blocks the
  loop, so it serves one request at a time and is only measured at concurrency 1.

The service's overhead less this endpoint's is what the service's own machinery costs.
service_speed.py runs it as the API is run (`python -m uvicorn minimal_api:app --app-dir
benchmarks`), with `MINIMAL_API_MODEL` (a model directory) and `MINIMAL_API_DEVICE` set.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile

from bit_core.images import ImageSource
from bit_core.predict import Prediction, Predictor
from service.models.schemas import ImagePrediction, LabelProbability, PredictResponse

predictor = Predictor.load(
    os.environ["MINIMAL_API_MODEL"], device=os.environ.get("MINIMAL_API_DEVICE", "auto")
)
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


@app.post("/v1/predict", response_model=PredictResponse)
async def predict(request: Request, response: Response) -> PredictResponse:
    """Decode, forward and top-k inline; `Server-Timing` gives the forward's share."""
    began = time.perf_counter()
    model_id, top_k, sources, names = await _read_form(request)
    batch = predictor.preprocess(sources)
    forward_began = time.perf_counter()
    probabilities = predictor.probabilities(batch)
    forward_ms = (time.perf_counter() - forward_began) * 1000
    rows = predictor.top_k(probabilities, top_k)
    response.headers["Server-Timing"] = f"forward;dur={forward_ms:.2f}"
    return _answer(model_id, names, rows, began)
