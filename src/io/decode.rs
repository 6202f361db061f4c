//! The decode stage: Arrow record batches to [`ImageBatch`]es of 8-bit pixels.
//!
//! Three layouts of the image column are accepted, and give identical pixels for identical
//! images:
//! 1. an `arrow.fixed_shape_tensor` of uint8 or float32, shape `[H, W]` or `[H, W, C]`;
//! 2. a `list<uint8|float32>`, fixed-size list, or binary column of raw pixels, with the shape
//!    from `source.shape` or from height/width/channels columns;
//! 3. a struct `{bytes, path}` of PNG-encoded images (the Hugging Face datasets convention), or
//!    a binary column of PNG bytes without a configured shape.
//!
//! Rows that cannot be used become [`Reject`]s with a reason; problems with the whole file (a
//! missing column, an unsupported type) are errors naming the file. For the common case, a
//! uint8 tensor column without nulls, the values buffer is copied in bulk.

use std::borrow::Cow;
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, StringArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Float32Type, Schema, UInt8Type};
use arrow::record_batch::RecordBatch;
use ndarray::Array2;
use rayon::prelude::*;

use crate::config::SourceConfig;
use crate::data::{ImageBatch, ImageShape, Reject};
use crate::error::{Error, Result};

/// The largest PNG (in pixels per side, and in decoded bytes) a row may hold; a larger one is a
/// rejected row, not an allocation.
const PNG_MAX_SIDE: u32 = 16_384;
const PNG_MAX_ALLOC: u64 = 256 << 20;
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The element type of a list or tensor image column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    U8,
    F32,
}

/// How the image column stores pixels.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    /// A list-like column of values (tensor, list, large list, fixed-size list).
    List(Values),
    /// Binary values: raw 8-bit pixels when a shape is known, else PNG.
    Binary,
    /// A struct whose `bytes` child holds PNG bytes.
    PngStruct,
}

/// Where an image's shape comes from.
#[derive(Debug, Clone, PartialEq)]
enum ShapeRule {
    /// The same for every row (tensor metadata or `source.shape`).
    Fixed(ImageShape),
    /// Per row, from integer columns (channels optional, default 1).
    Columns {
        height: String,
        width: String,
        channels: Option<String>,
    },
    /// From each PNG's header.
    Png,
}

/// One row's pixels with their shape, or why the row cannot be used.
type RowPixels<'a> = std::result::Result<(ImageShape, Cow<'a, [u8]>), RowProblem>;

/// Why one row's image cannot be used: its `reason` in the rejects table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowProblem {
    /// The id is null.
    #[error("id is null")]
    NullId,
    /// The image is null.
    #[error("image is null")]
    NullImage,
    /// A struct image's `bytes` are null.
    #[error("image bytes are null")]
    NullBytes,
    /// One of the shape columns is null.
    #[error("height, width or channels is null")]
    NullShape,
    /// A shape no image has.
    #[error("shape {0} is not an image with 1 or 3 channels")]
    NotAnImage(ImageShape),
    /// A list of the wrong length for its shape.
    #[error("image has {got} values but shape {shape} needs {}", .shape.dims())]
    Values {
        /// Values in the row.
        got: usize,
        /// The shape it should have.
        shape: ImageShape,
    },
    /// Raw bytes of the wrong length for the shape, and not a PNG.
    #[error("image has {got} bytes but shape {shape} needs {}", .shape.dims())]
    Bytes {
        /// Bytes in the row.
        got: usize,
        /// The shape it should have.
        shape: ImageShape,
    },
    /// A null pixel.
    #[error("pixel {0} is null")]
    NullPixel(usize),
    /// A float pixel that is NaN or infinite.
    #[error("pixel {0} is {1}")]
    NotFinite(usize, f64),
    /// A float pixel outside `[0, float_max]`.
    #[error("pixel {pixel} is {value}, outside [0, {max}] (source.float_max)")]
    OutOfRange {
        /// Which pixel.
        pixel: usize,
        /// Its value.
        value: f64,
        /// `source.float_max`.
        max: f64,
    },
    /// An image of another shape than the source's first image (or the model's).
    #[error(
        "image is {got}, expected {expected} (the shape of the source's first image, or the model's)"
    )]
    Shape {
        /// This row's shape.
        got: ImageShape,
        /// The shape images must have.
        expected: ImageShape,
    },
    /// Bytes that are not a PNG this decoder accepts (corrupt, or past its size limits).
    #[error("not a decodable PNG image: {0}")]
    Png(String),
}

/// Decodes the record batches of one source file; built from the file's schema.
#[derive(Debug, Clone)]
pub struct Decoder {
    uri: Arc<str>,
    image_column: String,
    /// The id column; `None` numbers rows by their index in the file (for `inspect`).
    id_column: Option<String>,
    passthrough: Vec<String>,
    layout: Layout,
    shape: ShapeRule,
    float_max: f64,
}

impl Decoder {
    /// Checks the file's schema against the config and decides how to decode it.
    pub fn new(schema: &Schema, config: &SourceConfig, uri: &Arc<str>) -> Result<Self> {
        let column_list = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let field = |name: &str, key: &str| {
            schema.field_with_name(name).map_err(|_| {
                Error::data(
                    uri.to_string(),
                    format!(
                        "has no column `{name}` (its columns: {}); set `{key}` to the right column",
                        column_list()
                    ),
                )
            })
        };
        let image = field(&config.image_column, "source.image_column")?;
        if !config.id_column.is_empty() {
            field(&config.id_column, "source.id_column")?;
        }
        for p in &config.passthrough {
            field(p, "source.passthrough")?;
        }
        let configured_shape = match config.shape.as_slice() {
            [] => None,
            [h, w] => Some(ImageShape::new(*h, *w, 1)),
            [h, w, c] => Some(ImageShape::new(*h, *w, *c)),
            _ => None, // rejected by config validation
        };
        let has = |name: &str| schema.field_with_name(name).is_ok();
        let shape_columns =
            (has(&config.height_column) && has(&config.width_column)).then(|| ShapeRule::Columns {
                height: config.height_column.clone(),
                width: config.width_column.clone(),
                channels: has(&config.channels_column).then(|| config.channels_column.clone()),
            });
        let bad = |message: String| Error::data(uri.to_string(), message);
        let name = &config.image_column;

        let (layout, shape) = if image.extension_type_name() == Some("arrow.fixed_shape_tensor") {
            let (shape, values) =
                tensor_layout(image, name).map_err(|e| bad(crate::error::chain_of(&e)))?;
            (Layout::List(values), ShapeRule::Fixed(shape))
        } else {
            let need_shape = || {
                configured_shape
                    .map(ShapeRule::Fixed)
                    .or_else(|| shape_columns.clone())
                    .ok_or_else(|| {
                        bad(format!(
                            "column `{name}` is a list of pixels with no shape: set `source.shape = [height, width]` (or [height, width, channels]), or add `{}`/`{}` columns",
                            config.height_column, config.width_column
                        ))
                    })
            };
            match image.data_type() {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    let values = value_kind(f.data_type()).ok_or_else(|| {
                        bad(format!(
                            "column `{name}`: list values are {}, expected uint8 or float32",
                            f.data_type()
                        ))
                    })?;
                    (Layout::List(values), need_shape()?)
                }
                DataType::Binary | DataType::LargeBinary | DataType::FixedSizeBinary(_) => {
                    let rule = need_shape().unwrap_or(ShapeRule::Png);
                    (Layout::Binary, rule)
                }
                DataType::Struct(fields) if fields.iter().any(|f| f.name() == "bytes") => {
                    (Layout::PngStruct, ShapeRule::Png)
                }
                other => {
                    return Err(bad(format!(
                        "column `{name}` has type {other}, which holds no images; expected an arrow.fixed_shape_tensor, a list<uint8>, binary, or a struct {{bytes, path}} of PNGs"
                    )));
                }
            }
        };
        Ok(Self {
            uri: Arc::clone(uri),
            image_column: config.image_column.clone(),
            id_column: (!config.id_column.is_empty()).then(|| config.id_column.clone()),
            passthrough: config.passthrough.clone(),
            layout,
            shape,
            float_max: config.float_max,
        })
    }

    /// The shape every row has, when the file fixes it (tensors and `source.shape`).
    pub fn fixed_shape(&self) -> Option<ImageShape> {
        match self.shape {
            ShapeRule::Fixed(s) => Some(s),
            _ => None,
        }
    }

    /// The columns the decoder reads, for projection.
    pub fn columns(&self) -> Vec<String> {
        let mut c = vec![self.image_column.clone()];
        c.extend(self.id_column.clone());
        c.extend(self.passthrough.iter().cloned());
        if let ShapeRule::Columns {
            height,
            width,
            channels,
        } = &self.shape
        {
            c.push(height.clone());
            c.push(width.clone());
            c.extend(channels.clone());
        }
        c
    }

    /// Decodes one record batch whose first row is row `first_row` of the file.
    ///
    /// `shape` is the source's image shape: the first usable row sets it when it is `None`,
    /// and rows of another shape are rejected.
    pub fn decode(
        &self,
        batch: &RecordBatch,
        first_row: u64,
        shape: &mut Option<ImageShape>,
    ) -> Result<(ImageBatch, Vec<Reject>)> {
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                Error::Internal(format!("column `{name}` missing from a projected batch"))
            })
        };
        let ids: ArrayRef = match &self.id_column {
            Some(name) => cast(&column(name)?, &DataType::Utf8).map_err(|e| {
                Error::data_because(
                    self.uri.to_string(),
                    format!("id column `{name}` cannot be read as text"),
                    e,
                )
            })?,
            None => Arc::new(StringArray::from_iter_values(
                (0..batch.num_rows() as u64).map(|i| (first_row + i).to_string()),
            )),
        };
        let ids: &StringArray = ids.as_string::<i32>();
        let image = column(&self.image_column)?;
        let row_shapes = self.row_shapes(batch)?;

        let n = batch.num_rows();
        if let Some(fast) = self.bulk_u8(&image, ids, shape) {
            return self.assemble_fast(batch, first_row, fast, ids);
        }
        let decoded: Vec<RowPixels<'_>> = (0..n)
            .into_par_iter()
            .map(|i| {
                if ids.is_null(i) {
                    return Err(RowProblem::NullId);
                }
                if image.is_null(i) {
                    return Err(RowProblem::NullImage);
                }
                self.row_pixels(&image, i, row_shapes.as_ref().map(|s| s[i]))
            })
            .collect();

        let mut pixels = Vec::new();
        let mut accepted = Vec::with_capacity(n);
        let mut rejects = Vec::new();
        for (i, row) in decoded.into_iter().enumerate() {
            let checked = row.and_then(|(s, px)| match shape {
                Some(expected) if *expected != s => Err(RowProblem::Shape {
                    got: s,
                    expected: *expected,
                }),
                _ => {
                    *shape = Some(s);
                    Ok(px)
                }
            });
            match checked {
                Ok(px) => {
                    pixels.extend_from_slice(&px);
                    accepted.push(i as u32);
                }
                Err(problem) => rejects.push(Reject {
                    id: ids.is_valid(i).then(|| ids.value(i).to_string()),
                    source: Arc::clone(&self.uri),
                    row: first_row + i as u64,
                    reason: problem.to_string(),
                }),
            }
        }
        let shape = shape.unwrap_or(ImageShape::new(0, 0, 1));
        let out = self.assemble(batch, first_row, shape, pixels, &accepted, ids)?;
        Ok((out, rejects))
    }

    /// The shape of each row when it comes from height/width/channels columns.
    fn row_shapes(&self, batch: &RecordBatch) -> Result<Option<Vec<Option<ImageShape>>>> {
        let ShapeRule::Columns {
            height,
            width,
            channels,
        } = &self.shape
        else {
            return Ok(None);
        };
        let ints = |name: &str| -> Result<Vec<Option<usize>>> {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| Error::Internal(format!("shape column `{name}` not projected")))?;
            let col = cast(col, &DataType::UInt64).map_err(|e| {
                Error::data_because(
                    self.uri.to_string(),
                    format!("shape column `{name}` is not an integer column"),
                    e,
                )
            })?;
            let col = col.as_primitive::<arrow::datatypes::UInt64Type>();
            Ok(col.iter().map(|v| v.map(|v| v as usize)).collect())
        };
        let h = ints(height)?;
        let w = ints(width)?;
        let c = match channels {
            Some(c) => ints(c)?,
            None => vec![Some(1); batch.num_rows()],
        };
        Ok(Some(
            (0..batch.num_rows())
                .map(|i| match (h[i], w[i], c[i]) {
                    (Some(h), Some(w), Some(c)) => Some(ImageShape::new(h, w, c)),
                    _ => None,
                })
                .collect(),
        ))
    }

    /// The pixels of row `i` (not null), with their shape.
    fn row_pixels<'a>(
        &self,
        image: &'a ArrayRef,
        i: usize,
        row_shape: Option<Option<ImageShape>>,
    ) -> RowPixels<'a> {
        let expected = match (&self.shape, row_shape) {
            (ShapeRule::Fixed(s), _) => Some(*s),
            (ShapeRule::Columns { .. }, Some(Some(s))) => Some(s),
            (ShapeRule::Columns { .. }, _) => {
                return Err(RowProblem::NullShape);
            }
            (ShapeRule::Png, _) => None,
        };
        if let Some(s) = expected
            && (s.dims() == 0 || !matches!(s.channels, 1 | 3))
        {
            return Err(RowProblem::NotAnImage(s));
        }
        match &self.layout {
            Layout::List(values) => {
                let elements = list_values(image, i);
                let s = expected.expect("lists always have a shape rule");
                if elements.len() != s.dims() {
                    return Err(RowProblem::Values {
                        got: elements.len(),
                        shape: s,
                    });
                }
                if elements.null_count() > 0 {
                    let k = (0..elements.len())
                        .find(|&k| elements.is_null(k))
                        .unwrap_or(0);
                    return Err(RowProblem::NullPixel(k));
                }
                let px = match values {
                    Values::U8 => {
                        let a = elements.as_primitive::<UInt8Type>();
                        Cow::Owned(a.values().to_vec())
                    }
                    Values::F32 => Cow::Owned(
                        self.floats_to_u8(elements.as_primitive::<Float32Type>().values())?,
                    ),
                };
                Ok((s, px))
            }
            Layout::Binary => {
                let bytes = binary_value(image, i);
                match expected {
                    Some(s) if bytes.len() == s.dims() => Ok((s, Cow::Borrowed(bytes))),
                    Some(s) if !bytes.starts_with(PNG_SIGNATURE) => Err(RowProblem::Bytes {
                        got: bytes.len(),
                        shape: s,
                    }),
                    _ => decode_png(bytes).map(|(s, px)| (s, Cow::Owned(px))),
                }
            }
            Layout::PngStruct => {
                let s = image.as_struct();
                let bytes = s
                    .column_by_name("bytes")
                    .expect("checked when the decoder was built");
                if bytes.is_null(i) {
                    return Err(RowProblem::NullBytes);
                }
                decode_png(binary_value(bytes, i)).map(|(s, px)| (s, Cow::Owned(px)))
            }
        }
    }

    /// Maps float pixels on `[0, float_max]` to 0..=255, rejecting NaN, infinities and values
    /// out of range.
    fn floats_to_u8(&self, values: &[f32]) -> std::result::Result<Vec<u8>, RowProblem> {
        let scale = 255.0 / self.float_max;
        values
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                let v = f64::from(v);
                if !v.is_finite() {
                    Err(RowProblem::NotFinite(k, v))
                } else if v < 0.0 || v > self.float_max {
                    Err(RowProblem::OutOfRange {
                        pixel: k,
                        value: v,
                        max: self.float_max,
                    })
                } else {
                    Ok((v * scale).round() as u8)
                }
            })
            .collect()
    }

    /// The whole batch's pixels as one slice, when the column is a uint8 fixed-size list with
    /// no nulls anywhere and the source's shape agrees: the common case, copied in bulk.
    fn bulk_u8<'a>(
        &self,
        image: &'a ArrayRef,
        ids: &StringArray,
        shape: &mut Option<ImageShape>,
    ) -> Option<(ImageShape, &'a [u8])> {
        let ShapeRule::Fixed(s) = self.shape else {
            return None;
        };
        let list = image.as_any().downcast_ref::<FixedSizeListArray>()?;
        let values = list.values().as_primitive_opt::<UInt8Type>()?;
        let fits = list.null_count() == 0
            && values.null_count() == 0
            && ids.null_count() == 0
            && list.value_length() as usize == s.dims()
            && shape.is_none_or(|e| e == s)
            && s.dims() > 0;
        if !fits {
            return None;
        }
        *shape = Some(s);
        let start = list.offset() * s.dims();
        Some((s, &values.values()[start..start + list.len() * s.dims()]))
    }

    fn assemble_fast(
        &self,
        batch: &RecordBatch,
        first_row: u64,
        (shape, px): (ImageShape, &[u8]),
        ids: &StringArray,
    ) -> Result<(ImageBatch, Vec<Reject>)> {
        let n = batch.num_rows();
        let pixels = Array2::from_shape_vec((n, shape.dims()), px.to_vec())
            .map_err(|e| Error::internal(e, "shaping a batch's pixels"))?;
        let passthrough = self
            .passthrough
            .iter()
            .map(|p| Arc::clone(batch.column_by_name(p).expect("projected")))
            .collect();
        let out = ImageBatch {
            shape,
            pixels,
            ids: ids
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect(),
            rows: (first_row..first_row + n as u64).collect(),
            source: Arc::clone(&self.uri),
            passthrough,
        };
        Ok((out, Vec::new()))
    }

    fn assemble(
        &self,
        batch: &RecordBatch,
        first_row: u64,
        shape: ImageShape,
        pixels: Vec<u8>,
        accepted: &[u32],
        ids: &StringArray,
    ) -> Result<ImageBatch> {
        let indices = UInt32Array::from(accepted.to_vec());
        let passthrough = self
            .passthrough
            .iter()
            .map(|p| take(batch.column_by_name(p).expect("projected"), &indices, None))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::internal(e, "selecting passthrough rows"))?;
        let pixels = Array2::from_shape_vec((accepted.len(), shape.dims()), pixels)
            .map_err(|e| Error::internal(e, "shaping a batch's pixels"))?;
        Ok(ImageBatch {
            shape,
            pixels,
            ids: accepted
                .iter()
                .map(|&i| ids.value(i as usize).to_string())
                .collect(),
            rows: accepted.iter().map(|&i| first_row + u64::from(i)).collect(),
            source: Arc::clone(&self.uri),
            passthrough,
        })
    }
}

/// The `arrow.fixed_shape_tensor` metadata, read per the Arrow canonical extension spec.
///
/// Not arrow-rs's `FixedShapeTensor` (arrow 60): it refuses the nullable child field pyarrow
/// writes, and its own serializer writes `"permutations": null`, which its deserializer rejects.
#[derive(Debug, serde::Deserialize)]
struct TensorMetadata {
    shape: Vec<usize>,
    #[serde(default)]
    permutation: Option<Vec<usize>>,
}

/// Checks a tensor column's metadata against its storage and returns its image shape and
/// value type. The storage's child field may be nullable (pyarrow writes it so); null values
/// are caught per row.
fn tensor_layout(
    image: &arrow::datatypes::Field,
    name: &str,
) -> std::result::Result<(ImageShape, Values), TensorProblem> {
    let column = name.to_string();
    let raw = image.extension_type_metadata().unwrap_or("{}");
    let meta: TensorMetadata =
        serde_json::from_str(raw).map_err(|source| TensorProblem::Metadata {
            column: column.clone(),
            raw: raw.to_string(),
            source,
        })?;
    if let Some(p) = &meta.permutation
        && p.iter().enumerate().any(|(i, &j)| i != j)
    {
        return Err(TensorProblem::Permuted {
            column,
            permutation: p.clone(),
        });
    }
    let shape = match meta.shape.as_slice() {
        [h, w] => ImageShape::new(*h, *w, 1),
        [h, w, c] if matches!(c, 1 | 3) => ImageShape::new(*h, *w, *c),
        other => {
            return Err(TensorProblem::NotAnImage {
                column,
                shape: other.to_vec(),
            });
        }
    };
    let DataType::FixedSizeList(child, size) = image.data_type() else {
        return Err(TensorProblem::Storage {
            column,
            found: image.data_type().to_string(),
        });
    };
    let dims = meta.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if dims != Some(*size as usize) {
        return Err(TensorProblem::Disagrees {
            column,
            shape: meta.shape.clone(),
            size: *size,
        });
    }
    let values = value_kind(child.data_type()).ok_or_else(|| TensorProblem::Values {
        column,
        found: child.data_type().to_string(),
    })?;
    Ok((shape, values))
}

/// An `arrow.fixed_shape_tensor` image column this decoder cannot read.
#[derive(Debug, thiserror::Error)]
pub enum TensorProblem {
    /// Extension metadata that is not the canonical JSON.
    #[error("column `{column}`: unreadable arrow.fixed_shape_tensor metadata {raw:?}")]
    Metadata {
        /// The image column.
        column: String,
        /// The metadata as stored.
        raw: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A permuted tensor.
    #[error(
        "column `{column}`: permuted tensors ({permutation:?}) are not supported; write the images in row-major [height, width, channels] order"
    )]
    Permuted {
        /// The image column.
        column: String,
        /// Its permutation.
        permutation: Vec<usize>,
    },
    /// A tensor shape that is not an image's.
    #[error(
        "column `{column}`: tensor shape {shape:?} is not an image; expected [height, width] or [height, width, channels] with 1 or 3 channels"
    )]
    NotAnImage {
        /// The image column.
        column: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Storage other than a fixed-size list.
    #[error(
        "column `{column}`: an arrow.fixed_shape_tensor must be stored as a fixed-size list, found {found}"
    )]
    Storage {
        /// The image column.
        column: String,
        /// Its storage type.
        found: String,
    },
    /// A shape whose size is not the storage's list size.
    #[error(
        "column `{column}`: tensor shape {shape:?} disagrees with its storage of {size} values per row"
    )]
    Disagrees {
        /// The image column.
        column: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// Values per row in storage.
        size: i32,
    },
    /// Values other than uint8 or float32.
    #[error("column `{column}`: tensor values are {found}, expected uint8 or float32")]
    Values {
        /// The image column.
        column: String,
        /// Their type.
        found: String,
    },
}

fn value_kind(t: &DataType) -> Option<Values> {
    match t {
        DataType::UInt8 => Some(Values::U8),
        DataType::Float32 => Some(Values::F32),
        _ => None,
    }
}

/// The elements of row `i` of a list-like array.
fn list_values(array: &ArrayRef, i: usize) -> ArrayRef {
    match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().value(i),
        DataType::LargeList(_) => array.as_list::<i64>().value(i),
        DataType::FixedSizeList(_, _) => array.as_fixed_size_list().value(i),
        _ => unreachable!("layout checked when the decoder was built"),
    }
}

/// The bytes of row `i` of a binary-like array.
fn binary_value(array: &ArrayRef, i: usize) -> &[u8] {
    match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().value(i),
        DataType::LargeBinary => array.as_binary::<i64>().value(i),
        DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(i),
        _ => &[],
    }
}

/// Decodes PNG bytes to 8-bit pixels: grayscale stays one channel, anything with colour becomes
/// R, G, B (alpha dropped). Limits guard against decompression bombs.
pub fn decode_png(bytes: &[u8]) -> std::result::Result<(ImageShape, Vec<u8>), RowProblem> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(PNG_MAX_SIDE);
    limits.max_image_height = Some(PNG_MAX_SIDE);
    limits.max_alloc = Some(PNG_MAX_ALLOC);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| RowProblem::Png(e.to_string()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if img.color().has_color() {
        Ok((ImageShape::new(h, w, 3), img.into_rgb8().into_raw()))
    } else {
        Ok((ImageShape::new(h, w, 1), img.into_luma8().into_raw()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (IEEE) of PNG chunk type + data, bit by bit.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn undecodable_and_oversized_pngs_are_reasons_not_crashes() {
        let e = decode_png(b"\x89PNG\r\n\x1a\nnot really")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("not a decodable PNG"), "{e}");
        // A header that declares 100000 x 100000 grayscale pixels (10 GB decoded).
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]);
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend(13u32.to_be_bytes());
        png.extend(&ihdr);
        png.extend(crc32(&ihdr).to_be_bytes());
        let e = decode_png(&png).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn grayscale_and_colour_pngs_keep_their_channels() {
        let gray = image::GrayImage::from_raw(3, 2, vec![0, 50, 100, 150, 200, 250]).unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        gray.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        let (s, px) = decode_png(buf.get_ref()).unwrap();
        assert_eq!(
            (s, px),
            (ImageShape::new(2, 3, 1), vec![0, 50, 100, 150, 200, 250])
        );
        let rgb = image::RgbImage::from_raw(1, 1, vec![1, 2, 3]).unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        rgb.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        assert_eq!(
            decode_png(buf.get_ref()).unwrap(),
            (ImageShape::new(1, 1, 3), vec![1, 2, 3])
        );
    }
}
