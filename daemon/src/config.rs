//! Reading a daemon's configuration: a TOML file, then environment variables over it.
//!
//! Both daemons read their settings the same way, into their own "raw" struct (every key
//! optional, `deny_unknown_fields`), which they then validate into a typed configuration:
//!
//! 1. the file, if one is named (otherwise the struct's defaults);
//! 2. every variable `PREFIX` + `KEY` (top-level keys) or `PREFIX` + `SECTION__KEY` (keys of
//!    a `[section]`), upper case; the value is read as a TOML value when it is one (`5000`,
//!    `true`, `["a", "b"]`) and as a string otherwise, and list keys also take `a,b,c`;
//! 3. command-line flags, which each binary applies to the raw struct itself.
//!
//! A key the struct does not know, or a value of the wrong type, is an error naming where it
//! came from: the file, the variables, or both.
//!
//! `--print-config` goes the other way with [`Commented`]: from the same raw structs to a
//! commented TOML file, each key under its field's doc comment.

use std::path::{Path, PathBuf};

use documented::DocumentedFields;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file or a variable is not valid for the configuration: bad TOML, an unknown key, or
    /// a value of the wrong type.
    #[error("config from {origin}: {message}")]
    Parse {
        /// The file, the defaults, and the variables used.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Where a daemon's variables start and which of them are not configuration keys.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    /// Prefix of every variable, e.g. `AMBIENT_AGENT_`.
    pub prefix: &'a str,
    /// Names after the prefix that belong to command-line flags (`CONFIG`, `VERBOSE`), skipped.
    pub flags: &'a [&'a str],
    /// Keys (`labels`, `section.key`) whose variables may also be comma-separated lists.
    pub lists: &'a [&'a str],
}

/// Reads `file` (`None`: start from `T`'s defaults, which `#[serde(default)]` provides), then
/// applies the variables in `vars` that `env` selects.
///
/// # Errors
/// [`LoadError::Read`] if the file cannot be read, [`LoadError::Parse`] if the file or a
/// variable names an unknown key or has a value of the wrong type.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: Env<'_>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, LoadError> {
    let (mut table, origin) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table = text.parse::<toml::Table>().map_err(|e| LoadError::Parse {
                origin: path.display().to_string(),
                message: e.to_string().trim_end().to_owned(),
            })?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "the defaults".to_owned()),
    };
    let mut used = Vec::new();
    for (name, value) in vars {
        let Some(key) = name.strip_prefix(env.prefix) else {
            continue;
        };
        if env.flags.contains(&key) {
            continue;
        }
        let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
        let is_list = env.lists.contains(&path.join(".").as_str());
        insert_path(&mut table, &path, env_value(&value, is_list));
        used.push(name);
    }
    table.try_into::<T>().map_err(|e| LoadError::Parse {
        origin: if used.is_empty() {
            origin
        } else {
            format!("{origin} and the environment ({})", used.join(", "))
        },
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

/// A variable's value as a TOML value when it is one, as a list when `is_list` and it is
/// comma-separated, and as a string otherwise.
fn env_value(value: &str, is_list: bool) -> toml::Value {
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v) => v,
        None if is_list => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_owned().into())
                .collect(),
        ),
        None => toml::Value::String(value.to_owned()),
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [key] => {
            table.insert(key.clone(), value);
        }
        [section, rest @ ..] => {
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Table::new().into());
            if !entry.is_table() {
                *entry = toml::Table::new().into();
            }
            if let Some(t) = entry.as_table_mut() {
                insert_path(t, rest, value);
            }
        }
    }
}

/// The environment as `(name, value)` pairs, skipping names or values that are not UTF-8.
pub fn env_vars() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

/// A configuration as commented TOML, generated from its raw structs: each key is commented
/// with its field's doc comment (rustdoc, through [`DocumentedFields`]) and given the value it
/// was set to (serde), in the order the fields are declared. A key left unset is shown
/// commented out with the value in effect (`# key = value`), or as `# key is not set` when
/// nothing is in effect either, so every key the daemon reads appears and uncommenting a line
/// gives a valid setting. Reading the text back gives the same settings.
///
/// Add the top level (`name` `None`) first, then each `[section]`; a map inside a section
/// (accounts, for example) is printed as its own `[section.key]` table.
///
/// ```
/// use documented::DocumentedFields;
/// use serde::Serialize;
///
/// #[derive(Serialize, DocumentedFields)]
/// struct Raw {
///     /// Where to connect.
///     broker: String,
///     /// A name for logs.
///     name: Option<String>,
///     /// Tasks at once. Default: the cores.
///     tasks: Option<u32>,
/// }
///
/// let broker = "mqtt://127.0.0.1:1883".to_owned();
/// let set = Raw { broker: broker.clone(), name: None, tasks: None };
/// let effective = Raw { broker, name: None, tasks: Some(4) };
/// let text = ambient_daemon::config::Commented::new("example")
///     .section(None, &set, &effective)?
///     .finish();
/// let expected = concat!(
///     "# example\n\n",
///     "# Where to connect.\nbroker = \"mqtt://127.0.0.1:1883\"\n",
///     "# A name for logs.\n# name is not set\n",
///     "# Tasks at once. Default: the cores.\n# tasks = 4\n",
/// );
/// assert_eq!(text, expected);
/// # Ok::<(), toml::ser::Error>(())
/// ```
#[derive(Debug)]
pub struct Commented {
    out: String,
}

impl Commented {
    /// Starts with `title` as a comment.
    pub fn new(title: &str) -> Self {
        Self {
            out: format!("# {title}\n"),
        }
    }

    /// Adds the keys of `set` (what the configuration says), showing for each unset key its
    /// value in `effective` (what the daemon uses): at the top level with `name` `None`, else
    /// under `[name]`. Top-level keys whose value is a table are sections: add them with their
    /// own call.
    ///
    /// # Errors
    /// When a value cannot be written as TOML (a path that is not UTF-8, for example).
    pub fn section<T: Serialize + DocumentedFields>(
        mut self,
        name: Option<&str>,
        set: &T,
        effective: &T,
    ) -> Result<Self, toml::ser::Error> {
        let set = toml::Table::try_from(set)?;
        let effective = toml::Table::try_from(effective)?;
        let mut keys = String::new();
        // Maps inside a section, after its plain keys, as `[name.key]` tables.
        let mut tables = String::new();
        for (key, doc) in T::FIELD_NAMES.iter().zip(T::FIELD_DOCS) {
            let comment: String = doc
                .lines()
                .map(|line| format!("{}\n", format!("# {line}").trim_end()))
                .collect();
            match (set.get(*key), effective.get(*key), name) {
                (Some(toml::Value::Table(_)), _, None) => {}
                (Some(toml::Value::Table(entries)), _, Some(name)) => {
                    let nested = toml::Table::from_iter([(
                        name.to_owned(),
                        toml::Value::Table(toml::Table::from_iter([(
                            (*key).to_owned(),
                            toml::Value::Table(entries.clone()),
                        )])),
                    )]);
                    let text = toml::to_string(&nested)?;
                    tables.push_str(&format!("\n{comment}{text}"));
                }
                (Some(value), _, _) => keys.push_str(&format!("{comment}{key} = {value}\n")),
                (None, Some(value), _) => keys.push_str(&format!("{comment}# {key} = {value}\n")),
                (None, None, _) => keys.push_str(&format!("{comment}# {key} is not set\n")),
            }
        }
        match name {
            Some(name) => self.out.push_str(&format!("\n[{name}]\n{keys}{tables}")),
            None if keys.is_empty() => {}
            None => self.out.push_str(&format!("\n{keys}")),
        }
        Ok(self)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Raw {
        name: String,
        tags: Vec<String>,
        section: Section,
    }

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        limit_ms: u64,
        on: bool,
    }

    const ENV: Env<'static> = Env {
        prefix: "T_",
        flags: &["CONFIG"],
        lists: &["tags"],
    };

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize, DocumentedFields)]
    #[serde(default, deny_unknown_fields)]
    struct Printed {
        /// A name, with "quotes" and a \\ in it.
        name: String,
        /// Accounts: name = hash.
        users: std::collections::BTreeMap<String, String>,
        /// Unset, with nothing in effect.
        note: Option<String>,
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize, DocumentedFields)]
    #[serde(default, deny_unknown_fields)]
    struct PrintedTop {
        /// The one section.
        section: Printed,
    }

    #[test]
    fn commented_text_escapes_strings_prints_maps_as_subtables_and_reads_back() {
        let section = Printed {
            name: "a \"quoted\" \\ name".into(),
            users: [("laptop".to_owned(), "$argon2id$x".to_owned())].into(),
            note: None,
        };
        let top = PrintedTop { section };
        let text = Commented::new("test")
            .section(None, &top, &top)
            .unwrap()
            .section(Some("section"), &top.section, &top.section)
            .unwrap()
            .finish();
        assert!(
            text.contains("\n[section.users]\nlaptop = \"$argon2id$x\"\n"),
            "{text}"
        );
        assert!(text.contains("\n# note is not set\n"), "{text}");
        let back: PrintedTop = toml::from_str(&text).unwrap();
        assert_eq!(back, top);
    }

    #[test]
    fn variables_override_the_file_key_by_key_with_sections_after_a_double_underscore() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "name = \"a\"\n[section]\nlimit_ms = 5\non = true\n").unwrap();
        let raw: Raw = load(
            Some(&file),
            ENV,
            vars(&[
                ("T_SECTION__LIMIT_MS", "7"),
                ("T_TAGS", "x, y"),
                ("T_CONFIG", "ignored: a flag's"),
                ("OTHER", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            raw,
            Raw {
                name: "a".into(),
                tags: vec!["x".into(), "y".into()],
                section: Section {
                    limit_ms: 7,
                    on: true
                },
            }
        );
    }

    #[test]
    fn an_unknown_key_or_a_wrong_type_names_where_it_came_from() {
        let err = load::<Raw>(None, ENV, vars(&[("T_SECTION__LIMIT", "7")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config from the defaults and the environment (T_SECTION__LIMIT):"),
            "{text}"
        );
        assert!(text.contains("unknown field `limit`"), "{text}");
        let err = load::<Raw>(None, ENV, vars(&[("T_SECTION__ON", "maybe")])).unwrap_err();
        assert!(err.to_string().contains("T_SECTION__ON"), "{err}");
        let missing = Path::new("/nonexistent/c.toml");
        assert!(matches!(
            load::<Raw>(Some(missing), ENV, vars(&[])),
            Err(LoadError::Read { .. })
        ));
    }
}
