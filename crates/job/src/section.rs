//! One table of a job spec, with its dotted path: typed getters whose errors name
//! the full key (`dataset.context`), the value and what is allowed.

use toml::{Table, Value};

use crate::SpecError;

/// One table of the spec, with its dotted path for error messages.
pub(crate) struct Section<'a> {
    pub(crate) path: String,
    pub(crate) table: &'a Table,
}

static EMPTY: std::sync::LazyLock<Table> = std::sync::LazyLock::new(Table::new);

fn type_name(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{s}\""),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}

impl<'a> Section<'a> {
    pub(crate) fn new(path: &str, table: &'a Table, allowed: &[&str]) -> Result<Self, SpecError> {
        let section = Section {
            path: path.to_string(),
            table,
        };
        for key in table.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(SpecError::UnknownKey {
                    key: section.key(key),
                    allowed: allowed.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        Ok(section)
    }

    pub(crate) fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    pub(crate) fn section(&self, name: &str, allowed: &[&str]) -> Result<Section<'a>, SpecError> {
        match self.table.get(name) {
            None => Section::new(&self.key(name), &EMPTY, allowed),
            Some(Value::Table(t)) => Section::new(&self.key(name), t, allowed),
            Some(v) => Err(self.wrong_type(name, "a table", v)),
        }
    }

    pub(crate) fn wrong_type(&self, k: &str, expected: &str, v: &Value) -> SpecError {
        SpecError::WrongType {
            key: self.key(k),
            expected: expected.into(),
            found: type_name(v),
        }
    }

    pub(crate) fn invalid(&self, k: &str, value: &str, allowed: &str) -> SpecError {
        SpecError::InvalidValue {
            key: self.key(k),
            value: format!("\"{value}\""),
            allowed: allowed.into(),
        }
    }

    pub(crate) fn missing(&self, k: &str, what: &str) -> SpecError {
        SpecError::Missing {
            key: self.key(k),
            what: what.into(),
        }
    }

    pub(crate) fn string(&self, k: &str) -> Result<Option<String>, SpecError> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong_type(k, "a string", v)),
        }
    }

    pub(crate) fn int(&self, k: &str, min: usize, max: usize) -> Result<Option<usize>, SpecError> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::Integer(i)) => match usize::try_from(*i) {
                Ok(u) if u >= min && u <= max => Ok(Some(u)),
                _ => Err(SpecError::InvalidValue {
                    key: self.key(k),
                    value: i.to_string(),
                    allowed: if max == usize::MAX {
                        format!("an integer of at least {min}")
                    } else {
                        format!("an integer from {min} to {max}")
                    },
                }),
            },
            Some(v) => Err(self.wrong_type(k, "an integer", v)),
        }
    }

    /// `[rows, cols]`, each from 1 to 4096.
    pub(crate) fn shape(&self, k: &str) -> Result<Option<(usize, usize)>, SpecError> {
        let expected = "[rows, cols] (integers from 1 to 4096)";
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => match a.as_slice() {
                [Value::Integer(r), Value::Integer(c)] if (1..=4096).contains(r) && (1..=4096).contains(c) => {
                    Ok(Some((*r as usize, *c as usize)))
                }
                _ => Err(self.invalid(k, &Value::Array(a.clone()).to_string(), expected)),
            },
            Some(v) => Err(self.wrong_type(k, expected, v)),
        }
    }

    pub(crate) fn bool(&self, k: &str) -> Result<Option<bool>, SpecError> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(k, "true or false", v)),
        }
    }

    pub(crate) fn float(&self, k: &str) -> Result<Option<f64>, SpecError> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::Float(f)) => Ok(Some(*f)),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.wrong_type(k, "a number", v)),
        }
    }
}
