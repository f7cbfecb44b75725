"""The usual Python model server, as a reference for `linescan bench`: FastAPI + pydantic +
onnxruntime, one InferenceSession per worker process, one request per session.run (no dynamic
batching). It speaks the same Open Inference Protocol JSON as linescan, so the same load generator
drives both.

    MODEL_DIR=models/aoi_defect uvicorn fastapi_server:app --workers 2 --port 8100
"""
import os
import tomllib
from typing import Any, List, Optional

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

MODEL_DIR = os.environ.get("MODEL_DIR", "models/aoi_defect")
THREADS = int(os.environ.get("ORT_THREADS", "1"))

with open(os.path.join(MODEL_DIR, "config.toml"), "rb") as f:
    CONFIG = tomllib.load(f)
NAME = CONFIG["name"]
versions = sorted(int(v) for v in os.listdir(MODEL_DIR) if v.isdigit())
options = ort.SessionOptions()
options.intra_op_num_threads = THREADS
options.inter_op_num_threads = 1
SESSION = ort.InferenceSession(
    os.path.join(MODEL_DIR, str(versions[-1]), "model.onnx"),
    sess_options=options,
    providers=["CPUExecutionProvider"],
)
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}

app = FastAPI()


class InputTensor(BaseModel):
    name: str
    shape: List[int]
    datatype: str
    data: List[Any]


class InferRequest(BaseModel):
    id: Optional[str] = None
    inputs: List[InputTensor]


def tensor_meta(spec):
    return {"name": spec["name"], "datatype": spec["datatype"], "shape": [-1] + spec["shape"]}


@app.get("/v2/models/{name}")
def metadata(name: str):
    if name != NAME:
        raise HTTPException(404, f"unknown model {name}")
    return {
        "name": NAME,
        "versions": [str(versions[-1])],
        "platform": "onnxruntime",
        "inputs": [tensor_meta(s) for s in CONFIG["input"]],
        "outputs": [tensor_meta(s) for s in CONFIG["output"]],
    }


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest):
    if name != NAME:
        raise HTTPException(404, f"unknown model {name}")
    feeds = {
        i.name: np.asarray(i.data, dtype=DTYPES[i.datatype]).reshape(i.shape)
        for i in request.inputs
    }
    names = [o["name"] for o in CONFIG["output"]]
    results = SESSION.run(names, feeds)
    return {
        "model_name": NAME,
        "model_version": str(versions[-1]),
        "id": request.id,
        "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel().tolist()}
            for n, r in zip(names, results)
        ],
    }
