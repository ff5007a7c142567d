"""The design Reefline replaces, built to be measured against it: FastAPI + Celery + Redis +
onnxruntime + Pillow, one image per task.

`POST /api/infer {"images": [...]}` enqueues one Celery task per URL and answers with the task
ids; a prefork worker (one process per core) fetches the image, decodes and preprocesses it with
Pillow and numpy as the reference preprocessing the Rust classifier matches does
(models/reference.py: the shorter side resized bilinearly to 256, the centre 224×224 cropped,
x = (pixel − 127) / 128, RGB, NCHW), runs the same ONNX file through onnxruntime with batch 1, and
stores the top-5 in the Redis result backend. `GET /api/done` counts finished tasks (and
those that failed), so the benchmark can stop its clock without reading every result.

Settings (environment): REDIS_URL, MODEL_PATH, IMAGE_SIZE (224), LABELS_PATH, ORT_THREADS (per worker process; 1,
since the workers already use every core).
"""
import os
import sys

import numpy as np
import onnxruntime
import redis
import requests
from celery import Celery
from celery.signals import worker_process_init
from fastapi import FastAPI
from pydantic import BaseModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../models"))
from reference import tensor  # noqa: E402  (the reference preprocessing, shared with the parity test)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = "reefline-baseline:done"
ERRORS_KEY = "reefline-baseline:errors"
SIZE = int(os.environ.get("IMAGE_SIZE", "224"))

celery = Celery("baseline", broker=REDIS_URL, backend=REDIS_URL)
celery.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                   worker_prefetch_multiplier=4, task_acks_late=True, result_expires=3600)
api = FastAPI(title="Celery baseline")
counter = redis.Redis.from_url(REDIS_URL)

# Per worker process, made after the fork.
model = {}


@worker_process_init.connect
def load_model(**_):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(os.environ["MODEL_PATH"], options,
                                           providers=["CPUExecutionProvider"])
    with open(os.environ["LABELS_PATH"]) as f:
        labels = [line.rstrip("\n").split("\t")[-1] for line in f if line.strip() and not line.startswith("#")]
    model.update(session=session, input=session.get_inputs()[0].name, labels=labels,
                 http=requests.Session())


def preprocess(data: bytes) -> np.ndarray:
    return tensor(data, SIZE)[np.newaxis]


@celery.task(name="classify")
def classify(url: str) -> dict:
    try:
        response = model["http"].get(url, timeout=20)
        response.raise_for_status()
        logits = model["session"].run(None, {model["input"]: preprocess(response.content)})[0][0]
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        top = np.argsort(scores)[::-1][:5]
        result = {"url": url, "status": "ok",
                  "predictions": [{"index": int(i), "label": model["labels"][i], "score": float(scores[i])}
                                  for i in top]}
    except Exception as error:  # a failed image is a result too
        result = {"url": url, "status": "error", "error": str(error)}
        counter.incr(ERRORS_KEY)
    counter.incr(DONE_KEY)
    return result


class Submission(BaseModel):
    images: list[str]


@api.post("/api/infer", status_code=202)
def infer(submission: Submission):
    return {"task_ids": [classify.delay(url).id for url in submission.images]}


@api.get("/api/done")
def done():
    return {"done": int(counter.get(DONE_KEY) or 0), "errors": int(counter.get(ERRORS_KEY) or 0)}
