//! Memory-mapped safetensors, single file or sharded, handed to the model tensor by tensor.
//!
//! Each tensor is converted straight from the mapped bytes to the compute dtype on the target
//! device, so the checkpoint is never held twice. Errors name the file and the tensor.
//!
//! Tensors already in memory (the synthetic benchmark model) go through the same checks, so
//! the model builds from either source unchanged.

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

impl Shard {
    /// Unmaps the whole pages inside `[begin, end)` from this process once their bytes were
    /// copied out. Otherwise every page read stays in the RSS until the load ends, and loading a
    /// bf16 checkpoint with `--quant q4k` peaked at the file's size plus the quantized model
    /// (2.2 GB for a 1.6 GB file, 0.62 GB with this) although the weights were copied only once.
    /// The file's pages stay in the page cache; a later read of the same bytes (a tied
    /// embedding) faults them back in unchanged, since the mapping is read-only and shared.
    fn release(&self, begin: usize, end: usize) {
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
                .ok()
                .filter(|p| p.is_power_of_two())
                .unwrap_or(4096);
            // The mapping starts on a page, so offsets rounded inward are whole pages.
            let (first, last) = (begin.next_multiple_of(page), end / page * page);
            if last > first {
                // SAFETY: the range lies inside the mapping, and nothing borrows it any more
                // (its bytes were copied into a tensor). MADV_DONTNEED on a read-only shared
                // file mapping only drops page-table entries: the data read later is the same.
                let dropped = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
                if let Err(e) = dropped {
                    tracing::debug!("madvise(DONTNEED) on {}: {e}", self.path.display());
                }
            }
        }
        #[cfg(not(unix))]
        let _ = (begin, end);
    }
}

/// Where the bytes come from.
enum Store {
    /// Memory-mapped safetensors files.
    Mapped {
        shards: Vec<Shard>,
        tensors: HashMap<String, TensorInfo>,
    },
    /// Tensors built in memory; rows are sliced with `narrow`, sharing their storage.
    Memory(HashMap<String, Tensor>),
}

/// Stands for the file name in the errors of an in-memory source.
const IN_MEMORY: &str = "<in-memory tensors>";

/// All tensors of a checkpoint, mapped, converted on demand to `dtype` on `device`.
pub struct WeightSource {
    store: Store,
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
            store: Store::Mapped { shards, tensors },
            device: device.clone(),
            dtype,
            progress,
        })
    }

    /// A source over tensors already in memory (e.g. a synthetic model), with the same checks
    /// and errors as a checkpoint; like a checkpoint it holds only bf16, f16 and f32 tensors.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightError> {
        if let Some((name, t)) = tensors
            .iter()
            .find(|(_, t)| !matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32))
        {
            return Err(WeightError::Dtype {
                name: name.clone(),
                path: IN_MEMORY.into(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        Ok(Self {
            store: Store::Memory(tensors),
            device: device.clone(),
            dtype,
            progress: ProgressBar::hidden(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Mapped { tensors, .. } => tensors.contains_key(name),
            Store::Memory(tensors) => tensors.contains_key(name),
        }
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        match &self.store {
            Store::Mapped { tensors, .. } => tensors.get(name).map(|t| t.shape.as_slice()),
            Store::Memory(tensors) => tensors.get(name).map(|t| t.dims()),
        }
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
        let missing = || WeightError::Missing {
            name: name.to_string(),
            files: self.file_list(),
        };
        let (shards, tensors) = match &self.store {
            Store::Mapped { shards, tensors } => (shards, tensors),
            Store::Memory(tensors) => {
                let t = tensors.get(name).ok_or_else(missing)?;
                return self.load_memory(name, t, shape, row_start, rows, dtype);
            }
        };
        let info = tensors.get(name).ok_or_else(missing)?;
        let shard = &shards[info.shard];
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
        shard.release(begin, end);
        Ok(t)
    }

    /// [`load`](Self::load) for an in-memory tensor: same checks, rows sliced with `narrow`.
    fn load_memory(
        &self,
        name: &str,
        t: &Tensor,
        shape: &[usize],
        row_start: usize,
        rows: usize,
        dtype: DType,
    ) -> Result<Tensor, WeightError> {
        let shape_err = |expected: Vec<usize>| WeightError::Shape {
            name: name.to_string(),
            path: IN_MEMORY.into(),
            expected,
            found: t.dims().to_vec(),
        };
        if t.dims() != shape {
            return Err(shape_err(shape.to_vec()));
        }
        let total_rows = shape.first().copied().unwrap_or(1);
        if row_start + rows > total_rows {
            return Err(shape_err(vec![row_start + rows]));
        }
        let candle_err = |source| WeightError::Candle {
            name: name.to_string(),
            path: IN_MEMORY.into(),
            source: Box::new(source),
        };
        // A scalar has no dim 0 to slice: it is taken whole, as the mapped path does.
        let sliced = if shape.is_empty() {
            Ok(t.clone())
        } else {
            t.narrow(0, row_start, rows)
        };
        // `contiguous` copies only a tensor handed in strided; the mapped path always returns
        // contiguous tensors, and a row slice of a contiguous one stays contiguous.
        sliced
            .and_then(|t| t.contiguous())
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&self.device))
            .map_err(candle_err)
    }

    fn file_list(&self) -> String {
        match &self.store {
            Store::Mapped { shards, .. } => shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Store::Memory(_) => IN_MEMORY.into(),
        }
    }

    /// Clears the progress bar once the model is built.
    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> HashMap<String, Tensor> {
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .and_then(|t| t.reshape((4, 3)))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .unwrap();
        HashMap::from([("a".to_string(), a), ("b".to_string(), b)])
    }

    /// The in-memory source answers exactly as the mapped one does for the same tensors.
    #[test]
    fn in_memory_source_matches_the_mapped_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors(), &path).unwrap();
        let mapped = WeightSource::open(&[path], &Device::Cpu, DType::F32).unwrap();
        let memory = WeightSource::from_tensors(tensors(), &Device::Cpu, DType::F32).unwrap();
        for w in [&mapped, &memory] {
            assert!(w.contains("a") && !w.contains("c"));
            assert_eq!(w.shape_of("a"), Some(&[4usize, 3][..]));
            let a = w.get("a", &[4, 3]).unwrap();
            assert_eq!(a.to_vec2::<f32>().unwrap()[3], vec![9., 10., 11.]);
            let rows = w.get_rows("a", &[4, 3], 1, 2).unwrap();
            assert_eq!(
                rows.to_vec2::<f32>().unwrap(),
                vec![vec![3., 4., 5.], vec![6., 7., 8.]]
            );
            let b = w.get("b", &[2]).unwrap();
            assert_eq!(b.dtype(), DType::F32);
            assert_eq!(b.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
            let b = w.get_dtype("b", &[2], DType::BF16).unwrap();
            assert_eq!(b.dtype(), DType::BF16);

            let err = w.get("c", &[1]).unwrap_err();
            assert!(matches!(&err, WeightError::Missing { name, .. } if name == "c"));
            let err = w.get("a", &[3, 4]).unwrap_err();
            assert!(
                matches!(&err, WeightError::Shape { name, found, .. } if name == "a" && found == &[4, 3]),
                "{err}"
            );
            assert!(err.to_string().contains("tensor a "), "{err}");
            let err = w.get_rows("a", &[4, 3], 3, 2).unwrap_err();
            assert!(matches!(err, WeightError::Shape { .. }));
        }
    }

    /// Resident kB of the mapping that starts at `addr`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn mapping_rss_kb(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start)).skip(1);
        let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
        rss.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Once a tensor is copied out, its pages leave the process's mapping (a load's RSS stays
    /// near the model's own size), and reading it again gives the same values.
    #[cfg(target_os = "linux")]
    #[test]
    fn loaded_tensors_leave_the_resident_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let big = |seed: f32| {
            Tensor::arange(0f32, 262_144., &Device::Cpu)
                .and_then(|t| t.affine(1.0, seed as f64))
                .unwrap()
        };
        let tensors = HashMap::from([
            ("x".to_string(), big(0.5)),
            ("y".to_string(), big(-3.0)),
            ("z".to_string(), big(7.0)),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let w = WeightSource::open(&[path], &Device::Cpu, DType::F32).unwrap();
        let Store::Mapped { shards, .. } = &w.store else {
            panic!("a file source is mapped")
        };
        let addr = shards[0].mmap.as_ptr() as usize;
        let loaded: Vec<Vec<f32>> = ["x", "y", "z"]
            .iter()
            .map(|n| w.get(n, &[262_144]).unwrap().to_vec1().unwrap())
            .collect();
        // 3 MiB were read; what stays is the header's page and the pages tensors share.
        let rss = mapping_rss_kb(addr);
        assert!(rss < 512, "{rss} kB of the 3 MiB mapping still resident");
        for (n, want) in ["x", "y", "z"].iter().zip(&loaded) {
            assert_eq!(
                &w.get(n, &[262_144]).unwrap().to_vec1::<f32>().unwrap(),
                want
            );
            let t = &tensors[*n];
            assert_eq!(&t.to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn in_memory_source_refuses_non_float_tensors() {
        let ids = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let err = WeightSource::from_tensors(
            HashMap::from([("ids".to_string(), ids)]),
            &Device::Cpu,
            DType::F32,
        )
        .err()
        .unwrap();
        assert!(matches!(err, WeightError::Dtype { name, .. } if name == "ids"));
    }
}
