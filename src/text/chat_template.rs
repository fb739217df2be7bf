//! Hugging Face compatible chat templates, rendered with minijinja.
//!
//! `transformers` renders `chat_template` with a sandboxed Jinja2 environment configured with
//! `trim_blocks`, `lstrip_blocks` and the loop-controls extension, exposes `raise_exception`,
//! `strftime_now` and a Python-flavoured `tojson`, and passes `messages`, `tools`, `documents`,
//! `add_generation_prompt` plus the special tokens. We mirror that so that a prompt rendered here
//! is byte-identical to `tokenizer.apply_chat_template(..., tokenize=False)`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Name under which the template is registered; it has no extension so auto-escaping stays off.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation, as sent by OpenAI-style clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template called `raise_exception(msg)`: the message is meant for the client (it
    /// explains what is wrong with the conversation), so it is kept verbatim.
    #[error("{0}")]
    Raised(String),
    /// Rendering failed for another reason (undefined filter, type error, ...).
    #[error("chat template error: {0}")]
    Render(String),
    /// The template does not compile.
    #[error("invalid chat template: {0}")]
    Syntax(String),
    #[error("failed to read chat template {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that should carry a `chat_template` does not.
    #[error("invalid chat template file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A compiled chat template. Cloning is cheap (the environment is shared).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` once; `bos_token`/`eos_token` are the strings the template may emit.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env: Arc::new(env),
            source: source.into(),
            bos_token,
            eos_token,
        })
    }

    /// Loads a `--chat-template` file: raw Jinja, or JSON (`tokenizer_config.json`,
    /// `chat_template.json`) holding a `chat_template` field.
    pub fn from_file(
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        let source = if is_json {
            let invalid = |message: String| TemplateError::Invalid {
                path: path.to_path_buf(),
                message,
            };
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
            match value {
                // A JSON file holding just the template string.
                serde_json::Value::String(s) => s,
                other => template_source_from_config(&other)
                    .map_err(invalid)?
                    .ok_or_else(|| invalid("no \"chat_template\" field".to_string()))?,
            }
        } else {
            text
        };
        Self::new(source, bos_token, eos_token)
    }

    /// The Jinja source, e.g. to log which template is in use.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation exactly as `apply_chat_template(tokenize=False)` would.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let mut ctx = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            // transformers passes these explicitly as None when unused; templates test
            // `tools is not none`, which is true for an undefined variable.
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        // An unset special token is left undefined (renders as ""), as in transformers,
        // rather than `none` (which would render as "none").
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token", Value::from(eos.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => TemplateError::Raised(message),
            None => TemplateError::Render(describe(&e)),
        })
    }
}

/// Extracts the template from a parsed `tokenizer_config.json`-like object. `chat_template` may
/// be a string or a list of `{"name", "template"}` (we take `default`, else the first).
/// `Ok(None)` when there is no template.
pub(crate) fn template_source_from_config(
    config: &serde_json::Value,
) -> Result<Option<String>, String> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let chosen = named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| named.first());
            match chosen {
                None => Ok(None),
                Some(t) => t
                    .get("template")
                    .and_then(|s| s.as_str())
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| "named chat template without a \"template\" string".into()),
            }
        }
        Some(_) => Err("\"chat_template\" must be a string or a list of named templates".into()),
    }
}

/// Marker attached to the error raised by `raise_exception`, so that the message can be told
/// apart from ordinary render errors however deep the call happened.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

fn raised_message(err: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line (minijinja puts template locations in the chain).
fn describe(err: &Error) -> String {
    let mut out = err.to_string();
    let mut current = std::error::Error::source(err);
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
}

/// `strftime_now(fmt)`: transformers formats the current local time with Python's strftime.
/// We have no time-zone database, so this is UTC; templates use it for "Today is ..." lines.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm): (year, month 1-12, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A subset of C `strftime` for a UTC Unix timestamp: `%a %A %b %B %d %e %H %I %j %m %M %p %S
/// %y %Y %Z %z %%`, plus glibc's `%-d`-style unpadded variants. Unknown directives are copied.
pub(crate) fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        (secs_of_day % 3600) / 60,
        secs_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let year_start = days - (civil_days(year, 1, 1));
    let day_of_year = year_start + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('d') => out.push_str(&num(i64::from(day), 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('j') => out.push_str(&num(day_of_year, 3)),
            Some('m') => out.push_str(&num(i64::from(month), 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('S') => out.push_str(&num(second, 2)),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn civil_days(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. minijinja's own filter HTML-escapes and uses
/// compact separators, which would change prompts that embed JSON (tool schemas).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                Some(" ".repeat(usize::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0)))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() => {
            let item = seps.get_item(&Value::from(0))?;
            let key = seps.get_item(&Value::from(1))?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_string(), k.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        // Python's defaults: no space before newlines when indenting.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let opts = JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(out)
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOptions,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String | ValueKind::Bytes => {
            write_json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_string(),
                    None if key.is_none() => "null".to_string(),
                    None if key.kind() == ValueKind::Bool => key.is_true().to_string(),
                    None => key.to_string(),
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), opts, depth, |out, i| {
                let (key, item) = &entries[i];
                write_json_string(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, depth + 1)
            })?;
        }
        _ => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), opts, depth, |out, i| {
                write_json(out, &items[i], opts, depth + 1)
            })?;
        }
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    opts: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(indent) = &opts.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, i)?;
    }
    if let Some(indent) = &opts.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Numbers as Python's `json.dumps` prints them (`1.0`, `1e+20`, `NaN`).
fn python_number(value: &Value) -> String {
    if let Ok(i) = i128::try_from(value.clone()) {
        return i.to_string();
    }
    let Ok(f) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        ChatTemplate::new(src.to_string(), Some("<s>".into()), Some("</s>".into()))?
            .render(messages, true)
    }

    #[test]
    fn raise_exception_message_is_verbatim_even_inside_a_macro() {
        let src = "{% macro check(m) %}{% if m.role == 'x' %}{{ raise_exception('bad role: ' + m.role) }}{% endif %}{% endmacro %}{% for m in messages %}{{ check(m) }}{% endfor %}";
        match render(src, &[ChatMessage::new("x", "hi")]) {
            Err(TemplateError::Raised(msg)) => assert_eq!(msg, "bad role: x"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn other_errors_are_render_errors() {
        let err = render("{{ messages | no_such_filter }}", &[]).unwrap_err();
        assert!(
            matches!(err, TemplateError::Syntax(_) | TemplateError::Render(_)),
            "{err:?}"
        );
        let err = render("{{ 1 + }}", &[]).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn python_methods_loop_controls_and_block_trimming() {
        let src = "{% for m in messages %}\n  {% if loop.index0 > 0 %}{% break %}{% endif %}\n{{ m['content'].strip().upper() }}|{{ m.role.startswith('us') }}\n{% endfor %}";
        let out = render(
            src,
            &[
                ChatMessage::new("user", "  hi "),
                ChatMessage::new("user", "no"),
            ],
        )
        .unwrap();
        assert_eq!(out, "HI|True\n");
    }

    #[test]
    fn missing_special_tokens_render_empty() {
        let t =
            ChatTemplate::new("[{{ bos_token }}]{{ tools is none }}".into(), None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]True");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'b': [1, 2.5, none, true], 'a': 'é\"<'} | tojson }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}".into(),
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"<\"}|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]|{\"a\":2,\"b\":1}"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let ts = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", ts), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", ts), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %I%p %j %%", ts),
            "Thursday February 29, 01PM 060 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
    }

    #[test]
    fn named_templates_pick_default() {
        let cfg = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(
            template_source_from_config(&cfg).unwrap().as_deref(),
            Some("D")
        );
        let cfg = serde_json::json!({"chat_template": [{"name": "rag", "template": "R"}]});
        assert_eq!(
            template_source_from_config(&cfg).unwrap().as_deref(),
            Some("R")
        );
        assert_eq!(
            template_source_from_config(&serde_json::json!({})).unwrap(),
            None
        );
    }
}
