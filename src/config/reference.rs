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

/// A Markdown reference: one table per TOML section, one row per key; a table chosen by its
/// `kind` (`[model]`, `[score.background]`) gets one more table per kind.
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
        section_markdown(section, prop, def, defs, &mut out);
        // A key that is a table of its own (`[score.background]`) follows its section.
        if let Some(fields) = def["properties"].as_object() {
            for (key, field) in fields {
                let target = resolve(field, defs);
                if is_kind_table(target) {
                    section_markdown(&format!("{section}.{key}"), target, target, defs, &mut out);
                }
            }
        }
    }
    out
}

/// `## [name]`, its description, its keys, and for a kind table one section per kind.
fn section_markdown(name: &str, prop: &Value, def: &Value, defs: &Value, out: &mut String) {
    out.push_str(&format!("\n## `[{name}]`\n\n"));
    if let Some(d) = prop["description"].as_str().or(def["description"].as_str()) {
        out.push_str(&format!("{}\n\n", one_line(d)));
    }
    out.push_str(&key_table(def, defs, &[]));
    if !is_kind_table(def) {
        return;
    }
    for branch in def["oneOf"].as_array().into_iter().flatten() {
        let kind = branch["properties"]["kind"]["const"]
            .as_str()
            .unwrap_or("?");
        out.push_str(&format!("\n### `[{name}]` `kind = \"{kind}\"`\n\n"));
        if let Some(d) = branch["description"].as_str() {
            out.push_str(&format!("{}\n\n", one_line(d)));
        }
        let own = branch["properties"]
            .as_object()
            .is_some_and(|p| p.keys().any(|k| k != "kind" && k != "uri"));
        if own {
            out.push_str(&key_table(branch, defs, &["kind", "uri"]));
        } else {
            out.push_str("No other keys.\n");
        }
    }
}

/// Whether `def` is a table chosen by its `kind`: `oneOf` branches, each with a `kind` constant.
fn is_kind_table(def: &Value) -> bool {
    def["oneOf"].as_array().is_some_and(|branches| {
        !branches.is_empty()
            && branches
                .iter()
                .all(|b| b["properties"]["kind"]["const"].is_string())
    })
}

/// One row per key of `def` (but those in `skip`).
fn key_table(def: &Value, defs: &Value, skip: &[&str]) -> String {
    let mut out = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    let Some(fields) = def["properties"].as_object() else {
        return out;
    };
    for (key, field) in fields.iter().filter(|(k, _)| !skip.contains(&k.as_str())) {
        let target = resolve(field, defs);
        let ty = if is_kind_table(target) {
            "table".to_string()
        } else {
            type_name(field, defs)
        };
        let default = field
            .get("default")
            .or_else(|| def.get("default").and_then(|d| d.get(key)))
            .filter(|_| !is_kind_table(target))
            .map(|d| format!("`{d}`"))
            .unwrap_or_else(|| "—".into());
        let mut meaning = field["description"]
            .as_str()
            .map(one_line)
            .unwrap_or_default();
        if let Some(variants) = target["oneOf"]
            .as_array()
            .filter(|_| !is_kind_table(target))
        {
            let list: Vec<String> = variants
                .iter()
                .filter_map(|v| {
                    let name = v["const"].as_str().or_else(|| v["enum"][0].as_str())?;
                    Some(match v["description"].as_str().map(one_line) {
                        Some(doc) if !doc.is_empty() => format!("`{name}`: {doc}"),
                        _ => format!("`{name}`"),
                    })
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
