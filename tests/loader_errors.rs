//! Loading checkpoints: sharded files, and clear errors (never panics) for broken ones.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use mixserve::config::MoeConfig;
use mixserve::loader::{self, WeightSource};
use mixserve::model::MoeModel;
use std::collections::HashMap;
use std::path::Path;

/// A copy of tiny-mixtral's small files in a temp dir (weights are written by each test).
fn scratch_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(model_dir("tiny-mixtral").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        model_dir("tiny-mixtral").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Loads the model in `dir` the way the CLI does; returns the error text.
fn load_error(dir: &Path) -> String {
    let files = match loader::from_dir(dir) {
        Ok(f) => f,
        Err(e) => return e.to_string(),
    };
    let cfg = MoeConfig::from_file(&files.config).unwrap();
    match WeightSource::open(&files.weights, &Device::Cpu, DType::F32) {
        Err(e) => e.to_string(),
        Ok(w) => match MoeModel::load(&cfg, &w) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("loading {} should fail", dir.display()),
        },
    }
}

fn write_shards(dir: &Path, all: &HashMap<String, Tensor>) {
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let shard_name = |i| format!("model-0000{i}-of-00002.safetensors");
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(shard_name(i + 1))).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), shard_name(i + 1).into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_loads_and_matches_single_file() {
    let dir = scratch_model();
    write_shards(dir.path(), &tensors());
    let files = loader::from_dir(dir.path()).unwrap();
    assert_eq!(files.weights.len(), 2);
    let cfg = MoeConfig::from_file(&files.config).unwrap();
    let w = WeightSource::open(&files.weights, &Device::Cpu, DType::F32).unwrap();
    let sharded = MoeModel::load(&cfg, &w).unwrap();
    let single = load_model("tiny-mixtral", DType::F32);
    let ids = &reference("tiny-mixtral")[1].input_ids;
    let rows: Vec<usize> = (0..ids.len()).collect();
    let mut a = Blocks::new(&sharded, 4);
    let mut b = Blocks::new(&single, 4);
    let (ta, tb) = (a.table(ids.len()), b.table(ids.len()));
    let la = prefill(&sharded, &a.cache, ids, &ta, &rows);
    let lb = prefill(&single, &b.cache, ids, &tb, &rows);
    assert_eq!(max_abs_diff(&la, &lb), 0.0);
}

#[test]
fn missing_shard_is_named() {
    let dir = scratch_model();
    write_shards(dir.path(), &tensors());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn truncated_file_is_named() {
    let dir = scratch_model();
    let bytes = std::fs::read(model_dir("tiny-mixtral").join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A header that is not even there.
    std::fs::write(dir.path().join("model.safetensors"), b"\x05\x00").unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let dir = scratch_model();
    let mut all = tensors();
    let name = "model.layers.1.self_attn.k_proj.weight";
    all.insert(
        name.into(),
        Tensor::zeros((16, 64), DType::BF16, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&all, dir.path().join("model.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(name) && err.contains("[16, 64]") && err.contains("[32, 64]"),
        "{err}"
    );

    let mut all = tensors();
    let name = "model.layers.0.block_sparse_moe.experts.3.w2.weight";
    all.remove(name);
    candle_core::safetensors::save(&all, dir.path().join("model.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(name) && err.contains("missing"), "{err}");
}

#[test]
fn config_that_disagrees_with_weights_is_an_error() {
    let dir = scratch_model();
    std::fs::copy(
        model_dir("tiny-mixtral").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_local_experts"] = 9.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("gate.weight") && err.contains("[9, 64]"),
        "{err}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = scratch_model();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
}
