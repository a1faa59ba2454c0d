#!/usr/bin/env python3
"""Runs llama.cpp's HTTP server (through the xllamacpp wheel) with its OpenAI-compatible
/v1/embeddings route: the third-party endpoint the remote-model tests talk to.

usage: serve.py MODEL.gguf PORT MODEL_NAME      (needs: pip install xllamacpp)
Serves until killed.
"""
import sys
import time

import xllamacpp as xlc

params = xlc.CommonParams()
params.model.path = sys.argv[1]
params.hostnames = ["127.0.0.1"]
params.port = int(sys.argv[2])
params.model_alias = {sys.argv[3]}
params.embedding = True
params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
params.n_ctx = 512
params.n_batch = 512
params.n_ubatch = 512
params.n_parallel = 1
params.cpuparams.n_threads = 1
params.cpuparams_batch.n_threads = 1
server = xlc.Server(params)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
