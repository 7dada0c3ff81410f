//! The docs cannot drift from the code: every TOML block in the Markdown docs is a config the
//! agent accepts, and the values the configuration reference gives as defaults are the defaults.
#![cfg(test)]

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Every Markdown doc of the repository (the top README and each folder's).
fn docs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = vec![root.join("README.md")];
    for dir in ["mesh", "runtime", "wit", "plugins", "deploy", "tests"] {
        let p = root.join(dir).join("README.md");
        if p.exists() {
            out.push(p);
        }
    }
    out
}

/// The fenced blocks of `lang` in `text`, with the line each starts on.
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => {
                current = Some((i + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => out.push(current.take().unwrap()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn every_toml_block_in_the_docs_is_a_config_the_agent_accepts() {
    let mut count = 0;
    for path in docs() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, block) in blocks(&text, "toml") {
            if let Err(e) = Config::from_toml(&block) {
                panic!(
                    "{}:{line}: the block does not parse as a config: {e}",
                    path.display()
                );
            }
            count += 1;
        }
    }
    assert!(count >= 5, "{count} TOML blocks found");
}

/// The configuration reference's values for these tables are documented as the defaults.
#[test]
fn the_documented_defaults_are_the_defaults() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    let mut checked = 0;
    for (line, block) in blocks(&text, "toml") {
        let documented = toml::Value::try_from(Config::from_toml(&block).unwrap()).unwrap();
        let written: toml::Table = toml::from_str(&block).unwrap();
        for table in ["server", "cache", "scheduler", "log"] {
            let Some(keys) = written.get(table).and_then(|t| t.as_table()) else {
                continue;
            };
            for (key, value) in keys {
                if value.is_array() && value.as_array().unwrap().iter().any(|v| v.is_table()) {
                    continue; // [[cache.devices]]: an example pool, not a default
                }
                assert_eq!(
                    documented[table].get(key),
                    defaults[table].get(key),
                    "mesh/README.md:{line}: [{table}] {key} is documented as {value}, \
                     but the default differs"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} documented defaults checked");
}
