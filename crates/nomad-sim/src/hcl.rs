//! `POST /v1/jobs/parse`: job specifications to Nomad's JSON job.
//!
//! Nomad parses HCL2 with `jobspec2`; no Rust crate does that, and Poseidon's templates use a
//! small part of it. So this is a parser for that part: blocks with labels, attributes with
//! strings, numbers, booleans, lists and objects, comments; `${...}` stays verbatim (Nomad
//! keeps unknown variables as text). The job keys map to the JSON keys of nomad-api.md §1.2.
//! Anything else is a clear error (400). JSON jobs (`{"Job": ...}` or the job) pass through.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::http::parse_go_duration;

/// Why a specification could not be parsed (Nomad: 400 `Failed to parse job: ...`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid JSON job: {0}")]
    Json(String),
}

/// A job specification (HCL subset or JSON) as Nomad's JSON job.
pub(crate) fn parse_job(source: &str) -> Result<Value, ParseError> {
    if source.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(source).map_err(|e| ParseError::Json(e.to_string()))?;
        return Ok(value.get("Job").cloned().unwrap_or(value));
    }
    let body = Parser::new(source).body(true)?;
    let jobs: Vec<&Block> = body.blocks("job").collect();
    match (jobs.as_slice(), body.attributes.keys().next()) {
        ([job], None) => job_json(job),
        (_, Some(name)) => Err(unsupported("the top level", name)),
        _ => Err(ParseError::Unsupported("exactly one job block is required".into())),
    }
}

// ---- syntax ----------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Body {
    attributes: BTreeMap<String, Value>,
    blocks: Vec<Block>,
}

impl Body {
    fn blocks<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Block> {
        self.blocks.iter().filter(move |b| b.kind == kind)
    }
}

#[derive(Debug)]
struct Block {
    kind: String,
    labels: Vec<String>,
    body: Body,
}

/// Nesting deeper than this is refused, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 32;

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
    line: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser { text: text.as_bytes(), at: 0, line: 1, depth: 0 }
    }

    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError::Syntax { line: self.line, message: message.into() }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Skips blanks and comments; with `newlines` also line ends.
    fn skip(&mut self, newlines: bool) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r') => {
                    self.bump();
                }
                Some(b'\n') if newlines => {
                    self.bump();
                }
                Some(b'#') => self.skip_line(),
                Some(b'/') if self.text.get(self.at + 1) == Some(&b'/') => self.skip_line(),
                Some(b'/') if self.text.get(self.at + 1) == Some(&b'*') => {
                    while self.bump().is_some() {
                        if self.peek() == Some(b'/') && self.text.get(self.at - 1) == Some(&b'*') {
                            self.bump();
                            break;
                        }
                    }
                }
                _ => return,
            }
        }
    }

    fn skip_line(&mut self) {
        while self.peek().is_some_and(|c| c != b'\n') {
            self.bump();
        }
    }

    fn identifier(&mut self) -> Result<String, ParseError> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
            self.bump();
        }
        if start == self.at {
            return Err(self.error("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.text[start..self.at]).into_owned())
    }

    fn expect(&mut self, wanted: u8) -> Result<(), ParseError> {
        self.skip(true);
        match self.bump() {
            Some(c) if c == wanted => Ok(()),
            other => Err(self.error(format!(
                "expected {:?}, found {:?}",
                wanted as char,
                other.map(|c| c as char)
            ))),
        }
    }

    /// Attributes and blocks until `}` (or the end at the top level).
    fn body(&mut self, top: bool) -> Result<Body, ParseError> {
        let mut body = Body::default();
        loop {
            self.skip(true);
            match self.peek() {
                None if top => return Ok(body),
                None => return Err(self.error("unexpected end of file, expected \"}\"")),
                Some(b'}') if !top => {
                    self.bump();
                    return Ok(body);
                }
                Some(_) => {}
            }
            let name = self.identifier()?;
            self.skip(false);
            if self.peek() == Some(b'=') {
                self.bump();
                let value = self.value()?;
                if body.attributes.insert(name.clone(), value).is_some() {
                    return Err(self.error(format!("duplicate argument {name:?}")));
                }
                continue;
            }
            let mut labels = Vec::new();
            while self.peek() == Some(b'"') {
                labels.push(self.string()?);
                self.skip(false);
            }
            self.expect(b'{')?;
            let inner = self.nested(|p| p.body(false))?;
            body.blocks.push(Block { kind: name, labels, body: inner });
        }
    }

    fn nested<T>(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        if self.depth == MAX_DEPTH {
            return Err(self.error(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        let result = parse(self);
        self.depth -= 1;
        result
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        self.skip(true);
        match self.peek() {
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => self.nested(Parser::list),
            Some(b'{') => self.nested(Parser::object),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(c) if c.is_ascii_alphabetic() => match self.identifier()?.as_str() {
                "true" => Ok(json!(true)),
                "false" => Ok(json!(false)),
                "null" => Ok(Value::Null),
                other => Err(self.error(format!("unsupported expression {other:?}"))),
            },
            other => Err(self.error(format!("unexpected {:?}", other.map(|c| c as char)))),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.bump();
        let mut out = Vec::new();
        loop {
            match self.bump() {
                None | Some(b'\n') => return Err(self.error("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => {
                    let escaped = match self.bump() {
                        Some(b'n') => b'\n',
                        Some(b't') => b'\t',
                        Some(b'r') => b'\r',
                        Some(c @ (b'"' | b'\\')) => c,
                        other => {
                            return Err(self.error(format!(
                                "unsupported escape {:?}",
                                other.map(|c| c as char)
                            )));
                        }
                    };
                    out.push(escaped);
                }
                Some(c) => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("a string is not UTF-8"))
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.at;
        while self.peek().is_some_and(|c| c == b'-' || c == b'.' || c.is_ascii_digit()) {
            self.bump();
        }
        let text = String::from_utf8_lossy(&self.text[start..self.at]).into_owned();
        if let Ok(int) = text.parse::<i64>() {
            return Ok(json!(int));
        }
        text.parse::<f64>()
            .map(|f| json!(f))
            .map_err(|_| self.error(format!("invalid number {text:?}")))
    }

    fn list(&mut self) -> Result<Value, ParseError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip(true);
            if self.peek() == Some(b']') {
                self.bump();
                return Ok(Value::Array(items));
            }
            items.push(self.value()?);
            self.skip(true);
            match self.peek() {
                Some(b',') => {
                    self.bump();
                }
                Some(b']') => {}
                _ => return Err(self.error("expected \",\" or \"]\" in a list")),
            }
        }
    }

    fn object(&mut self) -> Result<Value, ParseError> {
        self.bump();
        let mut map = Map::new();
        loop {
            self.skip(true);
            if self.peek() == Some(b'}') {
                self.bump();
                return Ok(Value::Object(map));
            }
            let key = if self.peek() == Some(b'"') { self.string()? } else { self.identifier()? };
            self.skip(false);
            match self.bump() {
                Some(b'=' | b':') => {}
                _ => return Err(self.error("expected \"=\" in an object")),
            }
            map.insert(key, self.value()?);
            self.skip(false);
            if self.peek() == Some(b',') {
                self.bump();
            }
        }
    }
}

// ---- job keys --------------------------------------------------------------------------------

fn unsupported(place: &str, name: &str) -> ParseError {
    ParseError::Unsupported(format!(
        "unsupported argument or block {name:?} in {place} (the simulator parses Poseidon's template subset)"
    ))
}

/// How an HCL attribute becomes a JSON key.
#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Duration,
}

/// Maps attributes by `(hcl name, JSON key, kind)`; anything unlisted is an error.
fn attributes(
    body: &Body,
    place: &str,
    keys: &[(&str, &str, Kind)],
) -> Result<Map<String, Value>, ParseError> {
    let mut out = Map::new();
    for (name, value) in &body.attributes {
        let Some((_, key, kind)) = keys.iter().find(|(n, _, _)| n == name) else {
            return Err(unsupported(place, name));
        };
        let value = match kind {
            Kind::Plain => value.clone(),
            Kind::Duration => duration(value, name)?,
        };
        out.insert((*key).to_owned(), value);
    }
    Ok(out)
}

fn duration(value: &Value, name: &str) -> Result<Value, ParseError> {
    let text = value.as_str().unwrap_or_default();
    let nanos = parse_go_duration(text)
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .ok_or_else(|| ParseError::Unsupported(format!("{name}: invalid duration {text:?}")))?;
    Ok(json!(nanos))
}

fn only_blocks(body: &Body, place: &str, known: &[&str]) -> Result<(), ParseError> {
    match body.blocks.iter().find(|b| !known.contains(&b.kind.as_str())) {
        Some(block) => Err(unsupported(place, &block.kind)),
        None => Ok(()),
    }
}

fn single<'a>(body: &'a Body, kind: &'a str) -> Option<&'a Block> {
    body.blocks(kind).next()
}

/// A `meta`/`env`/`config` block as a free-form object.
fn free_form(body: &Body) -> Value {
    let mut map: Map<String, Value> = body.attributes.clone().into_iter().collect();
    for block in &body.blocks {
        let entry = map.entry(block.kind.clone()).or_insert_with(|| json!([]));
        if let Value::Array(items) = entry {
            items.push(free_form(&block.body));
        }
    }
    Value::Object(map)
}

fn job_json(block: &Block) -> Result<Value, ParseError> {
    let id = block.labels.first().cloned().unwrap_or_default();
    let body = &block.body;
    only_blocks(body, "job", &["group", "meta"])?;
    let keys = [
        ("datacenters", "Datacenters", Kind::Plain),
        ("type", "Type", Kind::Plain),
        ("namespace", "Namespace", Kind::Plain),
        ("region", "Region", Kind::Plain),
        ("priority", "Priority", Kind::Plain),
        ("node_pool", "NodePool", Kind::Plain),
        ("all_at_once", "AllAtOnce", Kind::Plain),
    ];
    let mut job = attributes(body, "job", &keys)?;
    job.insert("ID".into(), json!(id));
    job.insert("Name".into(), json!(id));
    if let Some(meta) = single(body, "meta") {
        job.insert("Meta".into(), free_form(&meta.body));
    }
    let groups = body.blocks("group").map(group_json).collect::<Result<Vec<_>, _>>()?;
    job.insert("TaskGroups".into(), Value::Array(groups));
    Ok(Value::Object(job))
}

fn group_json(block: &Block) -> Result<Value, ParseError> {
    let body = &block.body;
    let place = "group";
    only_blocks(
        body,
        place,
        &["task", "ephemeral_disk", "spread", "restart", "reschedule", "network", "meta"],
    )?;
    let mut group = attributes(body, place, &[("count", "Count", Kind::Plain)])?;
    group.insert("Name".into(), json!(block.labels.first().cloned().unwrap_or_default()));
    if let Some(disk) = single(body, "ephemeral_disk") {
        let keys = [
            ("migrate", "Migrate", Kind::Plain),
            ("size", "SizeMB", Kind::Plain),
            ("sticky", "Sticky", Kind::Plain),
        ];
        group.insert(
            "EphemeralDisk".into(),
            Value::Object(attributes(&disk.body, "ephemeral_disk", &keys)?),
        );
    }
    let spreads = body
        .blocks("spread")
        .map(|s| {
            let keys = [("attribute", "Attribute", Kind::Plain), ("weight", "Weight", Kind::Plain)];
            attributes(&s.body, "spread", &keys).map(Value::Object)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !spreads.is_empty() {
        group.insert("Spreads".into(), Value::Array(spreads));
    }
    if let Some(restart) = single(body, "restart") {
        let keys = [
            ("attempts", "Attempts", Kind::Plain),
            ("delay", "Delay", Kind::Duration),
            ("interval", "Interval", Kind::Duration),
            ("mode", "Mode", Kind::Plain),
            ("render_templates", "RenderTemplates", Kind::Plain),
        ];
        group.insert(
            "RestartPolicy".into(),
            Value::Object(attributes(&restart.body, "restart", &keys)?),
        );
    }
    if let Some(reschedule) = single(body, "reschedule") {
        let keys = [
            ("unlimited", "Unlimited", Kind::Plain),
            ("attempts", "Attempts", Kind::Plain),
            ("interval", "Interval", Kind::Duration),
            ("delay", "Delay", Kind::Duration),
            ("max_delay", "MaxDelay", Kind::Duration),
            ("delay_function", "DelayFunction", Kind::Plain),
        ];
        group.insert(
            "ReschedulePolicy".into(),
            Value::Object(attributes(&reschedule.body, "reschedule", &keys)?),
        );
    }
    let networks = body.blocks("network").map(network_json).collect::<Result<Vec<_>, _>>()?;
    if !networks.is_empty() {
        group.insert("Networks".into(), Value::Array(networks));
    }
    if let Some(meta) = single(body, "meta") {
        group.insert("Meta".into(), free_form(&meta.body));
    }
    let tasks = body.blocks("task").map(task_json).collect::<Result<Vec<_>, _>>()?;
    group.insert("Tasks".into(), Value::Array(tasks));
    Ok(Value::Object(group))
}

fn network_json(block: &Block) -> Result<Value, ParseError> {
    only_blocks(&block.body, "network", &["port"])?;
    let mut network = attributes(&block.body, "network", &[("mode", "Mode", Kind::Plain)])?;
    let mut dynamic = Vec::new();
    let mut reserved = Vec::new();
    for port in block.body.blocks("port") {
        let keys = [
            ("static", "Value", Kind::Plain),
            ("to", "To", Kind::Plain),
            ("host_network", "HostNetwork", Kind::Plain),
        ];
        let mut entry = attributes(&port.body, "port", &keys)?;
        entry.insert("Label".into(), json!(port.labels.first().cloned().unwrap_or_default()));
        if entry.contains_key("Value") {
            reserved.push(Value::Object(entry));
        } else {
            dynamic.push(Value::Object(entry));
        }
    }
    if !dynamic.is_empty() {
        network.insert("DynamicPorts".into(), Value::Array(dynamic));
    }
    if !reserved.is_empty() {
        network.insert("ReservedPorts".into(), Value::Array(reserved));
    }
    Ok(Value::Object(network))
}

fn task_json(block: &Block) -> Result<Value, ParseError> {
    let body = &block.body;
    only_blocks(body, "task", &["config", "logs", "resources", "env", "meta"])?;
    let keys = [
        ("driver", "Driver", Kind::Plain),
        ("user", "User", Kind::Plain),
        ("kill_timeout", "KillTimeout", Kind::Duration),
        ("kill_signal", "KillSignal", Kind::Plain),
        ("leader", "Leader", Kind::Plain),
    ];
    let mut task = attributes(body, "task", &keys)?;
    task.insert("Name".into(), json!(block.labels.first().cloned().unwrap_or_default()));
    for (kind, key) in [("config", "Config"), ("env", "Env"), ("meta", "Meta")] {
        if let Some(inner) = single(body, kind) {
            task.insert(key.into(), free_form(&inner.body));
        }
    }
    if let Some(logs) = single(body, "logs") {
        let keys = [
            ("max_files", "MaxFiles", Kind::Plain),
            ("max_file_size", "MaxFileSizeMB", Kind::Plain),
            ("disabled", "Disabled", Kind::Plain),
        ];
        task.insert("LogConfig".into(), Value::Object(attributes(&logs.body, "logs", &keys)?));
    }
    if let Some(resources) = single(body, "resources") {
        let keys = [
            ("cpu", "CPU", Kind::Plain),
            ("cores", "Cores", Kind::Plain),
            ("memory", "MemoryMB", Kind::Plain),
            ("memory_max", "MemoryMaxMB", Kind::Plain),
        ];
        task.insert(
            "Resources".into(),
            Value::Object(attributes(&resources.body, "resources", &keys)?),
        );
    }
    Ok(Value::Object(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_name_the_line() {
        let error = parse_job("job \"x\" {\n  count = \n}").unwrap_err();
        assert!(matches!(error, ParseError::Syntax { line: 3, .. }), "{error:?}");
        assert!(matches!(parse_job("job \"x\" {"), Err(ParseError::Syntax { .. })));
        let deep = format!("job \"x\" {{ meta {{ a = {} }} }}", "[".repeat(100_000));
        assert!(parse_job(&deep).unwrap_err().to_string().contains("nesting"));
        let error = parse_job("job \"x\" { vault { policies = [] } }").unwrap_err();
        assert!(error.to_string().contains("\"vault\""), "{error}");
    }

    #[test]
    fn ports_comments_and_objects() {
        let job = parse_job(
            "/* c */ job \"j\" { # c\n group \"g\" { network { mode = \"bridge\"\n port \"8080\" { to = 8080 } }\n \
             task \"t\" { config {\n labels = { a = \"b\" }\n args = [1, \"x\",] } } } }",
        )
        .unwrap();
        let group = &job["TaskGroups"][0];
        assert_eq!(
            group["Networks"][0],
            json!({"Mode": "bridge", "DynamicPorts": [{"Label": "8080", "To": 8080}]})
        );
        assert_eq!(group["Tasks"][0]["Config"], json!({"labels": {"a": "b"}, "args": [1, "x"]}));
    }
}
