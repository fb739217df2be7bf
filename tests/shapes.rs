//! Shapes and routings the shipped checkpoints do not have (MHA, MQA, explicit `head_dim`,
//! top-1 / top-3 routing, strong `clip_qkv`), proven by exact equivalences: each test builds
//! modified copies of the verified tiny checkpoints that must compute the same function (or a
//! predictably different one) and loads them through the public API, in f32.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use mixserve::config::MoeConfig;
use mixserve::loader::{self, WeightSource};
use mixserve::model::{Batch, MoeModel};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tempfile::TempDir;

type Tensors = HashMap<String, Tensor>;

/// Both tiny checkpoints: 4 heads of 16 dims (hidden 64), 2 KV heads.
const HEADS: usize = 4;
const HEAD_DIM: usize = 16;
/// Equivalences with the same arithmetic per logit, in differently shaped tensors.
const TOL: f32 = 1e-5;
/// Equivalences that hold in exact arithmetic but round differently (summation order, a
/// sqrt(2) folded into weights, softmax weights renormalised to ~1), and chunked or batched vs
/// single-pass prefill as in parity.rs. For scale: rounding q_proj's weights by one ulp already
/// moves these checkpoints' logits (|logit| <= ~10) by up to 2.7e-5.
const ROUNDING: f32 = 1e-4;
/// "These logits really differ": far above any rounding noise.
const DIFFERENT: f32 = 1e-3;

// ---------------------------------------------------------------------------------------------
// Building and loading variants.

fn read_config(name: &str) -> Value {
    let text = std::fs::read_to_string(model_dir(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of `models/<name>`'s small files with an edited `config.json`.
fn scratch(name: &str, edit_config: impl Fn(&mut Value)) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(model_dir(name).join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg = read_config(name);
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}

/// `models/<name>` with its config and tensors edited, in a temp dir.
fn variant(
    name: &str,
    edit_config: impl Fn(&mut Value),
    edit_tensors: impl Fn(&mut Tensors),
) -> TempDir {
    let dir = scratch(name, edit_config);
    let mut tensors: Tensors =
        candle_core::safetensors::load(model_dir(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// `models/<name>` with only `config.json` edited (the weights file copied as is).
fn config_variant(name: &str, edit_config: impl Fn(&mut Value)) -> TempDir {
    let dir = scratch(name, edit_config);
    std::fs::copy(
        model_dir(name).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    dir
}

/// Loads the model in `dir` the way the CLI does, in f32, with an optional
/// `--experts-per-token` override.
fn try_load(dir: &Path, top_k: Option<usize>) -> Result<MoeModel, String> {
    let files = loader::from_dir(dir).map_err(|e| e.to_string())?;
    let mut cfg = MoeConfig::from_file(&files.config).map_err(|e| e.to_string())?;
    if let Some(k) = top_k {
        cfg = cfg.with_experts_per_token(k).map_err(|e| e.to_string())?;
    }
    let w =
        WeightSource::open(&files.weights, &Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
    MoeModel::load(&cfg, &w).map_err(|e| e.to_string())
}

fn load(dir: &Path, top_k: Option<usize>) -> MoeModel {
    try_load(dir, top_k).unwrap()
}

/// The shipped checkpoint itself, with an optional top-k override.
fn original(name: &str, top_k: Option<usize>) -> MoeModel {
    load(&model_dir(name), top_k)
}

fn set_kv_heads(cfg: &mut Value, n: usize) {
    match cfg.get_mut("attn_config") {
        Some(attn) => attn["kv_n_heads"] = json!(n),
        None => cfg["num_key_value_heads"] = json!(n),
    }
}

/// `cfg[section][key] = value` (DBRX keeps its attention and FFN settings in sub-objects).
fn set_nested(cfg: &mut Value, section: &str, key: &str, value: Value) {
    cfg[section][key] = value;
}

// ---------------------------------------------------------------------------------------------
// Tensor edits.

/// Builds a `[map.len(), cols]` tensor whose row `r` is `w`'s row `map[r]`, or zeros for `None`.
fn gather_rows(w: &Tensor, map: &[Option<usize>]) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let zero = Tensor::zeros((1, cols), w.dtype(), w.device()).unwrap();
    let extended = Tensor::cat(&[w, &zero], 0).unwrap();
    let idx: Vec<u32> = map.iter().map(|r| r.unwrap_or(rows) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), w.device()).unwrap();
    extended.index_select(&idx, 0).unwrap()
}

/// The rows of the listed heads (`HEAD_DIM` rows each), stacked in that order.
fn pick_heads(w: &Tensor, heads: &[usize]) -> Tensor {
    let map: Vec<Option<usize>> = heads
        .iter()
        .flat_map(|&h| (0..HEAD_DIM).map(move |d| Some(h * HEAD_DIM + d)))
        .collect();
    gather_rows(w, &map)
}

/// Every layer's K and V projections replaced by the rows of the listed original KV heads
/// (Mixtral's `k_proj`/`v_proj`; the K and V parts of DBRX's fused `[q | k | v]` `Wqkv`).
fn remap_kv_heads(t: &mut Tensors, heads: &[usize]) {
    let mut edited = 0;
    for (name, w) in t.iter_mut() {
        if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.v_proj.weight") {
            *w = pick_heads(w, heads);
            edited += 1;
        } else if name.ends_with("attn.Wqkv.weight") {
            let q_dim = HEADS * HEAD_DIM;
            let kv_dim = (w.dim(0).unwrap() - q_dim) / 2;
            let q = w.narrow(0, 0, q_dim).unwrap();
            let k = pick_heads(&w.narrow(0, q_dim, kv_dim).unwrap(), heads);
            let v = pick_heads(&w.narrow(0, q_dim + kv_dim, kv_dim).unwrap(), heads);
            *w = Tensor::cat(&[q, k, v], 0).unwrap();
            edited += 2;
        }
    }
    assert_eq!(edited, 4, "2 layers, K and V each");
}

/// Every layer's expert `e` replaced by original expert `src(e)`; with `permute_router` the
/// router's rows move with them (Mixtral's per-expert tensors; DBRX's fused
/// `[experts * ffn, hidden]` `w1`/`v1`/`w2`, sliced per expert).
fn remap_experts(t: &mut Tensors, src: impl Fn(usize) -> usize, permute_router: bool) {
    let src = &src;
    let old = t.clone();
    let mut edited = 0;
    for (name, w) in t.iter_mut() {
        let is_router = name.ends_with("block_sparse_moe.gate.weight")
            || name.ends_with("ffn.router.layer.weight");
        if is_router && permute_router {
            let map: Vec<Option<usize>> = (0..w.dim(0).unwrap()).map(|e| Some(src(e))).collect();
            *w = gather_rows(w, &map);
            edited += 1;
        }
        let Some((prefix, rest)) = name.split_once(".experts.") else {
            continue;
        };
        let (head, tail) = rest.split_once('.').unwrap();
        if let Ok(e) = head.parse::<usize>() {
            // Mixtral: `{prefix}.experts.{e}.w1.weight`.
            *w = old[&format!("{prefix}.experts.{}.{tail}", src(e))].clone();
        } else {
            // DBRX: `{prefix}.experts.mlp.w1` with the router at `{prefix}.router.layer.weight`.
            let ne = old[&format!("{prefix}.router.layer.weight")]
                .dim(0)
                .unwrap();
            let ffn = w.dim(0).unwrap() / ne;
            let map: Vec<Option<usize>> = (0..ne)
                .flat_map(|e| (0..ffn).map(move |r| Some(src(e) * ffn + r)))
                .collect();
            *w = gather_rows(w, &map);
        }
        edited += 1;
    }
    assert!(edited >= 6, "no experts found to remap");
}

/// Row layout of a head_dim-32 Q or K projection equivalent to a head_dim-16 one under NeoX
/// rotary embeddings: rotary pairs dims (i, i + hd/2) at frequency theta^(-2i/hd), so original
/// dim j of the first half goes to 2j and dim 8 + j to 16 + 2j (same pairs, same frequencies);
/// odd dims are zero and stay zero when rotated.
fn rope_padded_map(heads: usize) -> Vec<Option<usize>> {
    (0..heads * 2 * HEAD_DIM)
        .map(|r| {
            let (h, d) = (r / (2 * HEAD_DIM), r % (2 * HEAD_DIM));
            let (half, i) = (d / HEAD_DIM, d % HEAD_DIM);
            (i % 2 == 0).then_some(h * HEAD_DIM + half * HEAD_DIM / 2 + i / 2)
        })
        .collect()
}

/// Row layout of a head_dim-32 V projection (and o_proj column layout): each head's 16 dims
/// first, then 16 zeros.
fn zero_padded_map(heads: usize) -> Vec<Option<usize>> {
    (0..heads * 2 * HEAD_DIM)
        .map(|r| {
            let (h, d) = (r / (2 * HEAD_DIM), r % (2 * HEAD_DIM));
            (d < HEAD_DIM).then_some(h * HEAD_DIM + d)
        })
        .collect()
}

/// tiny-mixtral rewritten with head_dim 32 computing the same function: Q/K padded as in
/// [`rope_padded_map`], V and o_proj zero-padded, and Q scaled by sqrt(2) so that
/// `q.k / sqrt(32)` equals the original `q.k / sqrt(16)`.
fn pad_head_dim_to_32(t: &mut Tensors) {
    let mut edited = 0;
    for (name, w) in t.iter_mut() {
        let f32w = w.to_dtype(DType::F32).unwrap();
        if name.ends_with("q_proj.weight") {
            *w = (gather_rows(&f32w, &rope_padded_map(HEADS)) * 2f64.sqrt()).unwrap();
        } else if name.ends_with("k_proj.weight") {
            *w = gather_rows(&f32w, &rope_padded_map(HEADS / 2));
        } else if name.ends_with("v_proj.weight") {
            *w = gather_rows(&f32w, &zero_padded_map(HEADS / 2));
        } else if name.ends_with("o_proj.weight") {
            let cols = gather_rows(&f32w.t().unwrap(), &zero_padded_map(HEADS));
            *w = cols.t().unwrap().contiguous().unwrap();
        } else {
            continue;
        }
        edited += 1;
    }
    assert_eq!(edited, 8);
}

// ---------------------------------------------------------------------------------------------
// Running models.

fn prompt(name: &str, i: usize) -> Vec<u32> {
    reference(name)[i].input_ids.clone()
}

/// The ~109-token and the 481-token reference prompts.
fn long_prompts(name: &str) -> Vec<Vec<u32>> {
    let refs = reference(name);
    vec![refs[3].input_ids.clone(), refs[4].input_ids.clone()]
}

/// Single-pass prefill of `ids`: logits for every row.
fn logits(model: &MoeModel, ids: &[u32]) -> Tensor {
    let mut blocks = Blocks::new(model, ids.len().div_ceil(16));
    let table = blocks.table(ids.len());
    let rows: Vec<usize> = (0..ids.len()).collect();
    prefill(model, &blocks.cache, ids, &table, &rows)
}

/// Prefill, then greedy tokens decoded one at a time through the paged KV cache: the tokens and
/// the logits rows they were picked from (`[steps, vocab]`, the last prefill row first).
fn greedy(model: &MoeModel, ids: &[u32], steps: usize) -> (Vec<u32>, Tensor) {
    let mut blocks = Blocks::new(model, (ids.len() + steps).div_ceil(16));
    let table = blocks.table(ids.len() + steps);
    let mut rows = vec![prefill(model, &blocks.cache, ids, &table, &[ids.len() - 1])];
    let mut tokens = Vec::new();
    for step in 0..steps {
        let next = argmax(&rows[step].get(0).unwrap());
        tokens.push(next);
        if step + 1 < steps {
            rows.push(decode(
                model,
                &blocks.cache,
                next,
                ids.len() + step + 1,
                &table,
            ));
        }
    }
    (tokens, Tensor::cat(&rows, 0).unwrap())
}

/// Max difference between single-pass prefill and prefill in chunks cut at `cuts`.
fn chunked_vs_single(model: &MoeModel, ids: &[u32], cuts: &[usize]) -> f32 {
    let whole = logits(model, ids);
    let mut blocks = Blocks::new(model, ids.len().div_ceil(16));
    let table = blocks.table(ids.len());
    let bounds: Vec<usize> = [0]
        .iter()
        .chain(cuts)
        .chain([ids.len()].iter())
        .copied()
        .collect();
    let mut parts = Vec::new();
    for w in bounds.windows(2) {
        let mut batch = Batch::default();
        batch.push_seq(&ids[w[0]..w[1]], w[1], table.clone());
        batch.logits_rows = (0..w[1] - w[0]).collect();
        parts.push(model.forward(&batch, &blocks.cache).unwrap());
    }
    max_abs_diff(&whole, &Tensor::cat(&parts, 0).unwrap())
}

/// Max difference between the five reference prompts' logits (every row) batched in one
/// forward pass and each prefilled alone.
fn batched_vs_alone(model: &MoeModel, name: &str) -> f32 {
    let prompts: Vec<Vec<u32>> = reference(name).into_iter().map(|p| p.input_ids).collect();
    let total: usize = prompts.iter().map(|p| p.len().div_ceil(16)).sum();
    let mut blocks = Blocks::new(model, total);
    let mut batch = Batch::default();
    for ids in &prompts {
        let rows = batch.push_seq(ids, ids.len(), blocks.table(ids.len()));
        batch.logits_rows.extend(rows);
    }
    let together = model.forward(&batch, &blocks.cache).unwrap();
    let mut offset = 0;
    let mut worst = 0f32;
    for ids in &prompts {
        let alone = logits(model, ids);
        let diff = max_abs_diff(&alone, &together.narrow(0, offset, ids.len()).unwrap());
        worst = worst.max(diff);
        offset += ids.len();
    }
    worst
}

fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite())
}

/// `a` and `b` give the same logits (every row of the long prompts) within `tol`.
fn assert_same_logits(a: &MoeModel, b: &MoeModel, prompts: &[Vec<u32>], tol: f32, what: &str) {
    for (i, ids) in prompts.iter().enumerate() {
        let diff = max_abs_diff(&logits(a, ids), &logits(b, ids));
        assert!(diff <= tol, "{what}, prompt {i}: logits differ by {diff}");
    }
}

/// `a` and `b` give logits that differ by far more than rounding on `ids`.
fn assert_different_logits(a: &MoeModel, b: &MoeModel, ids: &[u32], what: &str) {
    let diff = max_abs_diff(&logits(a, ids), &logits(b, ids));
    assert!(
        diff > DIFFERENT,
        "{what}: logits should differ, max diff {diff}"
    );
}

/// Greedy decoding through the KV cache: same tokens, same logits rows (single-token steps run
/// differently shaped matrix products, hence rounding-level agreement).
fn assert_same_greedy(a: &MoeModel, b: &MoeModel, ids: &[u32], steps: usize, what: &str) {
    let (ta, la) = greedy(a, ids, steps);
    let (tb, lb) = greedy(b, ids, steps);
    assert_eq!(ta, tb, "{what}: greedy tokens");
    let diff = max_abs_diff(&la, &lb);
    assert!(diff <= ROUNDING, "{what}: decode logits differ by {diff}");
}

// ---------------------------------------------------------------------------------------------
// 1. MHA: every query head gets its own copy of the KV head it shares under GQA.

#[test]
fn mha_with_duplicated_kv_heads_equals_gqa() {
    for name in FAMILIES {
        // Query head h uses KV head h / (heads / kv_heads) = h / 2.
        let dir = variant(
            name,
            |c| set_kv_heads(c, 4),
            |t| remap_kv_heads(t, &[0, 0, 1, 1]),
        );
        let mha = load(dir.path(), None);
        assert_eq!(mha.config().num_kv_heads, 4);
        let gqa = original(name, None);
        let what = format!("{name}: MHA vs GQA");
        assert_same_logits(&mha, &gqa, &long_prompts(name), TOL, &what);
        assert_same_greedy(&mha, &gqa, &prompt(name, 3), 6, &what);
    }
}

// 2. MQA: one KV head equals two identical KV heads.

#[test]
fn mqa_equals_gqa_with_identical_kv_heads() {
    for name in FAMILIES {
        let shared = variant(name, |_| {}, |t| remap_kv_heads(t, &[0, 0]));
        let shared = load(shared.path(), None);
        let mqa = variant(name, |c| set_kv_heads(c, 1), |t| remap_kv_heads(t, &[0]));
        let mqa = load(mqa.path(), None);
        assert_eq!(mqa.config().num_kv_heads, 1);
        let prompts = long_prompts(name);
        // KV head 1 matters, so the edit is not a no-op.
        assert_different_logits(&shared, &original(name, None), &prompts[0], name);
        let what = format!("{name}: MQA vs two identical KV heads");
        assert_same_logits(&mqa, &shared, &prompts, TOL, &what);
        for ids in &prompts {
            assert_same_greedy(&mqa, &shared, ids, 6, &what);
        }
    }
}

// 3. Explicit head_dim.

#[test]
fn explicit_default_head_dim_changes_nothing() {
    let dir = config_variant("tiny-mixtral", |c| c["head_dim"] = json!(16));
    let explicit = load(dir.path(), None);
    assert_eq!(explicit.config().head_dim, 16);
    let ids = prompt("tiny-mixtral", 3);
    let diff = max_abs_diff(
        &logits(&explicit, &ids),
        &logits(&original("tiny-mixtral", None), &ids),
    );
    assert_eq!(diff, 0.0, "same config, same weights: identical logits");
}

/// head_dim 32 with 4 heads on hidden 64 (q_dim 128 != hidden): the padded checkpoint computes
/// the original function, decodes the same tokens, and chunked prefill equals single pass.
#[test]
fn head_dim_32_with_padded_heads_equals_original() {
    let dir = variant(
        "tiny-mixtral",
        |c| c["head_dim"] = json!(32),
        pad_head_dim_to_32,
    );
    let wide = load(dir.path(), None);
    assert_eq!(wide.config().head_dim, 32);
    assert_eq!(wide.config().q_dim(), 128);
    let orig = original("tiny-mixtral", None);
    let prompts = long_prompts("tiny-mixtral");
    assert_same_logits(&wide, &orig, &prompts, ROUNDING, "head_dim 32 vs 16");
    assert_same_greedy(&wide, &orig, &prompts[1], 6, "head_dim 32 vs 16");
    let diff = chunked_vs_single(&wide, &prompts[1], &[100, 317]);
    assert!(
        diff <= ROUNDING,
        "head_dim 32: chunked prefill differs by {diff}"
    );
}

#[test]
fn weights_that_disagree_with_the_config_are_named() {
    assert_load_error_names(
        "tiny-mixtral",
        |c| c["head_dim"] = json!(32),
        "model.layers.0.self_attn.q_proj.weight",
        "has shape [64, 64], expected [128, 64]",
    );
    assert_load_error_names(
        "tiny-mixtral",
        |c| set_kv_heads(c, 1),
        "model.layers.0.self_attn.k_proj.weight",
        "has shape [32, 64], expected [16, 64]",
    );
    assert_load_error_names(
        "tiny-dbrx",
        |c| set_kv_heads(c, 4),
        "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight",
        "has shape [128, 64], expected [192, 64]",
    );
}

/// Loading `models/<name>`'s weights under an edited config fails with an error that names
/// `tensor` and says `shapes` (found vs expected).
fn assert_load_error_names(
    name: &str,
    edit_config: impl Fn(&mut Value),
    tensor: &str,
    shapes: &str,
) {
    let dir = config_variant(name, edit_config);
    match try_load(dir.path(), None) {
        Ok(_) => panic!("{name}: {tensor} disagrees with the config but loaded"),
        Err(err) => assert!(
            err.contains(tensor) && err.contains(shapes),
            "{name}: {err:?} should name {tensor} and say {shapes:?}"
        ),
    }
}

// 4. Routing: top-1, top-3, all experts.

fn num_experts(name: &str) -> usize {
    original(name, None).config().num_experts
}

/// All five reference prompts in one batch equal each alone, at top-1 and top-3.
#[test]
fn batching_invariance_at_top1_and_top3() {
    for name in FAMILIES {
        for k in [1, 3] {
            let model = original(name, Some(k));
            assert_eq!(model.config().experts_per_token, k);
            let diff = batched_vs_alone(&model, name);
            assert!(
                diff <= ROUNDING,
                "{name} top-{k}: batched logits differ by {diff}"
            );
        }
    }
}

/// With every expert a copy of expert 0 and weights renormalised to sum 1 (Mixtral; DBRX's
/// default p = 1), the MoE block is that one expert whatever the router picks: top-1, top-3 and
/// all experts give the checkpoint's own top-k logits. The real experts give different ones.
#[test]
fn identical_experts_make_top_k_irrelevant() {
    for name in FAMILIES {
        let ids = prompt(name, 3);
        let dir = variant(name, |_| {}, |t| remap_experts(t, |_| 0, false));
        let reference_k = load(dir.path(), None);
        for k in [1, 3, num_experts(name)] {
            let what = format!("{name}: identical experts, top-{k}");
            assert_same_logits(
                &load(dir.path(), Some(k)),
                &reference_k,
                std::slice::from_ref(&ids),
                ROUNDING,
                &what,
            );
        }
        assert_different_logits(
            &original(name, Some(1)),
            &original(name, Some(3)),
            &ids,
            &format!("{name}: real experts, top-1 vs top-3"),
        );
    }
}

/// Reversing the experts together with the router's rows changes nothing (each token still
/// reaches the same experts with the same weights); reversing the experts alone does.
#[test]
fn permuting_experts_with_their_router_rows_changes_nothing() {
    for name in FAMILIES {
        let ne = num_experts(name);
        let ids = prompt(name, 3);
        let both = variant(name, |_| {}, |t| remap_experts(t, |e| ne - 1 - e, true));
        let experts_only = variant(name, |_| {}, |t| remap_experts(t, |e| ne - 1 - e, false));
        for k in [1, 3] {
            let orig = original(name, Some(k));
            let what = format!("{name}: permuted experts, top-{k}");
            assert_same_logits(
                &load(both.path(), Some(k)),
                &orig,
                std::slice::from_ref(&ids),
                ROUNDING,
                &what,
            );
            assert_different_logits(&load(experts_only.path(), Some(k)), &orig, &ids, &what);
        }
    }
}

/// Top-k = every expert: runs, finite, deterministic, and differs from the default top-k.
/// For DBRX, normalising all the softmax weights by their sum (p = 1) is the softmax itself, so
/// it equals no normalisation (`null`).
#[test]
fn all_experts_routing() {
    for name in FAMILIES {
        let ne = num_experts(name);
        let ids = prompt(name, 3);
        let all = original(name, Some(ne));
        let (a, b) = (logits(&all, &ids), logits(&all, &ids));
        assert!(all_finite(&a), "{name} top-{ne}: non-finite logits");
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "{name} top-{ne}: not deterministic"
        );
        assert_different_logits(&all, &original(name, None), &ids, name);
    }
    let null = config_variant("tiny-dbrx", |c| {
        set_nested(c, "ffn_config", "moe_normalize_expert_weights", Value::Null)
    });
    assert_same_logits(
        &load(null.path(), Some(16)),
        &original("tiny-dbrx", Some(16)),
        &long_prompts("tiny-dbrx"),
        ROUNDING,
        "dbrx top-16: p = 1 vs no normalisation",
    );
}

/// DBRX's `moe_normalize_expert_weights` p-norm: p = 2 and `null` change the default top-4
/// logits; at top-1 every p-norm maps the single weight to 1, so p = 1 and p = 2 agree while
/// `null` (the raw softmax probability) does not.
#[test]
fn dbrx_expert_weight_normalisation() {
    let with_p = |p: Value| {
        config_variant("tiny-dbrx", move |c| {
            set_nested(c, "ffn_config", "moe_normalize_expert_weights", p.clone())
        })
    };
    let (p2, null) = (with_p(json!(2.0)), with_p(Value::Null));
    let ids = prompt("tiny-dbrx", 3);

    let p1 = original("tiny-dbrx", None);
    assert_different_logits(&load(p2.path(), None), &p1, &ids, "top-4: p = 2 vs p = 1");
    assert_different_logits(&load(null.path(), None), &p1, &ids, "top-4: null vs p = 1");
    assert_different_logits(
        &load(null.path(), None),
        &load(p2.path(), None),
        &ids,
        "top-4: null vs p = 2",
    );

    let p1 = original("tiny-dbrx", Some(1));
    assert_same_logits(
        &load(p2.path(), Some(1)),
        &p1,
        std::slice::from_ref(&ids),
        ROUNDING,
        "top-1: p = 2 vs p = 1",
    );
    assert_different_logits(
        &load(null.path(), Some(1)),
        &p1,
        &ids,
        "top-1: null vs p = 1",
    );
}

// 5. clip_qkv.

fn with_clip(clip: Value) -> TempDir {
    config_variant("tiny-dbrx", move |c| {
        set_nested(c, "attn_config", "clip_qkv", clip.clone())
    })
}

/// A clip that binds on most of Q, K and V: a different function from clip 8, but finite,
/// deterministic, and the same whether the prompt is prefilled at once, in chunks, or decoded.
#[test]
fn strong_clip_qkv_is_consistent() {
    let dir = with_clip(json!(0.05));
    let clipped = load(dir.path(), None);
    assert_eq!(clipped.config().clip_qkv, Some(0.05));
    let prompts = long_prompts("tiny-dbrx");
    let ids = &prompts[1];
    assert_different_logits(
        &clipped,
        &original("tiny-dbrx", None),
        ids,
        "clip 0.05 vs 8",
    );

    let (a, b) = (logits(&clipped, ids), logits(&clipped, ids));
    assert!(all_finite(&a), "clip 0.05: non-finite logits");
    assert_eq!(max_abs_diff(&a, &b), 0.0, "clip 0.05: not deterministic");

    let diff = chunked_vs_single(&clipped, ids, &[100, 317]);
    assert!(
        diff <= ROUNDING,
        "clip 0.05: chunked prefill differs by {diff}"
    );

    // Decoding through the cache equals prefilling the prompt plus the decoded tokens.
    let steps = 6;
    let (tokens, decoded) = greedy(&clipped, &prompts[0], steps);
    let mut extended = prompts[0].clone();
    extended.extend(&tokens[..steps - 1]);
    let full = logits(&clipped, &extended);
    let start = prompts[0].len() - 1;
    let diff = max_abs_diff(&decoded, &full.narrow(0, start, steps).unwrap());
    assert!(
        diff <= ROUNDING,
        "clip 0.05: decode vs prefill differ by {diff}"
    );
}

/// No clip and a clip no value reaches are the same computation.
#[test]
fn clip_qkv_null_equals_huge_clip() {
    let (none, huge) = (with_clip(Value::Null), with_clip(json!(1e9)));
    let (none, huge) = (load(none.path(), None), load(huge.path(), None));
    assert_eq!(none.config().clip_qkv, None);
    assert_same_logits(
        &none,
        &huge,
        &long_prompts("tiny-dbrx"),
        0.0,
        "clip null vs 1e9",
    );
}

const WQKV: &str = "attn.Wqkv.weight";

/// Every layer's rows `rows` of the tensors named `*suffix` multiplied by `factor` (stored f32).
fn scale_rows(t: &mut Tensors, suffix: &str, rows: std::ops::Range<usize>, factor: f64) {
    let mut edited = 0;
    for (name, w) in t.iter_mut().filter(|(n, _)| n.ends_with(suffix)) {
        let n = w.dim(0).unwrap();
        let scale: Vec<f32> = (0..n)
            .map(|r| {
                if rows.contains(&r) {
                    factor as f32
                } else {
                    1.0
                }
            })
            .collect();
        let scale = Tensor::from_vec(scale, (n, 1), w.device()).unwrap();
        *w = w
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap();
        edited += 1;
        assert!(rows.end <= n, "{name}");
    }
    assert_eq!(edited, 2, "{suffix}: one per layer");
}

/// The clamp acts on each of Q, K and V. One part's rows of `Wqkv` are scaled by 2^40, so all
/// its values saturate at +-clip; doubling the clip (8 -> 16) then doubles exactly that part,
/// and halving its partner (K for Q, Q for K, out_proj for V) makes the model the same function
/// again, bit for bit. Clip 8 binds nowhere else (on the shipped checkpoint it equals no clip,
/// so the parity tests never exercise the clamp). Without the compensation the two differ,
/// which also proves the clamp is applied to that part at all.
#[test]
fn clip_qkv_saturates_each_of_q_k_v() {
    let prompts = long_prompts("tiny-dbrx");
    let unclipped = load(with_clip(Value::Null).path(), None);
    assert_same_logits(
        &original("tiny-dbrx", None),
        &unclipped,
        &prompts,
        0.0,
        "clip 8 vs none on the shipped checkpoint",
    );
    // Wqkv rows: [q (4 heads x 16) | k (2 x 16) | v (2 x 16)]; out_proj is [64, 64].
    let (q, k, v) = (0..64, 64..96, 96..128);
    let cases = [
        ("q", q.clone(), ("k", WQKV, k.clone())),
        ("k", k, ("q", WQKV, q)),
        ("v", v, ("out_proj", "attn.out_proj.weight", 0..64)),
    ];
    let huge = 2f64.powi(40);
    for (part, rows, (partner, partner_tensor, partner_rows)) in cases {
        let saturate = |t: &mut Tensors| scale_rows(t, WQKV, rows.clone(), huge);
        let clip =
            |c: f64| move |cfg: &mut Value| set_nested(cfg, "attn_config", "clip_qkv", json!(c));
        let at_8 = load(variant("tiny-dbrx", clip(8.0), saturate).path(), None);
        let at_16 = load(
            variant("tiny-dbrx", clip(16.0), |t| {
                saturate(t);
                scale_rows(t, partner_tensor, partner_rows.clone(), 0.5);
            })
            .path(),
            None,
        );
        let what = format!("{part} saturated: clip 8 vs clip 16 with {partner} halved");
        assert_same_logits(&at_8, &at_16, &prompts, TOL, &what);
        let at_16_alone = load(variant("tiny-dbrx", clip(16.0), saturate).path(), None);
        let what = format!("{part} saturated: clip 8 vs clip 16");
        assert_different_logits(&at_8, &at_16_alone, &prompts[0], &what);
    }
}
