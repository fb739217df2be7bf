"""Random Mixtral and DBRX checkpoints of shapes the fixtures do not have, and a float64 numpy
forward pass of each, written from Hugging Face transformers' modeling code (not from ours):
an independent reference for the shapes, head ratios and routings that acceptance checks.

Semantics followed (transformers' `modeling_mixtral.py` and `modeling_dbrx.py`):
- Mixtral: RMSNorm, q/k/v/o projections (`head_dim` from the config when given), rotary
  embeddings in the rotate-half layout, causal softmax attention with K/V heads repeated (a
  query sees the last `sliding_window` positions, itself included, when one is set),
  the LM head being the embeddings when `tie_word_embeddings` is set,
  router softmax over all experts, top-k, weights renormalised to sum 1, SwiGLU experts
  `w2(silu(w1 x) * w3 x)`.
- DBRX: LayerNorm without bias, fused Wqkv clamped to `clip_qkv`, the same rotary and
  attention, top-k weights divided by their p-norm (`moe_normalize_expert_weights`; kept as
  they are when it is null), experts
  stacked in `w1` / `v1` / `w2` of `[experts * ffn, d_model]` with `w2` used untransposed.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

VOCAB = 32000


def _normal(rng, *shape, scale=None):
    scale = 1.0 / np.sqrt(shape[-1]) if scale is None else scale
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _norm_weight(rng, n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _write(directory: Path, config: dict, tensors: dict, shards: int, tokenizer_from: Path):
    """config.json, the tokenizer files, and the tensors in `shards` safetensors files with
    their `model.safetensors.index.json`, as sharded hub checkpoints are laid out."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (directory / name).write_bytes((tokenizer_from / name).read_bytes())
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = int(sum(t.nbytes for t in tensors.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def make_mixtral(directory, tokenizer_from, *, hidden, heads, kv_heads, ffn, experts, top_k,
                 layers, head_dim=None, sliding_window=None, tied=False, seed=0, shards=3):
    rng = np.random.default_rng(seed)
    hd = head_dim or hidden // heads
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
        "num_local_experts": experts, "num_experts_per_tok": top_k, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "hidden_act": "silu", "tie_word_embeddings": tied, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32", "sliding_window": sliding_window,
    }
    if head_dim:
        config["head_dim"] = head_dim
    t = {
        # Tied, the embeddings are also the LM head: at an LM head's scale.
        "model.embed_tokens.weight": _normal(rng, VOCAB, hidden, scale=None if tied else 1.0),
        "model.norm.weight": _norm_weight(rng, hidden),
        "lm_head.weight": _normal(rng, VOCAB, hidden),
    }
    if tied:
        del t["lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm_weight(rng, hidden)
        t[p + "post_attention_layernorm.weight"] = _norm_weight(rng, hidden)
        t[p + "self_attn.q_proj.weight"] = _normal(rng, heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = _normal(rng, kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = _normal(rng, kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = _normal(rng, hidden, heads * hd)
        t[p + "block_sparse_moe.gate.weight"] = _normal(rng, experts, hidden, scale=1.0)
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = _normal(rng, ffn, hidden)
            t[q + "w3.weight"] = _normal(rng, ffn, hidden)
            t[q + "w2.weight"] = _normal(rng, hidden, ffn)
    _write(Path(directory), config, t, shards, Path(tokenizer_from))


def make_dbrx(directory, tokenizer_from, *, d_model, heads, kv_heads, ffn, experts, top_k,
              layers, clip_qkv, p_norm=1.0, seed=0, shards=2):
    rng = np.random.default_rng(seed)
    hd = d_model // heads
    config = {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": d_model,
        "n_heads": heads, "n_layers": layers, "max_seq_len": 512, "vocab_size": VOCAB,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "attn_config": {"clip_qkv": clip_qkv, "kv_n_heads": kv_heads, "rope_theta": 500000.0},
        "ffn_config": {
            "ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": ffn, "moe_num_experts": experts,
            "moe_top_k": top_k, "moe_normalize_expert_weights": p_norm,
        },
    }
    t = {
        "transformer.wte.weight": _normal(rng, VOCAB, d_model, scale=1.0),
        "transformer.norm_f.weight": _norm_weight(rng, d_model),
        "lm_head.weight": _normal(rng, VOCAB, d_model),
    }
    for i in range(layers):
        p = f"transformer.blocks.{i}."
        t[p + "norm_attn_norm.norm_1.weight"] = _norm_weight(rng, d_model)
        t[p + "norm_attn_norm.norm_2.weight"] = _norm_weight(rng, d_model)
        # Three times the usual scale, so that clip_qkv cuts a good share of the values.
        t[p + "norm_attn_norm.attn.Wqkv.weight"] = _normal(
            rng, d_model + 2 * kv_heads * hd, d_model, scale=3.0 / np.sqrt(d_model)
        )
        t[p + "norm_attn_norm.attn.out_proj.weight"] = _normal(rng, d_model, d_model)
        t[p + "ffn.router.layer.weight"] = _normal(rng, experts, d_model, scale=1.0)
        t[p + "ffn.experts.mlp.w1"] = _normal(rng, experts * ffn, d_model)
        t[p + "ffn.experts.mlp.v1"] = _normal(rng, experts * ffn, d_model)
        t[p + "ffn.experts.mlp.w2"] = _normal(rng, experts * ffn, d_model, scale=1 / np.sqrt(ffn))
    _write(Path(directory), config, t, shards, Path(tokenizer_from))


def _load(directory: Path):
    config = json.loads((directory / "config.json").read_text())
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / file)))
    return config, {k: v.astype(np.float64) for k, v in tensors.items()}


def _rope(x, theta):
    """Rotate-half rotary embeddings of `x [tokens, heads, head_dim]` at positions 0.."""
    hd = x.shape[-1]
    freqs = np.outer(np.arange(x.shape[0]), 1.0 / theta ** (np.arange(0, hd, 2) / hd))
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


def _attention(q, k, v, heads, kv_heads, head_dim, theta, window=None):
    n = q.shape[0]
    q = _rope(q.reshape(n, heads, head_dim), theta)
    k = _rope(k.reshape(n, kv_heads, head_dim), theta)
    v = v.reshape(n, kv_heads, head_dim)
    k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim)
    s = s + np.triu(np.full((n, n), -np.inf), 1)[None]
    if window:
        # transformers 5's sliding window: query i sees keys j with j > i - window.
        s = s + np.tril(np.full((n, n), -np.inf), -window)[None]
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", s, v).reshape(n, heads * head_dim)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _moe(x, router, expert, top_k, p_norm):
    logits = x @ router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        # Highest first, ties to the lower index (torch.topk on CPU).
        chosen = sorted(range(probs.shape[1]), key=lambda e: (-probs[t, e], e))[:top_k]
        w = probs[t, chosen]
        if p_norm is not None:
            w = w / (np.abs(w) ** p_norm).sum() ** (1.0 / p_norm)
        for e, we in zip(chosen, w):
            out[t] += we * expert(e, x[t:t + 1])[0]
    return out


def logits(directory, ids):
    """`[len(ids), vocab]` logits of the checkpoint in `directory` for the token ids `ids`."""
    config, t = _load(Path(directory))
    ids = np.asarray(ids)
    if config["model_type"] == "mixtral":
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        hd = config.get("head_dim") or config["hidden_size"] // heads

        def norm(x, w):
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + config["rms_norm_eps"]) * w

        x = t["model.embed_tokens.weight"][ids]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = norm(x, t[p + "input_layernorm.weight"])
            a = p + "self_attn."
            att = _attention(h @ t[a + "q_proj.weight"].T, h @ t[a + "k_proj.weight"].T,
                             h @ t[a + "v_proj.weight"].T, heads, kv, hd, config["rope_theta"],
                             config.get("sliding_window"))
            x = x + att @ t[a + "o_proj.weight"].T
            h = norm(x, t[p + "post_attention_layernorm.weight"])
            m = p + "block_sparse_moe."

            def expert(e, y, m=m):
                w = lambda n: t[m + f"experts.{e}.{n}.weight"]  # noqa: E731
                return (_silu(y @ w("w1").T) * (y @ w("w3").T)) @ w("w2").T

            x = x + _moe(h, t[m + "gate.weight"], expert, config["num_experts_per_tok"], 1.0)
        x = norm(x, t["model.norm.weight"])
        if config.get("tie_word_embeddings"):
            return x @ t["model.embed_tokens.weight"].T
    else:
        a, f = config["attn_config"], config["ffn_config"]
        dm, heads, kv = config["d_model"], config["n_heads"], a["kv_n_heads"]
        hd, ffn = dm // heads, f["ffn_hidden_size"]

        def norm(x, w):
            return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w

        x = t["transformer.wte.weight"][ids]
        for i in range(config["n_layers"]):
            p = f"transformer.blocks.{i}."
            h = norm(x, t[p + "norm_attn_norm.norm_1.weight"])
            qkv = h @ t[p + "norm_attn_norm.attn.Wqkv.weight"].T
            if a.get("clip_qkv"):
                qkv = np.clip(qkv, -a["clip_qkv"], a["clip_qkv"])
            att = _attention(qkv[:, :dm], qkv[:, dm:dm + kv * hd], qkv[:, dm + kv * hd:],
                             heads, kv, hd, a["rope_theta"])
            x = x + att @ t[p + "norm_attn_norm.attn.out_proj.weight"].T
            h = norm(x, t[p + "norm_attn_norm.norm_2.weight"])
            w1, v1, w2 = (t[p + f"ffn.experts.mlp.{n}"] for n in ("w1", "v1", "w2"))

            def expert(e, y, w1=w1, v1=v1, w2=w2):
                s = slice(e * ffn, (e + 1) * ffn)
                return (_silu(y @ w1[s].T) * (y @ v1[s].T)) @ w2[s]

            x = x + _moe(h, t[p + "ffn.router.layer.weight"], expert, f["moe_top_k"],
                         f.get("moe_normalize_expert_weights"))
        x = norm(x, t["transformer.norm_f.weight"])
    return x @ t["lm_head.weight"].T


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

