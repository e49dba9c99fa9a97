//! `Doc`: a JSON value held as its text and parsed only when read. What a
//! step stores (its input and output) is loaded with every decision of its
//! instance, but read only by the templates that name it: held as parsed
//! values, a large state of small objects takes up to ~20 times its text in
//! memory; held as text, it takes its text.

use std::fmt;
use std::sync::OnceLock;

use bytes::BufMut;
use serde_json::Value;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// A JSON document: its text, and its parsed value once something read it.
pub(crate) struct Doc {
    text: Box<str>,
    parsed: OnceLock<Value>,
}

impl Doc {
    /// The document of `value` (serialised now; the value is not kept).
    pub(crate) fn of(value: &Value) -> Doc {
        let text = serde_json::to_string(value).expect("JSON values serialise");
        Doc::from_text(text)
    }

    /// JSON `null`.
    pub(crate) fn null() -> Doc {
        Doc::from_text("null".to_string())
    }

    /// A document from text known to be JSON (a `jsonb` column's).
    fn from_text(text: String) -> Doc {
        Doc {
            text: text.into_boxed_str(),
            parsed: OnceLock::new(),
        }
    }

    /// The value, parsed on the first call.
    pub(crate) fn value(&self) -> &Value {
        // The text came from serde_json or PostgreSQL's jsonb: it parses.
        self.parsed
            .get_or_init(|| serde_json::from_str(&self.text).unwrap_or(Value::Null))
    }

    /// A copy of the value.
    pub(crate) fn to_value(&self) -> Value {
        self.value().clone()
    }

    /// The length of its JSON text, in bytes.
    pub(crate) fn len(&self) -> usize {
        self.text.len()
    }
}

impl Clone for Doc {
    /// Copies the text only.
    fn clone(&self) -> Self {
        Doc::from_text(self.text.to_string())
    }
}

impl PartialEq for Doc {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text || self.value() == other.value()
    }
}

impl PartialEq<Value> for Doc {
    fn eq(&self, other: &Value) -> bool {
        self.value() == other
    }
}

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<Value> for Doc {
    fn from(value: Value) -> Self {
        Doc::of(&value)
    }
}

impl serde::Serialize for Doc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// `jsonb` in binary form is a version byte (1) and the text; `json` is the
/// text.
impl<'a> FromSql<'a> for Doc {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unsupported jsonb encoding version".into()),
            }
        } else {
            raw
        };
        Ok(Doc::from_text(std::str::from_utf8(text)?.to_string()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

impl ToSql for Doc {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.text.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_doc_is_its_value_as_text_parsed_when_read() {
        let doc = Doc::of(&json!({"b": [1, 2], "a": "x"}));
        assert_eq!(doc.len(), r#"{"a":"x","b":[1,2]}"#.len());
        assert!(doc.parsed.get().is_none(), "not parsed until read");
        assert_eq!(doc.value(), &json!({"a": "x", "b": [1, 2]}));
        assert_eq!(doc, json!({"a": "x", "b": [1, 2]}));
        assert_eq!(Doc::null(), Value::Null);
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            json!({"a": "x", "b": [1, 2]})
        );
    }
}
