//! Parquet, the format the Hugging Face Hub serves datasets in: the documents of one text column
//! (snappy-compressed or uncompressed pages, as `datasets` and pyarrow write them).

use crate::{Error, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::path::Path;
use std::sync::Arc;

/// The column a corpus reads, as the Hub's text datasets (WikiText, TinyStories, FineWeb) name it.
pub const TEXT_COLUMN: &str = "text";

/// Every value of the string column `column` of a Parquet file, in order; nulls are skipped.
pub fn read_text_column(path: &Path, column: &str) -> Result<Vec<String>> {
    let bad = |msg: String| Error::malformed(path, "Parquet", msg);
    let file = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable Parquet file ({e})")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let fields = schema.root_schema().get_fields();
    let Some(field) = fields.iter().find(|f| f.name() == column) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        return Err(bad(format!(
            "has no column \"{column}\" (its columns: {}); kiln reads the text of a \"{column}\" column",
            names.join(", ")
        )));
    };
    let projection = parquet::schema::types::Type::group_type_builder("schema")
        .with_fields(vec![Arc::clone(field)])
        .build()
        .map_err(|e| bad(format!("column \"{column}\": {e}")))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| bad(format!("column \"{column}\": {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        match row.get_column_iter().next().map(|(_, f)| f) {
            Some(Field::Str(s)) => out.push(s.clone()),
            Some(Field::Null) | None => {}
            Some(Field::Bytes(b)) => match std::str::from_utf8(b.data()) {
                Ok(s) => out.push(s.to_string()),
                Err(_) => return Err(bad(format!("row {i}: column \"{column}\" holds bytes that are not UTF-8"))),
            },
            Some(other) => {
                return Err(bad(format!("column \"{column}\" holds {other:?}-like values, not text (row {i})")));
            }
        }
    }
    Ok(out)
}
