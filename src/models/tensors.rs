//! A model's parameters as safetensors bytes (every tensor f64, little-endian) and back: the
//! format of `model.safetensors`. Where the bytes are stored is the pipeline's business.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use super::NamedTensor;

/// Why tensors could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TensorsError {
    /// Not a safetensors file, or one whose header lies about its contents.
    #[error("not a safetensors file of this model")]
    Format(#[from] safetensors::SafeTensorError),
    /// A tensor of another element type than f64.
    #[error("tensor `{name}` is {dtype:?}, expected F64")]
    Dtype {
        /// Its name.
        name: String,
        /// Its element type.
        dtype: Dtype,
    },
}

/// Serializes parameters to safetensors bytes.
pub fn to_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>, TensorsError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (t.name.clone(), raw, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            TensorView::new(Dtype::F64, shape.clone(), raw).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(safetensors::serialize(
        views,
        None::<HashMap<String, String>>,
    )?)
}

/// Reads parameters back from safetensors bytes; every tensor must be f64.
pub fn from_safetensors(bytes: &[u8]) -> Result<Vec<NamedTensor>, TensorsError> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F64 {
            return Err(TensorsError::Dtype {
                name,
                dtype: view.dtype(),
            });
        }
        let data = view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_safetensors() {
        let t = vec![
            NamedTensor {
                name: "p".into(),
                shape: vec![3],
                data: vec![0.1, 0.5, 0.999],
            },
            NamedTensor {
                name: "w".into(),
                shape: vec![2, 2],
                data: vec![-1.0, 2.0, f64::MIN_POSITIVE, 4.0],
            },
        ];
        let bytes = to_safetensors(&t).unwrap();
        let mut back = from_safetensors(&bytes).unwrap();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, t);
        assert!(from_safetensors(&bytes[..bytes.len() - 1]).is_err());
    }
}
