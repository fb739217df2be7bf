//! Memory-mapped safetensors, single file or sharded, handed to the model tensor by tensor.
//!
//! Each tensor is converted straight from the mapped bytes to the compute dtype on the target
//! device, so the checkpoint is never held twice. Errors name the file and the tensor.

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot open weight file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("weight file {path} is truncated or corrupt: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("tensor {name} is missing from the checkpoint (searched {files})")]
    Missing { name: String, files: String },
    #[error("tensor {name} in {path} has shape {found:?}, expected {expected:?} from config.json")]
    Shape {
        name: String,
        path: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} in {path} has unsupported dtype {dtype}")]
    Dtype {
        name: String,
        path: String,
        dtype: String,
    },
    #[error("tensor {name} in {path}: {source}")]
    Candle {
        name: String,
        path: String,
        source: Box<candle_core::Error>,
    },
}

struct TensorInfo {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the shard's mapping.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// All tensors of a checkpoint, mapped, converted on demand to `dtype` on `device`.
pub struct WeightSource {
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    device: Device,
    dtype: DType,
    progress: ProgressBar,
}

impl WeightSource {
    /// Maps every file and reads their headers; a missing, truncated or corrupt file fails here.
    pub fn open(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self, WeightError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        let mut total_bytes = 0u64;
        for (idx, path) in files.iter().enumerate() {
            let p = path.display().to_string();
            let file = File::open(path).map_err(|source| WeightError::Open {
                path: p.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only; a checkpoint modified while serving is
            // outside what any engine can defend against (candle and vLLM map the same way).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| WeightError::Open {
                path: p.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| WeightError::Corrupt {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let dtype = match view.dtype() {
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    StDtype::F32 => DType::F32,
                    other => {
                        return Err(WeightError::Dtype {
                            name,
                            path: p,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                total_bytes += data.len() as u64;
                tensors.insert(
                    name,
                    TensorInfo {
                        shard: idx,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
            });
        }
        let progress = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_bytes);
            if let Ok(style) = ProgressStyle::with_template(
                "loading weights {bar:40} {bytes}/{total_bytes} ({eta})",
            ) {
                bar.set_style(style);
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(Self {
            shards,
            tensors,
            device: device.clone(),
            dtype,
            progress,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Loads a whole tensor, checking its shape against what the config implies.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, WeightError> {
        let rows = shape.first().copied().unwrap_or(1);
        self.load(name, shape, 0, rows, self.dtype)
    }

    /// Like [`get`](Self::get) but in an explicit dtype (e.g. f32 for numerically sensitive parts).
    pub fn get_dtype(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor, WeightError> {
        let rows = shape.first().copied().unwrap_or(1);
        self.load(name, shape, 0, rows, dtype)
    }

    /// Loads rows `[start, start + len)` along dim 0 of a tensor of full shape `shape`, reading
    /// only those bytes (DBRX's fused expert tensors are sliced per expert this way).
    pub fn get_rows(
        &self,
        name: &str,
        shape: &[usize],
        start: usize,
        len: usize,
    ) -> Result<Tensor, WeightError> {
        self.load(name, shape, start, len, self.dtype)
    }

    fn load(
        &self,
        name: &str,
        shape: &[usize],
        row_start: usize,
        rows: usize,
        dtype: DType,
    ) -> Result<Tensor, WeightError> {
        let info = self.tensors.get(name).ok_or_else(|| WeightError::Missing {
            name: name.to_string(),
            files: self.file_list(),
        })?;
        let shard = &self.shards[info.shard];
        let path = shard.path.display().to_string();
        if info.shape != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                path,
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let total_rows = shape.first().copied().unwrap_or(1);
        let row_elems: usize = shape.iter().skip(1).product();
        let row_bytes = row_elems * info.dtype.size_in_bytes();
        if row_start + rows > total_rows {
            return Err(WeightError::Shape {
                name: name.to_string(),
                path,
                expected: vec![row_start + rows],
                found: info.shape.clone(),
            });
        }
        let begin = info.start + row_start * row_bytes;
        let end = begin + rows * row_bytes;
        debug_assert!(end <= info.end);
        let bytes = &shard.mmap[begin..end];
        let mut out_shape = shape.to_vec();
        if let Some(first) = out_shape.first_mut() {
            *first = rows;
        }
        let candle_err = |source| WeightError::Candle {
            name: name.to_string(),
            path: path.clone(),
            source: Box::new(source),
        };
        let t = Tensor::from_raw_buffer(bytes, info.dtype, &out_shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&self.device))
            .map_err(candle_err)?;
        self.progress.inc(bytes.len() as u64);
        Ok(t)
    }

    fn file_list(&self) -> String {
        self.shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Clears the progress bar once the model is built.
    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }
}
