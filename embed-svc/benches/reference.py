"""Reference embedders for the throughput bench: sentence-transformers (torch CPU) and ONNX
Runtime on an fp32 export of the same model, on the same texts and thread count.

Usage: reference.py MODEL_DIR TEXTS_JSON THREADS  -> prints one JSON object with the figures.
Needs: pip install sentence-transformers onnxruntime onnx
"""

import json
import os
import statistics
import sys
import tempfile
import time

model_dir, texts_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ.setdefault("OMP_NUM_THREADS", str(threads))
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(threads)
from sentence_transformers import SentenceTransformer  # noqa: E402

texts = json.load(open(texts_path))
query = "How do I configure the build to use link time optimization?"
out = {}

st = SentenceTransformer(model_dir, device="cpu")
st.max_seq_length = 256
st.encode(texts[:32], batch_size=32)
start = time.perf_counter()
st_vectors = st.encode(texts, batch_size=32, normalize_embeddings=True)
out["st_passages_per_s"] = len(texts) / (time.perf_counter() - start)
lat = []
for _ in range(50):
    t = time.perf_counter()
    st.encode([query])
    lat.append((time.perf_counter() - t) * 1000)
out["st_query_ms_p50"] = statistics.median(lat)

import onnxruntime as ort  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(model_dir)
onnx_path = os.path.join(tempfile.mkdtemp(), "model.onnx")
hf = AutoModel.from_pretrained(model_dir).eval()


class LastHidden(torch.nn.Module):
    """Keyword arguments only: positional ones no longer line up with BertModel.forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


dummy = tok(["hello world"], return_tensors="pt")
torch.onnx.export(
    LastHidden(hf),
    (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]),
    onnx_path,
    input_names=["input_ids", "attention_mask", "token_type_ids"],
    output_names=["last_hidden_state"],
    dynamic_axes={n: {0: "b", 1: "s"} for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
    opset_version=17,
    dynamo=False,
)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])


def ort_embed(batch):
    enc = tok(batch, padding=True, truncation=True, max_length=256, return_tensors="np")
    hidden = session.run(None, {k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]})[0]
    mask = enc["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


# Length-sorted batches, as sentence-transformers does, so both references get the same help.
order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
ort_embed(texts[:32])
start = time.perf_counter()
ort_vectors = np.zeros_like(st_vectors)
for i in range(0, len(order), 32):
    idx = order[i : i + 32]
    ort_vectors[idx] = ort_embed([texts[j] for j in idx])
out["ort_passages_per_s"] = len(texts) / (time.perf_counter() - start)
lat = []
for _ in range(50):
    t = time.perf_counter()
    ort_embed([query])
    lat.append((time.perf_counter() - t) * 1000)
out["ort_query_ms_p50"] = statistics.median(lat)
out["ort_vs_st_min_cosine"] = float((ort_vectors * st_vectors).sum(1).min())
np.save(texts_path + ".st.npy", st_vectors)
print(json.dumps(out))
