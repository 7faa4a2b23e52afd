//! The README's configuration reference and the model name the same keys.
//!
//! The model's keys are read from the model itself: a deserializer that answers nothing
//! but records the field names serde asks for (`deserialize_struct` receives them) walks
//! every section, one field deeper per pass. The README's keys are the first cells of the
//! tables under "## Configuration reference", qualified by their `###` heading.
//! Test-only; it calls nothing outside this crate's config model.

use super::model::Config;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

type Error = de::value::Error;

/// What the passes have learnt: the fields of each struct met (by key path), and the
/// leaves already visited.
#[derive(Default)]
struct Walk {
    structs: BTreeMap<String, &'static [&'static str]>,
    leaves: BTreeSet<String>,
}

impl Walk {
    /// A key is done when it is a visited leaf, or a struct whose fields are all done.
    fn done(&self, path: &str) -> bool {
        if self.leaves.contains(path) {
            return true;
        }
        match self.structs.get(path) {
            Some(fields) => fields.iter().all(|f| self.done(&join(path, f))),
            None => false,
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Deserializes the value at `path`: structs are entered, `Option`s and newtypes looked
/// through, and anything else (numbers, strings, lists, enums) is a leaf that fails, so
/// that no sample value is ever needed.
struct Tracer<'w> {
    path: String,
    walk: &'w RefCell<Walk>,
}

impl Tracer<'_> {
    fn leaf<T>(self) -> Result<T, Error> {
        self.walk.borrow_mut().leaves.insert(self.path);
        Err(de::Error::custom("leaf"))
    }
}

macro_rules! leaves {
    ($($method:ident),*) => {
        $(fn $method<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> { self.leaf() })*
    };
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    leaves!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: V,
    ) -> Result<V::Value, Error> {
        self.leaf()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, Error> {
        self.leaf()
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, Error> {
        self.leaf()
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Error> {
        self.leaf()
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.walk
            .borrow_mut()
            .structs
            .insert(self.path.clone(), fields);
        visitor.visit_map(Fields {
            path: self.path,
            fields: fields.iter(),
            current: String::new(),
            walk: self.walk,
        })
    }
}

/// Offers a struct's fields that are not done yet, in order.
struct Fields<'w> {
    path: String,
    fields: std::slice::Iter<'static, &'static str>,
    current: String,
    walk: &'w RefCell<Walk>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        for field in self.fields.by_ref() {
            let path = join(&self.path, field);
            if !self.walk.borrow().done(&path) {
                self.current = path;
                let key: de::value::StrDeserializer<'_, Error> = field.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(Tracer {
            path: self.current.clone(),
            walk: self.walk,
        })
    }
}

/// Every key of the model that holds a value (not a section of further keys).
fn model_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let walk = RefCell::new(Walk::default());
    // Each pass ends at the first leaf it meets (a leaf fails), so it takes about one
    // pass per key; the bound only guards against a model this walk cannot finish.
    for _ in 0..10_000 {
        if walk.borrow().done("") {
            break;
        }
        let _ = <Config as serde::Deserialize>::deserialize(Tracer {
            path: String::new(),
            walk: &walk,
        });
    }
    let walk = walk.into_inner();
    assert!(walk.done(""), "the walk did not finish");
    let sections: BTreeSet<String> = walk.structs.keys().cloned().collect();
    (walk.leaves, sections)
}

/// `a.{b,c}` → `a.b`, `a.c`.
fn expand(key: &str) -> Vec<String> {
    match (key.find('{'), key.strip_suffix('}')) {
        (Some(open), Some(rest)) => rest[open + 1..]
            .split(',')
            .map(|part| format!("{}{}", &key[..open], part.trim()))
            .collect(),
        _ => vec![key.to_string()],
    }
}

fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The keys the README's configuration reference documents, fully qualified; a `###`
/// heading's own names count too (`### \`backend\`` documents a key without a table).
fn readme_keys(readme: &str) -> BTreeSet<String> {
    let section = readme
        .split("\n## Configuration reference\n")
        .nth(1)
        .expect("README has a Configuration reference");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut keys = BTreeSet::new();
    let mut heading: Vec<&str> = Vec::new();
    for line in section.lines() {
        if let Some(title) = line.strip_prefix("### ") {
            heading = backticked(title);
            keys.extend(heading.iter().map(|name| name.to_string()));
        } else if line.starts_with("| `") {
            let first_cell = line.split('|').nth(1).unwrap_or_default();
            for key in backticked(first_cell).into_iter().flat_map(expand) {
                let top = key.split('.').next().unwrap_or_default();
                if heading.contains(&top) {
                    keys.insert(key);
                } else {
                    assert_eq!(
                        heading.len(),
                        1,
                        "`{key}` under a heading of several sections"
                    );
                    keys.insert(format!("{}.{key}", heading[0]));
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_finds_nested_and_optional_sections() {
        let (leaves, sections) = model_keys();
        for key in [
            "server.hostname",
            "server.timeouts.command",
            "server.proxy_protocol.trusted_networks",
            "tls.certificate",
            "relay.recipient_cache.max_entries",
            "arc.trusted_sealers",
            "limits.store",
            "backend",
        ] {
            assert!(leaves.contains(key), "{key}: {leaves:#?}");
        }
        assert!(sections.contains("server.timeouts"), "{sections:#?}");
        assert!(!leaves.contains("server"), "a section is not a leaf");
    }

    #[test]
    fn braces_and_headings_are_read() {
        let readme = "# x\n## Configuration reference\n### `relay`\n| key | default |\n|---|---|\n| `timeouts.{connect,greeting}` | x |\n| `a`, `b` | y |\n### `auth`, `dmarc`\n| `auth.enabled` | z |\n## Next\n| `ignored` | |\n";
        let keys: Vec<String> = readme_keys(readme).into_iter().collect();
        assert_eq!(
            keys,
            [
                "auth",
                "auth.enabled",
                "dmarc",
                "relay",
                "relay.a",
                "relay.b",
                "relay.timeouts.connect",
                "relay.timeouts.greeting"
            ]
        );
    }

    #[test]
    fn the_readme_documents_every_key_and_only_keys_that_exist() {
        let readme = include_str!("../../README.md");
        let documented = readme_keys(readme);
        let (leaves, sections) = model_keys();
        let undocumented: Vec<&String> = leaves.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "keys missing from README's Configuration reference: {undocumented:#?}"
        );
        let unknown: Vec<&String> = documented
            .iter()
            .filter(|key| !leaves.contains(*key) && !sections.contains(*key))
            .collect();
        assert!(
            unknown.is_empty(),
            "README documents keys the configuration does not have: {unknown:#?}"
        );
    }
}
