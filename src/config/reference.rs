//! The TOML reference, generated from the config structs' doc comments and defaults.
//!
//! `schemas/pipeline.schema.json` (JSON Schema) and `schemas/pipeline-toml.md` (a table per
//! section) are written by `pipeline schema --out-dir schemas/`; a test fails when the committed
//! copies drift from the code.

use serde_json::Value;

use super::PipelineConfig;

/// The JSON Schema of a pipeline file.
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(PipelineConfig);
    serde_json::to_value(&schema).expect("a schema is JSON")
}

/// The JSON Schema as pretty-printed text with a trailing newline.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).expect("a schema is JSON");
    s.push('\n');
    s
}

/// `schemas/tables.json`: the output tables' columns, pretty-printed with a trailing newline.
pub fn tables_json_text() -> String {
    let mut s = serde_json::to_string_pretty(&crate::io::tables::tables_reference())
        .expect("a reference is JSON");
    s.push('\n');
    s
}

/// A Markdown reference: one table per TOML section, one row per key.
pub fn markdown() -> String {
    let schema = json_schema();
    let defs = &schema["$defs"];
    let mut out = String::from(
        "# Pipeline TOML reference\n\n\
         Generated from the config structs by `pipeline schema --out-dir schemas/`; do not edit.\n\
         Unknown keys are errors. String values may use `${VAR}`, `${VAR:-default}`,\n\
         `${VAR:?message}` and `$$`; `--set section.key=value` overrides any key.\n",
    );
    let Some(sections) = schema["properties"].as_object() else {
        return out;
    };
    for (section, prop) in sections {
        let def = resolve(prop, defs);
        out.push_str(&format!("\n## `[{section}]`\n\n"));
        if let Some(d) = prop["description"].as_str().or(def["description"].as_str()) {
            out.push_str(&format!("{}\n\n", one_line(d)));
        }
        out.push_str("| key | type | default | meaning |\n|---|---|---|---|\n");
        let Some(fields) = def["properties"].as_object() else {
            continue;
        };
        for (key, field) in fields {
            let ty = type_name(field, defs);
            let default = field
                .get("default")
                .or_else(|| def.get("default").and_then(|d| d.get(key)))
                .map(|d| format!("`{d}`"))
                .unwrap_or_else(|| "—".into());
            let mut meaning = field["description"]
                .as_str()
                .map(one_line)
                .unwrap_or_default();
            let target = resolve(field, defs);
            if let Some(variants) = target["oneOf"].as_array() {
                let list: Vec<String> = variants
                    .iter()
                    .filter_map(|v| {
                        let name = v["const"].as_str().or_else(|| v["enum"][0].as_str())?;
                        let doc = v["description"].as_str().map(one_line).unwrap_or_default();
                        Some(format!("`{name}`: {doc}"))
                    })
                    .collect();
                if !list.is_empty() {
                    meaning.push_str(" Values: ");
                    meaning.push_str(&list.join("; "));
                }
            }
            out.push_str(&format!(
                "| `{key}` | {ty} | {default} | {} |\n",
                meaning.replace('|', "\\|")
            ));
        }
    }
    out
}

fn resolve<'a>(v: &'a Value, defs: &'a Value) -> &'a Value {
    let r = v["$ref"]
        .as_str()
        .or_else(|| v["allOf"][0]["$ref"].as_str());
    match r.and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &defs[name],
        None => v,
    }
}

fn type_name(field: &Value, defs: &Value) -> String {
    let target = resolve(field, defs);
    if target["oneOf"].is_array() || target["enum"].is_array() {
        return "string".into();
    }
    match &target["type"] {
        Value::String(t) if t == "array" => {
            format!("array of {}", type_name(&target["items"], defs))
        }
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "value".into(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_documents_every_section_and_key() {
        let md = markdown();
        for needle in [
            "## `[source]`",
            "| `image_column` | string | `\"image\"` |",
            "| `quantile` | number | `0.99` |",
            "`stochastic`: Pixel ~ Bernoulli",
            "## `[sink]`",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    /// The committed reference must match the code; regenerate with
    /// `cargo run -- schema --out-dir schemas/`.
    #[test]
    fn committed_schemas_are_current() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
        let json = std::fs::read_to_string(format!("{dir}/pipeline.schema.json")).unwrap();
        let md = std::fs::read_to_string(format!("{dir}/pipeline-toml.md")).unwrap();
        let tables = std::fs::read_to_string(format!("{dir}/tables.json")).unwrap();
        assert!(
            json == json_schema_text() && md == markdown() && tables == tables_json_text(),
            "schemas/ is stale: run `cargo run -- schema --out-dir schemas/`"
        );
    }
}
