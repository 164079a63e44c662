//! The QMP command table: each command's name, its arguments (checked before it runs, with QEMU's messages) and
//! what it does. Adding a command is adding a row; nothing else matches on command names. Guest-facing commands
//! are forwarded to the core ([`Reply::Core`]); the rest run in the launcher through [`Host`].

use serde_json::{json, Map, Value};
use tessera_ipc::messages::MonitorCommand;

/// A QMP error: `{"error": {"class": ..., "desc": ...}}` (qmp-spec §2.4.2). QEMU uses `GenericError` for
/// almost everything; `CommandNotFound` and `DeviceNotFound` are the other classes Tessera sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError { class: "GenericError", desc: desc.into() }
    }

    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError { class: "CommandNotFound", desc: desc.into() }
    }

    pub fn device_not_found(id: &str) -> QmpError {
        QmpError { class: "DeviceNotFound", desc: format!("Device '{id}' not found") }
    }
}

/// What running a command gives.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Return(Value),
    Error(QmpError),
    /// Forward to the core; its `MonitorReply` is the answer.
    Core(MonitorCommand),
    /// `quit`: answer `{}`, then end the VM.
    Quit,
}

/// What the launcher-side commands act on (the supervised graph).
pub trait Host {
    /// `x-tessera-backend-restart`: a new process of the backend's binary, as it is on disk now.
    fn backend_restart(&mut self, id: &str) -> Result<(), QmpError>;
    /// `x-tessera-backend-swap`: the device's vhost-user connection goes to `socket` instead.
    fn backend_swap(&mut self, id: &str, socket: &str) -> Result<(), QmpError>;
    /// `x-tessera-query-backends`: the supervised backends and their state.
    fn backends(&self) -> Value;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    Str,
    StrList,
}

impl ArgType {
    /// QEMU's name for the expected type, in "Invalid parameter type for 'x', expected: string".
    fn name(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::StrList => "array",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            ArgType::Str => v.is_string(),
            ArgType::StrList => v.is_array(),
        }
    }
}

pub struct ArgDef {
    pub name: &'static str,
    pub ty: ArgType,
    pub optional: bool,
}

pub type Handler = fn(&mut dyn Host, &Map<String, Value>) -> Reply;

pub struct CommandDef {
    pub name: &'static str,
    pub args: &'static [ArgDef],
    pub run: Handler,
}

const fn arg(name: &'static str, ty: ArgType, optional: bool) -> ArgDef {
    ArgDef { name, ty, optional }
}

/// Every command, in the order `query-commands` lists them.
pub static COMMANDS: &[CommandDef] = &[
    // Negotiation mode runs this one itself (server.rs); in command mode it is refused as QEMU refuses it.
    CommandDef {
        name: "qmp_capabilities",
        args: &[arg("enable", ArgType::StrList, true)],
        run: |_, _| {
            Reply::Error(QmpError::command_not_found("Capabilities negotiation is already complete, command ignored"))
        },
    },
    CommandDef { name: "query-status", args: &[], run: |_, _| Reply::Core(MonitorCommand::QueryStatus) },
    CommandDef { name: "stop", args: &[], run: |_, _| Reply::Core(MonitorCommand::Stop) },
    CommandDef { name: "cont", args: &[], run: |_, _| Reply::Core(MonitorCommand::Cont) },
    CommandDef { name: "system_powerdown", args: &[], run: |_, _| Reply::Core(MonitorCommand::SystemPowerdown) },
    CommandDef { name: "system_reset", args: &[], run: |_, _| Reply::Core(MonitorCommand::SystemReset) },
    CommandDef { name: "quit", args: &[], run: |_, _| Reply::Quit },
    CommandDef { name: "query-version", args: &[], run: |_, _| Reply::Return(version()) },
    CommandDef {
        name: "query-commands",
        args: &[],
        run: |_, _| Reply::Return(Value::Array(COMMANDS.iter().map(|c| json!({ "name": c.name })).collect())),
    },
    CommandDef {
        name: "x-tessera-backend-restart",
        args: &[arg("id", ArgType::Str, false)],
        run: |host, args| match host.backend_restart(str_arg(args, "id")) {
            Ok(()) => Reply::Return(json!({})),
            Err(e) => Reply::Error(e),
        },
    },
    CommandDef {
        name: "x-tessera-backend-swap",
        args: &[arg("id", ArgType::Str, false), arg("socket", ArgType::Str, false)],
        run: |host, args| match host.backend_swap(str_arg(args, "id"), str_arg(args, "socket")) {
            Ok(()) => Reply::Return(json!({})),
            Err(e) => Reply::Error(e),
        },
    },
    CommandDef { name: "x-tessera-query-backends", args: &[], run: |host, _| Reply::Return(host.backends()) },
];

/// A string argument [`check_args`] has checked (empty if absent).
fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// `query-version` and the greeting's `version`: QEMU's `VersionInfo` of the release whose interface Tessera
/// follows, with Tessera in `package`.
pub fn version() -> Value {
    let mut parts = crate::QEMU_VERSION.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, micro) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    json!({
        "qemu": { "micro": micro, "minor": minor, "major": major },
        "package": format!("tessera {}", env!("CARGO_PKG_VERSION")),
    })
}

pub fn find(name: &str) -> Option<&'static CommandDef> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Check `args` against the command's definition, in QEMU's order (the input visitor walks the schema's
/// members, then complains about what is left).
pub fn check_args(def: &CommandDef, args: &Map<String, Value>) -> Result<(), QmpError> {
    for a in def.args {
        match args.get(a.name) {
            None if a.optional => {}
            None => return Err(QmpError::generic(format!("Parameter '{}' is missing", a.name))),
            Some(v) if !a.ty.accepts(v) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{}', expected: {}",
                    a.name,
                    a.ty.name()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(k) = args.keys().find(|k| !def.args.iter().any(|a| a.name == k.as_str())) {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    Ok(())
}

/// A client's input, checked as QEMU's qmp_dispatch checks it (qapi/qmp-dispatch.c).
#[derive(Debug, PartialEq)]
pub enum Request {
    Command { id: Option<Value>, name: String, args: Map<String, Value> },
    Invalid { id: Option<Value>, error: QmpError },
}

pub fn parse_request(v: Value) -> Request {
    let Value::Object(obj) = v else {
        return Request::Invalid { id: None, error: QmpError::generic("QMP input must be a JSON object") };
    };
    let id = obj.get("id").cloned();
    let invalid = |error| Request::Invalid { id: id.clone(), error };
    let mut name = None;
    let mut args = Map::new();
    for (k, v) in &obj {
        match (k.as_str(), v) {
            ("execute", Value::String(s)) => name = Some(s.clone()),
            ("execute", _) => return invalid(QmpError::generic("QMP input member 'execute' must be a string")),
            ("arguments", Value::Object(a)) => args = a.clone(),
            ("arguments", _) => return invalid(QmpError::generic("QMP input member 'arguments' must be an object")),
            ("id", _) => {}
            // Out-of-band execution is not offered in the greeting, so `exec-oob` is as unexpected as any
            // other member.
            (k, _) => return invalid(QmpError::generic(format!("QMP input member '{k}' is unexpected"))),
        }
    }
    match name {
        Some(name) => Request::Command { id, name, args },
        None => invalid(QmpError::generic("QMP input lacks member 'execute'")),
    }
}

/// `qmp_capabilities` in negotiation mode: Tessera offers no capability (no out-of-band execution yet).
pub fn negotiate(args: &Map<String, Value>) -> Result<(), QmpError> {
    let def = find("qmp_capabilities").ok_or_else(|| QmpError::generic("internal: no qmp_capabilities"))?;
    check_args(def, args)?;
    // Every capability a client may name is one Tessera does not offer: the first one is the error.
    if let Some((i, cap)) = args.get("enable").and_then(Value::as_array).and_then(|l| l.iter().enumerate().next()) {
        return Err(match cap.as_str() {
            // QEMU monitor/qmp-cmds-control.c qmp_caps_accept.
            Some("oob") => QmpError::generic("Capability oob not available"),
            Some(other) => QmpError::generic(format!("Parameter 'enable[{i}]' does not accept value '{other}'")),
            None => QmpError::generic(format!("Invalid parameter type for 'enable[{i}]', expected: string")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Request {
        parse_request(serde_json::from_str(text).unwrap())
    }

    #[test]
    fn input_is_checked_with_qemus_messages() {
        let err = |text: &str| match req(text) {
            Request::Invalid { error, .. } => error.desc,
            other => panic!("{other:?}"),
        };
        assert_eq!(err("[1]"), "QMP input must be a JSON object");
        assert_eq!(err(r#"{"execute": 5}"#), "QMP input member 'execute' must be a string");
        assert_eq!(err(r#"{"execute": "stop", "arguments": []}"#), "QMP input member 'arguments' must be an object");
        assert_eq!(err(r#"{"exec": "stop"}"#), "QMP input member 'exec' is unexpected");
        assert_eq!(err(r#"{"id": 1}"#), "QMP input lacks member 'execute'");
        match req(r#"{"execute": "stop", "id": {"a": [1]}}"#) {
            Request::Command { id, name, .. } => {
                assert_eq!(name, "stop");
                assert_eq!(id, Some(json!({"a": [1]})));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arguments_are_checked_against_the_table() {
        let swap = find("x-tessera-backend-swap").unwrap();
        let args = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(check_args(swap, &args(json!({"id": "d", "socket": "/s"}))), Ok(()));
        assert_eq!(check_args(swap, &args(json!({"id": "d"}))).unwrap_err().desc, "Parameter 'socket' is missing");
        assert_eq!(
            check_args(swap, &args(json!({"id": 3, "socket": "/s"}))).unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            check_args(find("stop").unwrap(), &args(json!({"x": 1}))).unwrap_err().desc,
            "Parameter 'x' is unexpected"
        );
        assert_eq!(negotiate(&args(json!({"enable": ["oob"]}))).unwrap_err().desc, "Capability oob not available");
        assert_eq!(negotiate(&args(json!({}))), Ok(()));
    }

    #[test]
    fn names_are_unique_and_the_version_is_qemus() {
        for (i, c) in COMMANDS.iter().enumerate() {
            assert!(COMMANDS[..i].iter().all(|d| d.name != c.name), "{} twice", c.name);
        }
        assert_eq!(version()["qemu"], json!({"micro": 0, "minor": 2, "major": 8}));
    }
}
