//! Human-readable output: aligned tables. `--json` bypasses all of this.

use serde_json::Value;

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(headers.to_vec())];
    out.extend(rows.iter().map(|row| line(row.iter().map(String::as_str).collect())));
    out.join("\n")
}

/// A string field, or `-`.
pub fn field(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// Cuts `text` to `max` characters, marking the cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max { text.to_owned() } else { text.chars().take(max - 1).collect::<String>() + "…" }
}

pub fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// One page of a list endpoint: as is with `--json`, else its `data` as a table.
pub fn print_page(page: &Value, json_output: bool, headers: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    if json_output {
        print_json(page);
        return;
    }
    let rows: Vec<Vec<String>> = page["data"].as_array().into_iter().flatten().map(row).collect();
    println!("{}", table(headers, &rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let rows = vec![vec!["a".into(), "long value".into()], vec!["bbb".into(), "x".into()]];
        assert_eq!(table(&["K", "V"], &rows), "K    V\na    long value\nbbb  x");
    }

    #[test]
    fn shorten_marks_the_cut() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }
}
