"""Talks to a running linescan with NVIDIA's unmodified tritonclient: health, metadata, config,
repository index, infer with JSON and binary tensors, plain and compressed, and statistics. Usage: tritonclient_check.py HOST:PORT MODEL"""
import sys

import numpy as np
import tritonclient.http as httpclient

url, model = sys.argv[1], sys.argv[2]
client = httpclient.InferenceServerClient(url)
assert client.is_server_live()
assert client.is_server_ready()
assert client.is_model_ready(model)
metadata = client.get_model_metadata(model)
config = client.get_model_config(model)
index = client.get_model_repository_index()
assert any(entry["name"] == model and entry["state"] == "READY" for entry in index), index
assert config["max_batch_size"] >= 2, config

rng = np.random.default_rng(0)
inputs_numpy = {
    i["name"]: rng.random([2] + [max(d, 1) for d in i["shape"][1:]], dtype=np.float32)
    for i in metadata["inputs"]
}
results = {}
# JSON and binary tensors, and bodies sent compressed both ways.
for binary, compression in ((False, None), (True, None), (True, "gzip"), (False, "deflate")):
    inputs = []
    for name, array in inputs_numpy.items():
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in metadata["outputs"]]
    result = client.infer(
        model,
        inputs,
        outputs=outputs,
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,
    )
    results[binary, compression] = {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}
    for name, array in results[binary, compression].items():
        assert array.shape[0] == 2, (name, array.shape)

for key in results:
    for name in results[key]:
        np.testing.assert_allclose(results[False, None][name], results[key][name], rtol=1e-6, atol=1e-6)

# Triton's statistics extension: the four requests of two rows above, at least.
stats = client.get_inference_statistics(model)["model_stats"][0]
assert stats["name"] == model, stats
assert stats["inference_count"] >= 8 and stats["execution_count"] >= 1, stats
assert stats["inference_stats"]["success"]["count"] >= 4, stats

try:
    client.get_model_metadata("no-such-model")
    raise AssertionError("unknown model accepted")
except httpclient.InferenceServerException as error:
    assert "no-such-model" in str(error), error

print("tritonclient OK")
