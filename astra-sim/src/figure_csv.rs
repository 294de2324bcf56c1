//! The small CSV files the figure commands read (`plot-lines`, `plot-bars`): a fixed header,
//! then rows of exactly that many comma-separated fields; blank lines are skipped. Errors name
//! the file and line.

use std::path::Path;

use crate::error::{Result, SimError};

/// One data row: its 1-based line number and its trimmed fields.
pub struct Row {
    pub line: usize,
    pub fields: Vec<String>,
}

impl Row {
    /// An error about this row.
    pub fn error(&self, path: &Path, reason: String) -> SimError {
        SimError::Csv {
            path: path.display().to_string(),
            line: self.line,
            reason,
        }
    }

    /// Field `i` as a finite number that `ok` accepts (`what` says what it must be).
    pub fn number(
        &self,
        path: &Path,
        i: usize,
        what: &str,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let v = &self.fields[i];
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && ok(*x))
            .ok_or_else(|| self.error(path, format!("'{v}' is not {what}")))
    }
}

/// The data rows of `path`, whose first line must be `header` (possibly none).
pub fn rows(path: &Path, header: &str) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(SimError::io(path))?;
    let mut lines = text.lines().enumerate();
    let found = lines.next().map(|(_, h)| h.trim()).unwrap_or_default();
    let width = header.split(',').count();
    if found != header {
        return Err(SimError::Csv {
            path: path.display().to_string(),
            line: 1,
            reason: format!("header '{found}' is not '{header}'"),
        });
    }
    let mut out = Vec::new();
    for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
        let row = Row {
            line: i + 1,
            fields: line.split(',').map(|f| f.trim().to_string()).collect(),
        };
        if row.fields.len() != width {
            return Err(row.error(
                path,
                format!("{} fields, expected {width}", row.fields.len()),
            ));
        }
        out.push(row);
    }
    Ok(out)
}
