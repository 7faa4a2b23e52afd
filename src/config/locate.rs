//! Finding the line and column of a YAML node by its path.
//!
//! Errors are collected with the path of the value they are about (`rules[3].match.ip`);
//! this module turns that path into a position in the source text. It walks the document
//! with `serde_yaml_ng`'s own deserializer and, on reaching the node, raises an error:
//! the deserializer stamps errors with the position of the node being read, which is
//! exactly the position we want. This keeps one YAML parser in the program.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

const MARK: &str = "\u{0}mxgate-locate\u{0}";

/// One step of a path into a YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path into a YAML document, displayed like `rules[2].match.client_ip`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct YamlPath(pub Vec<Segment>);

impl YamlPath {
    pub fn root() -> Self {
        YamlPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_string()));
        next
    }

    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// Appends a path reported by `serde_path_to_error`.
    pub fn join_serde(&self, path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        let mut next = self.clone();
        for segment in path.iter() {
            match segment {
                S::Seq { index } => next.0.push(Segment::Index(*index)),
                S::Map { key } => next.0.push(Segment::Key(key.clone())),
                S::Enum { variant } => next.0.push(Segment::Key(variant.clone())),
                S::Unknown => {}
            }
        }
        next
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if n == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where the node at `path` starts. With `key` set and a path ending in a map key, the
/// position of the key itself (used for "unknown field" errors). Falls back to the
/// nearest existing ancestor, and to 1:1 for an empty document.
pub fn locate(text: &str, path: &YamlPath, key: bool) -> Position {
    let mut segments = path.0.as_slice();
    loop {
        if let Some(position) = locate_exact(text, segments, key && segments.len() == path.0.len())
        {
            return position;
        }
        match segments.split_last() {
            Some((_, parent)) => segments = parent,
            None => return Position { line: 1, column: 1 },
        }
    }
}

fn locate_exact(text: &str, path: &[Segment], key: bool) -> Option<Position> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match (Locate { path, key }).deserialize(deserializer) {
        Err(err) if err.to_string().contains(MARK) => err.location().map(|loc| Position {
            line: loc.line(),
            column: loc.column(),
        }),
        _ => None,
    }
}

struct Locate<'p> {
    path: &'p [Segment],
    key: bool,
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        // The error must be raised inside the node's own visit, so the deserializer
        // stamps it with that node's position rather than its parent's.
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.path.is_empty() {
            return Err(de::Error::custom(MARK));
        }
        let (Segment::Key(wanted), rest) = (&self.path[0], &self.path[1..]) else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let stop_at_key = self.key && rest.is_empty();
        while let Some(found) = map.next_key_seed(KeySeed {
            wanted,
            stop: stop_at_key,
        })? {
            if found {
                return map.next_value_seed(Locate {
                    path: rest,
                    key: self.key,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.path.is_empty() {
            return Err(de::Error::custom(MARK));
        }
        let (Segment::Index(wanted), rest) = (&self.path[0], &self.path[1..]) else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        for _ in 0..*wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Locate {
            path: rest,
            key: self.key,
        })?;
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
}

impl Locate<'_> {
    /// A scalar: the target if the path ends here, otherwise the path does not exist.
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(MARK))
        } else {
            Ok(())
        }
    }
}

/// Reads a map key; tells whether it is the wanted one, or (with `stop`) raises the
/// locating error on the key itself.
struct KeySeed<'w> {
    wanted: &'w str,
    stop: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

impl KeySeed<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        let found = key == self.wanted;
        if found && self.stop {
            return Err(E::custom(MARK));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "server:\n  hostname: mx.test\n  listen:\n    - 127.0.0.1:25\n    - '[::1]:25'\nrules:\n  - name: a\n    match:\n      ip: 10.0.0.0/8\n";

    fn path(segments: &[Segment]) -> YamlPath {
        YamlPath(segments.to_vec())
    }

    #[test]
    fn locates_values_keys_and_items() {
        let hostname = path(&[
            Segment::Key("server".into()),
            Segment::Key("hostname".into()),
        ]);
        assert_eq!(
            locate(DOC, &hostname, false),
            Position {
                line: 2,
                column: 13
            }
        );
        assert_eq!(
            locate(DOC, &hostname, true),
            Position { line: 2, column: 3 }
        );
        let item = path(&[
            Segment::Key("server".into()),
            Segment::Key("listen".into()),
            Segment::Index(1),
        ]);
        assert_eq!(locate(DOC, &item, false), Position { line: 5, column: 7 });
        let ip = path(&[
            Segment::Key("rules".into()),
            Segment::Index(0),
            Segment::Key("match".into()),
            Segment::Key("ip".into()),
        ]);
        assert_eq!(
            locate(DOC, &ip, false),
            Position {
                line: 9,
                column: 11
            }
        );
        assert_eq!(ip.to_string(), "rules[0].match.ip");
    }

    #[test]
    fn missing_node_falls_back_to_parent() {
        let missing = path(&[Segment::Key("server".into()), Segment::Key("nope".into())]);
        assert_eq!(
            locate(DOC, &missing, false),
            Position { line: 2, column: 3 }
        );
    }
}
