#!/usr/bin/env python3
"""Converts a sentence-transformers BERT model directory (safetensors) to an F32 GGUF file, so
llama.cpp's server can serve the same model as a third-party OpenAI-compatible endpoint in the
black-box tests. Follows what llama.cpp's convert_hf_to_gguf.py does for BERT, without torch.

usage: to_gguf.py MODEL_DIR OUT.gguf      (needs: pip install gguf safetensors numpy)
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

src, out = Path(sys.argv[1]), sys.argv[2]
cfg = json.loads((src / "config.json").read_text())
n_layer = cfg["num_hidden_layers"]
arch = gguf.MODEL_ARCH.BERT
w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])

w.add_name(src.name)
w.add_context_length(cfg["max_position_embeddings"])
w.add_embedding_length(cfg["hidden_size"])
w.add_feed_forward_length(cfg["intermediate_size"])
w.add_block_count(n_layer)
w.add_head_count(cfg["num_attention_heads"])
w.add_layer_norm_eps(cfg["layer_norm_eps"])
w.add_causal_attention(False)
w.add_file_type(gguf.LlamaFileType.ALL_F32)

pool_path = src / "1_Pooling" / "config.json"
# sentence-transformers' default for BERT models is mean pooling.
pool = json.loads(pool_path.read_text()) if pool_path.exists() else {"pooling_mode_mean_tokens": True}
if pool.get("pooling_mode_mean_tokens"):
    w.add_pooling_type(gguf.PoolingType.MEAN)
elif pool.get("pooling_mode_cls_token"):
    w.add_pooling_type(gguf.PoolingType.CLS)
else:
    raise SystemExit("unsupported pooling")

# Vocabulary: WordPiece pieces in llama.cpp's form (word starts get "\u2581", "##" is dropped).
tok = json.loads((src / "tokenizer.json").read_text())
vocab = tok["model"]["vocab"]
special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
inv = {i: t for t, i in vocab.items()}
tokens, types = [], []
for i in range(len(inv)):
    t = inv[i]
    if t in special:
        tokens.append(t); types.append(gguf.TokenType.CONTROL)
    else:
        tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
        types.append(gguf.TokenType.NORMAL)
w.add_token_type_count(cfg.get("type_vocab_size", 1))
w.add_tokenizer_model("bert")
w.add_tokenizer_pre("default")
w.add_token_list(tokens)
w.add_token_types(types)
gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w)

tmap = gguf.get_tensor_name_map(arch, n_layer)
for name, arr in load_file(str(src / "model.safetensors")).items():
    if name.startswith("bert."):
        name = name[5:]
    if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
        continue
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise SystemExit(f"cannot map tensor {name}")
    w.add_tensor(new, np.ascontiguousarray(arr.astype(np.float32)))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", out)
